"""The layer Hessian that GPTQ, SparseGPT, Wanda's refit and mixed precision share: H = 2/n sum x x^T
of a Linear's calibration inputs [K, K], accumulated per Linear (HessianStore), and the damped
inverse Cholesky factor the column sweeps run on. Pure tensor math."""
from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger("llmsqueeze")


def accumulate_hessian(h: torch.Tensor, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running mean update of H = 2/n sum x x^T. h [K, K] float32, x [..., K] -> (h, n)."""
    x = x.reshape(-1, x.shape[-1]).float()  # [T, K]
    t = x.shape[0]
    h *= n / (n + t)
    n += t
    x = x * math.sqrt(2 / n)
    h.addmm_(x.t(), x)
    return h, n


def zero_dead_inputs(H: torch.Tensor, W: torch.Tensor) -> None:
    """In place, H [K, K] and W [N, K]: inputs that never fired (H_jj == 0) carry no information; their
    weights become exactly 0 and their diagonal 1, so H can be factored."""
    dead = torch.diag(H) == 0  # [K]
    H[dead, dead] = 1
    W[:, dead] = 0


def inverse_hessian_cholesky(h: torch.Tensor, damp_frac: float, max_tries: int = 6,
                             consume: bool = False) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*I)^-1, with damp = damp_frac * mean(diag H), raised x10
    (and logged) while the factorisation fails.

    consume=True: h is the caller's to give away; the damping goes on its diagonal in place and its
    memory is released once factored (h is left empty), so at most two [K, K] matrices are alive
    (K = 5504: 121 MB each) instead of four."""
    mean_diag = torch.mean(torch.diag(h)).item()
    frac = damp_frac
    # each factor is freed once the next is made
    for attempt in range(max_tries):
        if consume:
            h.diagonal().add_(frac * mean_diag)
            chol, info = torch.linalg.cholesky_ex(h)
            if info.item() == 0:
                h.set_()  # the caller's H is not needed past this point: release its storage
            else:
                h.diagonal().sub_(frac * mean_diag)  # retry from the undamped H
        else:
            hd = h.clone()
            hd.diagonal().add_(frac * mean_diag)
            chol, info = torch.linalg.cholesky_ex(hd)
            del hd
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            del chol
            chol2, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if info2.item() == 0:
                if attempt:
                    log.warning("GPTQ: Hessian not positive definite; damping raised to %.3g of the mean diagonal", frac)
                return chol2, frac
        frac *= 10
    raise FloatingPointError(
        f"the Hessian stays singular after damping {frac / 10:.3g} x its mean diagonal: the calibration data "
        "are degenerate for this layer; use more or longer calibration samples"
    )


class HessianStore:
    """Per-Linear Hessians H = 2/n sum x x^T accumulated from the engine's hooks; Linears fed the very
    same input tensor (q/k/v, gate/up) share one Hessian, accumulated once. Used by GPTQ and SparseGPT."""

    def __init__(self):
        self.hessians: dict[str, list] = {}  # name -> [H, n, owner] (one shared list for shared inputs)
        self._last_input: tuple | None = None  # (tensor, name) seen last; held so its memory is not reused

    def collect(self, name: str, x: torch.Tensor) -> None:
        if name not in self.hessians:
            if self._last_input is not None and self._last_input[0] is x:
                self.hessians[name] = self.hessians[self._last_input[1]]  # same input: share
                return
            k = x.shape[-1]
            self.hessians[name] = [torch.zeros(k, k, device=x.device), 0, name]
        entry = self.hessians[name]
        if entry[2] != name:  # a sharer: its owner accumulates
            return
        entry[0], entry[1] = accumulate_hessian(entry[0], entry[1], x)
        self._last_input = (x, name)

    def pop(self, name: str, exclusive: bool = False) -> tuple[torch.Tensor, int]:
        """-> (H [K, K], tokens) of `name`, forgotten afterwards (kept for the other sharers).
        exclusive=True: a tensor the caller may modify or free (a copy while others still share it)."""
        h, n, owner = self.hessians.pop(name)
        # checked once here, not after every batch (a NaN/Inf input stays in the running sum)
        if not torch.isfinite(h).all():
            raise FloatingPointError(f"the inputs of {name} hold NaN/Inf; check the model and the calibration data")
        sharers = [k for k, v in self.hessians.items() if v[2] == owner]
        if sharers and owner == name:  # hand the shared Hessian to the next sharer
            for k in sharers:
                self.hessians[k][2] = sharers[0]
        if exclusive and sharers:
            h = h.clone()
        return h, n
