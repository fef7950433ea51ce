"""The optimal-brain-surgeon column sweep that SparseGPT runs and that Wanda reuses to quantize (or
refit) under its own mask: see pruning/sparsegpt.py for the method. Pure tensor math."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import LlmsqueezeError, QuantScheme
from ..quant.grid import rtn_qparams
from ..quant.hessian import inverse_hessian_cholesky, zero_dead_inputs
from .masks import check_nm_width, check_sparsity, n_pruned, prune_lowest
from .refit import reconstruction_error, refit_masked


@dataclass
class SparseGPTResult:
    w: torch.Tensor  # [N, K] float32: pruned, updated (dequantized when quantized) weight
    keep: torch.Tensor  # [N, K] bool
    q: torch.Tensor | None  # [N, K] int32 (q == zero where pruned), with a scheme
    scale: torch.Tensor | None  # [N, ng] float32
    zero: torch.Tensor | None  # [N, ng] int32
    loss: float  # sum over columns of (w - v)^2 / d^2 / 2: the layer-output error minimised
    damp: float


@torch.no_grad()
def sparsegpt_prune(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    scheme: QuantScheme | None = None,
    keep: torch.Tensor | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    scope: str = "layer",
) -> SparseGPTResult:
    """w [N, K], h [K, K] float32 -> SparseGPTResult.

    sparsity: fraction pruned (unstructured; exactly floor(s*N*K) over the layer, spread over blocks
    of `block_size` columns, compared across the whole block ("layer", the paper) or within each row
    of the block ("row")); nm: (n, m) keeps n of every m inputs instead; keep: a fixed mask [N, K]
    (then only the update and quantization run); scheme: also quantize, in the same sweep."""
    W = w.detach().float().clone()  # [N, K]
    rows, k = W.shape
    if keep is None and nm is None:
        check_sparsity(sparsity)
    if nm is not None:
        check_nm_width(*nm, k)
        block_size = max(nm[1], block_size // nm[1] * nm[1])  # a group of m never straddles two blocks
    if scope not in ("layer", "row"):
        raise LlmsqueezeError(f"scope {scope!r}: SparseGPT compares within a block ('layer') or each block row ('row')")
    H = h.detach().float().clone()
    zero_dead_inputs(H, W)  # (they are pruned first)
    Hinv, used_damp = inverse_hessian_cholesky(H, damp)
    del H

    mask = torch.ones(rows, k, dtype=torch.bool, device=W.device) if keep is None else keep.clone().bool()
    if scheme is not None:
        g = scheme.group_size_for(k)
        maxq = 2**scheme.bits - 1
        ng = math.ceil(k / g)
        Q = torch.zeros(rows, k, dtype=torch.int32, device=W.device)
        scale = torch.zeros(rows, ng, device=W.device)
        zero = torch.zeros(rows, ng, dtype=torch.int32, device=W.device)
    losses = torch.zeros(rows, device=W.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()  # [N, B]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)  # [B]
        if keep is None and nm is None:
            score = W1**2 / d1**2  # [N, B]: the OBS saliency of removing each weight
            if scope == "layer":  # floor(s * N * i2) pruned up to column i2: exact over the layer
                cnt = n_pruned(rows * i2, sparsity) - n_pruned(rows * i1, sparsity)
                mask[:, i1:i2] = prune_lowest(score.reshape(-1), cnt).view_as(score)
            else:
                cnt = n_pruned(i2, sparsity) - n_pruned(i1, sparsity)
                mask[:, i1:i2] = prune_lowest(score, cnt)
        for i in range(i2 - i1):
            col = i1 + i
            if keep is None and nm is not None and col % nm[1] == 0:
                n, m = nm
                score = W1[:, i : i + m] ** 2 / d1[i : i + m] ** 2  # [N, m]
                mask[:, col : col + m] = prune_lowest(score, m - n)
            w_col, d, kc = W1[:, i], d1[i], mask[:, col]
            if scheme is not None:
                if col % g == 0:  # group parameters from the updated, masked weights of the group
                    span = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : min(g, k - col)]
                    span = span * mask[:, col : col + span.shape[1]]
                    s, z = rtn_qparams(span, scheme)  # [N, 1] each
                    scale[:, col // g], zero[:, col // g] = s[:, 0], z[:, 0]
                s, z = scale[:, col // g], zero[:, col // g]
                q = (torch.round(w_col / s) + z).clamp(0, maxq)
                q = torch.where(kc, q, z.float())
                Q[:, col] = q.to(torch.int32)
                v = (q - z) * s
            else:
                v = w_col * kc
            err = (w_col - v) / d
            losses += err**2 / 2
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = v  # exact zeros where pruned
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    loss = losses.sum().item()
    if not math.isfinite(loss):
        raise FloatingPointError("SparseGPT produced NaN/Inf (the inputs or weights hold NaN/Inf)")
    if scheme is None:
        return SparseGPTResult(W, mask, None, None, None, loss, used_damp)
    return SparseGPTResult(W, mask, Q, scale, zero, loss, used_damp)


def refit_result(w: torch.Tensor, h: torch.Tensor, res, scheme: QuantScheme | None, damp: float,
                 block_size: int) -> SparseGPTResult:
    """A mask `res.keep` [N, K] on weights w [N, K] -> the least-squares kept weights (pruning/refit.py),
    and with a scheme those rounded by the mask-fixed OBS sweep (a sparse GPTQ from the refit weights)."""
    fitted = refit_masked(w, h, res.keep, damp=damp, start=res.w)  # [N, K]
    if scheme is not None:
        return sparsegpt_prune(fitted, h, keep=res.keep, scheme=scheme, damp=damp, block_size=block_size)
    loss = reconstruction_error(fitted, w, h)
    if not math.isfinite(loss):
        raise FloatingPointError("the refit produced NaN/Inf (the inputs or weights hold NaN/Inf)")
    return SparseGPTResult(fitted, res.keep, None, None, None, loss, res.damp)
