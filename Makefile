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
# The target's own answers (greedy, bf16), contexts of at most 288 tokens, answers of at most 224 (the training
# rows hold 512): the first turn of 250 ShareGPT conversations, and 400 GSM8K questions of the training source
# gsm8k:train (questions 500-899; `eval --prompts gsm8k` reads questions 0-499 only), so the draft learns both
# the chat and the served kind of prompt. Resumable: a rerun of `make demo` continues them, or skips them.
DEMO_REGEN_ARGS := --target $(SMOLLM2) --max-new-tokens 224 --max-turns 1 --max-context-tokens 288 --batch-size 32 \
	--dtype bfloat16
DEMO_REGEN_CHAT := regenerate sharegpt -o $(DEMO_OUT)/sharegpt-regen.jsonl --max-samples 250 $(DEMO_REGEN_ARGS)
DEMO_REGEN_MATH := regenerate gsm8k:train -o $(DEMO_OUT)/gsm8k-regen.jsonl --max-samples 400 $(DEMO_REGEN_ARGS)
# Speculative decoding of the export, fp32 target (exact, so the lossless check is token for token), 25
# prompts decoded together (chains; each prompt gets what it gets alone), both cores (the demo's steps run
# one after another; the automatic choice would count the finished training's load average).
DEMO_EVAL := --target $(SMOLLM2) --max-new-tokens 128 --batch-size 25 --spec-batch-size 25 --baseline-prompts 0 \
	--threads 2

# The whole path on the CPU default: target -> regenerated data -> draft vocab -> train (bf16, epoch 1 online
# writing the feature store, epochs 2+ from it) -> export -> speculative decoding against the untrained draft.
demo:
	$(SF) prepare-target smollm2 --out $(SMOLLM2)
	$(SF) $(DEMO_REGEN_CHAT)
	$(SF) $(DEMO_REGEN_MATH)
	$(SF) prepare-data --config $(DEMO_CONFIG)
	$(SF) build-vocab --config $(DEMO_CONFIG) --out $(DEMO_OUT)/vocab.safetensors
	$(SF) train --config $(DEMO_CONFIG) --out $(DEMO_OUT) --overwrite data.vocab_file=$(DEMO_OUT)/vocab.safetensors
	$(SF) train --config $(DEMO_CONFIG) --out $(DEMO_OUT)/untrained --overwrite train.max_steps=0 data.features=null \
		train.plot=false data.vocab_file=$(DEMO_OUT)/vocab.safetensors
	$(SF) export --checkpoint $(DEMO_OUT) --out $(DEMO_OUT)/export --format sglang --overwrite
	$(SF) export --checkpoint $(DEMO_OUT)/untrained --out $(DEMO_OUT)/untrained/export --format sglang --overwrite
	$(SF) eval $(DEMO_EVAL) --draft $(DEMO_OUT)/export --prompts gsm8k --configs 3,1,4 7,1,8 --num-prompts 50 \
		--out $(DEMO_OUT)/eval-gsm8k
	$(SF) eval $(DEMO_EVAL) --draft $(DEMO_OUT)/untrained/export --prompts gsm8k --configs 3,1,4 --num-prompts 20 \
		--out $(DEMO_OUT)/eval-gsm8k-untrained
	$(SF) eval $(DEMO_EVAL) --draft $(DEMO_OUT)/export --prompts humaneval --configs 3,1,4 --num-prompts 50 \
		--out $(DEMO_OUT)/eval-humaneval
	$(SF) eval $(DEMO_EVAL) --draft $(DEMO_OUT)/export --prompts sharegpt-heldout --configs 3,1,4 --num-prompts 25 \
		--out $(DEMO_OUT)/eval-sharegpt
	$(SF) eval-table trained=$(DEMO_OUT)/eval-gsm8k untrained=$(DEMO_OUT)/eval-gsm8k-untrained \
		trained=$(DEMO_OUT)/eval-humaneval trained=$(DEMO_OUT)/eval-sharegpt --out $(DEMO_OUT)/demo.md

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
