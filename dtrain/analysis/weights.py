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
        for key in (f"{module}.weight", f"{module.split('.', 1)[-1]}.weight"):
            if key in self.files:
                return key
        raise DtrainError(f"--base '{self.dir}': no weight for adapted module '{module}' (adapter for another base?)")

    def weight(self, module: str) -> torch.Tensor:
        """`module`'s weight in float32 (dequantized from `bits` where dtrain would quantize it)."""
        from safetensors import safe_open

        expert = re.fullmatch(r"(.+\.experts)\.(\d+)\.(\w+)", module)  # one expert of a fused weight
        fused = f"{expert[1]}.{expert[3]}" if expert else None
        key = fused if fused in self.files else self.key_for(module)
        with safe_open(self.dir / self.files[key], "pt") as h:
            w = h.get_tensor(key).to(torch.float32)
        if expert and w.dim() == 3:
            w = w[int(expert[2])]
            if key in self._in_out_experts():
                w = w.T  # [out, in]: the rows dtrain quantizes (model/expert_quant.py), B_e A_e's shape
        if self.bits:
            from dtrain.model import layers, quant

            if self.quantized_head or not layers.is_head_name(module):
                w = quant.round_trip(w, self.bits)
        return w

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
