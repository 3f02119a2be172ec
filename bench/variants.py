"""The variants `bench/bench.py` compares: one build function per variant, each from the same source model.

Every builder takes a ``BuildContext`` and returns a ``Built`` (the model file measured, the folder a runtime loads).
Peers quantize the FP32 export that every ORT row shares (``build_fp32``), with the settings their tools use:

* ``ort-dynamic-int8-cli``: what ``optimum-cli onnxruntime quantize --arm64`` runs: Optimum's ``ORTQuantizer`` with
  ``AutoQuantizationConfig.arm64(is_static=False, per_channel=False)`` (the CLI's ``--per_channel`` is off unless
  given): QOperator, u8 activations, one s8 symmetric scale per weight tensor.
* ``ort-dynamic-int8``: the same with ``per_channel=True`` (``--arm64 --per_channel``).
* ``ort-quantize-dynamic``: ONNX Runtime's ``quantize_dynamic`` with per_channel=True, otherwise its defaults (only MatMuls with
  a constant weight: ``MatMulConstBOnly``).
* ``ort-static-qdq``: ``AutoQuantizationConfig.arm64(is_static=True)``, per-channel, QDQ, MinMax ranges from ONNX
  Runtime's calibrator over edgeq's calibration text (Optimum's ``fit`` runs the same calibrator; it only needs a
  ``datasets.Dataset``, which edgeq does not depend on).
* ``ort-rtn-int4``: ``MatMulNBitsQuantizer`` RTN, block 32, symmetric, accuracy_level 4 (onnxruntime-genai's model
  builder CPU defaults), every constant MatMul.
* ``fused-rtn-int4`` (LLMs): the same RTN over edgeq.decoder's fused FP32 graph, the graph edgeq's package is built
  on (GroupQueryAttention, packed QKV, SkipSimplifiedLayerNorm), its tied head kept FP32 as in the row above. Against
  ``ort-rtn-int4`` it differs in the graph alone, against edgeq in the quantization alone (and edgeq's FP16 table,
  read as FP32 on x86 all the same), so "edgeq vs RTN" splits into fusion and quantization.
* ``llama.cpp Q4_0 / Q4_K_M / Q8_0`` (LLMs, extra ``llamacpp``): ``llama_model_quantize`` from the source GGUF with
  ``allow_requantize``. llama.cpp dequantizes each tensor to FP32 before quantizing it again, and the FP32 reference
  here is transformers' dequantization of that same GGUF, so every row starts from the same weights.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.report import ENCODER, LLM

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_PROFILE = ROOT / "export_profiles" / "android-arm64.toml"


@dataclass(frozen=True)
class BuildContext:
    threads: int  # intra-op threads of every engine (ONNX Runtime, onnxruntime-genai, llama.cpp)
    model_dir: Path
    kind: str  # ENCODER or LLM
    work: Path  # this model's bench folder; every variant writes into work/<variant>
    fp32_dir: Path  # the shared FP32 export (model.onnx, config, tokenizer)
    gguf: Path | None = None  # LLMs: a GGUF of the same weights, for the llama.cpp rows
    calibration_samples: int = 128  # encoders: texts, as the profile's calibration_samples
    calibration_windows: int = 8  # LLMs: windows, as the profile's llm.calibration_windows
    window_tokens: int = 512
    eval_windows: int = 16


@dataclass(frozen=True)
class Built:
    model_file: Path  # the artifact whose bytes are the row's size (.onnx, .ort or .gguf)
    runtime_dir: Path  # what the speed run loads: an onnxruntime-genai folder (LLM ONNX), or the model's folder
    note: str = ""


@dataclass(frozen=True)
class Variant:
    name: str
    kinds: tuple[str, ...]
    build: Callable[[BuildContext], Built]
    requires: str | None = None  # an importable module; the row is skipped with a reason when it is missing
    edgeq: bool = False

    def missing(self) -> str | None:
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return f"the `{self.requires}` module is not installed (pip install 'edgeq[llamacpp]')"
        return None


# ---------------------------------------------------------------------------------------------------- edgeq
def bench_profile(ctx: BuildContext) -> Path:
    """The bundled android-arm64 profile with the LLM budgets opened: the bench measures what edgeq produces
    instead of refusing it (the row shows whether the profile's budget would pass)."""
    text = BUNDLED_PROFILE.read_text()
    for key, value in {"model_kinds": '["encoder", "causal-lm"]', "max_ppl_increase": "10.0",
                       "min_top1_agreement": "0.0", "max_size_mb": "100000.0", "eval_windows": str(ctx.eval_windows),
                       "calibration_windows": str(ctx.calibration_windows)}.items():
        text, n = re.subn(rf"(?m)^{key} = [^#\n]*", f"{key} = {value} ", text)
        if n != 1:
            raise RuntimeError(f"{BUNDLED_PROFILE} has no single '{key} = ' line; update bench/variants.py")
    path = ctx.work / "bench-profile.toml"
    path.write_text(text)
    return path


def build_edgeq(ctx: BuildContext) -> Built:
    from edgeq.pipeline import ExportRequest, export_package
    from edgeq.progress import Progress

    out = ctx.work / "edgeq"
    pkg = export_package(ExportRequest(ctx.model_dir, str(bench_profile(ctx)), out_dir=out, force=True), Progress())
    return Built(pkg.path / pkg.manifest["model"]["file"], pkg.path,
                 "android-arm64 profile as bundled" + (", LLM budgets opened (see bench/variants.py)"
                                                      if ctx.kind == LLM else ""))


# ---------------------------------------------------------------------------------------------------- FP32
def build_fp32(ctx: BuildContext) -> Built:
    from edgeq.modelsource import inspect_model_dir
    from edgeq.stages.export import export

    exported = export(inspect_model_dir(ctx.model_dir), ctx.work / "fp32-work")
    if ctx.fp32_dir.exists():
        shutil.rmtree(ctx.fp32_dir)
    shutil.move(str(exported.onnx_path.parent), str(ctx.fp32_dir))
    shutil.rmtree(ctx.work / "fp32-work", ignore_errors=True)
    return _ort_built(ctx, ctx.fp32_dir / "model.onnx", "fp32", "optimum-onnx export, no quantization")


def _ort_built(ctx: BuildContext, model_file: Path, name: str, note: str) -> Built:
    """LLM ONNX models get an onnxruntime-genai folder (for the decode/prefill run); encoders run as they are."""
    if ctx.kind != LLM:
        return Built(model_file, model_file.parent, note)
    import onnx

    from llm_decode import _write_package  # bench/ is on sys.path (bench.py runs from it)

    genai_dir = ctx.work / name / "genai"
    _write_package(onnx.load(str(model_file)), ctx.fp32_dir, genai_dir, None, None)
    return Built(model_file, genai_dir, note)


# ---------------------------------------------------------------------------------------------------- ORT peers
def _arm64_config(is_static: bool, per_channel: bool = True):
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    return AutoQuantizationConfig.arm64(is_static=is_static, per_channel=per_channel)


def _build_optimum_dynamic(ctx: BuildContext, per_channel: bool) -> Built:
    from optimum.onnxruntime import ORTQuantizer

    name = "ort-dynamic-int8" if per_channel else "ort-dynamic-int8-cli"
    out = ctx.work / name
    ORTQuantizer.from_pretrained(ctx.fp32_dir, file_name="model.onnx").quantize(_arm64_config(False, per_channel), out)
    return _ort_built(ctx, out / "model_quantized.onnx", name,
                      "Optimum arm64 dynamic: QOperator, u8 activations, s8 symmetric "
                      + ("per-channel weights (`--arm64 --per_channel`)" if per_channel else
                         "per-tensor weights (`optimum-cli onnxruntime quantize --arm64`, its default)"))


def build_ort_dynamic(ctx: BuildContext) -> Built:
    return _build_optimum_dynamic(ctx, per_channel=True)


def build_ort_dynamic_cli(ctx: BuildContext) -> Built:
    return _build_optimum_dynamic(ctx, per_channel=False)


def build_ort_quantize_dynamic(ctx: BuildContext) -> Built:
    """ONNX Runtime's own ``quantize_dynamic`` entry point, per-channel. It differs from Optimum's arm64 config in
    one default that matters: ``MatMulConstBOnly`` (only MatMuls with a constant weight are quantized), which
    Optimum's ORTQuantizer does not set, so there attention's activation x activation MatMuls run in int8 too."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = ctx.work / "ort-quantize-dynamic"
    out.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(ctx.fp32_dir / "model.onnx", out / "model.onnx", per_channel=True, weight_type=QuantType.QInt8)
    return _ort_built(ctx, out / "model.onnx", "ort-quantize-dynamic",
                      "onnxruntime.quantization.quantize_dynamic defaults, per-channel s8 weights "
                      "(MatMulConstBOnly: activation x activation MatMuls stay FP32)")


class _Feeds:
    """An ONNX Runtime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def calibration_feeds(ctx: BuildContext, input_names: list[str]) -> list[dict[str, np.ndarray]]:
    """edgeq's calibration text, shaped as each model kind is calibrated by edgeq itself."""
    from transformers import AutoTokenizer

    from edgeq.textdata import CALIBRATION_FILE, load_texts

    tokenizer = AutoTokenizer.from_pretrained(str(ctx.fp32_dir), local_files_only=True)
    texts = load_texts(CALIBRATION_FILE).texts
    if ctx.kind == LLM:
        from edgeq.llm.evaluate import lm_session, token_windows, window_feeds

        sess = lm_session(ctx.fp32_dir / "model.onnx")
        return [window_feeds(sess, w) for w in token_windows(tokenizer, texts, ctx.window_tokens, ctx.calibration_windows)]
    from edgeq.runtime import batches

    return list(batches(tokenizer, texts[:ctx.calibration_samples], 128, input_names))


def build_ort_static(ctx: BuildContext) -> Built:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from optimum.onnxruntime import ORTQuantizer

    logging.getLogger().setLevel(logging.ERROR)  # one "Axis 1 is out-of-range" warning per LayerNorm weight
    out = ctx.work / "ort-static-qdq"
    out.mkdir(parents=True, exist_ok=True)
    config = _arm64_config(True)
    src = ctx.fp32_dir / "model.onnx"
    names = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]
    calibrator = create_calibrator(src, [str(o.value if hasattr(o, "value") else o) for o in config.operators_to_quantize],
                                   augmented_model_path=out / "augmented.onnx", calibrate_method=CalibrationMethod.MinMax)
    calibrator.collect_data(_Feeds(calibration_feeds(ctx, names)))
    ranges = calibrator.compute_data()
    del calibrator
    (out / "augmented.onnx").unlink(missing_ok=True)
    ORTQuantizer.from_pretrained(ctx.fp32_dir, file_name="model.onnx").quantize(config, out,
                                                                               calibration_tensors_range=ranges)
    what = f"{ctx.calibration_windows} x {ctx.window_tokens} tokens" if ctx.kind == LLM else \
        f"{ctx.calibration_samples} texts"
    return _ort_built(ctx, out / "model_quantized.onnx", "ort-static-qdq",
                      f"Optimum arm64 static: QDQ, u8 asymmetric activations (MinMax over {what} of edgeq's calibration "
                      "text), s8 symmetric per-channel weights" + (
                          "; calibrated with an empty KV cache, as the accuracy windows run, so the past-KV tensors "
                          "get no range (ONNX Runtime warns of a NaN zero point): decode speed is measured on that "
                          "graph as built" if ctx.kind == LLM else ""))


def build_ort_rtn(ctx: BuildContext) -> Built:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4)
    q = MatMulNBitsQuantizer(onnx.load(str(ctx.fp32_dir / "model.onnx")), algo_config=cfg)
    q.process()
    out = ctx.work / "ort-rtn-int4"
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(q.model.model, str(out / "model.onnx"))
    return _ort_built(ctx, out / "model.onnx", "ort-rtn-int4",
                      "MatMulNBits RTN, block 32, symmetric, accuracy_level 4 (GenAI builder CPU defaults); "
                      "embedding and a tied head stay FP32")


def build_fused_rtn(ctx: BuildContext) -> Built:
    from llm_decode import build_fused  # bench/ is on sys.path (bench.py runs from it)

    out = ctx.work / "fused-rtn-int4"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    summary = build_fused(ctx.model_dir, out, precision="int4", head="fp32")
    return Built(out / "model.onnx", out,
                 f"edgeq.decoder's fused FP32 graph ({summary}), quantized with the MatMulNBitsQuantizer settings "
                 "of 'ORT MatMulNBits RTN b32 sym acc4'; the tied head stays FP32 as there. Against that row: the "
                 "fused graph alone; against edgeq: the quantization alone")


# ---------------------------------------------------------------------------------------------------- llama.cpp
# llama.h's llama_ftype values (llama_cpp.LLAMA_FTYPE_MOSTLY_*), written out in case a binding drops a name
LLAMA_FTYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}


def llamacpp_builder(qtype: str) -> Callable[[BuildContext], Built]:
    def build(ctx: BuildContext) -> Built:
        import ctypes

        import llama_cpp

        if ctx.gguf is None:
            raise RuntimeError("the llama.cpp rows need --gguf (a GGUF of the same weights as MODEL)")
        out = ctx.work / f"llama.cpp-{qtype}"
        out.mkdir(parents=True, exist_ok=True)
        dst = out / f"model-{qtype}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", LLAMA_FTYPES[qtype])
        params.allow_requantize = True
        params.nthread = ctx.threads
        rc = llama_cpp.llama_model_quantize(str(ctx.gguf).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize to {qtype} failed with status {rc}")
        return Built(dst, out, f"llama-cpp-python {llama_cpp.__version__}, llama_model_quantize {qtype} "
                               f"from {ctx.gguf.name} (allow_requantize)")
    return build


VARIANTS: tuple[Variant, ...] = (
    Variant("FP32 (optimum export)", (ENCODER, LLM), build_fp32),
    Variant("edgeq android-arm64", (ENCODER, LLM), build_edgeq, edgeq=True),
    Variant("ORT dynamic INT8 (optimum-cli --arm64)", (ENCODER, LLM), build_ort_dynamic_cli),
    Variant("ORT dynamic INT8 per-channel (Optimum arm64)", (ENCODER, LLM), build_ort_dynamic),
    Variant("ORT quantize_dynamic INT8 per-channel", (ENCODER, LLM), build_ort_quantize_dynamic),
    Variant("ORT static QDQ (Optimum arm64)", (ENCODER, LLM), build_ort_static),
    Variant("ORT MatMulNBits RTN b32 sym acc4", (ENCODER, LLM), build_ort_rtn),
    Variant("ORT MatMulNBits RTN b32 sym acc4, edgeq's fused graph", (LLM,), build_fused_rtn),
    *(Variant(f"llama.cpp {q}", (LLM,), llamacpp_builder(q), requires="llama_cpp") for q in ("Q4_0", "Q4_K_M", "Q8_0")),
)


def variants_for(kind: str) -> list[Variant]:
    return [v for v in VARIANTS if kind in v.kinds]
