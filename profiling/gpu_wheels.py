"""Slim a bitsandbytes wheel to the native libraries one machine needs (used by profiling/prepare_gpu_wheels.sh).

bitsandbytes 0.50.2's wheel is 41 MiB because it carries a native library for every CUDA, ROCm and XPU version;
the lent GPU machine (torch 2.11+cu130) loads only `libbitsandbytes_cuda130.so`, and the CPU one is kept as the
fallback bitsandbytes looks for. Only 64 MiB travel with one command, so the wheel is rewritten without the others:
the same name and version, the removed files also removed from its RECORD (so pip's install manifest matches what
is there), everything else byte for byte.

    python profiling/gpu_wheels.py SRC.whl DEST.whl [--keep cuda130 --keep cuda132 --keep cpu]
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

LIBRARY = re.compile(r"(^|/)libbitsandbytes_([a-z0-9]+)\.(so|dll|dylib)$")
DEFAULT_KEEP = ("cuda130", "cpu")  # the machine's torch is 2.11+cu130; the CPU library is the fallback


def slim_wheel(src: Path, dest: Path, keep: tuple[str, ...] = DEFAULT_KEEP) -> list[str]:
    """Copy the wheel `src` to `dest` without the native libraries whose variant (the part after
    `libbitsandbytes_`) is not in `keep`; returns the names removed. Refuses to remove them all."""
    removed = []
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        drop = {n for n in names if (m := LIBRARY.search(n)) and m.group(2) not in keep}
        if drop and len(drop) == sum(1 for n in names if LIBRARY.search(n)):
            raise ValueError(f"{src.name}: keeping {keep} would remove every native library")
        record = next((n for n in names if n.endswith(".dist-info/RECORD")), None)
        tmp = dest.with_name(dest.name + ".partial")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if info.filename in drop:
                    removed.append(info.filename)
                    continue
                data = zin.read(info.filename)
                if info.filename == record:
                    lines = data.decode("utf-8").splitlines()
                    data = ("\n".join(line for line in lines if line.split(",", 1)[0] not in drop) + "\n").encode()
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    tmp.replace(dest)
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--keep", action="append", help=f"library variants to keep (default {', '.join(DEFAULT_KEEP)})")
    args = parser.parse_args(argv)
    removed = slim_wheel(args.src, args.dest, tuple(args.keep or DEFAULT_KEEP))
    print(f"{args.dest.name}: removed {len(removed)} native libraries, {args.dest.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
