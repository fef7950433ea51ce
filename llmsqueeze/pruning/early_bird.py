"""Early-bird tickets (You et al., "Drawing Early-Bird Tickets", ICLR 2020): the mask that pruning to
the final sparsity would give emerges early in dense training, so it can be drawn long before
training ends and the remaining steps spent on the (smaller) ticket.

Every `every` steps of dense training the mask is drawn (magnitude, global or uniform per layer) and
compared with the previous one by the normalised Hamming distance (the share of weights whose
keep/prune decision changed). The ticket is found when the last `window` distances all lie below
`threshold` (You et al.: a window of 5, 0.1, on channel masks); then the model is pruned to that mask
and trained on with it held (MaskGuard), from the weights it had when the ticket was found.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LlmsqueezeError, check_sparsity
from .training import MaskGuard, magnitude_masks, prunable_params

log = logging.getLogger("llmsqueeze")


def mask_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The normalised Hamming distance of two sets of masks: changed decisions / all weights."""
    total = sum(m.numel() for m in a.values())
    return sum(int((a[n] != b[n].to(a[n].device)).sum()) for n in a) / total


class EarlyBird:
    """Draws the mask every `every` steps and says when it has settled; `check(step)` after a step."""

    def __init__(self, params: dict[str, nn.Parameter], sparsity: float, every: int = 20,
                 threshold: float = 0.1, window: int = 3, scope: str = "global"):
        self.sparsity = check_sparsity(sparsity)
        if every < 1 or window < 1 or not 0 < threshold < 1:
            raise LlmsqueezeError(f"every={every}, window={window}, threshold={threshold}: need every, window >= 1 "
                                  "and 0 < threshold < 1")
        if scope not in ("global", "layer"):
            raise LlmsqueezeError(f"scope {scope!r}: use global or layer")
        self.params, self.every, self.threshold, self.window, self.scope = params, every, threshold, window, scope
        self.masks: dict[str, torch.Tensor] | None = None
        self.distances: list[tuple[int, float]] = []  # (step, distance to the mask drawn `every` steps before)
        self.found_at: int | None = None

    def check(self, step: int) -> bool:
        """After `step` optimizer steps: draw the mask when due; True once the ticket has settled."""
        if self.found_at is not None:
            return True
        if step % self.every:
            return False
        masks = magnitude_masks(self.params, self.sparsity, self.scope)
        if self.masks is not None:
            self.distances.append((step, mask_distance(masks, self.masks)))
        self.masks = masks
        recent = [d for _, d in self.distances[-self.window:]]
        if len(recent) == self.window and max(recent) < self.threshold:
            self.found_at = step
            return True
        return False


@dataclass
class EarlyBirdResult:
    masks: dict[str, torch.Tensor]
    found_at: int | None  # dense steps before the ticket settled (None: it never did within max_steps)
    distances: list[tuple[int, float]]
    steps: int  # every optimizer step taken: dense search + ticket training
    history: list[dict] = field(default_factory=list)


def early_bird_ticket(
    model: nn.Module,
    train_step: Callable[[nn.Module, torch.optim.Optimizer, int], float],
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    sparsity: float,
    max_steps: int,
    ticket_steps: int,
    every: int = 20,
    threshold: float = 0.1,
    window: int = 3,
    scope: str = "global",
    params: dict[str, nn.Parameter] | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
) -> EarlyBirdResult:
    """Dense training until the early-bird mask settles (at most `max_steps`; if it never does, the
    mask at `max_steps` is taken), then `ticket_steps` steps of the pruned model with the mask held,
    under a fresh optimizer. `train_step(model, optimizer, step) -> loss` as in iterative_prune."""
    if max_steps < 1 or ticket_steps < 0:
        raise LlmsqueezeError(f"max_steps={max_steps}, ticket_steps={ticket_steps}: need max_steps >= 1, ticket_steps >= 0")
    params = params if params is not None else prunable_params(model)
    bird = EarlyBird(params, sparsity, every, threshold, window, scope)
    opt = make_optimizer(list(model.parameters()))
    model.train()
    step = 0
    bird.check(0)
    while step < max_steps:
        train_step(model, opt, step)
        step += 1
        if bird.check(step):
            break
    if bird.found_at is None:
        log.warning("early bird: the mask did not settle within %d steps (last distances %s); taking it anyway",
                    max_steps, [round(d, 4) for _, d in bird.distances[-bird.window:]])
    masks = magnitude_masks(params, sparsity, scope)
    history = [{"phase": "search", "steps": step, **({"eval": float(eval_fn(model))} if eval_fn else {})}]
    guard = MaskGuard(params)
    opt = make_optimizer(list(model.parameters()))
    guard.set_masks(masks, opt)
    try:
        model.train()
        for i in range(ticket_steps):
            train_step(model, opt, step + i)
    finally:
        guard.remove()
    if eval_fn is not None:
        model.eval()
        history.append({"phase": "ticket", "steps": ticket_steps, "eval": float(eval_fn(model))})
    return EarlyBirdResult(masks, bird.found_at, bird.distances, step + ticket_steps, history)
