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
    "shadow" (default): the forward pass uses w * mask, but the optimizer updates the dense weights
        (kept in a shadow copy) with the gradient taken at the pruned point, so a pruned weight keeps
        learning and comes back with its own value when its score rises again (dynamic pruning with
        feedback, Lin et al., 2020). After `end` the masks are fixed and pruned weights stay zero.
    "zero": a pruned weight is set to zero and gets no update (Zhu & Gupta); it can come back only
        at zero, when its score (e.g. accumulated movement) overtakes a kept one at a later update.
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
from .iterative import prunable_params
from .masks import global_masks, n_pruned, nm_mask, prune_lowest

SCHEDULES = ("cubic", "linear")
SCORES = ("magnitude", "movement", "wanda", "random")
ALLOCATIONS = ("uniform", "global")
REGROW = ("shadow", "zero")


def sparsity_at(step: int, final: float, start: int, end: int, initial: float = 0.0, kind: str = "cubic") -> float:
    """The scheduled sparsity after `step` optimizer steps (module docstring)."""
    if kind not in SCHEDULES:
        raise LlmsqueezeError(f"schedule {kind!r}: use one of {', '.join(SCHEDULES)}")
    if step <= start:
        return initial
    if step >= end:
        return final
    frac = (step - start) / (end - start)
    if kind == "cubic":
        return final + (initial - final) * (1 - frac) ** 3
    return initial + (final - initial) * frac


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


class MaskedTraining:
    """The optimizer hooks every in-training pruner shares: the forward pass sees `effective(w)` (the
    masked weight), the optimizer steps the dense weights (`shadow`) or only the kept ones (`zero`).

    Subclasses decide the masks: `on_grad(name, grad, dense)` sees each gradient before the step,
    `update(step)` runs after each step (and may call `set_masks`)."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter] | None = None, regrow: str = "shadow"):
        if regrow not in REGROW:
            raise LlmsqueezeError(f"regrow {regrow!r}: use one of {', '.join(REGROW)}")
        self.model = model
        self.params = params if params is not None else prunable_params(model)
        if not self.params:
            raise LlmsqueezeError(f"{type(model).__name__} has no Linear weights to prune")
        self.regrow = regrow
        self.masks: dict[str, torch.Tensor] = {}
        self.shadow: dict[str, torch.Tensor] = {}
        self.step = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self._handles: list = []
        self.frozen = False  # after the schedule: masks fixed, pruned weights zero
        self.dense_grad = True  # shadow: pruned weights get the gradient taken at the pruned point
        # Conv1D (GPT-2) stores W as [K, N]; scores and masks are always [N, K]
        self._transposed = {n: not isinstance(model.get_submodule(n.rpartition(".")[0]), nn.Linear)
                            for n in self.params}

    # -- orientation
    def rows(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A [N, K] view of a tensor shaped like parameter `name`, and back (a transpose is its own inverse)."""
        return t.t() if self._transposed[name] else t

    def dense(self, name: str) -> torch.Tensor:
        """The dense weight [N, K] (the shadow copy while one is kept)."""
        return self.rows(name, self.shadow.get(name, self.params[name].detach()))

    # -- the optimizer's hooks
    def attach(self, optimizer: torch.optim.Optimizer) -> "MaskedTraining":
        self.optimizer = optimizer
        self._handles += [optimizer.register_step_pre_hook(lambda *a, **k: self._before_step()),
                          optimizer.register_step_post_hook(lambda *a, **k: self._after_step())]
        self.update(self.step)
        return self

    @torch.no_grad()
    def _before_step(self) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                self.on_grad(n, self.rows(n, p.grad), self.dense(n))
            if n in self.shadow:  # the dense weights take the step
                p.copy_(self.shadow[n])
            if p.grad is not None and n in self.masks and (n not in self.shadow or not self.dense_grad):
                p.grad.mul_(self.rows(n, self.masks[n]))

    @torch.no_grad()
    def _after_step(self) -> None:
        for n in self.shadow:
            self.shadow[n].copy_(self.params[n])
        self.step += 1
        self.update(self.step)
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """The parameters <- the effective weights the forward pass uses."""
        for n, m in self.masks.items():
            p = self.params[n]
            if n in self.shadow:
                p.copy_(self.rows(n, self.effective(n, self.dense(n))))
            else:
                p.mul_(self.rows(n, m))

    def effective(self, name: str, dense: torch.Tensor) -> torch.Tensor:
        """dense [N, K] -> the weight [N, K] the forward pass uses."""
        return dense * self.masks[name]

    # -- masks
    @torch.no_grad()
    def set_masks(self, masks: dict[str, torch.Tensor], freeze: bool = False) -> None:
        """New masks ([N, K] bool, True = keep): the optimizer state of newly pruned weights cleared;
        with `freeze` (or regrow "zero") pruned weights are zeroed for good and no shadow is kept."""
        for n, keep in masks.items():
            p = self.params[n]
            keep = keep.to(p.device)
            old = self.masks.get(n)
            gone = ~keep if old is None else old & ~keep
            if self.optimizer is not None:
                for v in self.optimizer.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        v.masked_fill_(self.rows(n, gone), 0)
            if self.regrow == "shadow" and not freeze:
                if n not in self.shadow:
                    self.shadow[n] = p.detach().clone()
            else:
                dense = self.shadow.pop(n, None)
                if dense is not None:
                    p.copy_(dense)
            self.masks[n] = keep
        if freeze:
            self.frozen = True
        self.apply()

    def on_grad(self, name: str, grad: torch.Tensor, dense: torch.Tensor) -> None:
        """grad, dense [N, K]: seen before every optimizer step."""

    def update(self, step: int) -> None:
        """Called after every optimizer step (and once on attach) with the number of steps taken."""

    def finish(self) -> dict[str, torch.Tensor]:
        """Remove the hooks; the weights stay pruned. -> the masks {name: [N, K] bool}."""
        for h in self._handles:
            h.remove()
        self._handles = []
        with torch.no_grad():
            self.shadow.clear()
            self.apply()
        return dict(self.masks)


class GradualPruner(MaskedTraining):
    """Gradual pruning to `final_sparsity` (or an N:M `pattern`) over optimizer steps [start, end],
    masks chosen again every `every` steps (module docstring)."""

    def __init__(self, model: nn.Module, final_sparsity: float | None = None, *, pattern=None, start: int = 0,
                 end: int, every: int = 100, initial: float = 0.0, schedule: str = "cubic",
                 score: str = "magnitude", allocation: str = "uniform", regrow: str = "shadow",
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


def sparsity_report(masks: dict[str, torch.Tensor]) -> dict:
    """{"sparsity": over all, "layers": {name: sparsity}} of keep masks."""
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    return {"sparsity": pruned / total if total else 0.0,
            "layers": {n: 1 - int(m.sum()) / m.numel() for n, m in masks.items()}}

