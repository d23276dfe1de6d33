# Two entry points for a new machine: `make demo` and `make test`.
# Both create .venv if missing, install torch/torchvision first (pinned; pip takes them from the
# local disk here), then the project with its dev extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean-demo benchmarks claims

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.torch-installed: $(BIN)/python
	$(BIN)/pip install $(TORCH_PINS)
	touch $@

$(VENV)/.installed: $(VENV)/.torch-installed pyproject.toml
	$(BIN)/pip install -e ".[dev,export]"
	touch $@

install: $(VENV)/.installed

# Continual pretraining on the embedded Sentinel-2 sample (random init: no weights are downloaded
# here; on a machine with the Hugging Face hub, drop --init random to start from DINOv2). A random
# teacher embeds every scene alike, so the demo lets the EMA teacher follow the student faster
# (0.9) than the 0.996 meant for long runs from DINOv2 weights.
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/domainfm pretrain --plugin eo-sar --init random --img-size 56 \
		--batch-size 16 --max-steps 60 --ema-momentum 0.9 --register eo-sar-demo --json outputs/demo.json
	HF_HUB_OFFLINE=1 $(BIN)/domainfm evaluate --plugin eo-sar --model models:/eo-sar-demo@candidate \
		--json outputs/demo_eval.json
	# the same evaluation of the starting weights (--max-steps 0 exports them untouched): the
	# figure pretraining has to beat
	HF_HUB_OFFLINE=1 $(BIN)/domainfm pretrain --plugin eo-sar --init random --img-size 56 \
		--batch-size 16 --max-steps 0 --register eo-sar-demo-start --json outputs/demo_start.json
	HF_HUB_OFFLINE=1 $(BIN)/domainfm evaluate --plugin eo-sar --model models:/eo-sar-demo-start@candidate \
		--json outputs/demo_start_eval.json

# one worker per core (pytest-xdist), each test file on one worker (its module fixtures built once)
test: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -n auto --dist loadfile

benchmarks: install
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# Each paper's claim measured on small synthetic data over 3 seeds, with 95 % intervals (about 20 min
# on 2 CPU cores); writes benchmarks/claims/RESULTS.md and one PNG per claim. Not part of `make test`.
claims: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python benchmarks/claims/run_all.py
