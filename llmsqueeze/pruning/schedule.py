"""Pruning during training: masks updated on a schedule while the weights train, from any PyTorch
training loop (the pruner hooks the optimizer; the loop does not change).

Schedule (the sparsity at optimizer step t, s_0 before `start`, s_f from `end` on):

    cubic  (Zhu & Gupta, 2017)  s(t) = s_f + (s_0 - s_f) * (1 - (t - start) / (end - start))^3
    linear                      s(t) = s_0 + (s_f - s_0) * (t - start) / (end - start)

At step `start`, every `every` steps after it and at `end`, the masks are chosen again from *all* the
weights by a score, at s(t):

    magnitude  |w|
    movement   S = -sum over steps of w * dL/dw (Sanh et al., 2020), accumulated from the first step
    wanda      |w| * ||x_j||, the input norms summed over the tokens seen since the last mask update
               (Sun et al., 2023)
    random     a fixed random score per weight (the baseline)

`allocation` "uniform" prunes s(t) of every layer, "global" ranks all layers' weights together. With
an N:M `pattern`, each group of M inputs keeps M - round((M - N) * s(t) / s_f) weights (2:4 goes 4:4,
3:4, 2:4 along the schedule). Allocation "learned" lives in pruning/learned.py (LearnedSparsity).

Where a weight is pruned (`regrow`):
    "zero" (default): a pruned weight is set to zero and gets no update (Zhu & Gupta); it can come back
        only at zero, when its score (e.g. accumulated movement) overtakes a kept one at a later update.
    "shadow": the forward pass uses w * mask, but the optimizer updates the dense weights
        (kept in a shadow copy) with the gradient taken at the pruned point, so a pruned weight keeps
        learning and comes back with its own value when its score rises again (dynamic pruning with
        feedback, Lin et al., 2020). After `end` the masks are fixed and pruned weights stay zero.
        On the character-level model of eval/prune_train.py it lost to "zero" at every sparsity
        (70 %: test loss 1.661 vs 1.550, uniform), hence the default.
At every mask update the optimizer's per-weight state (momentum, Adam moments) of the weights that
were just pruned is cleared.

    pruner = GradualPruner(model, 0.5, start=0, end=800, every=50)
    pruner.attach(optimizer)              # once; masks now follow the schedule as the optimizer steps
    ... the usual loop: forward, backward, optimizer.step() ...
    masks = pruner.finish()               # the pruned weights written, the hooks removed
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import LlmsqueezeError, NMPattern, check_sparsity
from .masks import global_masks, n_pruned, nm_mask, prune_lowest
from .training import SCHEDULES, MaskedTraining, sparsity_at

SCORES = ("magnitude", "movement", "wanda", "random")
ALLOCATIONS = ("uniform", "global")


def update_steps(start: int, end: int, every: int) -> list[int]:
    """The steps at which masks are chosen: start, start + every, ..., and end."""
    return sorted(set(range(start, end, every)) | {end})


def nm_keep_at(sparsity: float, final: float, n: int, m: int) -> int:
    """Weights kept per group of m when a schedule towards n:m stands at `sparsity` of `final`."""
    return m - round((m - n) * (sparsity / final if final > 0 else 1.0))


def layer_masks(scores: dict[str, torch.Tensor], sparsity: float, allocation: str = "uniform",
                nm: tuple[int, int] | None = None, keep_per_group: int | None = None) -> dict[str, torch.Tensor]:
    """{name: score [N, K]} -> {name: keep [N, K] bool}: `keep_per_group` of every m inputs with an
    N:M pattern, else `sparsity` of each layer ("uniform") or of all of them ranked together ("global")."""
    if nm is not None:
        m = nm[1]
        k = nm[0] if keep_per_group is None else keep_per_group
        return {n: nm_mask(s, k, m) if k < m else torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    if allocation == "global":
        return global_masks(scores, sparsity)
    return {n: prune_lowest(s.float().reshape(-1), n_pruned(s.numel(), sparsity)).view_as(s) for n, s in scores.items()}


class GradualPruner(MaskedTraining):
    """Gradual pruning to `final_sparsity` (or an N:M `pattern`) over optimizer steps [start, end],
    masks chosen again every `every` steps (module docstring)."""

    def __init__(self, model: nn.Module, final_sparsity: float | None = None, *, pattern=None, start: int = 0,
                 end: int, every: int = 100, initial: float = 0.0, schedule: str = "cubic",
                 score: str = "magnitude", allocation: str = "uniform", regrow: str = "zero",
                 params: dict[str, nn.Parameter] | None = None, seed: int = 0):
        super().__init__(model, params, regrow)
        self.nm = NMPattern.parse(pattern)
        if (final_sparsity is None) == (self.nm is None):
            raise LlmsqueezeError("give exactly one of a final sparsity (e.g. 0.5) or an N:M pattern (e.g. 2:4)")
        if self.nm is not None:
            final_sparsity = 1 - self.nm[0] / self.nm[1]
            for n in self.params:
                k = self.dense(n).shape[1]
                if k % self.nm[1]:
                    raise LlmsqueezeError(f"pattern {self.nm[0]}:{self.nm[1]} needs input widths divisible by "
                                          f"{self.nm[1]}, but {n} has {k}")
        self.final = check_sparsity(final_sparsity)
        self.initial = check_sparsity(initial)
        if not (0 <= start <= end) or every < 1:
            raise LlmsqueezeError(f"start={start}, end={end}, every={every}: need 0 <= start <= end and every >= 1")
        if schedule not in SCHEDULES:
            raise LlmsqueezeError(f"schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
        if score not in SCORES:
            raise LlmsqueezeError(f"score {score!r}: use one of {', '.join(SCORES)}")
        if allocation not in ALLOCATIONS:
            raise LlmsqueezeError(f"allocation {allocation!r}: use one of {', '.join(ALLOCATIONS)} "
                                  "(learned: llmsqueeze.pruning.learned.LearnedSparsity)")
        if self.nm is not None and allocation != "uniform":
            raise LlmsqueezeError("an N:M pattern is the same in every layer: use allocation 'uniform'")
        self.start, self.end, self.every = start, end, every
        self.schedule, self.score, self.allocation = schedule, score, allocation
        self.updates = set(update_steps(start, end, every))
        self.history: list[dict] = []  # per mask update: step, sparsity, share of the mask that changed
        self._movement = {n: torch.zeros_like(self.dense(n), dtype=torch.float32) for n in self.params} \
            if score == "movement" else {}
        self._random = {}
        if score == "random":
            g = torch.Generator().manual_seed(seed)
            self._random = {n: torch.rand(self.dense(n).shape, generator=g) for n in self.params}
        self._norms: dict[str, torch.Tensor] = {}
        if score == "wanda":
            for n in self.params:
                module = model.get_submodule(n.rpartition(".")[0])
                self._norms[n] = torch.zeros(self.dense(n).shape[1], dtype=torch.float32)
                self._handles.append(module.register_forward_pre_hook(self._input_hook(n)))

    def _input_hook(self, name: str):
        def hook(module, args):
            if torch.is_grad_enabled():  # training batches, not evaluation
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # [tokens, K]
                self._norms[name] += (x * x).sum(0).to(self._norms[name].device)
        return hook

    def on_grad(self, name, grad, dense) -> None:
        if self._movement:
            self._movement[name] -= (grad.float() * dense.float()).to(self._movement[name].device)

    def scores(self) -> dict[str, torch.Tensor]:
        """{name: score [N, K] float32}, higher = kept."""
        out = {}
        for n in self.params:
            w = self.dense(n).float()
            if self.score == "magnitude":
                out[n] = w.abs()
            elif self.score == "movement":
                out[n] = self._movement[n].to(w.device)
            elif self.score == "wanda":
                out[n] = w.abs() * self._norms[n].to(w.device).sqrt()
            else:
                out[n] = self._random[n].to(w.device)
        return out

    def target(self, step: int) -> float:
        return sparsity_at(step, self.final, self.start, self.end, self.initial, self.schedule)

    @torch.no_grad()
    def update(self, step: int) -> None:
        if self.frozen or step not in self.updates:
            return
        s = self.target(step)
        keep_n = None if self.nm is None else nm_keep_at(s, self.final, *self.nm)
        if s == 0 and not self.masks:
            return
        masks = layer_masks(self.scores(), s, self.allocation, self.nm, keep_n)
        changed = sum(int((self.masks[n] != m.to(self.masks[n].device)).sum()) for n, m in masks.items()
                      if n in self.masks)
        total = sum(m.numel() for m in masks.values())
        self.set_masks(masks, freeze=step >= self.end)
        for v in self._norms.values():
            v.zero_()
        pruned = sum(int((~m).sum()) for m in self.masks.values())
        self.history.append({"step": step, "target": s, "sparsity": pruned / total,
                             "changed": changed / total if self.history else None,
                             **({"keep_per_group": keep_n} if keep_n is not None else {})})
