# d2norm entry points (README). Each target installs what it needs into ./.venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/cpu/faster_rcnn_R18_FPN_ghostbn.yaml

.PHONY: install demo test bench

install:
	bash scripts/install.sh

# Main job: generate the synthetic COCO-format set, train a tiny detector with a d2norm norm, COCO-evaluate.
demo: install
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG)

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) tools/benchmark_norms.py
