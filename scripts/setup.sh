#!/usr/bin/env bash
# Create the venv and install jaxbooth with the torch backend and dev tools.
# torch goes first, pinned, in its own pip command: on this machine kind that is the local
# CPU build; asking for torch later (or letting another package ask) would pull CUDA wheels.
set -euo pipefail
VENV=${1:-.venv}
PY=${PY:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# PYTHONWARNINGS=ignore: setuptools' build backend prints a banner about editable installs on every install
PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install -q -e ".[dev]"
"$VENV/bin/python" -c "import jaxbooth, jax, torch; print('jaxbooth ready: jax', jax.__version__, 'torch', torch.__version__)"
