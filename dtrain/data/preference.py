"""Preference pairs (data.format: preference): a prompt, a chosen and a rejected completion.

Records follow TRL's conventions, so users' files work unchanged: `prompt` is a string or a list
of messages, `chosen` / `rejected` a string or a list of assistant messages (field names:
data.prompt_field, data.chosen_field, data.rejected_field; turn keys and roles as for messages).
With a chat template, each side is the conversation prompt + completion rendered by it, and its
scored tokens are exactly the labelled tokens SFT (dtrain/data/chat.py) trains on for the
completion's assistant turn(s): content + end-of-turn token; assistant turns inside the prompt are
context, not scored. Without a template (string records only), each side is prompt + completion +
EOS as in data.format: instruction.

A pair is two consecutive examples (chosen, then rejected), so the token cache stores it unchanged;
the split and the mix take pairs (pipeline.py), rows.PairRows serves them by pair.

Truncation keeps the end of the prompt and both completions whole: data.max_prompt_tokens first
cuts the prompt's start to that many tokens (counted `prompt_cut`); a pair still over
data.seq_len is dropped (`too_long`), fails (`error`) or loses more of its prompt's start
(`truncate`, counted `truncated`); completions that leave no room for a prompt token are dropped
(`no_room`).
"""

from __future__ import annotations

from dtrain.config.schema import DataConfig
from dtrain.data import chat
from dtrain.data.rows import IGNORE
from dtrain.errors import ConfigError

Seq = tuple[list[int], list[int]]


def sides(rec: dict, cfg: DataConfig) -> tuple[object, object, object] | str:
    """(prompt, chosen, rejected) as found, or why the record is unusable."""
    values = []
    for f in (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field):
        v = rec.get(f)
        if not (isinstance(v, str) and v.strip()) and not (isinstance(v, list) and v):
            return f"a missing or empty '{f}'"
        values.append(v)
    if values[1] == values[2]:
        return f"identical '{cfg.chosen_field}' and '{cfg.rejected_field}'"
    return tuple(values)


def _turns(value, field: str, cfg: DataConfig, default_role: str) -> list[dict] | str:
    """A string as one turn of `default_role`, or a list of turns with the configured keys and roles."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    role_key, text_key = cfg.turn_keys or chat.DEFAULT_TURN_KEYS["messages"]
    roles = {**chat.DEFAULT_ROLES["messages"], **(cfg.role_map or {})}
    out = []
    for j, turn in enumerate(value):
        if not isinstance(turn, dict):
            return f"'{field}'[{j}] is not a mapping"
        role, text = roles.get(turn.get(role_key)), turn.get(text_key)
        if role not in chat.ROLES:
            return f"'{field}'[{j}] has role {turn.get(role_key)!r} (known: {', '.join(roles)}; see data.role_map)"
        if not isinstance(text, str) or not text.strip():
            return f"'{field}'[{j}] has a missing or empty '{text_key}'"
        out.append({"role": role, "content": text})
    return out


def _side_chat(tokenizer, template: str, prompt: list[dict], completion: list[dict]) -> Seq:
    """(ids, labels) of prompt + completion rendered; only the completion's assistant turns labelled."""
    text, spans = chat.assistant_spans(tokenizer, template, prompt + completion)
    scored = spans[len(spans) - sum(m["role"] == "assistant" for m in completion) :]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = chat.overlap_mask(enc["offset_mapping"], scored)
    ids = enc["input_ids"]
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]


def pair(rec: dict, cfg: DataConfig, tokenizer, template: str | None) -> tuple[Seq, Seq] | str:
    """The (chosen, rejected) examples of one record, or why it is unusable."""
    found = sides(rec, cfg)
    if isinstance(found, str):
        return found
    prompt, chosen, rejected = found
    if template is None:
        if not all(isinstance(v, str) for v in found):
            return "conversational fields but no chat template (set data.chat_template or data.tokenizer)"
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out = []
        for c in (chosen, rejected):
            r = tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            out.append((p + r, [IGNORE] * len(p) + r))
        return out[0], out[1]
    p = _turns(prompt, cfg.prompt_field, cfg, "user")
    if isinstance(p, str):
        return p
    out = []
    for value, field in ((chosen, cfg.chosen_field), (rejected, cfg.rejected_field)):
        c = _turns(value, field, cfg, "assistant")
        if isinstance(c, str):
            return c
        if any(m["role"] != "assistant" for m in c):
            return f"'{field}' holds a turn that is not an assistant turn"
        out.append(_side_chat(tokenizer, template, p, c))
    return out[0], out[1]


def _prompt_len(labels: list[int]) -> int:
    return next(i for i, v in enumerate(labels) if v != IGNORE)


def fit(pair_: tuple[Seq, Seq], cfg: DataConfig, i: int) -> tuple[tuple[Seq, Seq] | None, str]:
    """The pair cut to fit (the same prompt tokens cut from both sides), or None; and what happened:
    '' (as is), prompt_cut, truncated, too_long, no_room."""
    (ic, lc), (ir, lr) = pair_
    room = min(_prompt_len(lc), _prompt_len(lr))  # prompt tokens shared by both sides
    cut, what, max_prompt = 0, "", cfg.max_prompt_tokens
    if max_prompt is not None and room > max_prompt:
        cut, what = room - max_prompt, "prompt_cut"
    longest = max(len(ic), len(ir)) - cut
    if longest > cfg.seq_len:
        if cfg.truncation == "error":
            raise ConfigError(
                f"data.path = '{cfg.path}': record {i} has a pair of {longest} tokens, more than "
                f"data.seq_len = {cfg.seq_len} (data.truncation: error)"
            )
        if cfg.truncation == "drop":
            return None, "too_long"
        cut, what = cut + longest - cfg.seq_len, "truncated"
    if cut > room - 1:  # the completions alone fill seq_len: not one prompt token would be left
        return None, "no_room"
    return ((ic[cut:], lc[cut:]), (ir[cut:], lr[cut:])), what
