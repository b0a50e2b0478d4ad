#!/usr/bin/env bash
# Installs d2norm and everything it needs into a project-local virtual environment.
#
#   bash scripts/install.sh            # creates/updates ./.venv (override with D2NORM_VENV=path)
#
# Idempotent: a second run with unchanged constraints/setup.py only checks a stamp file.
#
# detectron2: there is no official detectron2 on the package registry. `pb1-detectron2==0.6` is an sdist whose
# Python package is identical to upstream v0.6 but lacks `layers/csrc`, so its setup.py cannot build. We
# download it, and install only its Python package as a normal, uninstallable distribution named
# `detectron2` (no C++ extension, none of its old install_requires pins). d2norm/compat.py closes the runtime
# gaps. If an importable detectron2 with a compiled `_C` already exists (e.g. built from GitHub), it is left
# alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${D2NORM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$ROOT/constraints.txt"
D2_SDIST_SPEC="pb1-detectron2==0.6"

log() { printf '[install] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

stamp_key="$(cat "$CONSTRAINTS" "$ROOT/setup.py" "$ROOT/scripts/install.sh" | sha256sum | cut -c1-16)"
stamp="$VENV/.d2norm-install-$stamp_key"
if [ -f "$stamp" ] && "$PY" -c "import d2norm, detectron2, torch" >/dev/null 2>&1; then
  log "environment up to date ($VENV)"
  exit 0
fi

start=$(date +%s)
# pip's own chatter about unreadable local index mirrors is noise on this machine; real errors still show.
quiet_pip() {
  local rc
  set +e
  "${PIP[@]}" "$@" 2>&1 | grep -v "^WARNING: Location 'file:"
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}

log "installing torch/torchvision and runtime dependencies (torch brings CUDA libraries, ~5 GB, first run only)"
quiet_pip install -q -c "$CONSTRAINTS" "setuptools>=70" wheel
quiet_pip install -q -c "$CONSTRAINTS" torch==2.15.0 torchvision==0.29.2
# detectron2 v0.6 runtime dependencies, declared here instead of its install_requires
# (which pins black==21.4b2, iopath<0.1.10, ...).
quiet_pip install -q -c "$CONSTRAINTS" \
  "pillow>=10" matplotlib pycocotools termcolor yacs tabulate cloudpickle tqdm tensorboard \
  fvcore iopath omegaconf hydra-core pytest \
  opencv-python-headless  # detectron2's Visualizer (tools/visualize.py); headless: no GUI libraries needed

if "$PY" -c "import detectron2._C" >/dev/null 2>&1; then
  log "a compiled detectron2 is already installed; leaving it alone"
elif "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('detectron2') == '0.6' else 1)" >/dev/null 2>&1; then
  log "detectron2 0.6 (Python package) already installed"
else
  log "installing detectron2 0.6 Python package from $D2_SDIST_SPEC"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  # --no-build-isolation: the sdist's setup.py imports torch just to produce metadata.
  quiet_pip download -q --no-deps --no-binary :all: --no-build-isolation "$D2_SDIST_SPEC" -d "$work/dl"
  tar -xzf "$work"/dl/pb1-detectron2-0.6.tar.gz -C "$work"
  src="$work/pb1-detectron2-0.6"
  mkdir -p "$work/pkg"
  cp -r "$src/detectron2" "$work/pkg/detectron2"
  rm -rf "$work/pkg/detectron2/layers/csrc"
  cat > "$work/pkg/setup.py" <<'EOF'
# Pure-Python distribution of detectron2 v0.6 (no compiled _C; see d2norm/compat.py).
from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="0.6",
    description="detectron2 v0.6 Python package (no C++ extension), installed by d2norm",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},
    include_package_data=False,
    python_requires=">=3.7",
    install_requires=[],
)
EOF
  quiet_pip install -q --no-deps --no-build-isolation "$work/pkg"
fi

log "installing d2norm (editable)"
# compat mode: the repository root becomes a sys.path entry (a .pth line), so a folder named d2norm in the
# working directory (e.g. an output folder) cannot shadow the package; setuptools' default editable finder
# runs after the path search, where such a folder already won as a namespace package. (--use-pep517: pip
# ignores --config-settings for a setup.py-only project otherwise.)
quiet_pip install -q --no-deps --no-build-isolation --use-pep517 -e "$ROOT" --config-settings editable_mode=compat

"$PY" - <<'EOF'
import d2norm, detectron2, torch, torchvision
from d2norm import compat
print(f"[install] torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"detectron2 {detectron2.__version__} (compiled ops: {compat.HAS_COMPILED_OPS}), d2norm {d2norm.__version__}")
EOF
rm -f "$VENV"/.d2norm-install-*
touch "$stamp"
log "done in $(( $(date +%s) - start )) s"
