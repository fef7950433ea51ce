"""Magnitude pruning: drop the weights of smallest |w| (per row, per layer or globally). No data;
the baseline every data-aware method must beat. With a QuantScheme the kept weights are rounded to
nearest (pruned ones get q == zero, exactly 0 after dequantization)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..config import QuantScheme
from ..nn import linear_weight, set_module
from .layer import PrunedWeight, apply_mask, magnitude_score, pruned_module
from .masks import global_masks, nm_mask, unstructured_mask


def magnitude_prune(w: torch.Tensor, sparsity: float = 0.5, nm=None, scope: str = "layer",
                    scheme: QuantScheme | None = None) -> PrunedWeight:
    """w [N, K] -> PrunedWeight: unstructured at `sparsity` over `scope`, or N:M with nm=(n, m)."""
    score = magnitude_score(w)
    keep = nm_mask(score, *nm) if nm is not None else unstructured_mask(score, sparsity, scope)
    return apply_mask(w, keep, scheme)


@torch.no_grad()
def prune_layers(model, names: list[str], sparsity: float, nm, scope: str, scheme: QuantScheme | None,
                 progress: bool, scores: dict[str, torch.Tensor] | None = None) -> None:
    """Prune `names` of `model` in place by |w|, or by any given per-layer scores [N, K] (higher =
    kept): N:M, or unstructured per row, per layer or across all of them (scope "global")."""
    if scores is None:
        scores = {n: magnitude_score(linear_weight(model.get_submodule(n))) for n in names}
    if scope == "global" and nm is None:
        keeps = global_masks(scores, sparsity)
    for name in tqdm(names, desc="magnitude", disable=not progress, unit="layer"):
        layer = model.get_submodule(name)
        w = linear_weight(layer)
        if nm is not None:
            keep = nm_mask(scores.pop(name), *nm)
        elif scope == "global":
            keep = keeps.pop(name)
        else:
            keep = unstructured_mask(scores.pop(name), sparsity, scope)
        res = apply_mask(w, keep, scheme)
        set_module(model, name, pruned_module(layer, res, scheme))


def run(job, scores=None) -> None:
    """The method table's entry point for a whole-model prune of llmsqueeze.engine.Job `job`: by
    magnitude, or by `scores(job)` -> {layer: score [N, K]} (gradient saliency: pruning/saliency.py)."""
    sp = job.sparsity
    computed = None if scores is None else scores(job)
    prune_layers(job.model, job.names, sp.sparsity, sp.pattern, sp.scope, job.scheme,
                 job.progress and scores is None, computed)
    if scores is not None:
        job.method_args.update(job.data_args)
