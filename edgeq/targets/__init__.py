"""Device targets a package runs on, one registered ``Target`` each (protocol in edgeq.targets.base).

``edgeq verify --on``, ``edgeq targets [PACKAGE]``, ``make device-test`` and ``edgeq report`` read this registry; adding a
target is a module here with a class that implements the protocol, and one entry in ``TARGETS``.
"""

from __future__ import annotations

from edgeq.errors import UserInputError
from edgeq.profiles import CPU_EP, QNN_EP
from edgeq.targets.arm64 import Arm64Target
from edgeq.targets.base import InputShape, SampleRun, Target, input_shape, static_batches
from edgeq.targets.host import HostTarget
from edgeq.targets.qnn_htp import QnnHtpTarget

TARGETS: dict[str, Target] = {t.name: t for t in (HostTarget(), Arm64Target(), QnnHtpTarget())}

# the device a package's profile was built for, by its manifest's model.execution_provider (CPU EP: arm64 phones)
DEVICE_BY_EP = {QNN_EP: "qnn-htp", CPU_EP: "arm64"}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise UserInputError(f"unknown verification target '{name}'",
                             f"targets available: {', '.join(TARGETS)}") from None


def device_for(execution_provider: str | None) -> Target:
    """The device target for a package whose manifest records ``execution_provider`` (arm64 for a CPU package)."""
    return TARGETS[DEVICE_BY_EP.get(str(execution_provider), "arm64")]


__all__ = ["TARGETS", "InputShape", "SampleRun", "Target", "device_for", "get_target", "input_shape", "static_batches"]
