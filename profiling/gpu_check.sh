#!/usr/bin/env bash
# The GPU check (profiling/gpu_check.py says what each part does; profiling/GPU.md how to use a GPU window with it).
#
#   profiling/gpu_check.sh --out "$OUT"                      the first command: default parts, <= 6.5 min here
#   profiling/gpu_check.sh --out "$OUT" --parts second --budget-s 270     what a second command runs
#   profiling/gpu_check.sh --dry-run --out DIR               anywhere: lists the parts, writes only DIR/gpu_check_plan.md
#
# Wheels the machine lacks travel in .whl/ at the repository root (profiling/prepare_gpu_wheels.sh builds it; git
# ignores it). They are installed without network or dependency resolution into a folder whose path contains
# "site-packages": dill (which datasets uses) pickles modules from any other path by value, which breaks datasets.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's frugal_spin, whatever is installed
SITE="${GPU_CHECK_SITE:-/tmp/frugal_spin_gpu/site-packages}"

dry_run=0
budget=375
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --dry-run) dry_run=1 ;;
    --budget-s) budget="${args[i + 1]:-375}" ;;
    --budget-s=*) budget="${args[i]#--budget-s=}" ;;
  esac
done

if compgen -G ".whl/*.whl" > /dev/null; then
  if ((dry_run)); then
    echo "would install into $SITE: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
  else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH#"$PWD"}"
  fi
elif ((dry_run)); then
  echo "would install: nothing (no .whl/*.whl; bench_vs_trl would be skipped, stages need bitsandbytes)"
fi

if ((dry_run)); then
  exec python3 profiling/gpu_check.py "$@"
fi
# The driver starts no part past its budget; this is the hard stop (SIGTERM: it writes what it has, then exits).
exec timeout --kill-after=10 "$((budget + 30))" python3 profiling/gpu_check.py "$@"
