"""Pruning masks from scores: pure functions, True = keep.

Conventions (one spelling everywhere: code, CLI, checkpoints):
  * `sparsity` s in [0, 1) is the fraction of weights set to zero. Unstructured masks prune exactly
    floor(s * K) weights per row (scope "row"), floor(s * N * K) per layer ("layer"), or
    floor(s * total) across several layers ("global").
  * `nm_pattern` N:M keeps the N largest-scoring weights in every group of M consecutive inputs
    (along K, the input dimension), as in NVIDIA's 2:4: sparsity 1 - N/M, 1 <= N < M, M divides K.
Ties are broken by position (lower index pruned first), so masks are deterministic.
"""
from __future__ import annotations

import math

import torch

from ..config import LlmsqueezeError

SCOPES = ("row", "layer")


def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (0.0 <= sparsity < 1.0):
        raise LlmsqueezeError(f"sparsity={sparsity!r} must lie in [0, 1), e.g. 0.5 (half the weights set to zero)")
    return float(sparsity)


def parse_nm(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'2:4' or (2, 4) -> (n, m): keep n of every m consecutive inputs; None stays None."""
    if pattern is None:
        return None
    if isinstance(pattern, str):
        parts = pattern.split(":")
        try:
            n, m = (int(p) for p in parts)
        except ValueError:
            raise LlmsqueezeError(f"pattern {pattern!r} is not N:M: write e.g. 2:4 (keep 2 of every 4 inputs)") from None
    else:
        n, m = pattern
    if not (1 <= n < m):
        raise LlmsqueezeError(f"pattern {n}:{m}: need 1 <= N < M (keep N of every M inputs), e.g. 2:4 or 4:8")
    return n, m


def check_nm_width(n: int, m: int, k: int, name: str = "layer") -> None:
    if k % m:
        raise LlmsqueezeError(
            f"pattern {n}:{m} needs an input width divisible by {m}, but {name} has {k} inputs: "
            f"use an M that divides {k}, or exclude the layer"
        )


def n_pruned(count: int, sparsity: float) -> int:
    """How many of `count` weights a mask of `sparsity` prunes: floor, guarded against 0.3 * 10 = 2.9999."""
    return int(math.floor(sparsity * count + 1e-9))


def _prune_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """score [..., L] -> keep mask [..., L] with the k lowest of the last dim pruned (stable order)."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.argsort(score, dim=-1, stable=True)[..., :k]
        keep.scatter_(-1, idx, False)
    return keep


def unstructured_mask(score: torch.Tensor, sparsity: float, scope: str = "row") -> torch.Tensor:
    """score [N, K] (higher = more important) -> keep [N, K] bool; exactly floor(s*K) pruned per row
    ("row", Wanda's comparison group) or floor(s*N*K) in the layer ("layer")."""
    sparsity = check_sparsity(sparsity)
    if scope == "row":
        return _prune_lowest(score.float(), n_pruned(score.shape[1], sparsity))
    if scope == "layer":
        return _prune_lowest(score.float().reshape(-1), n_pruned(score.numel(), sparsity)).view_as(score)
    raise LlmsqueezeError(f"scope {scope!r} is not known: use one of {', '.join(SCOPES)} (or global_masks)")


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold across layers: exactly floor(s * total) of all the weights pruned.
    Scores must be comparable across layers (e.g. magnitude of weights of similar scale)."""
    sparsity = check_sparsity(sparsity)
    flat = torch.cat([s.float().reshape(-1) for s in scores.values()])  # [total]
    keep = _prune_lowest(flat, n_pruned(flat.numel(), sparsity))
    out, i = {}, 0
    for name, s in scores.items():
        out[name] = keep[i : i + s.numel()].view_as(s)
        i += s.numel()
    return out


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """score [N, K] -> keep [N, K]: the n highest of every m consecutive inputs of each row."""
    rows, k = score.shape
    check_nm_width(n, m, k)
    return _prune_lowest(score.float().reshape(rows, k // m, m), m - n).view(rows, k)


def is_nm(mask_or_weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive inputs holds at most n nonzeros."""
    x = mask_or_weight != 0
    rows, k = x.shape
    if k % m:
        return False
    return bool((x.view(rows, k // m, m).sum(-1) <= n).all())


def sparsity_of(mask_or_weight: torch.Tensor) -> float:
    """Fraction of zeros (False) in a mask or a weight."""
    return 1.0 - (mask_or_weight != 0).sum().item() / mask_or_weight.numel()
