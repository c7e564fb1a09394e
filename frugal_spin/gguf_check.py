"""Is a GGUF file whole? Walks its header, metadata and tensor table with every length checked against the file's
size, and checks that the tensor data the table describes fits in the file, without reading any tensor.

Input: a path. Output: a `GGUFLayout` (version, counts, where the data starts and where it must end), or a
`UserError` saying where the file stops making sense: not a GGUF file, cut inside its header, its metadata (which
key), its tensor table (which tensor) or its tensor data (how many bytes short), or damaged (an unknown type code).

Why: `gguf.GGUFReader` (and transformers through it) reads a cut file as far as numpy lets it and then fails with
"When changing to a larger dtype, its size must be a divisor of the total size in bytes of the last axis of the
array", an IndexError or a struct.error, depending on where the cut is; a partial download is the usual cause and
its owner needs to hear that. The layout is the one the gguf package writes (GGUF v2/v3, little-endian):
magic, version u32, tensor count u64, key-value count u64, the key-value pairs, the tensor infos (name, dims,
type, offset), padding to `general.alignment`, the data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from frugal_spin.errors import UserError

# Fixed sizes of GGUF's scalar value types (GGUFValueType): uint8 int8 uint16 int16 uint32 int32 float32 bool,
# 8 = string, 9 = array, uint64 int64 float64.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 8


@dataclass
class GGUFLayout:
    version: int
    tensors: int
    keys: int
    data_start: int
    data_end: int  # where the last tensor ends: the file must be at least this long


class _Cut(Exception):
    """The file ended (or said something impossible) where more was expected."""


class _Reader:
    def __init__(self, data, size: int):
        self.data, self.size, self.pos = data, size, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise _Cut(f"needs {n:,} bytes at byte {self.pos:,}")
        out = self.data[self.pos: self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> bytes:
        return self.take(self.u64())

    def skip_value(self, kind: int) -> None:
        if kind in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[kind])
        elif kind == _STRING:
            self.string()
        elif kind == _ARRAY:
            item, count = self.u32(), self.u64()
            if item in _SCALAR_SIZES:
                self.take(_SCALAR_SIZES[item] * count)
            elif item == _STRING:
                for _ in range(count):
                    self.string()
            else:
                raise ValueError(f"an array of unknown value type {item} at byte {self.pos:,}")
        else:
            raise ValueError(f"unknown metadata value type {kind} at byte {self.pos:,}")


def check_gguf_file(path: Path, what: str = "model.name") -> GGUFLayout:
    """The layout of a whole GGUF file, or a UserError naming `what` and where `path` is cut or damaged."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 4 or f.read(4) != b"GGUF":
                raise UserError(f"{what}: {path} is not a GGUF file (it does not start with the bytes GGUF)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _walk(_Reader(data, size), path, what)
    except OSError as exc:
        raise UserError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def _walk(r: _Reader, path: Path, what: str) -> GGUFLayout:
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    part = "its header"
    try:
        r.take(4)
        version = r.u32()
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (this reader knows 2 and 3)")
        tensors, keys = r.u64(), r.u64()
        alignment = 32
        for i in range(keys):
            part = f"its metadata, key {i + 1} of {keys:,}"
            key = r.string()
            kind = r.u32()
            if key == b"general.alignment" and kind == 4:
                start = r.pos
                alignment = r.u32()
                if alignment == 0 or alignment & (alignment - 1):
                    raise ValueError(f"general.alignment {alignment} at byte {start:,} is not a power of 2")
            else:
                r.skip_value(kind)
        data_end_rel = 0
        for i in range(tensors):
            part = f"its tensor table, tensor {i + 1} of {tensors:,}"
            name = r.string()
            dims = r.u32()
            if dims > MAX_DIMS:
                raise ValueError(f"tensor {name[:60]!r} has {dims} dimensions")
            shape = [r.u64() for _ in range(dims)]
            kind, offset = r.u32(), r.u64()
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name[:60]!r} has unknown type {kind}") from None
            elements = int(np.prod(shape, dtype=object)) if shape else 1
            data_end_rel = max(data_end_rel, offset + elements // block * block_bytes)
    except _Cut as exc:
        raise UserError(f"{what}: {path} is truncated: the file ends inside {part} ({exc}; the file has "
                        f"{r.size:,} bytes); download or copy it again") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{what}: {path} is damaged inside {part}: {exc}") from None
    data_start = r.pos + (-r.pos % alignment)
    data_end = data_start + data_end_rel
    if data_end > r.size:
        raise UserError(f"{what}: {path} is truncated: its tensor data needs {data_end:,} bytes, the file has "
                        f"{r.size:,}; download or copy it again")
    return GGUFLayout(version, tensors, keys, data_start, data_end)
