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

# Continual pretraining on a synthetic Sentinel-2 sample (random init: no weights are downloaded
# here; on a machine with the Hugging Face hub, drop --init random to start from DINOv2), judged on
# patches it never saw. Two folders from the sample generator: 240 patches to pretrain on (the
# health monitor holds out 0.15 of them, 36 patches) and 120 other patches (another seed) for the
# linear/k-NN evaluation of the starting weights and of the pretrained ones. ViT-Tiny/16 at 64 px
# (16 tokens): a model sized to 240 patches, cheap enough for 80 steps on 2 CPU cores. A random
# teacher embeds every scene alike, so the EMA teacher follows the student fast (0.9).
DEMO_DATA := outputs/demo-data
DEMO_MODEL := --plugin eo-sar --data $(DEMO_DATA)/pretrain --init random --backbone vit_tiny_patch16_224 \
	--img-size 64 --batch-size 16 --val-fraction 0.15
demo: install
	[ -e $(DEMO_DATA)/pretrain/s2 ] || $(BIN)/domainfm eo-sar sample $(DEMO_DATA)/pretrain --patches 240 --seed 0
	[ -e $(DEMO_DATA)/heldout/s2 ] || $(BIN)/domainfm eo-sar sample $(DEMO_DATA)/heldout --patches 120 --seed 1
	HF_HUB_OFFLINE=1 $(BIN)/domainfm pretrain $(DEMO_MODEL) --max-steps 80 --ema-momentum 0.9 --val-every 16 \
		--register eo-sar-demo --json outputs/demo.json
	HF_HUB_OFFLINE=1 $(BIN)/domainfm evaluate --plugin eo-sar --data $(DEMO_DATA)/heldout \
		--model models:/eo-sar-demo@candidate --json outputs/demo_eval.json
	# the same evaluation of the starting weights (--max-steps 0 exports them untouched): the
	# figure pretraining has to beat
	HF_HUB_OFFLINE=1 $(BIN)/domainfm pretrain $(DEMO_MODEL) --max-steps 0 --register eo-sar-demo-start \
		--json outputs/demo_start.json
	HF_HUB_OFFLINE=1 $(BIN)/domainfm evaluate --plugin eo-sar --data $(DEMO_DATA)/heldout \
		--model models:/eo-sar-demo-start@candidate --json outputs/demo_start_eval.json

# one worker per core (pytest-xdist), each test file on one worker (its module fixtures built once)
test: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -n auto --dist loadfile

benchmarks: install
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# Each paper's claim measured on small synthetic data over 3 seeds, with 95 % intervals (7.6 min
# on 2 idle CPU cores); writes benchmarks/claims/RESULTS.md and one PNG per claim. Not part of `make test`.
claims: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python benchmarks/claims/run_all.py
