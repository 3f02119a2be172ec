"""edgeq.families: the registry's lookups and entries, refusals before any work (tiny GGUFs written by the ``gguf``
package, through the CLI), and ``edgeq families``."""

from __future__ import annotations

import importlib
import json
import re
import time
from pathlib import Path

import pytest
from cli_results import assert_user_error, edgeq
from tiny_gguf import tiny_gguf

from edgeq.errors import UnsupportedModelError
from edgeq.families import (CAUSAL_LM, ENCODER, FAMILIES, LINE, OPTIMUM, Family, by_gguf_arch, by_model_type,
                            describe, gguf_archs_exported, supported_gguf_archs, supported_model_types)
from edgeq.llm.genai import genai_model_type

ROOT = Path(__file__).resolve().parent.parent


def test_lookups_by_model_type_and_gguf_arch():
    assert by_model_type("gemma3_text").supported and by_model_type("gemma3_text").name == "gemma3"
    assert by_model_type("gemma3") is by_gguf_arch("gemma3") and not by_gguf_arch("gemma3").supported
    assert by_gguf_arch("llama").model_types == ("llama",) and by_model_type("bert").kind == ENCODER
    assert by_model_type("wav2vec2") is None and by_gguf_arch("bert") is None and by_gguf_arch("") is None
    assert supported_gguf_archs() == ["llama", "phi3", "qwen2"]
    assert gguf_archs_exported() == ["llama", "qwen2"]  # phi3: tensors read, export untested (families.GGUF_EXPORT)
    assert "gemma2" not in supported_model_types(CAUSAL_LM) and "llama" in supported_model_types(CAUSAL_LM)


def test_entries_are_checked_when_made():
    with pytest.raises(ValueError, match="needs its onnxruntime-genai type"):
        Family("x", CAUSAL_LM, ("x",), ("XForCausalLM",))
    with pytest.raises(ValueError, match="bad kind"):
        Family("x", "vision", ("x",), ("XModel",))


def test_every_supported_causal_lm_has_a_runtime_type_and_others_none():
    for f in FAMILIES:
        if f.kind == CAUSAL_LM and f.supported:
            assert genai_model_type(f.model_types[0]) == f.runtime_type
        else:
            with pytest.raises(UnsupportedModelError, match=f"does not support model_type '{f.model_types[0]}'"):
                genai_model_type(f.model_types[0])


def test_verified_names_only_test_files_that_exist():
    """``verified`` states what tests cover: every test file it names is in the repository."""
    named = {m for f in FAMILIES for text in f.verified for m in re.findall(r"tests/[\w/]+\.py", text)}
    assert named and all((ROOT / path).is_file() for path in named), sorted(named)
    assert all(f.verified for f in FAMILIES if f.kind == CAUSAL_LM)  # every causal LM family claimed is tested


def test_transformers_ranges_are_pyprojects_and_hold_the_tested_releases():
    """A family's transformers range is what pip installs it with: causal LMs the core dependency's floor or later,
    uncapped (optimum-onnx is not a core dependency); encoders the encoders extra's range. Every release its tests
    passed with lies in it."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    extra = {Requirement(r).name: Requirement(r).specifier for r in project["optional-dependencies"]["encoders"]}
    assert "optimum-onnx" not in core and "optimum-onnx" in extra
    (floor,) = core["transformers"]
    assert floor.operator == ">="  # no cap
    for f in (f for f in FAMILIES if f.supported):
        spec = SpecifierSet(f.transformers)
        if f.exporter == OPTIMUM:
            assert spec == extra["transformers"], f.name
        else:
            (since,) = spec
            assert since.operator == ">=" and Version(since.version) >= Version(floor.version), f.name
        assert all(v in spec for v in f.transformers_tested), f.name
        # a release is claimed only for a family some test exports
        assert bool(f.transformers_tested) == (f.verified != ()), f.name


def test_families_command_prints_every_family_within_the_line_width():
    result = edgeq("families")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= LINE
    rows = {line.split()[0]: line.split() for line in lines[1:] if not line.startswith(" ")}
    assert list(rows) == [f.name for f in FAMILIES]
    assert rows["llama"] == ["llama", "causal-lm", "llama", "llama", "edgeq-decoder", "llama", "supported"]
    assert rows["bert"][4] == "optimum" and rows["bert"][3] == "-"
    assert rows["gemma3"][-1] == "supported" and rows["gemma3-multimodal"][-1] == "REFUSED"
    text = " ".join(line.strip() for line in lines)
    assert "refused: edgeq's decoder builder has no Gemma-2 yet (attention logit soft-capping" in text
    assert "real checkpoint: SmolLM2-135M-Instruct" in text and "all-MiniLM-L6-v2" in text


def test_families_command_json_is_the_registry():
    result = edgeq("families", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == [describe(f) for f in FAMILIES]
    gemma2 = next(d for d in data if d["name"] == "gemma2")
    assert gemma2["status"] == "refused" and "soft-capping" in gemma2["reason"] and gemma2["gguf_arch"] == "gemma2"


def export_gguf(folder: Path, name: str, out: Path):
    return edgeq("export", folder, "--gguf-file", name, "--profile", "android-arm64", "-o", out)


def test_gemma2_gguf_is_refused_with_the_gemma2_reason(tmp_path):
    tiny_gguf(tmp_path / "g2.gguf", "gemma2", context_length=8192)
    error, hint = assert_user_error(export_gguf(tmp_path, "g2.gguf", tmp_path / "out"), tmp_path / "out")
    assert "(GGUF architecture 'gemma2') is a gemma2 causal LM, which edgeq refuses" in error
    assert "soft-capping" in error and "Gemma-3 is" in hint


def test_gguf_of_a_family_that_cannot_be_packaged_is_refused_before_dequantization(tmp_path):
    """A Gemma-3 GGUF once ran 16.5 minutes before packaging refused it; the header alone refuses it (edgeq's GGUF
    reader does not map Gemma-3 tensors; the text checkpoint's safetensors are exported)."""
    tiny_gguf(tmp_path / "g3.gguf", "gemma3", context_length=32768)
    importlib.import_module("edgeq.pipeline")  # the timed refusal measures the checks, not ~3 s of first imports
    start = time.monotonic()
    result = export_gguf(tmp_path, "g3.gguf", tmp_path / "out")
    elapsed = time.monotonic() - start
    error, hint = assert_user_error(result, tmp_path / "out")
    assert "is a gemma3-multimodal causal LM, which edgeq refuses" in error and "Gemma-3 GGUF files" in error
    assert "gemma3_text" in hint
    assert elapsed < 5, elapsed  # measured ~0.1 s: no model was loaded


# GGUF architecture -> the tests/decoder/tiny.py variant written as that GGUF; a tiny model learns nothing, so the
# accuracy budget is opened (SmolLM2's slow test carries the real bar)
GGUF_TINY = {"llama": "llama", "qwen2": "qwen2"}
TINY_LLM = [x for k, v in (("llm.window_tokens", 128), ("llm.context_length", 128), ("llm.max_ppl_increase", 1.0),
                           ("llm.min_top1_agreement", 0.0)) for x in ("--set", f"{k}={v}")]


@pytest.mark.parametrize("arch", gguf_archs_exported())
def test_each_gguf_architecture_claimed_end_to_end_exports_with_gguf_file(arch, tmp_path):
    """What the README lists as working end to end from GGUF: a Q8_0 GGUF (metadata, vocabulary, chat template as
    llama.cpp writes them) through `edgeq export --gguf-file`, verified, with every tensor counted as dequantized."""
    from decoder.gguf_files import write_gguf
    from decoder.tiny import checkpoint

    folder = tmp_path / "gguf"
    folder.mkdir()
    write_gguf(checkpoint(GGUF_TINY[arch], tmp_path / "hf"), folder / f"tiny-{arch}.gguf", "Q8_0", chat_template=True)
    out = tmp_path / "out"
    result = edgeq("export", folder, "--gguf-file", f"tiny-{arch}.gguf", "--profile", "android-arm64", "-o", out,
                   *TINY_LLM)
    assert result.exit_code == 0, result.output
    pkg = out / f"tiny-{arch}-android-arm64"
    assert result.stdout.startswith(f"wrote {pkg}\n")
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["source"]["gguf_file"] == f"tiny-{arch}.gguf" and manifest["source"]["model_type"] == arch
    assert re.search(rf"^\[\s*[\d.]+s\] dequantize: every tensor of tiny-{arch}.gguf", result.stderr, re.M)
    counted = re.findall(r"^\[\s*[\d.]+s\]   dequantized tensor (\d+)/(\d+)$", result.stderr, re.M)
    assert counted and counted[0][0] == "1" and counted[-1][0] == counted[-1][1], result.stderr
    assert edgeq("verify", pkg).exit_code == 0


def test_gguf_of_an_unknown_architecture_names_the_ones_edgeq_takes(tmp_path):
    tiny_gguf(tmp_path / "s.gguf", "stablelm")
    error, hint = assert_user_error(export_gguf(tmp_path, "s.gguf", tmp_path / "out"), tmp_path / "out")
    assert "holds a 'stablelm' model, which is not a causal LM family edgeq exports from GGUF" in error
    assert hint == "--gguf-file takes the GGUF architectures llama, phi3, qwen2"


def edgeq_imports(module: str) -> set[str]:
    """The edgeq modules a source file imports, lazy imports inside functions included."""
    import ast

    tree = ast.parse((ROOT / module).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return {n for n in names if n == "edgeq" or n.startswith("edgeq.")}


def test_the_registry_is_bottom_layer_and_modelsource_reads_no_llm_module():
    assert edgeq_imports("edgeq/families.py") <= {"edgeq.errors"}
    # modelsource once imported llm/gguf_source, which imports modelsource: the GGUF header reader lives here now
    assert not any(m.startswith("edgeq.llm") for m in edgeq_imports("edgeq/modelsource.py"))
    assert "edgeq.modelsource" in edgeq_imports("edgeq/llm/gguf_source.py")
