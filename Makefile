# `make demo` and `make test` work on a fresh machine: the first call builds .venv.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean gpu-suite

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch 2.13.0 (CPU) comes from the local wheel cache. numpy is imported by Triton's interpreter; numpy 2.4
	# breaks its loops over runtime bounds (triton-lang/triton#9171, fixed after Triton 3.6.0), hence < 2.4.
	$(VPY) -m pip install -q "torch==2.13.0" "triton==3.6.0" "numpy<2.4" "pytest>=8" "pytest-timeout>=2.3"
	# the models' checkpoints (safetensors) and the tests' Hugging Face reference models (transformers, tokenizers)
	$(VPY) -m pip install -q "safetensors>=0.4" "transformers>=4.51" "tokenizers>=0.19"
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/triton-dist demo

test: $(STAMP)
	$(VPY) -m pytest -q

# On a GPU machine (no venv: the image's python3 has torch and triton).
gpu-suite:
	bash scripts/gpu_suite.sh

clean:
	rm -rf $(VENV) build *.egg-info
