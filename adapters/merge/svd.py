"""Dense delta -> low-rank factors, so a merged result rides the LoRA batched path.

Used for "virtual adapters" (a merged delta stored in a free slot as `B @ A`), for
`dynamerge merge --out` static exports, and by Twin-Merging's exclusive parts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adapters.merge.base import check_int, check_number


def _svd(delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if delta.dim() != 2:
        raise ValueError(f"delta must be 2-D [out, in], got shape {tuple(delta.shape)}")
    # float32 at least: LAPACK has no half kernels, and bf16 singular vectors are too coarse
    work = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
    return torch.linalg.svd(work, full_matrices=False)


def _factors(u: Tensor, s: Tensor, vh: Tensor, r: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    # sqrt(S) on both sides keeps B and A on the same scale (matters once cast to fp16)
    root = s[:r].sqrt()
    return (u[:, :r] * root).to(dtype).contiguous(), (root[:, None] * vh[:r]).to(dtype).contiguous()


def truncated_svd(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` approximation of `delta` (Eckart-Young), as LoRA-style factors.

    Semantics:
        U, S, Vh = svd(delta)                       delta [out, in]
        B = U[:, :r] * sqrt(S[:r])                  [out, r]
        A = sqrt(S[:r])[:, None] * Vh[:r]           [r, in]
        B @ A = argmin_{rank(X) <= r} ||delta - X||_F

    Args:
        delta: [out, in].
        rank: wanted rank >= 1; capped at min(out, in), where the result is exact.

    Returns:
        (B, A) in `delta`'s dtype and device.
    """
    check_int("rank", rank, lo=1)
    u, s, vh = _svd(delta)
    return _factors(u, s, vh, min(rank, s.numel()), delta.dtype)


def exact_low_rank(delta: Tensor, rtol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Factors of `delta` at its numerical rank: singular values above `rtol * s_max`.

    A sum of LoRA deltas has rank <= the sum of their ranks, so this recovers a compact,
    (numerically) exact factorisation of such sums. A zero delta gives rank 1 of zeros.
    """
    check_number("rtol", rtol, lo=0.0, hi=1.0)
    u, s, vh = _svd(delta)
    r = max(1, int((s > rtol * s[0]).sum())) if s.numel() else 1
    return _factors(u, s, vh, r, delta.dtype)


def relative_error(delta: Tensor, b: Tensor, a: Tensor) -> float:
    """||delta - B @ A||_F / ||delta||_F (absolute error when `delta` is zero)."""
    diff = torch.linalg.matrix_norm((delta - b @ a).float())
    norm = torch.linalg.matrix_norm(delta.float())
    return float(diff if norm == 0 else diff / norm)
