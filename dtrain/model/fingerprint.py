"""Short content hashes of what defines a run but is not in its config: the base model's files, the
tokenizer's vocabulary and the chat template. A resume compares them (resume_check.py).

The base is hashed from config.json and the weight index (model.safetensors.index.json, else every
safetensors file's header: names, dtypes, shapes, offsets), not from the weights themselves: reading
tens of GB at every start would cost minutes, and a new upload of a model changes its index too.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

SHORT = 12  # hex digits shown and stored: enough to tell two versions apart


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:SHORT]


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(min(n, 100 << 20))


def base(path: str | None) -> str | None:
    """Hash of a model directory's config.json and weight index (None: no directory, a random base)."""
    if not path or not Path(path).is_dir():
        return None
    d = Path(path)
    parts = [(d / "config.json").read_bytes() if (d / "config.json").is_file() else b""]
    index = d / "model.safetensors.index.json"
    if index.is_file():
        parts.append(index.read_bytes())
    else:
        parts += [f.name.encode() + _safetensors_header(f) for f in sorted(d.glob("*.safetensors"))]
    return _digest(parts)


def tokenizer(tok) -> str | None:
    """Hash of a tokenizer's vocabulary and special tokens (None: no tokenizer)."""
    if tok is None:
        return None
    vocab = sorted(tok.get_vocab().items())
    special = {k: str(v) for k, v in sorted(getattr(tok, "special_tokens_map", {}).items())}
    return _digest([json.dumps(vocab).encode(), json.dumps(special, sort_keys=True).encode()])


def text(value: str | None) -> str | None:
    """Hash of a text such as a chat template (None stays None)."""
    return None if value is None else _digest([value.encode()])
