"""Iterative pruning with recovery fine-tuning, and lottery-ticket rewinding, for any nn.Module.

    for round r = 1..R:   s_r = 1 - (1 - s_final)^(r/R)   (each round removes the same share of what is left)
        masks <- the lowest-scoring weights pruned (magnitude by default), the ones already pruned included
        rewind (optional): kept weights <- their values at init or at an early step (Frankle et al., 2019/2020);
                           the optimizer starts afresh
        otherwise: the optimizer's state (momentum, Adam moments) is zeroed where weights were pruned
        train `steps` steps with the masks fixed

Masks stay fixed through training by MaskGuard: the gradients of pruned weights are zeroed by a hook
(so no momentum builds up there), and after every optimizer step the weights are multiplied by their
masks again (weight decay and Adam's epsilon move zeros otherwise).

The user's training step is `train_step(model, optimizer, step) -> loss` (forward, backward,
optimizer.step(); anything else it likes); `make_optimizer(params) -> optimizer`.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .masks import check_sparsity
from .training import MaskGuard, magnitude_masks, prunable_params  # noqa: F401 (imported from here too)

log = logging.getLogger("llmsqueeze")


@dataclass
class IterativeResult:
    masks: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)  # per round: sparsity, losses, eval


def iterative_prune(
    model: nn.Module,
    train_step: Callable[[nn.Module, torch.optim.Optimizer, int], float],
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    final_sparsity: float,
    rounds: int = 3,
    steps: int = 100,
    pretrain_steps: int = 0,
    params: dict[str, nn.Parameter] | None = None,
    scope: str = "global",
    rewind: str | int | dict | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
) -> IterativeResult:
    """Iterative magnitude pruning (IMP) with `steps` recovery steps per round, optionally with
    lottery-ticket rewinding (`rewind="init"`: to the weights before any training; an int k: to the
    weights after k pretraining steps, k <= pretrain_steps; a state dict: to those weights).
    `pretrain_steps` dense steps run first.
    Returns the final masks and a per-round history; the model ends pruned and trained."""
    check_sparsity(final_sparsity)
    if rounds < 1 or steps < 0 or pretrain_steps < 0:
        raise ValueError(f"rounds={rounds}, steps={steps}, pretrain_steps={pretrain_steps}: rounds >= 1, steps >= 0")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope {scope!r}: use global or layer")
    if isinstance(rewind, int) and not (0 <= rewind <= pretrain_steps):
        raise ValueError(f"rewind to step {rewind} needs 0 <= step <= pretrain_steps ({pretrain_steps})")
    if rewind is not None and not isinstance(rewind, (int, dict)) and rewind != "init":
        raise ValueError(f"rewind={rewind!r}: use None, 'init', a pretraining step number or a state dict")
    params = params if params is not None else prunable_params(model)
    snapshot = rewind if isinstance(rewind, dict) else None
    if rewind == "init" or (isinstance(rewind, int) and rewind == 0):
        snapshot = copy.deepcopy(model.state_dict())
    guard = MaskGuard(params)
    opt = make_optimizer(list(model.parameters()))
    history: list[dict] = []
    step = 0
    model.train()
    for _ in range(pretrain_steps):
        train_step(model, opt, step)
        step += 1
        if isinstance(rewind, int) and step == rewind:
            snapshot = copy.deepcopy(model.state_dict())
    masks = None
    try:
        for r in range(1, rounds + 1):
            s = 1 - (1 - final_sparsity) ** (r / rounds)
            masks = magnitude_masks(params, s, scope, masks)
            if snapshot is not None:  # lottery ticket: back to the early weights, a fresh optimizer
                model.load_state_dict(snapshot)
                guard.remove()
                opt = make_optimizer(list(model.parameters()))
                guard.set_masks(masks, opt)
            else:
                guard.set_masks(masks, opt)
            losses = []
            model.train()
            for _ in range(steps):
                losses.append(float(train_step(model, opt, step)))
                step += 1
            entry = {"round": r, "sparsity": s, "first_loss": losses[0] if losses else None,
                     "last_loss": losses[-1] if losses else None}
            if eval_fn is not None:
                model.eval()
                entry["eval"] = float(eval_fn(model))
            history.append(entry)
            log.info("round %d: sparsity %.3f %s", r, s, entry)
    finally:
        guard.remove()
    return IterativeResult(masks, history)
