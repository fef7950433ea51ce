"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding
error onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

    H = 2/n * sum_x x x^T                               [K, K], float32, from calibration inputs
    Hinv = chol(inverse(H + damp*I)) (upper)            the "lazy batch" form of Alg. 1 in the paper
    for each column i:  q_i = quant(w_i);  e = (w_i - q_i) / Hinv[i, i];  w_j -= e * Hinv[i, j]  (j > i)

Groups of `group_size` columns share a scale/zero, chosen when the sweep reaches the group's first
column (from the already-updated weights), optionally by the clipping search of `grid`. With
`act_order` the columns are visited by decreasing Hessian diagonal; `static_groups` then fixes each
group's scale/zero up front from the natural column order, so the checkpoint needs no `g_idx` and
runs on the fast kernel paths.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..config import LlmsqueezeError, QuantScheme, scheme_for
from . import fp, ggml
from .grid import rtn_qparams
from .hessian import HessianStore, accumulate_hessian, inverse_hessian_cholesky, zero_dead_inputs  # noqa: F401

log = logging.getLogger("llmsqueeze")


@dataclass
class GPTQResult:
    q: torch.Tensor  # [N, K] int32, original column order
    scale: torch.Tensor  # [N, ng] float32 (holding scale-dtype values)
    zero: torch.Tensor  # [N, ng] int32
    g_idx: torch.Tensor | None  # [K] int32 group of each column, only for act-order without static groups
    loss: float  # sum over columns of (w - q)^2 / Hinv_ii^2 / 2: the layer-output error GPTQ minimises
    damp: float  # the damping finally used (raised if the Cholesky factorisation failed)
    table: torch.Tensor | None = None  # [N, ng, 2**bits] levels of a non-uniform grid (q are indices into it)


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    scheme: QuantScheme,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    act_aware_clip: bool = True,
    consume_h: bool = False,
    table: torch.Tensor | None = None,
    group_size: int | None = None,
) -> GPTQResult:
    """w [N, K] (any float dtype), h [K, K] float32 Hessian -> GPTQResult. Each group's scale/zero
    comes from `rtn_qparams` on that group's columns, so the scheme's clipping search applies; with
    `act_aware_clip` its error is weighted per column by the Hessian diagonal (mean x_k^2).
    consume_h=True: h is handed over (the caller keeps no reference and must not use it again): it is
    worked on in place and freed early instead of copied, halving the peak [K, K] memory.
    `table` [N, ng, L] (sorted along L) with `group_size`: given levels per group (a floating-point
    format's values times each group's scale, quant/fp.py): the columns are rounded to the nearest of
    them, `scheme` is not read, and q holds level indices."""
    W = w.detach().float().clone()  # [N, K]
    n, k = W.shape
    given = table is not None
    if given:
        scheme = QuantScheme(bits=8, group_size=group_size, clip_search=False)  # only its group size is read
    bits = scheme.bits
    g = scheme.group_size_for(k)
    ng = math.ceil(k / g)
    maxq = 2**bits - 1
    H = h.detach().float() if consume_h else h.detach().float().clone()
    del h

    zero_dead_inputs(H, W)

    hdiag = torch.diag(H) if act_aware_clip and scheme.clip_search else None  # [K] natural order

    scale = torch.zeros(n, ng, device=W.device)
    zero = torch.zeros(n, ng, dtype=torch.int32, device=W.device)
    mid = None
    if given or scheme.grid != "uniform":  # levels fitted up front per group, like static groups (quant/lut.py);
        from .lut import lut_table

        if act_order and not static_groups:
            raise LlmsqueezeError(f"grid={'given levels' if given else repr(scheme.grid)} fixes its levels per "
                                  "natural-order group: use act_order with static_groups (--act-order static, the "
                                  "default) or no act_order")
        if not given:
            table, nf_scale = lut_table(W, scheme, torch.diag(H))
            if nf_scale is not None:
                scale = nf_scale
        mid = (table[..., 1:] + table[..., :-1]) / 2  # [N, ng, L-1]: a column's index = #midpoints below it
        static_groups = True
    elif static_groups:  # every group's parameters from the natural order, before any update (one call:
        scale, zero = rtn_qparams(W, scheme, hdiag)  # groups are independent, the search is vectorised)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm[:, None], perm]  # one gather: no [K, K] intermediate
        if hdiag is not None:
            hdiag = hdiag[perm]
    Hinv, used_damp = inverse_hessian_cholesky(H, damp, consume=True)  # H is this function's own by now
    del H

    Q = torch.zeros(n, k, dtype=torch.int32, device=W.device)
    losses = torch.zeros(n, device=W.device)
    col_group = torch.arange(k, device=W.device) // g  # natural group of each natural column
    if perm is not None:
        col_group = col_group[perm]  # ... of each visited column (static groups)
    cur_s = cur_z = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()  # [N, B]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            w_col = W1[:, i]
            d = Hinv1[i, i]
            if table is not None:  # nearest level of the row's group table
                gi = col_group[col]
                qi = (w_col.unsqueeze(1) > mid[:, gi]).sum(1, keepdim=True)  # [N, 1]
                Q[:, col] = qi.squeeze(1).to(torch.int32)
                dq = table[:, gi].gather(1, qi).squeeze(1)
                losses += (w_col - dq) ** 2 / d**2 / 2
                err = (w_col - dq) / d
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
                continue
            if static_groups:
                gi = col_group[col]
                s, z = scale[:, gi], zero[:, gi].float()
            else:
                if col % g == 0:  # a new group (in visiting order): parameters from the updated weights
                    gi = col // g
                    span = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : min(g, k - col)]
                    hw = None if hdiag is None else hdiag[col : col + span.shape[1]]
                    cur_s, cur_z = rtn_qparams(span, scheme, hw)  # one group: <= g columns
                    scale[:, gi : gi + 1], zero[:, gi : gi + 1] = cur_s, cur_z
                s, z = cur_s[:, 0], cur_z[:, 0].float()
            q = (torch.round(w_col / s) + z).clamp(0, maxq)
            Q[:, col] = q.to(torch.int32)
            dq = (q - z) * s
            losses += (w_col - dq) ** 2 / d**2 / 2
            err = (w_col - dq) / d
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        if not static_groups:  # visiting-order groups: column perm[j] belongs to group j // g
            g_idx = (torch.arange(k, device=W.device) // g)[inv].to(torch.int32)
    loss = losses.sum().item()
    if not math.isfinite(loss) or not torch.isfinite(scale).all():
        raise FloatingPointError("GPTQ produced NaN/Inf (the inputs or weights hold NaN/Inf)")
    return GPTQResult(Q, scale, zero, g_idx, loss, used_damp, table)


class GPTQ:
    """The engine's method for GPTQ: accumulates each Linear's Hessian from its inputs (HessianStore),
    then swaps the Linear for a packed QuantLinear."""

    def __init__(self, scheme, damp: float = 0.01, block_size: int = 128, act_order: bool = True,
                 static_groups: bool = True, act_aware_clip: bool = True):
        self.scheme, self.damp, self.block_size = scheme, damp, block_size
        self.act_order, self.static_groups = act_order, static_groups
        self.act_aware_clip = act_aware_clip
        self.store = HessianStore()
        self.report: list[dict] = []
        self.layer_schemes: dict | None = None  # mixed precision: per-layer overrides of `scheme`

    def collect(self, name: str, module, x: torch.Tensor) -> None:
        self.store.collect(name, x)

    def apply(self, name: str, module):
        from ..nn import QuantLinear, linear_weight

        held = list(self.store.pop(name, exclusive=True))  # [H, tokens]: H is handed over below
        n = held[1]
        w = linear_weight(module)
        s = self.scheme
        if self.layer_schemes:
            s = scheme_for(s, self.layer_schemes, name)
        try:
            res = gptq_quantize(w, held.pop(0), s, self.damp, self.block_size, self.act_order, self.static_groups,
                                self.act_aware_clip, consume_h=True)
        except FloatingPointError as e:
            raise FloatingPointError(f"GPTQ failed on {name}: {e}") from None
        self.report.append({"layer": name, "loss": res.loss, "damp": res.damp, "samples": n})
        log.info("GPTQ %s: loss %.4g (damp %.3g, %d tokens)", name, res.loss, res.damp, n)
        if res.table is not None:
            from ..nn import LUTLinear

            return LUTLinear.from_quantized(res.q, res.table, res.scale, s.bits, s.group_size_for(w.shape[1]), s.grid,
                                            bias=module.bias, scale_dtype=s.torch_scale_dtype)
        return QuantLinear.from_quantized(
            res.q, res.scale, res.zero, s.bits, s.group_size_for(w.shape[1]),
            bias=module.bias, scale_dtype=s.torch_scale_dtype, g_idx=res.g_idx,
        )


# the int8 weight grid of W8A8 in weight-only terms: 8-bit, one symmetric scale per output channel
# kept in float32; q - 128 is the int8 weight
INT8_CHANNEL_SCHEME = dict(bits=8, group_size=-1, sym=True, scale_dtype="float32")


class FloatGPTQ(GPTQ):
    """GPTQ on a floating-point format (FloatScheme, quant/fp.py): each group's scale is fixed first
    (its max|w|, or the scale search weighted by the Hessian diagonal), then the sweep rounds every
    column to the nearest value of the format times its group's scale and spreads the error as GPTQ
    does. Returns a FloatLinear (its activation scale, if any, is set by quant/w8a8)."""

    def __init__(self, scheme, **kw):
        super().__init__(scheme, **kw)
        self.fmt = fp.FORMATS[scheme.format]
        self.global_amax: dict[str, float] = {}  # nvfp4: set by quant/w8a8 (Linears sharing a global scale)

    def apply(self, name: str, module):
        from ..nn import linear_weight
        from ..nn_float import FloatLinear

        held = list(self.store.pop(name, exclusive=True))
        n_tokens = held[1]
        h = held.pop(0)
        w = linear_weight(module).detach().float()
        n, k = w.shape
        s, fmt = self.scheme, self.fmt
        problem = fp.non_finite(w, name, s.format)
        if problem:
            raise LlmsqueezeError(problem)
        scales = fp.layer_scales(w, fmt, s.scale_search, s.scale_grid, s.scale_max_shrink, torch.diag(h),
                                 self.global_amax.get(name))
        step = fp.scale_grid(scales, fmt, n, k)  # [N, ng]
        levels, codes = fmt.levels
        table = levels.to(w.device).view(1, 1, -1) * step.unsqueeze(2)  # [N, ng, L], sorted: steps are > 0
        try:
            res = gptq_quantize(w, h, None, self.damp, self.block_size, self.act_order, True, False,
                                consume_h=True, table=table, group_size=fp.group_cols(fmt, k))
        except FloatingPointError as e:
            raise FloatingPointError(f"GPTQ failed on {name}: {e}") from None
        self.report.append({"layer": name, "loss": res.loss, "damp": res.damp, "samples": n_tokens})
        log.info("GPTQ %s (%s): loss %.4g (damp %.3g, %d tokens)", name, s.format, res.loss, res.damp, n_tokens)
        q = codes.to(w.device)[res.q.long()]  # level index -> the format's code
        stored = fp.stored_codes(q.view(fp.FP8) if fmt.element == "e4m3" else q, fmt)
        return FloatLinear.from_tensors({**stored, **scales}, s.format, module.bias, in_features=k)


class GGUFGPTQ(GPTQ):
    """GPTQ into a GGML block format (GGUFScheme, quant/ggml.py): each sub-block's scale (and min) is
    fitted first, weighted by the Hessian diagonal, and quantized on the format's own super-block grid;
    the sweep then rounds every column to the nearest value its sub-block can hold and spreads the
    error as GPTQ does. Returns a GGUFLinear holding the file's bytes."""

    def apply(self, name: str, module):
        from ..nn import linear_weight
        from ..nn_gguf import GGUFLinear

        held = list(self.store.pop(name, exclusive=True))
        n_tokens = held[1]
        h = held.pop(0)
        w = linear_weight(module).detach().float()
        t = ggml.get_type(self.scheme.layer_types[name])
        params = ggml.fit(w, t, torch.diag(h) if self.act_aware_clip else None)
        table, flip = ggml.levels(t, params)
        try:
            res = gptq_quantize(w, h, None, self.damp, self.block_size, self.act_order, True, False,
                                consume_h=True, table=table, group_size=t.sub)
        except FloatingPointError as e:
            raise FloatingPointError(f"GPTQ failed on {name}: {e}") from None
        self.report.append({"layer": name, "loss": res.loss, "damp": res.damp, "samples": n_tokens, "type": t.name})
        log.info("GPTQ %s (%s): loss %.4g (damp %.3g, %d tokens)", name, t.name, res.loss, res.damp, n_tokens)
        q = ggml.codes_from_index(res.q.long(), flip, t)
        return GGUFLinear.from_codes(q, params, t.name, bias=module.bias)


def build(job) -> GPTQ:
    """The engine method for llmsqueeze.engine.Job `job` (the method table's entry point); records
    GPTQ's options in job.method_args."""
    s, o = job.scheme, job.options
    if s.grid != "uniform" and o.act_order and not o.static_groups:
        raise LlmsqueezeError(f"grid={s.grid!r} fits its levels per natural-order group: use --act-order static "
                              "(the default) or off, not dynamic")
    if o.static_groups and not o.act_order:
        log.info("static_groups without act_order changes nothing: groups are already in natural order")
    method = GPTQ(s, damp=o.damp, block_size=o.block_size, act_order=o.act_order, static_groups=o.static_groups)
    method.layer_schemes = job.layer_schemes
    job.method_args = {"act_order": o.act_order, "static_groups": o.static_groups, "damp": o.damp,
                       "block_size": o.block_size, "true_sequential": o.true_sequential, **job.data_args}
    return method


def build_gguf(job) -> GGUFGPTQ:
    """GPTQ into the GGML types of a GGUFScheme (static groups: each block's scales are fitted first)."""
    o = job.options
    job.method_args = {**job.data_args, "act_order": o.act_order, "damp": o.damp, "block_size": o.block_size,
                       "true_sequential": o.true_sequential}
    return GGUFGPTQ(job.scheme, damp=o.damp, block_size=o.block_size, act_order=o.act_order, static_groups=True)


def build_float(job) -> FloatGPTQ:
    """GPTQ on a FloatScheme's format (static groups), for quant/w8a8 to wrap."""
    o = job.options
    job.method_args = {**job.data_args, "act_order": o.act_order, "damp": o.damp, "block_size": o.block_size,
                       "true_sequential": o.true_sequential}
    return FloatGPTQ(job.scheme, damp=o.damp, block_size=o.block_size, act_order=o.act_order, static_groups=True)


def build_int8(job) -> GPTQ:
    """GPTQ on W8A8's int8 per-channel weight grid (static groups), for quant/w8a8 to wrap."""
    o = job.options
    job.method_args = {**job.data_args, "act_order": o.act_order, "damp": o.damp, "block_size": o.block_size}
    return GPTQ(QuantScheme(**INT8_CHANNEL_SCHEME), damp=o.damp, block_size=o.block_size, act_order=o.act_order,
                static_groups=True)
