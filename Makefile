# d2norm entry points (README). Each target installs what it needs into ./.venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/cpu/faster_rcnn_R18_FPN_ghostbn.yaml

.PHONY: install demo test bench reproduce

install:
	bash scripts/install.sh

# Main job: generate the synthetic COCO-format set, train a tiny detector with a d2norm norm, COCO-evaluate.
demo: install
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG)

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) tools/benchmark_norms.py

# Paper effects at CPU scale (README): every experiment of d2norm/experiments, JSON + PNG into results/paper_effects.
REPRODUCE_ARGS ?=
reproduce: install
	$(PY) tools/reproduce.py $(REPRODUCE_ARGS)
