"""Subspace similarity of two LoRA adapters (Hu et al. 2021, Sec. 7.2).

For A_1 (r_1 x in) and A_2 (r_2 x in), let U_1 and U_2 be their right-singular matrices (in x r,
columns ordered by singular value: the directions of the input space each A reads). Then

    phi(i, j) = ||U_1[:, :i]^T U_2[:, :j]||_F^2 / min(i, j),    1 <= i <= r_1, 1 <= j <= r_2,

is 1 when one of the two subspaces contains the other and 0 when they are orthogonal. Two random
subspaces of dimensions i and j in R^in give max(i, j) / in on average: the chance level.
"""

from __future__ import annotations

import numpy as np
import torch


def right_singular(a: torch.Tensor) -> torch.Tensor:
    """The right-singular vectors of `a` (r x in) as the columns of an (in x r) float64 matrix,
    by decreasing singular value (r <= in; otherwise only the first `in` exist)."""
    _, _, vh = torch.linalg.svd(a.detach().to(torch.float64), full_matrices=False)
    return vh.T


def phi(a1: torch.Tensor, a2: torch.Tensor) -> np.ndarray:
    """phi(i, j) for every i <= r_1, j <= r_2, as an (r_1 x r_2) array (entry [i-1, j-1])."""
    if a1.shape[-1] != a2.shape[-1]:
        raise ValueError(f"A matrices read different input sizes: {a1.shape[-1]} and {a2.shape[-1]}")
    g = (right_singular(a1).T @ right_singular(a2)).numpy() ** 2  # (r_1 x r_2) squared cosines
    cum = g.cumsum(axis=0).cumsum(axis=1)  # cum[i-1, j-1] = ||U_1[:, :i]^T U_2[:, :j]||_F^2
    i = np.arange(1, g.shape[0] + 1)[:, None]
    j = np.arange(1, g.shape[1] + 1)[None, :]
    return cum / np.minimum(i, j)


def chance(i: int, j: int, dim: int) -> float:
    """E[phi(i, j)] for two independent uniformly random subspaces of R^dim: max(i, j) / dim."""
    return max(i, j) / dim


def summary(p: np.ndarray, dim: int) -> dict[str, float]:
    """The numbers a table shows of one phi matrix (`dim`: the input size, for the chance level):
    phi(1,1), the top direction's overlap; the mean of phi(i,i) over the smaller rank; and
    phi(r_1, r_2), the whole smaller subspace's overlap, with its chance level."""
    r1, r2 = p.shape
    k = min(r1, r2)
    return {
        "phi_11": float(p[0, 0]),
        "phi_diag_mean": float(np.mean(np.diag(p)[:k])),
        "phi_full": float(p[-1, -1]),
        "chance_full": chance(r1, r2, dim),
    }
