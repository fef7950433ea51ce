"""The nn side of the Triton kernels: what turns a layer into the tensors `llmsqueeze.kernels` takes.

`llmsqueeze/kernels/` takes tensors and plain values only and imports
nothing from this package; the module-aware glue lives here, and nn.py calls it:

    quant_linear(x2, module)   QuantLinear.forward's kernel path: x2 [M, K] -> [M, N] (bias added), or None
    lut_linear(x2, module)     the same for LUTLinear (non-uniform grids), the nf levels handed in as a tensor
    kernel_weights(module)     the kernels' cached view of a QuantLinear (KernelWeights, below)
(`nn.prepare_model(model)` builds that view for every QuantLinear up front, before torch.compile.)

The kernels' view of a QuantLinear is built once at load time (torch only, no Triton needed).
Natural order (no g_idx, or a g_idx equal to k // G) runs on the module's own buffers: no copy.

Activation order: g_idx [K] gives each input row's group, in any order. Two cases:
  * the rows sorted by group form whole groups of G in natural position (sorted g_idx == k // G),
    which is what GPTQ's dynamic act-order writes: permute the weight rows once (a repacked copy
    of qweight) and gather x's columns by the same permutation per call; x[:, perm] @ W^T[perm]
    equals x @ W^T, and the kernels then see contiguous groups (the fast path).
  * anything else (groups of unequal sizes, hand-made g_idx): keep the layout and let the kernel
    gather each row's scale and zero through g_idx (GROUP_MODE 2), correct for every g_idx.
GPTQ with static groups stores no g_idx at all (its groups are natural-order groups).

The cache lives in a plain attribute of the module, never in its state_dict: checkpoints do not change.
Triton is still imported on the first kernel call only (the launchers are imported inside the calls).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels  # light: Triton itself is imported on the first kernel call
from .quant.lut import nf_levels
from .quant.pack import pack_rows, unpack_rows


@dataclass
class KernelWeights:
    qweight: torch.Tensor  # int32 [K_pad*bits/32, N]: the module's buffer, or a row-permuted copy
    scales: torch.Tensor  # [ng, N] as stored (fp16/bf16)
    qzeros: torch.Tensor  # int32 [ng, N_pad*bits/32] as stored
    g_idx: torch.Tensor | None  # int32 [K] for the kernel's per-row gather (GROUP_MODE 2), else None
    perm: torch.Tensor | None  # int64 [K]: gather x[:, perm] before the kernel (permuted act-order)
    bits: int
    group_size: int
    in_features: int
    out_features: int


def act_order_plan(g_idx: torch.Tensor | None, in_features: int, group_size: int):
    """-> (perm or None, g_idx for the kernel or None): see the module docstring."""
    if g_idx is None:
        return None, None
    natural = torch.arange(in_features, device=g_idx.device) // group_size
    g = g_idx.long()
    if torch.equal(g, natural):
        return None, None
    perm = torch.argsort(g, stable=True)
    if torch.equal(g[perm], natural):
        return perm, None
    return None, g_idx.to(torch.int32).contiguous()


def kernel_weights(module) -> KernelWeights:
    """The (cached) KernelWeights of a QuantLinear; nn.QuantLinear drops the cache on .to()/load."""
    cache = getattr(module, "_kernel_cache", None)
    if cache is not None:
        return cache
    k, bits, g = module.in_features, module.bits, module.group_size
    perm, gidx = act_order_plan(module.g_idx, k, g)
    qweight = module.qweight
    if perm is not None:  # rows in group order: repack [K, N] values permuted along K
        qweight = pack_rows(unpack_rows(qweight, bits, k)[perm], bits)
    cache = KernelWeights(
        qweight=qweight.contiguous(), scales=module.scales.contiguous(), qzeros=module.qzeros.contiguous(),
        g_idx=gidx, perm=perm, bits=bits, group_size=g, in_features=k, out_features=module.out_features,
    )
    module._kernel_cache = cache
    return cache


def quant_linear(x2, module):
    """x2 [M, K] -> y [M, N] = x2 @ W^T + bias through the Triton kernels, or None when this layer or
    input cannot run on them (Triton missing, float32 activations), so the caller falls back to torch."""
    if not kernels.available() or x2.dtype not in (torch.float16, torch.bfloat16):
        return None
    from .kernels.dispatch import quant_matmul

    if x2.shape[0] == 0:  # an empty grid is not a launch
        return None
    w = kernel_weights(module)
    x = x2 if w.perm is None else x2.index_select(1, w.perm)
    y = quant_matmul(x.contiguous(), w.qweight, w.scales, w.qzeros, w.g_idx, w.bits, w.group_size, w.in_features)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y


def lut_linear(x2, module):
    """x2 [M, K] -> y [M, N] = x2 @ W^T + bias for a LUTLinear through the lookup kernel, or None when
    it cannot run (Triton missing, float32 activations, no rows): the caller falls back to torch."""
    if not kernels.available() or x2.dtype not in (torch.float16, torch.bfloat16) or x2.shape[0] == 0:
        return None
    from .kernels.dispatch import lut_matmul

    if module.grid == "nf":
        scales, table = module.scales, nf_levels(module.bits, x2.device)
    else:
        scales, table = None, module.codebook
    y = lut_matmul(x2.contiguous(), module.qweight, scales, table, module.bits, module.group_size, module.in_features)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y
