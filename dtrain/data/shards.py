"""Token shards on disk, and the cache's tokens.safetensors written from them and read back
memory-mapped.

A shard is three raw little-endian arrays next to each other: `<prefix>.ids` and `<prefix>.labels`
(int32, every example's tokens end to end) and `<prefix>.lengths` (int64, one per example).
`stream_safetensors` concatenates the shards of each dataset into the Ragged layout of the token
cache ({i}.offsets int64, {i}.ids, {i}.labels int32) a block at a time, so writing never holds a
dataset in memory; `mmap_safetensors` maps the file and returns tensors over the mapping (pages
are read when used, and shared with every process that maps the same file).
"""

from __future__ import annotations

import json
import shutil
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BLOCK = 1 << 22  # bytes copied per read
_DTYPES = {"I32": (np.int32, torch.int32), "I64": (np.int64, torch.int64)}


@dataclass(frozen=True)
class Shard:
    prefix: Path
    n_examples: int
    n_tokens: int


def write_shard(prefix: Path, ids: array, labels: array, lengths: array) -> Shard:
    """Write one shard's arrays (torch-free: tokenizing workers call this)."""
    for suffix, buf in ((".ids", ids), (".labels", labels), (".lengths", lengths)):
        with open(f"{prefix}{suffix}", "wb") as f:
            buf.tofile(f)
    return Shard(prefix, len(lengths), len(ids))


def stream_safetensors(path: Path, datasets: list[list[Shard]], metadata: dict[str, str]) -> None:
    """tokens.safetensors of the datasets' shards: per dataset offsets, then ids, then labels (each
    8-byte aligned: offsets are n+1 int64, ids and labels together 8 bytes a token)."""
    header, at = {"__metadata__": metadata}, 0
    for i, shards in enumerate(datasets):
        n_ex, n_tok = sum(s.n_examples for s in shards), sum(s.n_tokens for s in shards)
        for name, dtype, n, width in (
            (f"{i}.offsets", "I64", n_ex + 1, 8),
            (f"{i}.ids", "I32", n_tok, 4),
            (f"{i}.labels", "I32", n_tok, 4),
        ):
            header[name] = {"dtype": dtype, "shape": [n], "data_offsets": [at, at + n * width]}
            at += n * width
    text = json.dumps(header, separators=(",", ":"))
    text += " " * (-(len(text) + 8) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text.encode())
        for shards in datasets:
            _write_offsets(out, shards)
            for suffix in (".ids", ".labels"):
                for s in shards:
                    with open(f"{s.prefix}{suffix}", "rb") as f:
                        shutil.copyfileobj(f, out, BLOCK)


def _write_offsets(out, shards: list[Shard]) -> None:
    base = 0
    out.write(struct.pack("<q", 0))
    for s in shards:
        lengths = np.fromfile(f"{s.prefix}.lengths", dtype=np.int64)
        ends = np.cumsum(lengths, dtype=np.int64) + base
        out.write(ends.tobytes())
        base = int(ends[-1]) if len(ends) else base


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The int32 / int64 tensors of a safetensors file, over a copy-on-write mapping of it."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        np_dtype, torch_dtype = _DTYPES[info["dtype"]]
        a, b = info["data_offsets"]
        count = (b - a) // np.dtype(np_dtype).itemsize
        if count == 0:
            out[name] = torch.zeros(0, dtype=torch_dtype)
            continue
        # mode "c": writable (torch wants that) yet never written back; pages load on first use
        arr = np.memmap(path, dtype=np_dtype, mode="c", offset=8 + n + a, shape=(count,))
        out[name] = torch.from_numpy(arr)
    return out
