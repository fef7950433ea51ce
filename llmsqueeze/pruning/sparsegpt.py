"""SparseGPT (Frantar & Alistarh, 2023): prune a layer column by column and push each column's error
(pruning, and optionally quantization) onto the columns not yet visited through the inverse Hessian
of the layer's inputs, the optimal-brain-surgeon update restricted to the remaining columns.

    H = 2/n sum_x x x^T                       [K, K], shared with GPTQ (quant/gptq.py)
    U = chol(inverse(H + damp*I)) (upper)     d_j = U[j, j]
    for each block of B columns: mask = the lowest w_ij^2 / d_j^2 of the block (unstructured), or, with
        N:M, of each group of M columns when the sweep reaches it (from the already-updated weights)
    for each column i: v_i = w_i * keep_i (or quant(w_i) * keep_i);  e = (w_i - v_i) / d_i;
        w_j -= e * U[i, j]   (j > i)

With a QuantScheme each kept weight is also rounded in the same sweep (GPTQ inside the OBS loop, as
in the paper's joint sparse+quantized results); pruned weights get q = zero, which dequantizes to
exactly 0. With a given `keep` mask (e.g. Wanda's) the loop only quantizes and updates: a sparse GPTQ.
"""
from __future__ import annotations

import logging

from ..config import QuantScheme
from ..quant.hessian import HessianStore
from .obs import SparseGPTResult, refit_result, sparsegpt_prune  # noqa: F401 (the sweep lives in obs.py)

log = logging.getLogger("llmsqueeze")


class SparseGPT:
    """The engine's method: Hessians from the shared store, then each Linear pruned (and quantized
    with a scheme) in place of the dense one."""

    def __init__(self, sparsity: float = 0.5, nm=None, scheme: QuantScheme | None = None, damp: float = 0.01,
                 block_size: int = 128, scope: str = "layer", layer_sparsity: dict[str, float] | None = None,
                 refit: bool | str = False):
        self.sparsity, self.nm, self.scheme = sparsity, nm, scheme
        self.damp, self.block_size, self.scope, self.refit = damp, block_size, scope, refit
        self.layer_sparsity = layer_sparsity or {}  # per-layer overrides (OWL)
        self.store = HessianStore()
        self.report: list[dict] = []

    def collect(self, name, module, x):
        self.store.collect(name, x)

    def apply(self, name, module):
        from ..nn import linear_weight
        from .layer import pruned_module
        from .refit import should_refit

        h, n = self.store.pop(name)
        w = linear_weight(module)
        sparsity = self.layer_sparsity.get(name, self.sparsity)
        refit = should_refit(self.refit, n, w.shape[1])
        try:
            if not refit:
                res = sparsegpt_prune(w, h, sparsity, self.nm, self.scheme, damp=self.damp,
                                      block_size=self.block_size, scope=self.scope)
            else:  # the sweep chooses the mask; the kept weights are then solved for outright
                res = sparsegpt_prune(w, h, sparsity, self.nm, None, damp=self.damp, block_size=self.block_size,
                                      scope=self.scope)
                res, swept = refit_result(w, h, res, self.scheme, self.damp, self.block_size), res.loss
        except FloatingPointError as e:
            raise FloatingPointError(f"SparseGPT failed on {name}: {e}") from None
        entry = {"layer": name, "loss": res.loss, "damp": res.damp, "samples": n, "refit": refit}
        if refit:
            entry["sweep_loss"] = swept
        self.report.append(entry)
        log.info("SparseGPT %s: loss %.4g (damp %.3g, %d tokens%s)", name, res.loss, res.damp, n,
                 f", refit from {swept:.4g}" if refit else "")
        return pruned_module(module, res, self.scheme)


def build(job) -> SparseGPT:
    """The engine method for llmsqueeze.engine.Job `job` (the method table's entry point): its
    SparsityScheme, job.extra["refit"] (True, False or "auto"), any OWL job.layer_sparsity."""
    sp, o = job.sparsity, job.options
    refit = job.extra.get("refit", "auto")
    job.method_args.update(damp=o.damp, block_size=o.block_size, true_sequential=o.true_sequential, refit=refit,
                           **job.data_args)
    return SparseGPT(sp.sparsity, sp.pattern, job.scheme, scope=sp.scope, damp=o.damp, block_size=o.block_size,
                     layer_sparsity=job.layer_sparsity, refit=refit)
