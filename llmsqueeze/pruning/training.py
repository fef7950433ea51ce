"""What the pruners that work during training share: keeping masks through an optimizer's steps
(MaskGuard for fixed masks, MaskedTraining for masks that change), the prunable weights of a model,
magnitude masks, and the sparsity schedules (cubic, Zhu & Gupta 2017, or linear: pruning/schedule.py
says how they read).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import LlmsqueezeError
from .masks import global_masks, n_pruned, prune_lowest

SCHEDULES = ("cubic", "linear")
REGROW = ("shadow", "zero")


class MaskGuard:
    """Keeps `params[name] * masks[name]` (True = keep) through training."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self.masks: dict[str, torch.Tensor] = {}
        self._handles: list = []

    @torch.no_grad()
    def set_masks(self, masks: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """New masks: weights and (when given) the optimizer's per-weight state zeroed where pruned."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.masks = {n: m.to(self.params[n].device) for n, m in masks.items()}
        for n, m in self.masks.items():
            p = self.params[n]
            p.mul_(m)
            self._handles.append(p.register_hook(lambda g, m=m: g * m))
        if optimizer is not None:
            self.attach(optimizer)
            for n, m in self.masks.items():
                for v in optimizer.state.get(self.params[n], {}).values():
                    if isinstance(v, torch.Tensor) and v.shape == m.shape:
                        v.mul_(m)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-apply the masks after each of this optimizer's steps."""
        self._handles.append(optimizer.register_step_post_hook(lambda *a, **k: self.apply()))

    @torch.no_grad()
    def apply(self) -> None:
        for n, m in self.masks.items():
            self.params[n].mul_(m)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def prunable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight matrices of every Linear (GPT-2 Conv1D too), except the output head/embeddings."""
    from ..nn import is_linear

    skip = set()
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        m = getattr(model, getter, lambda: None)()
        if m is not None:
            skip.add(id(m.weight))
    return {f"{n}.weight": m.weight for n, m in model.named_modules() if is_linear(m) and id(m.weight) not in skip}


def magnitude_masks(params: dict[str, nn.Parameter], sparsity: float, scope: str = "global",
                    previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Masks at `sparsity` by |w|, the previously pruned weights pruned first (they stay pruned)."""
    scores = {}
    for n, p in params.items():
        s = p.detach().float().abs()
        if previous is not None:
            s = torch.where(previous[n], s, torch.full_like(s, -1.0))
        scores[n] = s
    if scope == "global":
        return global_masks(scores, sparsity)
    return {n: prune_lowest(s.reshape(-1), n_pruned(s.numel(), sparsity)).view_as(s) for n, s in scores.items()}


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
            # newly pruned; at the freeze of a shadow, every pruned weight (they kept learning until now)
            gone = ~keep if old is None or (freeze and n in self.shadow) else old & ~keep
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


def sparsity_report(masks: dict[str, torch.Tensor]) -> dict:
    """{"sparsity": over all, "layers": {name: sparsity}} of keep masks."""
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    return {"sparsity": pruned / total if total else 0.0,
            "layers": {n: 1 - int(m.sum()) / m.numel() for n, m in masks.items()}}

