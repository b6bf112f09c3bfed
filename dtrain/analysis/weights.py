"""The frozen base's weights, read one tensor at a time from its safetensors file(s): no model is
built and at most one weight is in memory. With `bits` (8 or 4), each weight dtrain would have
quantized (every linear layer but the output head) comes back as deq(q(W)), the weight an adapter
trained on that quantized base saw (dtrain/model/quant.py round_trip)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dtrain.errors import DtrainError

INDEX = "model.safetensors.index.json"


class BaseWeights:
    """Tensors of a Hugging Face model directory (single safetensors file or sharded with an index)."""

    def __init__(self, directory: str | Path, bits: int | None = None, quantized_head: bool = False):
        self.dir = Path(directory)
        self.bits, self.quantized_head = bits, quantized_head
        if not self.dir.is_dir():
            raise DtrainError(f"--base '{self.dir}': directory not found")
        self.files = self._key_files()
        self._svdvals: dict[str, torch.Tensor] = {}
        self._in_out: set[str] | None = None

    def _key_files(self) -> dict[str, str]:
        """{tensor key: file name} of every tensor the base stores."""
        if (self.dir / INDEX).is_file():
            try:
                weight_map = json.loads((self.dir / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise DtrainError(f"--base '{self.dir / INDEX}': no readable weight_map ({e})") from None
            return dict(weight_map)
        if not (self.dir / "model.safetensors").is_file():
            raise DtrainError(f"--base '{self.dir}': no model.safetensors or {INDEX} (analyze reads safetensors)")
        from safetensors import safe_open

        try:
            with safe_open(self.dir / "model.safetensors", "pt") as h:
                return {k: "model.safetensors" for k in h.keys()}
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a truncated file
            raise DtrainError(
                f"--base '{self.dir}/model.safetensors': not readable ({str(e).splitlines()[0]})"
            ) from None

    def key_for(self, module: str) -> str:
        """The checkpoint key of `module`'s weight: `<module>.weight`, or without the module name's
        first component (checkpoints saved without their wrapper's prefix, e.g. 'bert.')."""
        key = self._stored(f"{module}.weight") or self._stored(f"{module.split('.', 1)[-1]}.weight")
        if key is not None:
            return key
        raise DtrainError(f"--base '{self.dir}': no weight for adapted module '{module}' (adapter for another base?)")

    def _stored(self, key: str) -> str | None:
        """`key`, or the older name the checkpoint stores it under (Mixtral's `block_sparse_moe`)."""
        from dtrain.model.expert_weights import stored_key

        return stored_key(key, self.files.__contains__)

    def _read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.dir / self.files[key], "pt") as h:
            return h.get_tensor(key).to(torch.float32)

    def weight(self, module: str) -> torch.Tensor:
        """`module`'s weight in float32 (dequantized from `bits` where dtrain would quantize it)."""
        w = self._expert(module)
        if w is None:
            w = self._read(self.key_for(module))
        if self.bits:
            from dtrain.model import layers, quant

            if self.quantized_head or not layers.is_head_name(module):
                w = quant.round_trip(w, self.bits)
        return w

    def _expert(self, module: str) -> torch.Tensor | None:
        """Expert e of a fused weight (`<experts>.<e>.<param>`) as [out, in], the rows dtrain quantizes
        (model/expert_quant.py) and B_e A_e's shape: from the fused tensor, or from the per-expert
        tensors a checkpoint in the older layout holds (gate and up concatenated, as training fuses
        them); None for any other module."""
        from dtrain.model.expert_weights import per_expert_keys

        m = re.fullmatch(r"(.+\.experts)\.(\d+)\.(\w+)", module)
        if m is None:
            return None
        fused, e = f"{m[1]}.{m[3]}", int(m[2])
        key = self._stored(fused)
        if key is not None:
            w = self._read(key)
            if w.dim() != 3:
                return None
            return w[e].T if key in self._in_out_experts() else w[e]
        parts = per_expert_keys(fused, lambda k: self._stored(k) is not None)
        if parts is None or e >= len(parts):
            return None  # a linear expert (module targets) or a missing weight: key_for says which
        return torch.cat([self._read(self._stored(k)) for k in parts[e]])

    def _in_out_experts(self) -> set[str]:
        """Keys of the fused expert weights stored [E, in, out] (gpt-oss), from a meta-device build of
        the base's config; none where transformers cannot build it (analysis then goes by shape)."""
        if self._in_out is None:
            from transformers import AutoConfig

            from dtrain.lora import experts
            from dtrain.model import build

            try:
                model = build.build_empty(AutoConfig.from_pretrained(self.dir, local_files_only=True), torch.float32)
            except Exception:  # noqa: BLE001 - ValueError, KeyError, OSError, ConfigError from transformers' config code
                model = None
            self._in_out = {
                f"{n}.{p}"
                for n, m in (model.named_modules() if model is not None else ())
                if experts.is_experts_module(m) and m.is_transposed
                for p, t in m.named_parameters(recurse=False)
                if t.dim() == 3
            }
        return self._in_out

    def singular_values(self, module: str, w: torch.Tensor) -> torch.Tensor:
        """W's singular values (float64, descending), computed once per module."""
        if module not in self._svdvals:
            self._svdvals[module] = torch.linalg.svdvals(w.to(torch.float64))
        return self._svdvals[module]
