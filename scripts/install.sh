#!/usr/bin/env bash
# Installs d2norm and everything it needs into a project-local virtual environment.
#
#   bash scripts/install.sh                                   # ./.venv with the registry's detectron2 v0.6
#   D2NORM_VENV=.venv-upstream D2NORM_DETECTRON2=<src> bash scripts/install.sh   # upstream detectron2 from <src>
#
#   D2NORM_VENV        the virtual environment (default ./.venv; a relative path is taken from the repo root)
#   D2NORM_TORCH, D2NORM_TORCHVISION
#                      another torch / torchvision pair than constraints.txt's (docs/install.md, "Supported
#                      versions"), e.g. D2NORM_TORCH=2.14.1 D2NORM_TORCHVISION=0.29.1 D2NORM_VENV=.venv-torch2.14
#   D2NORM_DETECTRON2  where detectron2 comes from: unset/empty = the registry's v0.6 Python package (below);
#                      otherwise an upstream detectron2 built with its C++ ops from a source tree (directory), an
#                      archive (.tar.gz/.tgz/.tar/.zip of a source tree) or a git URL (git+https://..., or any URL
#                      ending in .git). On a machine that can reach GitHub:
#                        D2NORM_DETECTRON2=git+https://github.com/facebookresearch/detectron2.git
#                      Built with FORCE_CUDA=0 when torch sees no CUDA, MAX_JOBS (default: all cores). The wheel
#                      built from an archive is cached in D2NORM_CACHE (default ~/.cache/d2norm), keyed by the
#                      archive's sha256, torch, Python and FORCE_CUDA.
#
# Idempotent: a second run with unchanged constraints/setup.py/installer/D2NORM_DETECTRON2 only checks a stamp.
#
# detectron2 v0.6 (default): there is no official detectron2 on the package registry. `pb1-detectron2==0.6` is an
# sdist whose Python package is identical to upstream v0.6 but lacks `layers/csrc`, so its setup.py cannot build.
# We download it and install only its Python package as a normal, uninstallable distribution named `detectron2`
# (none of its old install_requires pins), made importable on its own on today's stack: a `detectron2/_C.py`
# stand-in whose ops raise a clear error, `Image.LINEAR` -> `Image.BILINEAR` (Pillow >= 10), and a
# `pkg_resources` fallback in `model_zoo.py` (setuptools >= 81). d2norm/compat.py closes the remaining runtime gaps.
# If an importable detectron2 with a compiled `_C` already exists and D2NORM_DETECTRON2 is unset, it is left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${D2NORM_VENV:-$ROOT/.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
D2_SOURCE="${D2NORM_DETECTRON2:-}"
TORCH_VERSION="${D2NORM_TORCH:-$(sed -n 's/^torch==//p' "$ROOT/constraints.txt")}"
TORCHVISION_VERSION="${D2NORM_TORCHVISION:-$(sed -n 's/^torchvision==//p' "$ROOT/constraints.txt")}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$ROOT/constraints.txt"
D2_SDIST_SPEC="pb1-detectron2==0.6"

log() { printf '[install] %s\n' "$*" >&2; }

# Where upstream detectron2 comes from, checked before anything is installed.
D2_KIND=""
case "$D2_SOURCE" in
  "") ;;
  git+*|*.git|*.git@*) D2_KIND=git ;;
  *.tar.gz|*.tgz|*.tar|*.zip)
    [ -f "$D2_SOURCE" ] || { log "error: D2NORM_DETECTRON2=$D2_SOURCE: archive not found"; exit 2; }
    D2_SOURCE="$(cd "$(dirname "$D2_SOURCE")" && pwd)/$(basename "$D2_SOURCE")"; D2_KIND=archive ;;
  *)
    [ -f "$D2_SOURCE/setup.py" ] || {
      log "error: D2NORM_DETECTRON2=$D2_SOURCE is not a detectron2 source tree (no setup.py), an archive" \
          "(.tar.gz/.tgz/.tar/.zip) or a git URL (git+https://... or ending in .git)"; exit 2; }
    D2_SOURCE="$(cd "$D2_SOURCE" && pwd)"; D2_KIND=tree ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

stamp_key="$( (cat "$CONSTRAINTS" "$ROOT/setup.py" "$ROOT/scripts/install.sh" "$ROOT/scripts/make_detectron2_v06.py" \
  "$ROOT/d2norm/compiled_ops_stand_in.py"; echo "detectron2=$D2_SOURCE torch=$TORCH_VERSION/$TORCHVISION_VERSION") \
  | sha256sum | cut -c1-16)"
stamp="$VENV/.d2norm-install-$stamp_key"
# d2norm's CPU kernels (d2norm/layers/native.py) are compiled once into torch's extension cache (~50 s the first
# time, a hash check after): here, not in the middle of a training or a timed test
build_native() {
  "$PY" -c "from d2norm.layers.native import native_status; print('[install] d2norm native CPU kernels:', native_status())" 2>&1 \
    | grep -v "No CUDA runtime is found" || true
}
if [ -f "$stamp" ] && "$PY" -c "import d2norm, detectron2, torch" >/dev/null 2>&1; then
  build_native
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

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ -n "$D2_SOURCE" ]; then
  # Upstream detectron2 declares `iopath>=0.1.7,<0.1.10`; constraints.txt pins 0.1.10 for v0.6 (which declares
  # nothing once its install_requires are dropped). We honour upstream's own pin here -- what `pip install
  # git+https://github.com/facebookresearch/detectron2.git` resolves for a user -- so `pip check` is clean.
  sed 's/^iopath==.*/iopath==0.1.9/' "$CONSTRAINTS" > "$work/constraints.txt"
  CONSTRAINTS="$work/constraints.txt"
fi
# the torch pair (constraints.txt's unless D2NORM_TORCH / D2NORM_TORCHVISION say otherwise)
sed "s/^torch==.*/torch==$TORCH_VERSION/; s/^torchvision==.*/torchvision==$TORCHVISION_VERSION/" "$CONSTRAINTS" \
  > "$work/constraints-torch.txt"
CONSTRAINTS="$work/constraints-torch.txt"

log "installing torch/torchvision and runtime dependencies (torch brings CUDA libraries, ~5 GB, first run only)"
quiet_pip install -q -c "$CONSTRAINTS" "setuptools>=70" wheel
quiet_pip install -q -c "$CONSTRAINTS" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
# detectron2 v0.6 runtime dependencies, declared here instead of its install_requires
# (which pins black==21.4b2, iopath<0.1.10, ...).
quiet_pip install -q -c "$CONSTRAINTS" \
  "pillow>=10" matplotlib pycocotools termcolor yacs tabulate cloudpickle tqdm tensorboard \
  fvcore iopath omegaconf hydra-core pytest pytest-xdist \
  opencv-python-headless  # detectron2's Visualizer (tools/visualize.py); headless: no GUI libraries needed
if [ -n "$D2_SOURCE" ]; then
  # upstream's remaining runtime dependencies (its setup.py: black for LazyConfig.save's pretty-printing, packaging)
  quiet_pip install -q -c "$CONSTRAINTS" black packaging
fi

has_cuda="$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")"

install_upstream() {
  local target
  case "$D2_KIND" in
    git) target="$D2_SOURCE"; case "$target" in git+*) ;; *) target="git+$target" ;; esac ;;
    archive)
      mkdir -p "$work/src"
      case "$D2_SOURCE" in
        *.zip) "$PY" -m zipfile -e "$D2_SOURCE" "$work/src" ;;
        *) tar -xf "$D2_SOURCE" -C "$work/src" ;;
      esac
      target="$(dirname "$(find "$work/src" -maxdepth 2 -name setup.py | head -n1)")"
      [ -f "$target/setup.py" ] || { log "error: D2NORM_DETECTRON2=$D2_SOURCE: no setup.py in the archive"; exit 2; } ;;
    tree) target="$D2_SOURCE" ;;
  esac
  local force_cuda="${FORCE_CUDA:-}"
  if [ "$has_cuda" = 0 ]; then force_cuda=0; fi
  log "building upstream detectron2 from $D2_SOURCE (FORCE_CUDA=${force_cuda:-<unset>}," \
      "MAX_JOBS=${MAX_JOBS:-$(nproc)}; a few minutes)"
  # --no-build-isolation: its setup.py needs the installed torch; --no-deps: its dependencies are installed above.
  if [ "$D2_KIND" = archive ]; then
    # An archive is immutable: its wheel is built once per archive / torch / Python / CUDA setting and cached.
    local key cache
    key="$(sha256sum "$D2_SOURCE" | cut -c1-16)-$("$PY" -c 'import sys, torch
print(f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")')-cuda${force_cuda:-auto}"
    cache="${D2NORM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/d2norm}/detectron2-wheels/$key"
    if ! ls "$cache"/detectron2-*.whl >/dev/null 2>&1; then
      FORCE_CUDA="$force_cuda" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        quiet_pip wheel -q --no-build-isolation --no-deps -w "$work/wheel" "$target"
      mkdir -p "$cache" && cp "$work"/wheel/detectron2-*.whl "$cache"/
    else
      log "using the wheel built earlier from this archive: $cache"
    fi
    quiet_pip install -q --no-deps --force-reinstall "$(ls "$cache"/detectron2-*.whl | head -n1)"
  else
    FORCE_CUDA="$force_cuda" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      quiet_pip install -q --no-build-isolation --no-deps "$target"
  fi
  printf '%s\n' "$D2_SOURCE" > "$VENV/.d2norm-detectron2-source"
}

install_v06() {
  log "installing detectron2 0.6 Python package from $D2_SDIST_SPEC"
  # --no-build-isolation: the sdist's setup.py imports torch just to produce metadata.
  quiet_pip download -q --no-deps --no-binary :all: --no-build-isolation "$D2_SDIST_SPEC" -d "$work/dl"
  tar -xzf "$work"/dl/pb1-detectron2-0.6.tar.gz -C "$work"
  "$PY" "$ROOT/scripts/make_detectron2_v06.py" "$work/pb1-detectron2-0.6" "$work/pkg"
  quiet_pip install -q --no-deps --no-build-isolation "$work/pkg"
  rm -f "$VENV/.d2norm-detectron2-source"
}

stand_in_version="$(sed -n 's/^D2NORM_STAND_IN = //p' "$ROOT/d2norm/compiled_ops_stand_in.py")"
installed_source="$(cat "$VENV/.d2norm-detectron2-source" 2>/dev/null || true)"
if [ -n "$D2_SOURCE" ]; then
  if [ "$installed_source" = "$D2_SOURCE" ] && "$PY" -c "import detectron2._C" >/dev/null 2>&1; then
    log "upstream detectron2 from $D2_SOURCE already installed"
  else
    install_upstream
  fi
elif "$PY" -c "import detectron2._C as C, sys; sys.exit(hasattr(C, 'D2NORM_STAND_IN'))" >/dev/null 2>&1; then
  log "a compiled detectron2 is already installed; leaving it alone"
elif "$PY" -c "import importlib.metadata as m, sys, detectron2._C as C
sys.exit(0 if m.version('detectron2') == '0.6' and C.D2NORM_STAND_IN == $stand_in_version else 1)" >/dev/null 2>&1; then
  log "detectron2 0.6 (Python package) already installed"
else
  install_v06
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
build_native
rm -f "$VENV"/.d2norm-install-*
touch "$stamp"
log "done in $(( $(date +%s) - start )) s"
