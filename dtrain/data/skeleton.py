"""Assistant spans of many conversations from one full rendering each, not one per prefix.

chat.assistant_spans renders the prefix before and after every assistant turn. Conversations of
the same shape (the same roles in the same order, every message just role and content) differ only
in their contents, so this module renders that shape once with a placeholder for each content, finds
the spans there the prefix way, and maps them into a real conversation by the lengths of its
contents. That is exact when the template writes each content verbatim, which is checked for every
conversation: its real full rendering must equal the placeholder rendering with the contents put
in. A conversation that fails the check (a template that trims or rewrites contents, a content
holding a placeholder character) gets its spans the prefix way.
"""

from __future__ import annotations

from typing import NamedTuple

OPEN, CLOSE = "\ue000", "\ue001"  # private-use characters: no tokenizer or template writes them


class Shape(NamedTuple):
    """The placeholder rendering cut at its placeholders, and the spans in its coordinates."""

    pieces: list[str]  # literal text around the placeholders: len(contents) + 1 pieces
    spans: list[tuple[int, int]]  # (end of the prefix before the turn, end of the turn), unstripped


def shape_key(messages: list[dict]) -> tuple[str, ...] | None:
    """The roles, when every message is exactly {role, content} with string values; else None."""
    roles = []
    for m in messages:
        content, role = m.get("content"), m.get("role")
        if (
            len(m) != 2
            or not isinstance(content, str)
            or not isinstance(role, str)
            or OPEN in content
            or CLOSE in content
        ):
            return None
        roles.append(role)
    return tuple(roles)


def build_shape(render, roles: tuple[str, ...]) -> Shape | None:
    """render(messages, generation_prompt) -> text. None when the placeholders do not each appear
    once, in order, or a span edge falls inside one (the template does not write contents as they are)."""
    marks = [f"{OPEN}{k}{CLOSE}" for k in range(len(roles))]
    convo = [{"role": r, "content": c} for r, c in zip(roles, marks)]
    full = render(convo, False)
    pieces, at = [], 0
    for mark in marks:
        found = full.find(mark, at)
        if found < 0:
            return None
        pieces.append(full[at:found])
        at = found + len(mark)
    pieces.append(full[at:])
    if any(OPEN in p or CLOSE in p for p in pieces):
        return None
    spans = []
    for k, role in enumerate(roles):
        if role != "assistant":
            continue
        before, after = render(convo[:k], True), render(convo[: k + 1], False)
        if not (after.startswith(before) and full.startswith(after)):
            return None
        spans.append((len(before), len(after)))
    starts = [sum(len(p) for p in pieces[: k + 1]) + sum(len(m) for m in marks[:k]) for k in range(len(marks))]
    inside = [(s, s + len(m)) for s, m in zip(starts, marks)]
    if any(lo < edge < hi for edge in (e for span in spans for e in span) for lo, hi in inside):
        return None
    return Shape(pieces, spans)


def fill(shape: Shape, contents: list[str]) -> str:
    out = [shape.pieces[0]]
    for content, piece in zip(contents, shape.pieces[1:]):
        out += (content, piece)
    return "".join(out)


def spans_in(shape: Shape, contents: list[str], text: str) -> list[tuple[int, int]]:
    """The shape's spans in the filled `text`, each end cut of trailing whitespace (as chat.py does)."""
    edges, placeholder_end, shift = [], 0, 0
    bounds = []  # (end of placeholder k in the shape's coordinates, shift after it)
    for k, content in enumerate(contents):
        placeholder_end += len(shape.pieces[k]) + len(f"{OPEN}{k}{CLOSE}")
        shift += len(content) - len(f"{OPEN}{k}{CLOSE}")
        bounds.append((placeholder_end, shift))

    def real(x: int) -> int:
        s = 0
        for end, after in bounds:
            if end > x:
                break
            s = after
        return x + s

    for before, after in shape.spans:
        end = real(after)
        while end > 0 and text[end - 1].isspace():
            end -= 1
        edges.append((real(before), end))
    return edges
