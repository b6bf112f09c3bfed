"""A training checkpoint's state as files: nested optimizer / scheduler / trainer state split into
a JSON tree and safetensors tensors (and back), and the RNG state of every generator a resumed run
must continue (Python, torch CPU, CUDA)."""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

log = logging.getLogger(__name__)

# ---- nested state <-> (JSON tree, tensors) --------------------------------------------------


def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, plain values) into a JSON-able tree and
    the tensors it references by key. Empty tensors are kept in the tree (shape, dtype), never
    in the tensor file. Dicts with non-string keys (optimizer state by index) keep their keys."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            if x.numel() == 0:
                return {"__empty__": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
            tensors[path] = x.detach().cpu().clone()
            return {"__tensor__": path}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{path}/{k}") for k, v in x.items()}
            return {"__items__": [[enc(k, f"{path}/key"), enc(v, f"{path}/{k}")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, torch.dtype):
            return {"__dtype__": str(x).removeprefix("torch.")}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if hasattr(x, "item") and callable(x.item):  # numpy scalars
            return x.item()
        raise TypeError(f"state at '{path or '/'}': cannot store a {type(x).__name__} (tensors and plain data only)")

    return enc(obj, ""), tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of flatten_state."""
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__empty__" in tree:
        return torch.empty(tree["__empty__"], dtype=getattr(torch, tree["dtype"]))
    if "__items__" in tree:
        return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in tree["__items__"]}
    if "__tuple__" in tree:
        return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
    if "__dtype__" in tree:
        return getattr(torch, tree["__dtype__"])
    return {k: unflatten_state(v, tensors) for k, v in tree.items()}


# ---- RNG ------------------------------------------------------------------------------------


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's generator states: (python + numpy as plain data, torch CPU + CUDA tensors)."""
    import numpy as np

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this rank's device only:
        tensors["torch_cuda"] = torch.cuda.get_rng_state()  # never create contexts on the others
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what rng_state() returned."""
    import numpy as np

    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["torch_cuda"])  # the current (this rank's) device
        else:
            log.warning("checkpoint holds a CUDA RNG state but CUDA is not available: not restored")
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
