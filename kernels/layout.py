"""The kernels' view of a QuantLinear, built once at load time (torch only, no Triton needed).

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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmsqueeze.quant.pack import pack_rows, unpack_rows


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
