#!/usr/bin/env bash
# Run kvtier's test suite (sets the environment up first when needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Ray (the kvtier[ray] extra) for the tests of kvtier serve --ray and the ray: tier
.venv/bin/python -c "import ray.serve" 2>/dev/null || \
  .venv/bin/python -m pip --disable-pip-version-check -q install -e ".[ray]"
exec .venv/bin/python -m pytest "$@"
