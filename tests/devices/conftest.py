import pytest

from edgeq.devices.arm64 import DEFAULT_CACHE, ensure_runtime
from edgeq.errors import DeviceUnavailableError


@pytest.fixture(scope="module")
def arm64_runtime():
    """The arm64 runtime; the tests skip only when it cannot be built because apt is unavailable."""
    try:
        return ensure_runtime(DEFAULT_CACHE)
    except DeviceUnavailableError as exc:
        pytest.skip(f"arm64 runtime cannot be built here, apt is unavailable: {exc.message} ({exc.hint})")
