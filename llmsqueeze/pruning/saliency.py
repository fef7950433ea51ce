"""Gradient saliency for any torch model: one-shot pruning criteria from the loss gradient on a few
calibration batches (no weight update).

  * SNIP (Lee et al., 2019): |w * dL/dw|, the gradient summed over the batches first — the first-order
    change of the loss when w is removed;
  * Taylor (Molchanov et al., 2019): sum over batches of (w * dL/dw_b)^2 — the squared first-order
    estimate per batch, which does not let gradients of opposite sign cancel.

`loss_fn(model, batch) -> scalar loss`; for a causal LM the default is the next-token loss on the
batch of token ids.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

CRITERIA = ("snip", "taylor")


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    ids = batch.to(next(model.parameters()).device)
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def gradient_saliency(
    model: nn.Module,
    batches: Iterable,
    params: dict[str, nn.Parameter],
    criterion: str = "snip",
    loss_fn: Callable[[nn.Module, object], torch.Tensor] = causal_lm_loss,
) -> dict[str, torch.Tensor]:
    """-> {name: score [same shape as the parameter], float32}; higher = more important. Gradients
    of the model are left as they were (zeroed)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    wanted = {id(p) for p in params.values()}
    frozen = [p for p in model.parameters() if id(p) not in wanted and p.requires_grad]
    old = {n: p.requires_grad for n, p in params.items()}
    for p in frozen:  # no gradients (nor their memory) for parameters we do not score
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for n, p in params.items():
                g = p.grad.float()
                if criterion == "snip":
                    acc[n] += g
                else:
                    acc[n] += (g * p.detach().float()) ** 2
    finally:
        model.zero_grad(set_to_none=True)
        for p in frozen:
            p.requires_grad_(True)
        for n, p in params.items():
            p.requires_grad_(old[n])
    if criterion == "snip":
        return {n: (acc[n] * params[n].detach().float()).abs() for n in params}
    return acc


def layer_scores(job, criterion: str) -> dict[str, torch.Tensor]:
    """SNIP / Taylor scores [N, K] of job.names from the next-token loss on the calibration batches
    (whole model, one backward per batch)."""
    model = job.model
    params = {n: model.get_submodule(n).weight for n in job.names}
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    with torch.enable_grad():
        scores = gradient_saliency(model, job.batches, params, criterion)
    model.train(was_training)
    return {n: (s if isinstance(model.get_submodule(n), nn.Linear) else s.t()) for n, s in scores.items()}


def random_scores(shapes: dict[str, tuple[int, ...]], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """{name: uniform random score of that shape}: random pruning, the baseline every criterion must beat."""
    return {n: torch.rand(shape, generator=generator) for n, shape in shapes.items()}


def random_layer_scores(job) -> dict[str, torch.Tensor]:
    """Random scores [N, K] of job.names, drawn from torch's default generator (the CLI seeds it)."""
    from ..nn import linear_weight

    return random_scores({n: tuple(linear_weight(job.model.get_submodule(n)).shape) for n in job.names})
