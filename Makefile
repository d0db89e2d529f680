# The three commands a new user (and CI) runs: make setup, make demo, make test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check
CONSTRAINTS := requirements/constraints.txt
SMOLLM2 := .cache/targets/smollm2
SMOLLM2_MOE := .cache/targets/smollm2-moe4

.PHONY: setup system-deps venv sglang-venv targets demo test test-fast check-cuda clean

setup: system-deps venv sglang-venv targets
	@echo "setup done: $(VENV)/bin/specforge-mcore is ready"

# Open MPI and Slurm for the launcher tests (Debian packages; needs root, warns and skips without).
system-deps:
	bash .ci/install-system-deps.sh

venv:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU torch wheel first, then everything else pinned to it (never a CUDA torch).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements/base.txt
	$(PIP) install -q -c $(CONSTRAINTS) --no-build-isolation -e .

sglang-venv:
	bash tests/export/make_sglang_venv.sh

targets:
	$(VENV)/bin/specforge-mcore prepare-target smollm2 --out $(SMOLLM2)
	$(VENV)/bin/specforge-mcore prepare-target smollm2 --upcycle-moe 4 --topk 2 --out $(SMOLLM2_MOE)

SF := $(VENV)/bin/specforge-mcore
DEMO_CONFIG := configs/demo-smollm2.yaml
DEMO_OUT := runs/demo-smollm2
EVAL_ARGS := --configs 3,1,4 7,1,8 --num-prompts 4 --max-new-tokens 32

# The whole path on the CPU default: target -> data -> draft vocab -> train -> export -> speculative decoding.
demo:
	$(SF) prepare-target smollm2 --out $(SMOLLM2)
	$(SF) prepare-data --config $(DEMO_CONFIG)
	$(SF) build-vocab --config $(DEMO_CONFIG) --out $(DEMO_OUT)/vocab.safetensors
	$(SF) train --config $(DEMO_CONFIG) --out $(DEMO_OUT) --overwrite
	$(SF) export --checkpoint $(DEMO_OUT) --out $(DEMO_OUT)/export --format sglang --overwrite
	$(SF) eval --target $(SMOLLM2) --draft $(DEMO_OUT)/export --prompts gsm8k $(EVAL_ARGS) --out $(DEMO_OUT)/eval-gsm8k
	$(SF) eval --target $(SMOLLM2) --draft $(DEMO_OUT)/export --prompts humaneval $(EVAL_ARGS) --out $(DEMO_OUT)/eval-humaneval

test:
	$(VENV)/bin/pytest -q -p no:cacheprovider --timeout=1800

test-fast:
	$(VENV)/bin/pytest -q -m "not slow" --timeout=900

check-cuda:
	bash csrc/check_cuda.sh

clean:
	rm -rf build *.egg-info specforge_mcore/_C*.so
