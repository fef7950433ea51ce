"""Turning a pruning result into the module that replaces a Linear: the same Linear with its zeros
written in (sparse storage happens at save time), or a packed QuantLinear whose pruned weights have
q == zero (they dequantize to exactly 0)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import QuantScheme
from ..nn import QuantLinear, linear_weight


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
