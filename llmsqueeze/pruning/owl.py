"""Outlier-weighted layerwise sparsity (OWL, Yin et al., 2023): blocks whose Wanda scores hold more
outliers keep more of their weights.

    score_ij = |w_ij| * ||x_j||                          (Wanda's, over every Linear of block l)
    D_l = share of the block's scores above m * their mean     (the outlier ratio)
    s_l = s - lam + 2 * lam * (max D - D_l) / (max D - min D), then shifted so that mean_l s_l = s

so every block's sparsity stays within s +- lam and the average is the target. The statistics come
from one pass of the sequential engine over the dense model (nothing is changed in that pass).
"""
from __future__ import annotations

import torch

from ..config import LlmsqueezeError
from ..nn import linear_weight


def owl_allocation(outlier_ratio: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block outlier ratios -> per-block sparsities with mean `sparsity`, within +- lam."""
    d = torch.tensor(outlier_ratio, dtype=torch.float64)
    if d.numel() < 2 or float(d.max() - d.min()) == 0:
        return [sparsity] * d.numel()
    s = (d.max() - d) / (d.max() - d.min()) * 2 * lam  # [0, 2 lam]: the most outliers -> 0
    s = s - s.mean() + sparsity
    if float(s.min()) < 0 or float(s.max()) >= 1:
        raise LlmsqueezeError(f"owl lam={lam} pushes a block's sparsity outside [0, 1) around {sparsity}: use a smaller lam")
    return s.tolist()


class _OutlierStats:
    """An engine method that changes nothing: it sums x_j^2 per input and, when a Linear is done,
    counts its Wanda-score outliers (kept per block)."""

    def __init__(self, m: float):
        self.m = m
        self.sq: dict[str, torch.Tensor] = {}
        self.scores: dict[str, torch.Tensor] = {}

    def collect(self, name, module, x):
        s = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)
        self.sq[name] = self.sq[name] + s if name in self.sq else s

    def apply(self, name, module):
        self.scores[name] = (linear_weight(module).detach().float().abs() * self.sq.pop(name).sqrt()).reshape(-1)
        return module


def owl_sparsities(model, batches, names: list[str], sparsity: float, device="cpu", lam: float = 0.08,
                   m: float = 5.0, progress: bool = False) -> dict[str, float]:
    """-> {layer name: sparsity}: the same within a block, OWL-allocated across blocks."""
    from ..engine import run_sequential
    from ..models import get_arch

    if not (0 < lam < 1) or not m > 0:
        raise LlmsqueezeError(f"owl lam={lam}, m={m}: use 0 < lam < 1 (e.g. 0.08) and m > 0 (e.g. 5)")
    stats = _OutlierStats(m)
    run_sequential(model, batches, stats, names, device=device, progress=progress)
    prefix = get_arch(model).blocks + "."
    blocks: dict[int, list[str]] = {}
    for n in names:
        blocks.setdefault(int(n[len(prefix):].split(".")[0]), []).append(n)
    order = sorted(blocks)
    ratios = []
    for b in order:
        s = torch.cat([stats.scores[n] for n in blocks[b]])
        ratios.append(float((s > m * s.mean()).float().mean()))
    alloc = owl_allocation(ratios, sparsity, lam)
    return {n: alloc[i] for i, b in enumerate(order) for n in blocks[b]}
