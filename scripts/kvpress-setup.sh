#!/usr/bin/env bash
# Set up the kvpress peer for `kvtier bench retrieval --peers kvpress` in its own environment,
# .venv-kvpress: kvpress 0.5.5 pins transformers < 5.3 while kvtier runs on transformers 5.x,
# so the two cannot share .venv. kvtier calls .venv-kvpress/bin/python on
# kvtier/bench/peers/kvpress_run.py with the same model folder and the same cases.
# Safe to run again: an environment that already imports kvpress is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=.venv-kvpress
PIP="$ENV/bin/python -m pip --disable-pip-version-check -q"
if [ -x "$ENV/bin/python" ] && "$ENV/bin/python" -c "import kvpress" 2>/dev/null; then
  echo "kvpress-setup: $ENV already has kvpress"; exit 0
fi
python3 -m venv "$ENV"
$PIP install --upgrade pip
# torch pinned to its CPU build, as in scripts/setup.sh (a bare torch requirement pulls CUDA wheels)
$PIP install "torch==2.13.0"
$PIP install "kvpress==0.5.5" "transformers>=4.56,<5.3"
"$ENV/bin/python" -c "import kvpress, transformers; print('kvpress-setup: ready: kvpress', \
__import__('importlib.metadata').metadata.version('kvpress'), '| transformers', transformers.__version__)"
