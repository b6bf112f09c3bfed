"""Conversations (messages, sharegpt, alpaca) rendered with a chat template, with the loss mask.

The assistant spans come from rendering prefixes of the conversation: for assistant turn k, the
text between render(messages[:k], add_generation_prompt=True) and render(messages[:k+1]) is that
turn's content and end-of-turn marker (for ChatML: `content<|im_end|>\n`). Trailing whitespace is
cut from the span, so the newline the template writes after `<|im_end|>` carries no loss (the model
stops at `<|im_end|>`; what follows is the template's separator). Each rendered prefix must be a
prefix of the full rendering, else the template cannot be split into turns and the data is rejected.
Tokens overlapping a span are labelled, as transformers does for `{% generation %}` blocks.
"""

from __future__ import annotations

from dtrain.config.schema import DataConfig
from dtrain.data import skeleton
from dtrain.errors import ConfigError
from dtrain.model import templates

ROLES = ("system", "user", "assistant")
DEFAULT_TURN_KEYS = {"messages": ["role", "content"], "sharegpt": ["from", "value"]}
DEFAULT_FIELD = {"messages": "messages", "sharegpt": "conversations"}
DEFAULT_ROLES = {
    "messages": {r: r for r in ROLES},
    "sharegpt": {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"},
}


def template_of(cfg: DataConfig, tokenizer) -> str | None:
    """data.chat_template (a string, or a .jinja file), else the tokenizer's, else None."""
    if cfg.chat_template is not None:
        return templates.read_template(cfg.chat_template)
    return getattr(tokenizer, "chat_template", None) or None


def run_template(cfg: DataConfig, tokenizer) -> str | None:
    """The template a run renders its conversations with: that of its first dataset (of data.mix)
    in a conversation format; None when no dataset is rendered with one (text, instruction)."""
    from dtrain.data.sources import sources

    for c, _ in sources(cfg):
        template = template_of(c, tokenizer) if c.format in ("messages", "sharegpt", "alpaca") else None
        if template is not None:
            return template
    return None


def alpaca_turns(rec: dict, cfg: DataConfig) -> tuple[str, str]:
    """An Alpaca record's (user text, answer): the instruction, then its input after a blank line
    when there is one. The one home of this prompt: rendered through a chat template, or (a
    tokenizer without one) as `instruction` records are, with a blank line before the answer."""
    instr, inp, out = (rec.get(f) for f in cfg.alpaca_fields)
    return (instr if not (isinstance(inp, str) and inp.strip()) else f"{instr}\n\n{inp}"), out


def to_messages(rec: dict, cfg: DataConfig) -> list[dict] | str:
    """The record's conversation as [{role, content}], or why it cannot be one."""
    if cfg.format == "alpaca":
        user, out = alpaca_turns(rec, cfg)
        return [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
    field = cfg.messages_field or DEFAULT_FIELD[cfg.format]
    turns = rec.get(field)
    if not isinstance(turns, list) or not turns:
        return f"a missing or empty '{field}'"
    role_key, text_key = cfg.turn_keys or DEFAULT_TURN_KEYS[cfg.format]
    roles = {**DEFAULT_ROLES[cfg.format], **(cfg.role_map or {})}
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"'{field}'[{j}] is not a mapping"
        role, text = roles.get(turn.get(role_key)), turn.get(text_key)
        if role not in ROLES:
            return f"'{field}'[{j}] has role {turn.get(role_key)!r} (known: {', '.join(roles)}; see data.role_map)"
        if not isinstance(text, str) or not text.strip():
            return f"'{field}'[{j}] has a missing or empty '{text_key}'"
        out.append({"role": role, "content": text})
    first = next((m["role"] for m in out if m["role"] != "system"), None)
    if first != "user":
        return f"'{field}' must start with a user turn (after any system turn)"
    if not any(m["role"] == "assistant" for m in out):
        return f"'{field}' has no assistant turn"
    return out


def render(tokenizer, template: str, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(tokenizer, template: str, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry the loss."""
    full = render(tokenizer, template, messages)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:k], generation_prompt=True)
        after = render(tokenizer, template, messages[: k + 1])
        if not (after.startswith(before) and full.startswith(after)):
            raise ConfigError(
                "data.chat_template: rendering a conversation's first turns is not a prefix of "
                "rendering all of them, so assistant turns cannot be located (a template that "
                "changes earlier turns depending on later ones is not supported)"
            )
        spans.append((len(before), len(after.rstrip())))
    return full, spans


def render_batch(tokenizer, template: str, convs: list[list[dict]], generation_prompt: bool) -> list[str]:
    """render() of many conversations in one call of the renderer apply_chat_template uses, with the
    arguments it passes (its special tokens); per conversation where that renderer is not there."""
    if not convs:
        return []
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        return [render(tokenizer, template, m, generation_prompt) for m in convs]
    kwargs = dict(tokenizer.special_tokens_map)
    texts, _ = render_jinja_template(
        conversations=convs, chat_template=template, add_generation_prompt=generation_prompt, **kwargs
    )
    return texts


def assistant_spans_batch(
    tokenizer, template: str, convs: list[list[dict]], shapes: dict | None = None
) -> list[tuple[str, list[tuple[int, int]]]]:
    """assistant_spans() of many conversations: one full rendering each, the spans from the
    placeholder rendering of their shape (skeleton.py, cached in `shapes`), the prefix way where
    that does not apply."""
    shapes = {} if shapes is None else shapes
    full = render_batch(tokenizer, template, convs, False)
    out: list = [None] * len(convs)
    for c, (messages, text) in enumerate(zip(convs, full)):
        key = skeleton.shape_key(messages)
        if key is not None and key not in shapes:
            shapes[key] = skeleton.build_shape(lambda m, g: render_batch(tokenizer, template, [m], g)[0], key)
        shape = shapes.get(key) if key is not None else None
        contents = [m["content"] for m in messages]
        if shape is not None and skeleton.fill(shape, contents) == text:
            out[c] = (text, skeleton.spans_in(shape, contents, text))
    rest = [c for c, o in enumerate(out) if o is None]
    for c, got in zip(
        rest, _prefix_spans_batch(tokenizer, template, [convs[c] for c in rest], [full[c] for c in rest])
    ):
        out[c] = got
    return out


def _prefix_spans_batch(
    tokenizer, template: str, convs: list[list[dict]], full: list[str]
) -> list[tuple[str, list[tuple[int, int]]]]:
    """assistant_spans() of many conversations whose full renderings are `full`, every prefix
    rendering of the batch in two calls."""
    asks = [(c, k) for c, m in enumerate(convs) for k, turn in enumerate(m) if turn["role"] == "assistant"]
    befores = render_batch(tokenizer, template, [convs[c][:k] for c, k in asks], True)
    partial = [(c, k) for c, k in asks if k + 1 < len(convs[c])]  # a turn that ends the chat: `after` is `full`
    afters = dict(zip(partial, render_batch(tokenizer, template, [convs[c][: k + 1] for c, k in partial], False)))
    spans: list[list[tuple[int, int]]] = [[] for _ in convs]
    for (c, k), before in zip(asks, befores):
        after = afters.get((c, k), full[c])
        if not (after.startswith(before) and full[c].startswith(after)):
            raise ConfigError(
                "data.chat_template: rendering a conversation's first turns is not a prefix of "
                "rendering all of them, so assistant turns cannot be located (a template that "
                "changes earlier turns depending on later ones is not supported)"
            )
        spans[c].append((len(before), len(after.rstrip())))
    return list(zip(full, spans))


def encode_chat(tokenizer, template: str, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(token ids, loss mask): tokens overlapping an assistant span are learned."""
    text, spans = assistant_spans(tokenizer, template, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], overlap_mask(enc["offset_mapping"], spans)


def overlap_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    mask, k = [False] * len(offsets), 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        mask[i] = end > spans[k][0]
    return mask
