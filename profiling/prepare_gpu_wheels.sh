#!/usr/bin/env bash
# Build .whl/ (what profiling/gpu_check.sh installs on the GPU machine) from pinned, hash-checked PyPI downloads,
# in one command, on a machine with PyPI access:
#
#   profiling/prepare_gpu_wheels.sh            # -> .whl/: 5 wheels, ~5.1 MiB (bitsandbytes slimmed to 3.4 MiB)
#   profiling/prepare_gpu_wheels.sh DIR        # somewhere else
#
# The pins and hashes are in profiling/gpu_wheels.txt; the wheels are for the machine's python 3.12 on x86-64
# (multiprocess ships one wheel per Python version). bitsandbytes keeps only its CUDA 13.0 and CPU libraries
# (profiling/gpu_wheels.py). git ignores .whl/ (.gitignore); the device tool carries it with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
download="$(mktemp -d)"
trap 'rm -rf "$download"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes -r profiling/gpu_wheels.txt \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$download"
mkdir -p "$dest"
rm -f "$dest"/*.whl  # one version of each: two stop the install there
for wheel in "$download"/*.whl; do
  case "$(basename "$wheel")" in
    bitsandbytes-*) python3 profiling/gpu_wheels.py "$wheel" "$dest/$(basename "$wheel")" ;;
    *) cp "$wheel" "$dest/" ;;
  esac
done
ls -l "$dest"
du -ch "$dest"/*.whl | tail -1
