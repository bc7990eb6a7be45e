#!/usr/bin/env bash
# Every GPU figure in one call (bench/device_check.py --help): the repo's venv python, the repo on
# PYTHONPATH, an nvidia-smi summary first. Arguments go to device_check.py (--out, default
# device_check.json; --smoke for the CPU toy run; --sections; --budget-s).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$root/.venv/bin/python"
[ -x "$python" ] || python="$(command -v python3)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit,pstate --format=csv || true
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$root/bench/device_check.py" "$@"
