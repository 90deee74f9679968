#!/usr/bin/env bash
# Create `.venv-torch` (repository root): a CPU-only PyTorch + laplace-torch environment,
# separate from the JAX `.venv`, for the side-by-side benchmark in `torch_side.py`.
#
#   bash benchmarks/laplace_torch/setup_env.sh           # then:
#   .venv-torch/bin/python benchmarks/laplace_torch/torch_side.py in.npz out.json
#
# Environment variables:
#   PYTHON       interpreter for the venv (default: python3; CPython 3.10-3.13).
#   TORCH_SPEC   the torch requirement (default: torch==2.13.0+cpu, a CPU-only build).
#   VENV         where to create it (default: <repo>/.venv-torch).
#
# Why the steps look like this:
# - torch comes first. The CPU-only build (TORCH_SPEC, a `+cpu` local version) is taken
#   from the PyTorch CPU index or from a local `find-links` copy of it, with `--no-deps`
#   (it needs no nvidia-* wheel). If it is not available, the fallback is PyPI's `torch`,
#   which on Linux x86-64 is a CUDA build whose nvidia-*/cuda-* dependencies add several
#   GB: it cannot be installed with `--no-deps` instead, since `import torch` then fails
#   (`ImportError: libcudnn.so.9`: libtorch_cuda.so links the CUDA libraries at load
#   time, even on a machine without a GPU). Its small pure-Python dependencies are then
#   installed explicitly (a no-op after the fallback).
# - laplace-torch 0.3 and backpack-for-pytorch declare `torchvision`, but neither imports
#   it on the code paths used here (only backpack's MNIST example does); a PyPI torchvision
#   would pin and upgrade torch to a CUDA build. So they are installed with `--no-deps`
#   and their remaining (pure-Python) dependencies listed explicitly, all pinned.
#   `pip check` therefore reports torchvision as missing: expected.
# - laplace-torch 0.3 imports the `asdl` package, which PyPI ships as `asdfghjkl==0.1a4`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${VENV:-"$ROOT/.venv-torch"}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.13.0+cpu"}
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
start=$(date +%s)

"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
pip_() { "$PY" -m pip --disable-pip-version-check "$@"; }

echo "== torch (CPU build)"
if ! pip_ install --no-deps --timeout 30 --retries 1 --extra-index-url "$TORCH_CPU_INDEX" \
    "$TORCH_SPEC"; then
    echo "   $TORCH_SPEC unavailable; falling back to PyPI's torch (CUDA build, several GB)"
    pip_ install "torch<2.15"
fi
# torch's own (small, pure-Python) requirements, without the nvidia-* / triton ones.
pip_ install filelock "typing-extensions>=4.10" "sympy>=1.13.3" networkx jinja2 fsspec
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__)")
echo "   torch $TORCH_VERSION (cuda: $("$PY" -c "import torch; print(torch.version.cuda)"))"

echo "== laplace-torch and its backends (no torchvision)"
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"
pip_ install --no-deps \
    laplace-torch==0.3 \
    asdfghjkl==0.1a4 \
    backpack-for-pytorch==1.7.1 \
    curvlinops-for-pytorch==3.0.1
DEPS=("numpy>=1.24" "scipy>=1.12" "tqdm>=4.66" "opt-einsum>=3.4" "torchmetrics>=1.0"
    "einops>=0.3,<1" "unfoldNd>=0.2.0,<1" "einconv>=0.1.0" "linear_operator>=0.2.0")
# (tried twice: a transient index error once surfaced as a bogus ResolutionImpossible)
pip_ install -c "$CONSTRAINTS" "${DEPS[@]}" || pip_ install -c "$CONSTRAINTS" "${DEPS[@]}"

"$PY" -c "import laplace, torch; print('laplace-torch OK; torch', torch.__version__)"
echo "== pip check (torchvision is expected to be reported missing)"
pip_ check || true
echo "== done in $(($(date +%s) - start)) s; size $(du -sh "$VENV" | cut -f1)"
