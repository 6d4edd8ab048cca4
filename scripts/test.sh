#!/usr/bin/env bash
# Run kvtier's test suite (sets the environment up first when needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
