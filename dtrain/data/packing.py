"""Best-fit-decreasing packing: examples, longest first, each into the fullest row it still fits.

Rows come out nearly full (the gaps are what no remaining example fits), the packing is a pure
function of the lengths (so a resumed run packs the same rows, and the seeded batch plan then orders
them), and examples are never split. Each row lists its examples in their original order, and rows
are ordered by their first example.
"""

from __future__ import annotations

import bisect


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Groups of example indices, each summing to at most `capacity` tokens (an example longer than
    capacity gets a row of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # free space of each open row, as sorted (space, row) pairs: the first with space >= length is
    # the best fit (the fullest row that still takes the example)
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, r = free.pop(at)
            rows[r].append(i)
            if space - n > 0:
                bisect.insort(free, (space - n, r))
        else:
            rows.append([i])
            if capacity - n > 0:
                bisect.insort(free, (capacity - n, len(rows) - 1))
    groups = [sorted(g) for g in rows]
    return sorted(groups, key=lambda g: g[0])
