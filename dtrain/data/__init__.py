"""Datasets from local files -> tokenized examples -> the batches each rank sees at each step.

Formats (data.format): `text`, `instruction`, `alpaca`, `messages`, `sharegpt` (encode.py, chat.py).
Examples longer than data.seq_len are dropped, truncated or rejected (data.truncation); an example
with no labelled token never reaches training. Examples are held ragged (flat token arrays + offsets,
ragged.py); rows hold one example each or several (data.packing: best fit, packing.py), and a
micro-batch is cut to its longest row (rows.py). Several datasets mix by weight (sources.py); rank 0 tokenizes once into a
token cache the other ranks and later runs read (cache.py, pipeline.py). The batch plan (plan.py) is a
pure function of (seed, step, rank), so a resumed run sees exactly the batches the uninterrupted one would.
"""

from dtrain.data.encode import Encoded, encode
from dtrain.data.pipeline import Prepared, prepare, to_rows, tokenize
from dtrain.data.plan import BatchPlan, check_plan, total_steps
from dtrain.data.ragged import Ragged
from dtrain.data.records import BUILDERS, load_records
from dtrain.data.rows import IGNORE, Examples, pack_rows, pad_rows

__all__ = [
    "BUILDERS",
    "IGNORE",
    "BatchPlan",
    "Encoded",
    "Examples",
    "Prepared",
    "Ragged",
    "check_plan",
    "encode",
    "load_records",
    "pack_rows",
    "pad_rows",
    "prepare",
    "to_rows",
    "tokenize",
    "total_steps",
]
