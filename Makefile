# The three commands a new user (and CI) runs: make setup, make demo, make test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check
CONSTRAINTS := requirements/constraints.txt
SMOLLM2 := .cache/targets/smollm2
SMOLLM2_MOE := .cache/targets/smollm2-moe4

.PHONY: setup system-deps venv sglang-venv targets demo test test-fast check-cuda gpu-wheels gpu-check clean

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

# The GPU check (README "GPU check"). `make gpu-wheels` runs here (network): .whl/ gets the Megatron-Core
# wheel for the GPU node's Python, setuptools as a fallback for the C++/CUDA build, and the SmolLM2
# tokenizer files that configs/tiny.yaml reads (no weights). `make gpu-check` runs on the GPU node, offline.
GPU_WHEELS := .whl
GPU_PYTHON_VERSION ?= 3.12
GPU_MCORE ?= megatron-core==0.19.2
GPU_DOWNLOAD := $(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
	--python-version $(GPU_PYTHON_VERSION) --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
TOKENIZER_FILES := tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja \
	config.json generation_config.json

gpu-wheels:
	mkdir -p $(GPU_WHEELS)/fallback $(GPU_WHEELS)/tokenizer-smollm2
	rm -f $(GPU_WHEELS)/*.whl $(GPU_WHEELS)/fallback/*.whl
	$(GPU_DOWNLOAD) -d $(GPU_WHEELS) $(GPU_MCORE)
	$(GPU_DOWNLOAD) -d $(GPU_WHEELS)/fallback setuptools
	test -f $(SMOLLM2)/tokenizer.json || $(SF) prepare-target smollm2 --out $(SMOLLM2)
	for f in $(TOKENIZER_FILES); do \
		if [ -f $(SMOLLM2)/$$f ]; then cp $(SMOLLM2)/$$f $(GPU_WHEELS)/tokenizer-smollm2/; fi; \
	done
	@echo "$(GPU_WHEELS)/ for the GPU node ($$(du -sh $(GPU_WHEELS) | cut -f1)):"
	@find $(GPU_WHEELS) -type f | sort | xargs ls -l

# On the GPU node: GPU_CHECK_ARGS="--only build,tests" (or --dry-run) passes options to the script.
gpu-check:
	bash launch/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info specforge_mcore/_C*.so
