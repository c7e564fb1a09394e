#!/usr/bin/env bash
# The GPU check in one command (see profiling/gpu_check.py for what it runs): ends within 8 minutes, writes
# profiling/gpu_check.md and profiling/gpu_check.csv.
#
#   profiling/gpu_check.sh            on a CUDA machine (e.g. the lent H200)
#   profiling/gpu_check.sh --dry-run  anywhere: lists the parts and the plan estimates, installs and writes nothing
#
# Wheels the machine lacks (bitsandbytes; trl and datasets for the TRL comparison) travel in .whl/ at the
# repository root (keep it out of git: `echo .whl/ >> .git/info/exclude`); they are installed, without network or
# dependency resolution, into /tmp/site, which goes first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's frugal_spin, whatever is installed

if [[ "${1:-}" == "--dry-run" ]]; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    echo "would install: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
  else
    echo "would install: nothing (no .whl/*.whl)"
  fi
  exec python3 profiling/gpu_check.py --dry-run
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site:$PYTHONPATH"
fi
# The driver stops starting parts at 7.5 minutes; this is the hard stop.
exec timeout --kill-after=10 475 python3 profiling/gpu_check.py "$@"
