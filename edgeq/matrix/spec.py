"""The matrix file: models x profiles, with ``--set`` overrides, parsed with tomllib into frozen, checked records.

```toml
profiles = ["android-arm64", "ios-arm64", "my-phone.toml"]   # bundled names or .toml files
set = ["quantization.calibration_samples=64"]                  # every cell (as 'edgeq export --set')
device_check = false                                           # also run each package on its profile's device

[[model]]
path = "models/all-MiniLM-L6-v2"          # a model folder, or a .gguf file
name = "minilm"                           # optional: the package is <name>-<profile> (default: the model's own)
set = ["accuracy.min_mean_cosine=0.99"]   # this model's cells
memory_mb = 2500                          # optional: its declared peak memory instead of the estimate

[[cell]]                                  # overrides for the cells it matches (model, profile or both)
model = "minilm"
profile = "android-arm64"
set = ["quantization.sensitive_precision=w8a16"]
```

Paths are relative to the matrix file. Every key is checked: an unknown one is refused, with "did you mean" when it
is close to a known one (difflib ratio >= 0.8, as profiles are), a value of the wrong type names the key and the type.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import MatrixFileError
from edgeq.profiles import ProfileError, parse_setting

Settings = tuple[tuple[str, object], ...]


@dataclass(frozen=True)
class ModelEntry:
    model_dir: Path  # absolute: the folder, or the folder holding gguf_file
    gguf_file: str | None
    name: str | None  # the package name's stem; None: the model's own (folder or GGUF file name)
    settings: Settings
    memory_mb: int | None
    allow_pickle: bool


@dataclass(frozen=True)
class CellOverride:
    model: str | None  # a model's name or path as written; None: every model
    profile: str | None
    settings: Settings
    device_check: bool | None


@dataclass(frozen=True)
class MatrixSpec:
    path: Path
    models: tuple[ModelEntry, ...]
    profiles: tuple[str, ...]  # bundled names, or absolute .toml paths
    settings: Settings
    device_check: bool
    calibration: Path | None
    overrides: tuple[CellOverride, ...]


TOP_KEYS = {"profiles": list, "set": list, "device_check": bool, "calibration": str, "model": list, "cell": list}
MODEL_KEYS = {"path": str, "name": str, "gguf_file": str, "set": list, "memory_mb": int, "allow_pickle": bool}
CELL_KEYS = {"model": str, "profile": str, "set": list, "device_check": bool}
HINT = "see the matrix file format in 'edgeq matrix --help' and README.md ('Many models and targets')"


def _fail(path: Path, what: str, hint: str = HINT) -> MatrixFileError:
    return MatrixFileError(f"matrix file {path}: {what}", hint)


def _table(path: Path, data: object, keys: dict[str, type], where: str) -> dict:
    """``data`` checked against ``keys`` (name -> type): unknown keys refused with a close match, types checked."""
    if not isinstance(data, dict):
        raise _fail(path, f"{where} must be a table")
    for key, value in data.items():
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.8)
            if key in TOP_KEYS and keys is not TOP_KEYS:  # TOML puts a key written after [[model]] in that table
                top = ", ".join(k for k in TOP_KEYS if k not in ("model", "cell"))
                raise _fail(path, f"'{key}' is inside {where}",
                            f"write the top-level keys ({top}) before the first [[model]] or [[cell]] table")
            raise _fail(path, f"unknown key '{key}' in {where}",
                        f"did you mean '{close[0]}'?" if close else f"keys there: {', '.join(keys)}")
        want = keys[key]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise _fail(path, f"'{key}' in {where} must be {want.__name__}, got {type(value).__name__} {value!r}")
    return data


def _settings(path: Path, items: list, where: str) -> Settings:
    """``set = ["KEY=VALUE", ...]`` read as 'edgeq export --set' reads them; the profile loader checks the keys."""
    out = []
    for item in items:
        if not isinstance(item, str):
            raise _fail(path, f"'set' in {where} holds {item!r}; it takes strings KEY=VALUE",
                        'e.g. set = ["llm.symmetric=true"] (keys: edgeq profiles --fields)')
        try:
            out.append(parse_setting(item))
        except ProfileError as exc:
            raise _fail(path, f"'set' in {where}: {exc.message}", exc.hint) from None
    return tuple(out)


def _model(path: Path, data: object, index: int) -> ModelEntry:
    where = f"[[model]] {index + 1}"
    t = _table(path, data, MODEL_KEYS, where)
    if "path" not in t:
        raise _fail(path, f"{where} has no 'path'",
                    "path = a model folder, or a .gguf file (relative to the matrix file)")
    source = (path.parent / t["path"]).absolute()
    gguf = t.get("gguf_file")
    if source.suffix == ".gguf":
        if gguf:
            raise _fail(path, f"{where}: 'path' is a GGUF file and 'gguf_file' names another",
                        "give path = the folder with gguf_file = the file's name, or path = the .gguf file alone")
        source, gguf = source.parent, source.name
    if t.get("memory_mb", 1) < 1:
        raise _fail(path, f"{where}: memory_mb must be at least 1, got {t['memory_mb']}")
    return ModelEntry(source, gguf, t.get("name"), _settings(path, t.get("set", []), where), t.get("memory_mb"),
                      t.get("allow_pickle", False))


def _profile(path: Path, item: object) -> str:
    if not isinstance(item, str) or not item:
        raise _fail(path, f"'profiles' holds {item!r}; it takes profile names or .toml files")
    return str((path.parent / item).absolute()) if item.endswith(".toml") else item


def _override(path: Path, data: object, index: int) -> CellOverride:
    where = f"[[cell]] {index + 1}"
    t = _table(path, data, CELL_KEYS, where)
    if "model" not in t and "profile" not in t:
        raise _fail(path, f"{where} names neither a model nor a profile", "give model = ..., profile = ... or both")
    profile = t.get("profile")
    return CellOverride(t.get("model"), None if profile is None else _profile(path, profile),
                        _settings(path, t.get("set", []), where), t.get("device_check"))


def load_matrix(path: Path) -> MatrixSpec:
    """The matrix file at ``path``, every key checked (MatrixFileError, exit 2, otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise MatrixFileError(f"matrix file {path} {'is not a file' if path.exists() else 'does not exist'}",
                              "pass a .toml file listing models and profiles (README.md: 'Many models and targets')")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise _fail(path, f"not valid TOML: {exc}", "fix the syntax at the position given") from exc
    t = _table(path, data, TOP_KEYS, "the top level")
    if not t.get("model"):
        raise _fail(path, "no [[model]] tables", 'add one per model: [[model]] path = "models/NAME"')
    models = tuple(_model(path, m, i) for i, m in enumerate(t["model"]))  # first: a misplaced top-level key is here
    if not t.get("profiles"):
        raise _fail(path, "no profiles", 'add profiles = ["android-arm64", ...] at the top, before any [[model]]')
    profiles = tuple(_profile(path, p) for p in t["profiles"])
    if len(set(profiles)) != len(profiles):
        raise _fail(path, "a profile is listed twice in 'profiles'")
    calibration = t.get("calibration")
    return MatrixSpec(path.absolute(), models, profiles, _settings(path, t.get("set", []), "the top level"),
                      t.get("device_check", False),
                      None if calibration is None else (path.parent / calibration).absolute(),
                      tuple(_override(path, c, i) for i, c in enumerate(t.get("cell", []))))
