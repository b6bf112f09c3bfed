"""Chat templates and stop tokens: a built-in template for a model whose files have none (Gemma 3's
base model), the token that ends an assistant turn under a template, and the template and stop
tokens a run keeps next to its adapter, so that evaluation renders prompts as training did.

A run trained on conversations writes into its adapter directory (and its saved tokenizer)
`chat_template.jinja` (the template it rendered the data with) and `generation_config.json`
(`eos_token_id`: the tokenizer's EOS and the turn's end token, which training teaches the model
to emit). `dtrain eval`, `generate`, `chat` and `training.eval_generate` read them back.
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE_FILE = "chat_template.jinja"
GENERATION_FILE = "generation_config.json"

# Gemma 3's turn format: `<start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n...`, the
# assistant's role called "model", a system prompt folded into the first user turn (Gemma has no
# system role), BOS first. Every prefix of a rendering is a prefix of the whole (data/chat.py needs it).
GEMMA3 = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = (m['content'] | trim) + '\n\n' -%}"
    "{%- else -%}"
    "{{- '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' -}}"
    "{%- if m['role'] == 'user' and ns.system -%}{{- ns.system -}}{%- set ns.system = '' -%}{%- endif -%}"
    "{{- (m['content'] | trim) + '<end_of_turn>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)

_PROBE = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def read_template(value: str) -> str:
    """A template given as text, or as the path of a .jinja file."""
    path = Path(value)
    return path.read_text() if value.endswith(".jinja") and path.is_file() else value


def turn_end_token(tokenizer, template: str | None) -> int | None:
    """The special token that closes an assistant turn under `template` (`<|im_end|>`,
    `<end_of_turn>`, `<|eot_id|>`), or None when the turn ends in plain text or nothing."""
    if not template:
        return None
    render = lambda msgs, gen: tokenizer.apply_chat_template(  # noqa: E731
        msgs, chat_template=template, tokenize=False, add_generation_prompt=gen
    )
    before, after = render(_PROBE[:1], True), render(_PROBE, False)
    if not after.startswith(before + "a"):
        return None
    tail = after[len(before) + 1 :].strip()
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[0] if ids and ids[0] in special else None


def stop_ids(tokenizer, template: str | None, *more: int | list[int] | None) -> list[int]:
    """Token ids that end generation: the tokenizer's EOS, the template's turn end, and `more`."""
    out: list[int] = []
    for value in (tokenizer.eos_token_id, turn_end_token(tokenizer, template), *more):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in out:
                out.append(int(i))
    return out


def write_settings(directory: Path, template: str | None, eos_ids: list[int]) -> None:
    """Write the run's chat template and stop tokens into `directory` (an adapter or tokenizer dir)."""
    from dtrain.storage import files

    if template:
        files.write_text_atomic(directory / TEMPLATE_FILE, template)
    files.write_json(directory / GENERATION_FILE, {"eos_token_id": eos_ids})


def read_settings(directory: str | Path) -> tuple[str | None, list[int]]:
    """(chat template, stop token ids) kept in `directory`; (None, []) where it keeps none."""
    d = Path(directory)
    template = (d / TEMPLATE_FILE).read_text() if (d / TEMPLATE_FILE).is_file() else None
    eos: list[int] = []
    if (d / GENERATION_FILE).is_file():
        try:
            value = json.loads((d / GENERATION_FILE).read_text()).get("eos_token_id")
        except (ValueError, AttributeError):
            value = None
        eos = [int(i) for i in (value if isinstance(value, list) else [value]) if isinstance(i, int)]
    return template, eos
