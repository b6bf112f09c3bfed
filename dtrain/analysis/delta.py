"""The update ΔW = (alpha / r) B A of one adapted layer, and how it relates to the frozen W
(Hu et al. 2021, Sec. 7.3 and Table 7).

ΔW has rank at most r, so its SVD comes from two thin QR factorizations and the SVD of an r x r
matrix (B = Q_B R_B, A^T = Q_A R_A: ΔW = s Q_B (R_B R_A^T) Q_A^T), never an out x in one.

With U (out x k) and V (in x k) the top-k left and right singular vectors of ΔW (k = r unless
chosen), Table 7 projects W onto ΔW's subspace: ||U^T W V||_F. It compares that with W's own
top-k directions (= the norm of W's top k singular values) and with random orthonormal U, V;
the amplification factor ||ΔW||_F / ||U^T W V||_F says how much ΔW magnifies the directions of W
it uses. The paper reports ~21.5 for r = 4 and ~1.9 for r = 64 (GPT-3, W_q, layer 48).
"""

from __future__ import annotations

import math

import torch

EFFECTIVE_RANK_TOL = 0.01  # singular values above 1% of the top one are counted


def low_rank_svd(
    b: torch.Tensor, a: torch.Tensor, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U out x r, S r, V in x r) of scaling * B A in float64, S descending."""
    b, a = b.detach().to(torch.float64), a.detach().to(torch.float64)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(scaling * (rb @ ra.T))
    return qb @ u, s, qa @ vh.T


def effective_rank(s: torch.Tensor) -> dict[str, float]:
    """Roy & Vetterli's entropy effective rank exp(H(s / sum s)) (k for k equal non-zero singular
    values, less when they decay), and how many singular values exceed 1% of the top one."""
    s = s.to(torch.float64)
    s = s[s > 0]
    if s.numel() == 0:
        return {"effective_rank": 0.0, "rank_1pct": 0}
    p = s / s.sum()
    entropy = float(-(p * p.log()).sum())
    return {"effective_rank": math.exp(entropy), "rank_1pct": int((s > EFFECTIVE_RANK_TOL * s.max()).sum())}


def random_orthonormal(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random (rows x k) matrix with orthonormal columns (QR of a Gaussian)."""
    q, r = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # sign fix: Haar-distributed


def relate_to_base(
    w: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    scaling: float,
    k: int | None = None,
    seed: int = 0,
    sw: torch.Tensor | None = None,
) -> dict[str, float]:
    """Table 7's numbers for one layer: W (out x in), ΔW = scaling * B A, k = r by default
    (`sw`: W's singular values, when already known)."""
    w = w.detach().to(torch.float64)
    u, s, v = low_rank_svd(b, a, scaling)
    k = min(k or s.numel(), s.numel())
    u, v = u[:, :k], v[:, :k]
    sw = torch.linalg.svdvals(w) if sw is None else sw.to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    ur, vr = random_orthonormal(w.shape[0], k, gen), random_orthonormal(w.shape[1], k, gen)
    proj_delta = float(torch.linalg.norm(u.T @ w @ v))
    delta_norm = float(torch.linalg.norm(s))
    return {
        "k": k,
        "delta_norm": delta_norm,
        "w_norm": float(torch.linalg.norm(sw)),
        "proj_delta": proj_delta,
        "proj_w": float(torch.linalg.norm(sw[:k])),
        "proj_random": float(torch.linalg.norm(ur.T @ w @ vr)),
        "amplification": delta_norm / proj_delta if proj_delta > 0 else math.inf,
    }


def spectrum(b: torch.Tensor, a: torch.Tensor, scaling: float) -> dict:
    """ΔW's singular values (descending) and effective ranks."""
    _, s, _ = low_rank_svd(b, a, scaling)
    return {"singular_values": [float(x) for x in s], **effective_rank(s)}
