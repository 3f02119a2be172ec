"""The precision policy: for every recipe kind, one ``decide`` that returns a typed plan (per node: precision and
why) from measurements, before any pass runs; the passes carry the plan out and never decide.

  * encoder on CPU: ``decide_precision`` (edgeq/policy/encoder.py);
  * encoder on QNN HTP: ``decide_qnn_precision`` (edgeq/policy/qnn.py);
  * causal LM: ``decide_int4`` -> INT4/INT8 bits per linear layer, then ``decide_decoder_precision`` -> every node's
    precision (edgeq/policy/causal_lm.py).
"""

from edgeq.policy.causal_lm import (Int4Decision, Int4Facts, Int4Rules, LinearFacts, decide_decoder_precision,
                                    decide_int4, int4_rules, int4_setting)
from edgeq.policy.encoder import (HARD_RULES, SelectionStep, SelectionTarget, decide_precision, promotion_count,
                                  selection_met, selection_targets)
from edgeq.policy.plan import NodeDecision, PrecisionPlan, Sensitivity
from edgeq.policy.qnn import decide_qnn_precision

__all__ = ["HARD_RULES", "Int4Decision", "Int4Facts", "Int4Rules", "LinearFacts", "NodeDecision", "PrecisionPlan",
           "SelectionStep", "SelectionTarget", "Sensitivity", "decide_decoder_precision", "decide_int4",
           "decide_precision", "decide_qnn_precision", "int4_rules", "int4_setting", "promotion_count",
           "selection_met", "selection_targets"]
