"""Learned per-layer sparsity under one global budget, during training.

The reparametrization is STR's (Kusupati et al., "Soft Threshold Weight Reparameterization for
Learnable Sparsity", ICML 2020): each layer l has a learned threshold tau_l and the forward pass uses

    w_eff = sign(w) * relu(|w| - tau_l)                 (a weight below its layer's threshold is pruned)

so that a layer's sparsity is learned, not set. STR steers the total sparsity only indirectly (through
the weight decay on the thresholds); here the budget is held exactly, along the schedule of
pruning/schedule.py, and the thresholds move by the task loss as a budget-constrained problem:

    tau_l = exp(a_l + c)          a_l learned per layer; c shared, solved at every step so that exactly
                                  floor(s(t) * total) weights lie at or below their threshold
    u_l   = (dL/dtau_l) / rho_l   the loss increase per weight pruned in layer l: dL/dtau_l = sum over
                                  kept weights of -sign(w) * dL/dw_eff, rho_l the number of |w| per
                                  unit of threshold at tau_l (a histogram bin of +-`band` around it)
    a_l  <- a_l - lr * (u_l - mean u) / mean |u - mean u|        (u averaged over steps, `momentum`)

At the optimum the cost of pruning one more weight is the same in every layer (the KKT condition of
"least loss at a fixed count"); a layer where pruning costs more than average lowers its threshold
and the shared c raises everyone else's. The a_l start at the uniform allocation (each layer's
quantile at the final sparsity), so what the run learns is the departure from uniform.

As in STR, a weight below its threshold gets no gradient, and comes back when the threshold drops
below it. At `end` the masks are fixed at exactly the final sparsity (the weights ranked by
|w| / exp(a_l) across layers), the soft-thresholded weights written, and training goes on with the
masks held.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import LlmsqueezeError, check_sparsity
from .masks import n_pruned, prune_lowest
from .training import SCHEDULES, MaskedTraining, sparsity_at, sparsity_report


class LearnedSparsity(MaskedTraining):
    """Budgeted STR over optimizer steps [start, end] (module docstring); attach like GradualPruner."""

    def __init__(self, model: nn.Module, final_sparsity: float, *, start: int = 0, end: int,
                 initial: float = 0.0, schedule: str = "cubic", lr: float = 0.005, momentum: float = 0.9,
                 band: float = 0.05, log_every: int = 50, params: dict[str, nn.Parameter] | None = None):
        super().__init__(model, params, regrow="shadow")
        self.dense_grad = False  # STR: a weight under its threshold has no gradient
        self.final, self.initial = check_sparsity(final_sparsity), check_sparsity(initial)
        if not (0 <= start < end):
            raise LlmsqueezeError(f"start={start}, end={end}: need 0 <= start < end")
        if schedule not in SCHEDULES:
            raise LlmsqueezeError(f"schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
        if lr < 0 or not 0 <= momentum < 1 or not 0 < band < 1:
            raise LlmsqueezeError(f"lr={lr}, momentum={momentum}, band={band}: need lr >= 0, 0 <= momentum < 1, 0 < band < 1")
        self.start, self.end, self.schedule = start, end, schedule
        self.lr, self.momentum, self.band, self.log_every = lr, momentum, band, log_every
        self.total = sum(p.numel() for p in self.params.values())
        with torch.no_grad():  # the uniform allocation at the final sparsity
            self.log_a = {n: math.log(max(float(self.dense(n).float().abs().reshape(-1).kthvalue(
                max(1, n_pruned(self.dense(n).numel(), self.final))).values), 1e-12)) for n in self.params}
        self.c = -math.inf
        self._cost: dict[str, float] = {}
        self._grad_tau: dict[str, float] = {}
        self.history: list[dict] = []

    def tau(self, name: str) -> float:
        return math.exp(self.log_a[name] + self.c)

    def effective(self, name, dense):
        t = self.tau(name)
        return dense.sign() * (dense.abs() - t).clamp_min(0)

    def on_grad(self, name, grad, dense) -> None:
        if name not in self.masks or self.frozen:
            return
        t = self.tau(name)
        a = dense.float().abs()
        kept = a > t
        self._grad_tau[name] = float(-(grad.float() * dense.sign().float())[kept].sum())
        lo, hi = t / (1 + self.band), t * (1 + self.band)
        rho = float(((a > lo) & (a <= hi)).sum()) / (hi - lo)
        u = self._grad_tau[name] / max(rho, 1e-12)
        old = self._cost.get(name)
        self._cost[name] = u if old is None else self.momentum * old + (1 - self.momentum) * u

    @torch.no_grad()
    def _ratios(self) -> torch.Tensor:
        """|w| / exp(a_l) of every weight, concatenated [total]."""
        return torch.cat([(self.dense(n).float().abs() / math.exp(self.log_a[n])).reshape(-1).cpu()
                          for n in self.params])

    @torch.no_grad()
    def update(self, step: int) -> None:
        if self.frozen or step < self.start:
            return
        if len(self._cost) == len(self.params) and self.lr > 0:
            u = torch.tensor([self._cost[n] for n in self.params], dtype=torch.float64)
            dev = u - u.mean()
            scale = float(dev.abs().mean())
            if scale > 0:
                for n, d in zip(self.params, (dev / scale).tolist()):
                    self.log_a[n] -= self.lr * d
        s = sparsity_at(step, self.final, self.start, self.end, self.initial, self.schedule)
        k = n_pruned(self.total, s)
        if step >= self.end:
            self._freeze(k)
        elif k > 0:
            ratios = self._ratios()
            self.c = math.log(max(float(ratios.kthvalue(k).values), 1e-30))
            masks = {n: self.dense(n).abs() > self.tau(n) for n in self.params}
            self.set_masks(masks)
        if step % self.log_every == 0 or self.frozen:
            self.history.append({"step": step, "target": s, **self.report()})

    @torch.no_grad()
    def _freeze(self, k: int) -> None:
        ratios = self._ratios()
        keep = prune_lowest(ratios, k)
        if k > 0:
            self.c = math.log(max(float(ratios.kthvalue(k).values), 1e-30))
        masks, i = {}, 0
        for n in self.params:
            w = self.dense(n)
            masks[n] = keep[i : i + w.numel()].view_as(w).to(w.device)
            i += w.numel()
            if n in self.shadow:  # STR's weights: soft-thresholded, now fixed
                self.params[n].copy_(self.rows(n, self.effective(n, self.shadow.pop(n)) * masks[n]))
            else:
                self.params[n].mul_(self.rows(n, masks[n]))
        self.set_masks(masks, freeze=True)

    def report(self) -> dict:
        """{"sparsity": overall, "layers": {name: sparsity}} of the current masks."""
        return sparsity_report(self.masks)
