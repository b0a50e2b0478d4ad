# d2norm entry points (README). Each target installs what it needs into ./.venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/cpu/faster_rcnn_R18_FPN_ghostbn.yaml

.PHONY: install demo test bench reproduce gpu-bundle

install:
	bash scripts/install.sh

# Main job: generate the synthetic COCO-format set, train a tiny detector with a d2norm norm, COCO-evaluate.
# A second run into the same OUTPUT_DIR is refused (it would overwrite the first run's checkpoints): rerun with
# DEMO_ARGS=--overwrite (start over) or DEMO_ARGS=--resume.
DEMO_ARGS ?=
demo: install
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG) $(DEMO_ARGS)

# The suite runs one torch thread per test process (tests/conftest.py), so it is spread over the cores with
# pytest-xdist (one worker per core, at most 4: tests/conftest.py); TEST_ARGS= (e.g. "-n 0" for one process).
TEST_ARGS ?= -n auto
test: install
	$(PY) -m pytest -q $(TEST_ARGS)

# Speed (docs/speed.md): layer ratios vs BatchNorm2d at a ResNet and an RoI-head shape, detector ratios per backbone
# norm (and folded) at the CPU configs' 128 px and the main job's training ratios at 384 px, PreciseBN cost; JSON + PNG
# into $(BENCH_DIR), docs/speed.md regenerated from them.
# One thread by default: on a shared machine it is the stable measurement (BENCH_THREADS=2 for both cores).
BENCH_DIR ?= results/bench
BENCH_THREADS ?= 1
bench: install
	mkdir -p $(BENCH_DIR)
	OMP_NUM_THREADS=$(BENCH_THREADS) $(PY) tools/benchmark_norms.py --threads $(BENCH_THREADS) --json $(BENCH_DIR)/norms.json
	OMP_NUM_THREADS=$(BENCH_THREADS) $(PY) tools/benchmark_models.py --threads $(BENCH_THREADS) --fold --json $(BENCH_DIR)/models.json
	OMP_NUM_THREADS=$(BENCH_THREADS) $(PY) tools/benchmark_models.py --threads $(BENCH_THREADS) --models faster_rcnn_R18_FPN --image-size 384 --rounds 5 --json $(BENCH_DIR)/models_384.json
	$(PY) tools/bench_report.py $(BENCH_DIR)/norms.json $(BENCH_DIR)/models.json $(BENCH_DIR)/models_384.json --png $(BENCH_DIR)/norms.png --readme docs/speed.md

# Paper effects at CPU scale (README): every experiment of d2norm/experiments, JSON + PNG into results/paper_effects.
REPRODUCE_ARGS ?=
reproduce: install
	$(PY) tools/reproduce.py $(REPRODUCE_ARGS)

# What a bare GPU machine (no package registry) needs for tools/gpu_selfcheck.py: .gpu_bundle/ (<= 64 MiB), see
# scripts/make_gpu_bundle.py. GPU_BUNDLE_ARGS="--torchvision 0.26.0" adds torchvision for the machine's torch 2.11.
GPU_BUNDLE_ARGS ?=
gpu-bundle: install
	$(PY) scripts/make_gpu_bundle.py $(GPU_BUNDLE_ARGS)
