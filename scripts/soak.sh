#!/usr/bin/env bash
# Soak test of stop / kill / resume for score, embed, generate and train (see scripts/soak.py --help).
#   bash scripts/soak.sh --cycles 2                       # quick: ~2 cycles per task
#   bash scripts/soak.sh --cycles 20 --seed 1 --json soak.json
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
exec "$PY" "$ROOT/scripts/soak.py" "$@"
