"""``python -m edgeq.targets [PACKAGE]``: the registered target names, one a line; with PACKAGE, only the device
target its profile was built for (``make device-test`` takes its default ON from it)."""

from __future__ import annotations

import sys

from edgeq.errors import EdgeqError
from edgeq.targets import TARGETS, device_for


def main(argv: list[str]) -> int:
    if not argv:
        print("\n".join(TARGETS))
        return 0
    from edgeq.manifest import read_manifest

    try:
        print(device_for(read_manifest(argv[0]).to_dict()).name)
    except EdgeqError as exc:
        print(f"error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
