"""Text generation from a base model, the base plus LoRA adapters (switched by name), or a merged
model: a chat template applied (the one given, else the one the active adapter was trained with,
else the model's), greedy or sampled decoding stopping at EOS or the end of the assistant's turn,
one prompt or a batch.

One process, no sharding: generation is for checking what an adapter learned, not for serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dtrain.errors import DtrainError
from dtrain.model import templates


@dataclass
class Sampling:
    """Decoding settings: temperature 0 is greedy (deterministic)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class Generator:
    """A loaded model + tokenizer; `generate` answers prompts (or whole conversations)."""

    def __init__(self, model: nn.Module, tokenizer, chat_template: bool = True, system: str | None = None) -> None:
        self.model, self.tok, self.system = model.eval(), tokenizer, system
        self.use_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
        gen = getattr(model, "generation_config", None)
        self.stop = templates.stop_ids(
            tokenizer, tokenizer.chat_template if self.use_template else None, getattr(gen, "eos_token_id", None)
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # batched decoding continues every row from its last token

    def render(self, conversation: list[dict] | str) -> str:
        """The text the model continues: the chat template with the assistant turn opened."""
        if isinstance(conversation, str):
            conversation = [{"role": "user", "content": conversation}]
        if not self.use_template:
            return "\n".join(m["content"] for m in conversation)
        if self.system is not None and conversation[0]["role"] != "system":
            conversation = [{"role": "system", "content": self.system}, *conversation]
        return self.tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def generate(
        self, prompts: list[list[dict] | str], sampling: Sampling = Sampling(), batch_size: int = 8, stop=None
    ) -> list[str]:
        """One completion per prompt (text only, special tokens dropped). `stop()`, asked before
        each batch, raises preempt.Preempted when true (a preemption inside a long generation)."""
        from dtrain.training import preempt

        out: list[str] = []
        for i in range(0, len(prompts), batch_size):
            if stop is not None and stop():
                raise preempt.Preempted()
            out += self._batch([self.render(p) for p in prompts[i : i + batch_size]], sampling)
        return out

    def _batch(self, texts: list[str], s: Sampling) -> list[str]:
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=not self.use_template)
        enc = {k: v.to(_device(self.model)) for k, v in enc.items()}
        kwargs = {"do_sample": False}
        if s.temperature > 0:
            torch.manual_seed(s.seed)
            kwargs = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p}
        ids = self.model.generate(
            **enc,
            max_new_tokens=s.max_new_tokens,
            pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.stop,
            top_k=None,
            **kwargs,
        )
        new = ids[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in self.tok.batch_decode(new, skip_special_tokens=True)]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def load(
    model_dir: str | Path,
    adapters: list[str] = (),
    use: str | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    chat_template: str | None = None,
) -> tuple[nn.Module, object]:
    """(model, tokenizer) from an HF directory, with adapters loaded as `DIR` or `NAME=DIR`; the
    tokenizer's chat template and the model's stop tokens are those of `chat_template` (a template
    or a .jinja file), else of the active adapter's run, else the model's own."""
    from transformers import AutoModelForCausalLM

    from dtrain.config.names import gguf_hint
    from dtrain.lora import ops as lora, peft_format as adapter_lib
    from dtrain.model.build import DTYPES
    from dtrain.model.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DtrainError(gguf_hint(model_dir, "--model") or f"--model '{model_dir}': no config.json in that directory")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(device)
    tok = load_tokenizer(model_dir, corpus=None)  # the one loader: local files only, one-line errors
    names, dirs = [], []
    for spec in adapters:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or ("default" if not names else Path(path).name)
        adapter_lib.load_adapter(model, path, name)
        names.append(name)
        dirs.append(path)
    if use is not None:
        if use not in names:
            raise DtrainError(f"--use '{use}': no adapter of that name (loaded: {', '.join(names) or 'none'})")
        lora.set_adapter(model, use)
    trained = templates.read_settings(dirs[names.index(use or names[0])]) if names else (None, [])
    _apply_template(model, tok, chat_template, *trained)
    return model, tok


def _apply_template(model: nn.Module, tok, given: str | None, trained: str | None, trained_eos: list[int]) -> None:
    """The template generation renders prompts with, and the stop tokens that go with it."""
    template = templates.read_template(given) if given is not None else trained
    if template is not None:
        tok.chat_template = template
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = templates.stop_ids(tok, tok.chat_template, gen.eos_token_id, trained_eos)
