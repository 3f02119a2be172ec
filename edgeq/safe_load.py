"""Loading from folders edgeq did not write (model folders, packages) without ever running their code.

transformers runs a folder's Python when a config names it (``auto_map``) and ``trust_remote_code`` allows it; left
unset, it asks "Do you wish to run the custom code? [y/N]" on stdin. edgeq refuses such folders before any load
(:func:`refuse_code`), passes ``trust_remote_code=False`` on every load, and loads with stdin on /dev/null so that
nothing can ever wait for, or take, an answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from edgeq.errors import ModelFolderError, UnsupportedModelError

CODE_KEY = "auto_map"  # the config key through which transformers imports a folder's own modules


@contextlib.contextmanager
def no_stdin() -> Iterator[None]:
    """sys.stdin reads from /dev/null inside the block: any prompt gets end-of-file, never a user's answer."""
    saved = sys.stdin
    with open(os.devnull) as null:
        sys.stdin = null
        try:
            yield
        finally:
            sys.stdin = saved


def _json_with_code_key(path: Path) -> bool:
    """The file is a JSON object with a top-level auto_map (where transformers reads it: config.json,
    tokenizer_config.json, processor and feature-extractor configs). A byte search first: tokenizer.json files of
    tens of MB are parsed only if the word occurs at all."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if CODE_KEY.encode() not in data:
        return False
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # not JSON transformers could read either
    return isinstance(obj, dict) and CODE_KEY in obj


def refuse_code(folder: Path, what: str = "model folder") -> None:
    """UnsupportedModelError if ``folder`` holds Python code or a JSON config naming custom code (anywhere below it)."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if name.endswith(".py"):
                raise UnsupportedModelError(
                    f"{what} {folder} holds Python code ({rel}); edgeq never runs code from a {what}",
                    f"delete {rel} (a model whose architecture ships with transformers needs no code of its own)"
                    if what == "model folder" else "edgeq writes no code into packages: re-export it from its model")
            if name.endswith(".json") and _json_with_code_key(path):
                raise UnsupportedModelError(
                    f"{folder} needs custom code ({rel} has '{CODE_KEY}'); edgeq never runs trust_remote_code",
                    f"use a model whose architecture ships with transformers (remove '{CODE_KEY}' from {rel} only "
                    "if the model does not need its code)" if what == "model folder" else
                    "edgeq writes no code into packages: re-export it from its model")


def load_tokenizer(folder: Path):
    """transformers' tokenizer of ``folder``: local files only, never remote code, no stdin."""
    from transformers import AutoTokenizer

    try:
        with no_stdin():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelFolderError(f"cannot load the tokenizer in {folder}: {exc}",
                               "check the tokenizer files are complete (re-save them with save_pretrained)") from exc
