#!/usr/bin/env bash
# Thin wrapper: `launch/tpu.sh <subcommand> ...` == `python -m launch.tpu <subcommand> ...`,
# from any directory (the launcher itself needs only the standard library).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m launch.tpu "$@"
