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


def randomized_low_rank(delta: Tensor, rank: int, *, oversample: int = 8,
                        niter: int = 2) -> tuple[Tensor, Tensor]:
    """Rank-`rank` factors of `delta` by a randomized range finder (`torch.svd_lowrank`,
    Halko et al.), without the full SVD: O(out * in * (rank + oversample)) per power iteration.

    Near-optimal, not Eckart-Young optimal: with a decaying spectrum the error is within a
    small factor of `truncated_svd`'s (tests/test_merge_speed.py states the tolerance). When
    `rank + oversample` reaches min(out, in) it falls back to the full SVD (no saving left).

    Returns:
        (B [out, r], A [r, in]) in `delta`'s dtype, sqrt(S) on both sides as `truncated_svd`.
    """
    check_int("rank", rank, lo=1)
    if delta.dim() != 2:
        raise ValueError(f"delta must be 2-D [out, in], got shape {tuple(delta.shape)}")
    q = rank + oversample
    if q >= min(delta.shape):
        return truncated_svd(delta, rank)
    work = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
    # a fixed generator state: the same merge gives the same factors on every build
    with torch.random.fork_rng(devices=[work.device] if work.is_cuda else []):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(work, q=q, niter=niter)
    return _factors(u, s, v.T, min(rank, s.numel()), delta.dtype)


def compact_low_rank(delta: Tensor, rank_bound: int, rtol: float = 1e-5
                     ) -> tuple[Tensor, Tensor] | None:
    """Factors of `delta` when its rank is at most `rank_bound` (e.g. a row-masked sum of LoRA
    deltas, whose rank is at most the sum of their ranks), found by `randomized_low_rank`; None
    when the factors would not be smaller than `delta` or miss it by more than `rtol` (relative
    Frobenius), so that the caller stores it dense. Never a full SVD.
    """
    check_int("rank_bound", rank_bound, lo=1)
    if rank_bound * sum(delta.shape) >= delta.numel():
        return None
    b, a = randomized_low_rank(delta, rank_bound)
    if relative_error(delta, b, a) > rtol:
        return None
    return b, a


def relative_error(delta: Tensor, b: Tensor, a: Tensor) -> float:
    """||delta - B @ A||_F / ||delta||_F (absolute error when `delta` is zero)."""
    diff = torch.linalg.matrix_norm((delta - b @ a).float())
    norm = torch.linalg.matrix_norm(delta.float())
    return float(diff if norm == 0 else diff / norm)
