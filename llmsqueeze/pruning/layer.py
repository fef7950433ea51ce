"""What every pruning method shares: |w| scores, a mask applied (and the kept weights rounded to
nearest with a scheme: PrunedWeight), and the result turned into the module that replaces a Linear: the same Linear with its zeros
written in (sparse storage happens at save time), or a packed QuantLinear whose pruned weights have
q == zero (they dequantize to exactly 0)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import QuantScheme
from ..nn import QuantLinear, linear_weight
from ..quant.grid import quantize, rtn_qparams


@torch.no_grad()
def set_linear_weight(module: nn.Module, w: torch.Tensor) -> nn.Module:
    """Write w [N, K] into a Linear (or Conv1D, stored [K, N]) in its own dtype."""
    if isinstance(module, nn.Linear):
        module.weight.copy_(w.to(module.weight.dtype))
    else:
        module.weight.copy_(w.t().to(module.weight.dtype))
    return module


def pruned_module(module: nn.Module, res, scheme: QuantScheme | None) -> nn.Module:
    """res: anything with w [N, K] and, when quantized, q/scale/zero [N, K]/[N, ng]/[N, ng]."""
    if scheme is None:
        return set_linear_weight(module, res.w)
    k = linear_weight(module).shape[1]
    return QuantLinear.from_quantized(res.q, res.scale, res.zero, scheme.bits, scheme.group_size_for(k),
                                      bias=module.bias, scale_dtype=scheme.torch_scale_dtype)


def magnitude_score(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] -> |w| [N, K] float32."""
    return w.detach().float().abs()


@dataclass
class PrunedWeight:
    w: torch.Tensor  # [N, K] float32
    keep: torch.Tensor  # [N, K] bool
    q: torch.Tensor | None = None  # [N, K] int32
    scale: torch.Tensor | None = None  # [N, ng]
    zero: torch.Tensor | None = None  # [N, ng]


def apply_mask(w: torch.Tensor, keep: torch.Tensor, scheme: QuantScheme | None = None) -> PrunedWeight:
    """w [N, K] * keep, then (with a scheme) round-to-nearest on the kept weights: group ranges come
    from the masked weight, and pruned weights get q = zero."""
    w = w.detach().float() * keep
    if scheme is None:
        return PrunedWeight(w, keep)
    scale, zero = rtn_qparams(w, scheme)
    g = scheme.group_size_for(w.shape[1])
    q = quantize(w, scale, zero, scheme.bits, g)
    zero_full = zero.repeat_interleave(g, dim=1)[:, : w.shape[1]]
    q = torch.where(keep, q, zero_full)
    deq = (q.float() - zero_full) * scale.repeat_interleave(g, dim=1)[:, : w.shape[1]]
    return PrunedWeight(deq, keep, q, scale, zero)
