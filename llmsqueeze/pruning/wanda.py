"""Wanda (Sun et al., 2023): score each weight by |w_ij| * ||x_j||_2, the size of its contribution to
the output over the calibration tokens, and prune the lowest within each output row (or each group
of M inputs for N:M). No weight update. With a QuantScheme the mask is kept fixed and the kept weights
are quantized by the OBS sweep of SparseGPT (a sparse GPTQ), which needs the Hessian as well.
"""
from __future__ import annotations

import logging

import torch

from ..config import QuantScheme
from .masks import nm_mask, unstructured_mask

log = logging.getLogger("llmsqueeze")


def wanda_score(w: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """w [N, K], sq_norm [K] = sum over tokens of x_j^2 -> |w| * ||x|| [N, K] float32."""
    return w.detach().float().abs() * sq_norm.float().sqrt().unsqueeze(0)


def wanda_mask(w: torch.Tensor, sq_norm: torch.Tensor, sparsity: float = 0.5, nm=None, scope: str = "row") -> torch.Tensor:
    """-> keep [N, K]: per row (Wanda's comparison group) or per layer, or N:M."""
    score = wanda_score(w, sq_norm)
    return nm_mask(score, *nm) if nm is not None else unstructured_mask(score, sparsity, scope)


class Wanda:
    """The engine's method: sums x_j^2 per input channel from the hooks, then masks each Linear."""

    def __init__(self, sparsity: float = 0.5, nm=None, scheme: QuantScheme | None = None, scope: str = "row",
                 damp: float = 0.01, block_size: int = 128, layer_sparsity: dict[str, float] | None = None,
                 refit: bool | str = False):
        from ..quant.hessian import HessianStore

        self.sparsity, self.nm, self.scheme, self.scope = sparsity, nm, scheme, scope
        self.damp, self.block_size, self.refit = damp, block_size, refit
        self.layer_sparsity = layer_sparsity or {}
        self.sq_norms: dict[str, torch.Tensor] = {}
        self.store = HessianStore() if scheme is not None or refit else None
        self.report: list[dict] = []

    def collect(self, name, module, x):
        x2 = x.reshape(-1, x.shape[-1]).float()
        s = x2.pow(2).sum(0)  # [K]
        self.sq_norms[name] = self.sq_norms[name] + s if name in self.sq_norms else s
        if self.store is not None:
            self.store.collect(name, x)

    def apply(self, name, module):
        from ..nn import linear_weight
        from .layer import PrunedWeight, pruned_module
        from .obs import SparseGPTResult, refit_result, sparsegpt_prune
        from .refit import should_refit

        w = linear_weight(module)
        keep = wanda_mask(w, self.sq_norms.pop(name), self.layer_sparsity.get(name, self.sparsity), self.nm, self.scope)
        h, n = self.store.pop(name) if self.store is not None else (None, 0)
        if should_refit(self.refit, n, w.shape[1]):  # Wanda's mask, the kept weights solved for (and rounded)
            res = refit_result(w, h, SparseGPTResult(w, keep, None, None, None, 0.0, self.damp), self.scheme,
                               self.damp, self.block_size)
        elif self.scheme is None:
            res = PrunedWeight(w.detach().float() * keep, keep)
        else:
            res = sparsegpt_prune(w, h, keep=keep, scheme=self.scheme, damp=self.damp, block_size=self.block_size)
        self.report.append({"layer": name, "sparsity": 1 - keep.float().mean().item()})
        return pruned_module(module, res, self.scheme)


def build(job) -> Wanda:
    """The engine method for llmsqueeze.engine.Job `job` (the method table's entry point): its
    SparsityScheme, job.extra["refit"] (True, False or "auto"), any OWL job.layer_sparsity."""
    sp, o = job.sparsity, job.options
    refit = job.extra.get("refit", False)
    job.method_args.update(damp=o.damp, block_size=o.block_size, true_sequential=o.true_sequential, refit=refit,
                           **job.data_args)
    return Wanda(sp.sparsity, sp.pattern, job.scheme, scope=sp.scope, damp=o.damp, block_size=o.block_size,
                 layer_sparsity=job.layer_sparsity, refit=refit)
