#!/usr/bin/env bash
# Set up everything mabn needs on a fresh Debian machine: the Fashion-MNIST package and one virtual
# environment in .venv with torch 2.13.0, torchvision 0.28.0, timm, pycocotools and mabn with its
# test extras. One environment serves the library, the application and the tests: the zoo and
# detection tests need torchvision, and torchvision's wheels only load beside the registry's torch
# build (CUDA-enabled, CPU speed unchanged on a machine without a GPU), so that build is used for
# everything rather than keeping a second environment that would test against a different torch.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "== installing Debian package dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
# The machine's pip configuration points at a local CPU-only torch wheel, beside which torchvision
# fails to import; install from the registry alone. Versions are pinned: an open range pulls newer
# CUDA builds of several GB.
pip_registry() {
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null .venv/bin/pip install -q --disable-pip-version-check "$@" \
    2>&1 | grep -v "^WARNING: Location" || true
}
if ! .venv/bin/python -c "import torchvision" >/dev/null 2>&1; then
  echo "== installing torch 2.13.0 and torchvision 0.28.0 from the registry (about 2 minutes, 4.8 GB)"
  .venv/bin/pip uninstall -q -y torch torchvision >/dev/null 2>&1 || true
  pip_registry torch==2.13.0 torchvision==0.28.0
fi
pip_registry -e ".[test]"
# The fused CPU step is built with the machine's C compiler on first use; building it here (about 2 s,
# once per machine) keeps that out of the first training call and says at once whether it could be.
.venv/bin/python -c "import mabn._native as native; print('== fused CPU step:', native.status())"
.venv/bin/python -c "import torch, torchvision, timm, mabn; print(f'== ready: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, mabn {mabn.__version__}')"
