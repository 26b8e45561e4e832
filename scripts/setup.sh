#!/usr/bin/env bash
# Idempotent install into ./.venv from the pinned constraints, plus the rs-embed reference wheel
# used by the parity tests. Needs Python 3.11+ and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,reference]"
# rshf (the ScaleMAE parity reference) pulls torchaudio, whose newest PyPI build (2.11) is compiled for
# another torch/CUDA than torch 2.15 and breaks `import transformers`. Nothing here needs audio.
.venv/bin/python -m pip uninstall -q -y torchaudio
# rs-embed vendors FoMo/TerraFM/AgriFM; its wheel needs Python >= 3.12 to install, so it is only
# downloaded and unpacked, and the parity tests import the vendored files from there.
REF=.cache/reference
if [ ! -d "$REF/rs_embed-0.3.1/rs_embed" ]; then
  mkdir -p "$REF"
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      rs-embed==0.3.1 -d "$REF"
  .venv/bin/python -m zipfile -e "$REF/rs_embed-0.3.1-py3-none-any.whl" "$REF/rs_embed-0.3.1"
fi
echo "environment ready: .venv"
