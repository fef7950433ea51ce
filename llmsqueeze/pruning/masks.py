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

from ..config import LlmsqueezeError, NMPattern, check_sparsity  # noqa: F401 (check_sparsity re-exported)

SCOPES = ("row", "layer")


def parse_nm(pattern) -> NMPattern | None:
    """'2:4' or (2, 4) -> NMPattern(2, 4) (a (n, m) tuple); None stays None."""
    return NMPattern.parse(pattern)


def check_nm_width(n: int, m: int, k: int, name: str = "layer") -> None:
    if k % m:
        raise LlmsqueezeError(
            f"pattern {n}:{m} needs an input width divisible by {m}, but {name} has {k} inputs: "
            f"use an M that divides {k}, or exclude the layer"
        )


def n_pruned(count: int, sparsity: float) -> int:
    """How many of `count` weights a mask of `sparsity` prunes: floor, guarded against 0.3 * 10 = 2.9999."""
    return int(math.floor(sparsity * count + 1e-9))


def prune_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
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
        return prune_lowest(score.float(), n_pruned(score.shape[1], sparsity))
    if scope == "layer":
        return prune_lowest(score.float().reshape(-1), n_pruned(score.numel(), sparsity)).view_as(score)
    raise LlmsqueezeError(f"scope {scope!r} is not known: use one of {', '.join(SCOPES)} (or global_masks)")


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold across layers: exactly floor(s * total) of all the weights pruned.
    Scores must be comparable across layers (e.g. magnitude of weights of similar scale)."""
    sparsity = check_sparsity(sparsity)
    flat = torch.cat([s.float().reshape(-1) for s in scores.values()])  # [total]
    keep = prune_lowest(flat, n_pruned(flat.numel(), sparsity))
    out, i = {}, 0
    for name, s in scores.items():
        out[name] = keep[i : i + s.numel()].view_as(s)
        i += s.numel()
    return out


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """score [N, K] -> keep [N, K]: the n highest of every m consecutive inputs of each row."""
    rows, k = score.shape
    check_nm_width(n, m, k)
    return prune_lowest(score.float().reshape(rows, k // m, m), m - n).view(rows, k)


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
