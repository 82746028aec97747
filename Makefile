# dfl — every target that runs code installs what it needs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

LOCK := requirements/lock.txt
UV_VERSION := 0.13.9

.PHONY: install lock smoke demo compare test test-full bench lint pretrain-demo clean

install: $(STAMP)

# Every dependency at the exact version and hash of the lock, then dfl itself (editable, no deps),
# then a smoke check that loads every compiled extension.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m dfl.smoke
	touch $(STAMP)

# Re-resolve the lock from pyproject.toml's ranges (see CONTRIBUTING.md, "Dependencies").
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml requirements/build.in --extra test --universal \
		--python-version 3.10 --generate-hashes --upgrade -o $(LOCK)

smoke: install
	$(BIN)/python -m dfl.smoke

DEMO_LOSSNET := models/lossnet_synthetic.pt
# make demo's 15 minutes count from make's start, install and pretraining included: the training gets what is left
# of them less DEMO_RESERVE_S (corpus generation, test, report) as trainer.max_time, so a slower machine trains
# fewer of the 56 epochs (docs/demo_results.md). DEMO_BUDGET_S=100000 lifts the budget.
MAKE_START := $(shell date +%s)
DEMO_BUDGET_S ?= 900
DEMO_RESERVE_S ?= 120

# The denoiser demo uses the loss network pretrained on synthetic scenes/tags; made once. Then dfl-eval of the
# tested checkpoint on the same test split writes report.html into the run folder and prints where it is.
demo: install $(DEMO_LOSSNET)
	run=outputs/demo/runs/$$(date +%Y-%m-%d_%H-%M-%S) && \
	max_time=$$($(BIN)/python -m dfl.cli.time_left --start $(MAKE_START) --budget $(DEMO_BUDGET_S) \
		--reserve $(DEMO_RESERVE_S) --floor 120) && \
	WANDB_MODE=offline $(BIN)/dfl-train experiment=demo hydra.run.dir=$$run trainer.max_time=$$max_time && \
	WANDB_MODE=offline $(BIN)/dfl-eval experiment=eval_demo checkpoint=$$run hydra.run.dir=$$run/eval progress=false

$(DEMO_LOSSNET):
	$(MAKE) pretrain-demo

pretrain-demo: install
	WANDB_MODE=offline $(BIN)/dfl-pretrain pretrain/experiment=demo

# The method in miniature: the demo trained with each loss under the same data, steps, model and selection
# rule, each scored on the synthetic test split and (when present) the real pairs in REAL_PAIRS
# (noisy/ + clean/ folders), then one table. fl_random's random loss network has the pretrained one's shape.
COMPARE_LOSSES ?= fl l1 fl_random
COMPARE_METRICS := [pesq,stoi,si_sdr,dnsmos_ovrl]
REAL_PAIRS ?= ../shared/data/vbdmd_sample
compare: install $(DEMO_LOSSNET)
	set -e; dir=outputs/compare/$$(date +%Y-%m-%d_%H-%M-%S); rows=""; \
	if [ -d "$(REAL_PAIRS)/noisy" ]; then \
		mkdir -p $$dir/real_pairs && ln -s "$$(cd $(REAL_PAIRS) && pwd)/noisy" $$dir/real_pairs/testset_noisy && \
		ln -s "$$(cd $(REAL_PAIRS) && pwd)/clean" $$dir/real_pairs/testset_clean; \
	else echo "compare: no real pairs at $(REAL_PAIRS) (set REAL_PAIRS=): synthetic split only"; fi; \
	for loss in $(COMPARE_LOSSES); do \
		arch=""; [ $$loss = fl_random ] && arch="lossnet.n_layers=13 lossnet.base_channels=16"; \
		WANDB_MODE=offline $(BIN)/dfl-train experiment=demo loss=$$loss $$arch hydra.run.dir=$$dir/$$loss; \
		WANDB_MODE=offline $(BIN)/dfl-eval experiment=eval_demo checkpoint=$$dir/$$loss \
			hydra.run.dir=$$dir/$$loss/eval metrics=$(COMPARE_METRICS) progress=false; \
		rows="$$rows $$loss/synthetic=$$dir/$$loss/eval"; \
		if [ -d $$dir/real_pairs ]; then \
			WANDB_MODE=offline $(BIN)/dfl-eval checkpoint=$$dir/$$loss data_dir=$$dir/real_pairs \
				hydra.run.dir=$$dir/$$loss/eval_real metrics=$(COMPARE_METRICS) progress=false plots.num_spectrograms=0; \
			rows="$$rows $$loss/real=$$dir/$$loss/eval_real"; \
		fi; \
	done; \
	$(BIN)/python -m dfl.cli.demo_table $$rows | tee $$dir/compare.md

# The fast subset; test-full adds the slow end-to-end trainings (what CI runs).
test: install
	WANDB_MODE=offline $(BIN)/python -m pytest -q -m "not slow" tests

test-full: install
	WANDB_MODE=offline $(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/dfl-bench

lint: install
	$(BIN)/ruff check dfl datamodules callbacks tests

clean:
	rm -rf outputs multirun .pytest_cache
