"""Running the ``edgeq`` command line in-process and checking what a user mistake must look like."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from edgeq.cli import main


def edgeq(*args, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], input=stdin, prog_name="edgeq")


# The encoders extra absent, as beside transformers 5: with sys.modules["optimum"] = None every import of optimum
# raises ImportError. A subprocess of its own, so no other test's imports are touched.
WITHOUT_OPTIMUM = "import sys; sys.modules['optimum'] = None; from edgeq.cli import main; main()"


def edgeq_without_optimum(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_OPTIMUM, *map(str, args)], capture_output=True, text=True,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=600)


def assert_user_error(result: Result, out: Path | None = None, empty_out: bool = False) -> tuple[str, str]:
    """Exit 2, exactly one ``error:`` and one ``hint:`` line on stderr, nothing on stdout, no traceback, and nothing
    at ``out`` (with ``empty_out`` the folder itself may be there, empty: refusals found after OUT was made).
    Returns (error message, hint)."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an escaped Python exception
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    hints = [line[len("hint: "):] for line in lines if line.startswith("hint: ")]
    assert len(errors) == 1 and len(hints) == 1, result.stderr
    assert errors[0].strip() and hints[0].strip()
    if out is not None:
        assert not out.exists() or (empty_out and not any(out.iterdir())), sorted(p.name for p in out.rglob("*"))
    return errors[0], hints[0]
