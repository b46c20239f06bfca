# Every routine action. The environment lives in .venv/ and is made on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo demo-qwen3-vl test check faults lint format bench bench-gpu clean clean-results status

# The demo and the tests never touch the network: every model is built here.
demo demo-qwen3-vl test check faults: export HF_HUB_OFFLINE := 1

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev,slurm]'
	touch $(STAMP)

# The demo's training and evaluation jobs each ask for 2 threads, all of --cores here;
# Snakemake hands a job its threads as OMP_NUM_THREADS, torch's thread count, on which the
# figures depend: readme_figures names it in the record of the machine.
demo: DEMO_THREADS := 2
demo: $(STAMP)
	$(BIN)/snakemake --cores $(DEMO_THREADS) --directory demo --configfile config/demo.yaml
	@echo
	@$(BIN)/robovqa-data-summary demo/results/data/metadata.json
	@echo
	@cat demo/results/ablation/report.md
	@echo
	@echo "Demo results in demo/results/: data/ (frames, JSONL, metadata.json); stage1/, stage2/,"
	@echo "  stage2_only/ (adapter/, metrics, tensorboard/, heartbeat.json, eval.json, predictions.jsonl,"
	@echo "  val_losses.jsonl);"
	@echo "  base/; ablation/ (report)"
	@echo
	$(BIN)/robovqa-readme-figures README.md demo/results/ablation/report.md \
		--threads $(DEMO_THREADS)
	@echo
	@$(BIN)/robovqa-status --directory demo

# The same demo on a tiny Qwen3-VL, its frames as one video (config/demo_qwen3_vl.yaml).
demo-qwen3-vl: $(STAMP)
	$(BIN)/snakemake --cores 2 --directory demo_qwen3_vl \
		--configfile config/demo.yaml config/demo_qwen3_vl.yaml
	@echo
	@cat demo_qwen3_vl/results/ablation/report.md
	@echo
	$(BIN)/robovqa-readme-figures README.md demo_qwen3_vl/results/ablation/report.md \
		--threads 2 --demo demo_qwen3_vl

# Every run's state, step, losses, speed, last checkpoint and ETA, from its files only:
# safe while a training runs, from any node, after a crash (DIR=demo: the demo's runs).
# No $(STAMP): reinstalling the venv under a running training must not happen here.
status:
	@$(BIN)/robovqa-status --directory $(or $(DIR),.)

# TensorFlow and torch must not share a process: one pytest run each, the data and the
# training side by side (each shown whole when it ends), then the kills, which take both
# cores. The fault suite (tests/faults/) is part of it, its kills at their default size.
# What CI runs.
test: $(STAMP)
	@$(MAKE) --no-print-directory --output-sync=target -j2 test-data test-training
	$(BIN)/python -m pytest tests/faults/kills

.PHONY: test-data test-training
test-data test-training: export HF_HUB_OFFLINE := 1
test-data: $(STAMP)
	$(BIN)/python -m pytest tests/data tests/faults/data
test-training: $(STAMP)
	$(BIN)/python -m pytest tests/training tests/faults/training

# The inner loop, a few minutes: lint, every test but those marked `slow` (multi-process
# training, the whole DAG under SLURM or a GCS emulator, the kill suite, which is slow
# throughout), and the whole DAG once at its smallest, killed and rerun (test_rerun.py).
# The two pytest processes run side by side, each shown whole when it ends.
check: lint
	@$(MAKE) --no-print-directory --output-sync=target -j2 check-data check-training

.PHONY: check-data check-training
check-data check-training: export HF_HUB_OFFLINE := 1
check-data: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" tests/data tests/faults/data
check-training: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" tests/training tests/faults/training

# The fault suite alone, at any size: FAULT_KILLS=100 FAULT_SEED=3 make faults (default
# 20 kills, seed 0). A failure prints the FAULT_PLAN=... that replays it.
faults: $(STAMP)
	$(BIN)/python -m pytest tests/faults/data
	$(BIN)/python -m pytest tests/faults/training
	$(BIN)/python -m pytest -s tests/faults/kills

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint --dry-run

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/snakefmt Snakefile rules

# Every CPU benchmark, side by side in one run (docs/performance.md has the figures).
bench: $(STAMP)
	$(BIN)/python bench/extract_frames.py
	$(BIN)/python bench/padding.py
	$(BIN)/python bench/dataloader.py
	$(BIN)/python bench/train_step.py --tiny
	$(BIN)/python bench/flops.py
	$(BIN)/python bench/eval_cost.py
	$(BIN)/python bench/family_cost.py
	test -f demo/results/data/stage1/train.jsonl || $(MAKE) demo
	$(BIN)/python bench/tree_epoch.py

# The full-size training step: needs a GPU (and 16 GB of disk for the random weights).
# It takes a GPU no job holds (robovqa-gpus), as a workflow job would.
bench-gpu: $(STAMP)
	$(BIN)/robovqa-gpus 1 $(BIN)/python bench/train_step.py \
		--workdir $(or $(BENCH_DIR),/tmp/robovqa-bench)

# The training step within a short GPU slot: `make gpu-wheels` puts the pins the slot's
# machine lacks in .whl/; the command to run there is in bench/gpu_slot.py's
# docstring. `make rehearse-gpu-slot` runs that command here at tiny size (CPU, float32)
# in what that machine has: a Python 3.12 environment (.venv-gpu-slot/) of the packages
# the slot uses, at the machine's versions (bench/gpu_env.py requirements), plus the
# carried wheels installed as the slot installs them, and nothing else; with a budget
# that leaves setups out (SLOT_ARGS="--budget-seconds 600" runs them all).
.PHONY: gpu-wheels rehearse-gpu-slot
SLOT_VENV := .venv-gpu-slot
SLOT_SITE := /tmp/robovqa-gpu-slot-site
gpu-wheels: $(STAMP)
	bash bench/fetch_gpu_wheels.sh

$(SLOT_VENV)/.installed-stamp: bench/gpu_image.txt bench/gpu_env.py pyproject.toml | $(STAMP)
	rm -rf $(SLOT_VENV)
	python312=$$(bash bench/python312.sh) || { echo "no Python 3.12 here: set" \
		"PYTHON312=/path/to/python3.12 (the GPU slot's machine runs 3.12)"; exit 1; }; \
		$$python312 -m venv $(SLOT_VENV)
	$(BIN)/python bench/gpu_env.py requirements > $(SLOT_VENV)/requirements.txt
	$(SLOT_VENV)/bin/pip install --quiet -r $(SLOT_VENV)/requirements.txt
	touch $@

rehearse-gpu-slot: gpu-wheels $(SLOT_VENV)/.installed-stamp
	rm -rf $(SLOT_SITE)
	$(SLOT_VENV)/bin/python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
		--upgrade --target $(SLOT_SITE) .whl/*.whl
	PYTHONPATH=$(SLOT_SITE):$(CURDIR) PYTHONUNBUFFERED=1 $(SLOT_VENV)/bin/python \
		bench/gpu_slot.py --tiny --out $(or $(SLOT_OUT),/tmp/robovqa-gpu-slot) \
		$(or $(SLOT_ARGS),--budget-seconds 60)

# What a rerun makes again cheaply: the demo's folder and the tools' caches.
clean:
	rm -rf demo demo_qwen3_vl .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

# The real run's results: the download (~66 GB), frames, checkpoints, adapters, reports.
# Says what it would delete; deletes only with CONFIRM=yes.
clean-results:
	@du -sh results logs benchmarks/*/ .snakemake 2>/dev/null || true
	@if [ "$(CONFIRM)" = yes ]; then rm -rf results logs .snakemake $$(ls -d benchmarks/*/ 2>/dev/null) && echo deleted; \
	else echo "the above would be deleted (downloads, checkpoints, every result): make clean-results CONFIRM=yes"; fi
