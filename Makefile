# dfl — every target that runs code installs what it needs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint pretrain-demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

DEMO_LOSSNET := models/lossnet_synthetic.pt

# The denoiser demo uses the loss network pretrained on synthetic scenes/tags; made once.
demo: install $(DEMO_LOSSNET)
	WANDB_MODE=offline $(BIN)/dfl-train experiment=demo

$(DEMO_LOSSNET):
	$(MAKE) pretrain-demo

pretrain-demo: install
	WANDB_MODE=offline $(BIN)/dfl-pretrain pretrain/experiment=demo

test: install
	WANDB_MODE=offline $(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/dfl-bench

lint: install
	$(BIN)/ruff check dfl datamodules callbacks tests

clean:
	rm -rf outputs multirun .pytest_cache
