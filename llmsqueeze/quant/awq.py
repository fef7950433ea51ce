"""AWQ-style balancing (Lin et al., 2023, "activation-aware weight quantization"), then RTN or GPTQ.

For a balancing group (a norm, or a Linear, whose output X [T, K] feeds the Linears W_c [N_c, K]),
any s > 0 [K] keeps the float function, X @ W^T = (X / s) @ (W * s)^T, but not the quantized one:
input channels with large mean |x| are the salient ones, and scaling their weight columns up by
s_j > 1 before rounding gives them a relatively finer grid (the other columns of the group pay).

    s(alpha) = mean|X_j|^alpha / sqrt(max * min)             alpha searched on a grid in [0, 1]
    error(alpha) = sum_c || X W_c^T - (X / s) Q(W_c * s)^T ||^2 = sum_c tr(E_c H E_c^T)
                   E_c = W_c - Q(W_c * s) / s,   H = X^T X over every calibration token   [K, K]

so each candidate is scored exactly on all calibration tokens at the cost of one [N, K] x [K, K]
product (no stored activations). alpha = 0 is plain round-to-nearest: the search never loses on
this objective. 1 / s folds into the producer (a norm's weight, or a Linear's rows: v_proj ->
o_proj, up_proj -> down_proj, with grouped-query attention handled as in SmoothQuant), s into the
consumers' columns: the same SmoothMap table and folding functions as SmoothQuant
(llmsqueeze.quant.smoothquant), only the scales differ.

Then, for round-to-nearest, a clipping search per weight group scored by that group's exact share
of the layer-output error, e_g^T H_gg e_g (H_gg the group's diagonal block of the balanced inputs'
X^T X): candidates are the min/max range shrunk on both ends (AWQ's clip), shrunk on the smaller
end only, and the result of our activation-aware `clip_search_qparams` (weighted by diag H); each
group keeps the best. With GPTQ ("awq-gptq") the balanced block is handed to GPTQ unchanged, with
its own clipping search.

The output is the standard packed QuantLinear checkpoint; the norms and Linears hold the folded
scales, so loading and export are unchanged. Under a GGUFScheme, each consumer's candidate is scored
with its own GGML type's round-to-nearest (quant/ggml.py), and the layers become GGUFLinear: by
ggml's fit weighted by diag H (then RTN), or by GPTQ into the type ("awq-gptq").
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import GGUFScheme, LlmsqueezeError, QuantScheme
from ..nn import is_linear, linear_weight
from . import ggml
from .grid import clip_search_qparams, fake_quantize, group_minmax, minmax_qparams, quantize
from .smoothquant import (
    SmoothMap,
    linear_pair_plan,
    scale_linear_inputs,
    scale_linear_outputs,
    scale_norm,
    smooth_map_for,
)

log = logging.getLogger("llmsqueeze")

AWQ_METHODS = ("awq", "awq-gptq")  # AWQ then round-to-nearest / then GPTQ


# ------------------------------------------------------------------------------ pure functions
def awq_scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """act_mean [K] (mean |x_j| over calibration tokens) -> s [K] = act_mean^alpha / sqrt(max * min),
    so the scales straddle 1 (neither side of the fold grows far from its original range)."""
    m = act_mean.float().clamp(min=1e-5).pow(alpha)
    return m / (m.max() * m.min()).sqrt()


def minmax_fake_quant(w: torch.Tensor, scheme: QuantScheme | str) -> torch.Tensor:
    """w [N, K] -> its round-to-nearest (min/max range) fake-quantized copy, float32 [N, K]; scheme a
    GGML type name: that type's round-to-nearest."""
    if isinstance(scheme, str):
        return _ggml_fake(w, ggml.get_type(scheme))
    g = scheme.group_size_for(w.shape[1])
    scale, zero = minmax_qparams(*group_minmax(w, g), scheme.bits, scheme.sym, scheme.torch_scale_dtype)
    return fake_quantize(w, scale, zero, scheme.bits, g)


def _ggml_fake(w: torch.Tensor, t: ggml.GGMLType) -> torch.Tensor:
    q, p = ggml.quantize(w, t)
    return ggml.dequantize(q, t, p)


def balanced_fake_quant(w: torch.Tensor, s: torch.Tensor, scheme: QuantScheme | str) -> torch.Tensor:
    """w [N, K], s [K] -> Q(w * s) / s [N, K]: the weight the balanced layer effectively applies to x."""
    s = s.float()[None, :]
    return minmax_fake_quant(w.float() * s, scheme) / s


def output_error(e: torch.Tensor, h: torch.Tensor) -> float:
    """e [N, K] weight error, h [K, K] = X^T X -> ||X e^T||^2 = tr(e h e^T)."""
    e = e.float()
    return float(((e @ h) * e).sum())


def group_output_error(e: torch.Tensor, h: torch.Tensor, group_size: int) -> torch.Tensor:
    """e [N, K], h [K, K] -> [N, ng]: e_g^T H_gg e_g, each weight group's own share of the output
    error (cross terms between groups left out, so groups can be chosen independently). The last
    group may be shorter: zero padding adds nothing."""
    n, k = e.shape
    ng = math.ceil(k / group_size)
    pad = ng * group_size - k
    ep = torch.nn.functional.pad(e.float(), (0, pad)).view(n, ng, group_size).transpose(0, 1)  # [ng, N, g]
    hp = torch.nn.functional.pad(h.float(), (0, pad, 0, pad)).view(ng, group_size, ng, group_size)
    idx = torch.arange(ng, device=h.device)
    hb = hp[idx, :, idx, :]  # [ng, g, g] diagonal blocks
    return (torch.bmm(ep, hb) * ep).sum(dim=2).t()  # [N, ng]


def exact_clip_qparams(
    w: torch.Tensor, h: torch.Tensor, scheme: QuantScheme, grid: int = 20, max_shrink: float = 0.5,
    extra: list[tuple[torch.Tensor, torch.Tensor]] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-group range shrink that minimises `group_output_error`. Candidates: p in
    {1, 1 - max_shrink/grid, ..., 1 - max_shrink} applied to both ends of the min/max range (AWQ's
    clip; for symmetric grids the absmax), and for asymmetric grids to the end of smaller magnitude
    only; plus any `extra` (scale, zero) pairs. w [N, K], h [K, K] ->
    (scale [N, ng], zero [N, ng], index [N, ng] of the winning candidate: 0 .. grid two-sided,
    then one-sided, then extra)."""
    w = w.float()
    g = scheme.group_size_for(w.shape[1])
    wmin, wmax = group_minmax(w, g)
    keep_max = wmax.abs() >= wmin.abs()
    cands = []
    for i in range(grid + 1):
        p = 1 - max_shrink * i / grid
        cands.append((p * wmin, p * wmax))
    if not scheme.sym:
        for i in range(1, grid + 1):
            p = 1 - max_shrink * i / grid
            cands.append((torch.where(keep_max, p * wmin, wmin), torch.where(keep_max, wmax, p * wmax)))
    qparams = [minmax_qparams(lo, hi, scheme.bits, scheme.sym, scheme.torch_scale_dtype) for lo, hi in cands]
    qparams += list(extra)
    best_err = best_scale = best_zero = best_idx = None
    for j, (scale, zero) in enumerate(qparams):
        err = group_output_error(fake_quantize(w, scale, zero, scheme.bits, g) - w, h, g)  # [N, ng]
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            best_idx = torch.zeros_like(zero)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_idx = torch.where(better, torch.full_like(best_idx, j), best_idx)
    return best_scale, best_zero, best_idx


# ------------------------------------------------------------------------------ one block
@dataclass
class InputStats:
    """Of one Linear's input x [.., K] over the calibration tokens: h = X^T X / n [K, K], mean |x| [K]."""

    h: torch.Tensor
    abs_sum: torch.Tensor
    n: int = 0

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)


def collect_input_stats(block: nn.Module, names: list[str], batches) -> dict[str, InputStats]:
    """InputStats of each named Linear over the block run on `batches` [(hidden, kwargs)]. Linears
    called with the very same input tensor (q/k/v, gate/up) share one InputStats object, accumulated once."""
    entries: dict[str, InputStats] = {}
    share: dict[str, str] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # this batch's inputs, held so their ids are not reused

    def hook(name, x):
        prev = seen.get(id(x))  # identity of the very tensor passed (x.detach() would be a new object)
        if prev is not None and prev[0] is x:
            share.setdefault(name, prev[1])
            return
        seen[id(x)] = (x, name)
        x2 = x.detach().reshape(-1, x.shape[-1]).float()  # [T, K]
        e = entries.get(name)
        if e is None:
            k = x2.shape[1]
            e = entries[name] = InputStats(torch.zeros(k, k, device=x2.device), torch.zeros(k, device=x2.device))
        e.h.addmm_(x2.t(), x2)
        e.abs_sum += x2.abs().sum(dim=0)
        e.n += x2.shape[0]

    handles = [block.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(n, a[0])) for n in names]
    try:
        for h, kw in batches:
            seen.clear()
            block(h, **kw)
    finally:
        seen.clear()
        for hd in handles:
            hd.remove()
    for e in entries.values():
        e.h /= max(e.n, 1)
    return {n: entries[share.get(n, n)] for n in names if share.get(n, n) in entries}


def rare_expert_stats(block: nn.Module, names: list[str], stats: dict[str, InputStats], batches,
                      min_tokens: int) -> dict[str, InputStats]:
    """The engine's rare-expert policy for AWQ's own statistics pass: each MoE expert among `names`
    whose inputs came from fewer than `min_tokens` routed tokens (none: no entry) is run once more on
    every token of the block (nn_moe.MoEExperts.calibrate_all), its statistics merged with the
    routed ones. -> the replaced entries (shared by an expert's gate and up, as collected)."""
    from ..nn_moe import MoEExperts

    rare: dict[str, list[int]] = {}
    for n, m in block.named_modules():
        if isinstance(m, MoEExperts):
            for e in range(m.num_experts):
                own = [x for x in names if x.startswith(f"{n}.{e}.")]
                if own and min((stats[x].n if x in stats else 0) for x in own) < min_tokens:
                    rare.setdefault(n, []).append(e)
    if not rare:
        return {}
    wanted = [x for x in names for n, es in rare.items() for e in es if x.startswith(f"{n}.{e}.")]
    for n, es in rare.items():
        block.get_submodule(n).calibrate_all = frozenset(es)
        log.info("AWQ %s: experts %s routed fewer than %d calibration tokens: calibrated on all tokens", n, es, min_tokens)
    try:
        extra = collect_input_stats(block, wanted, batches())
    finally:
        for n in rare:
            block.get_submodule(n).calibrate_all = frozenset()
    merged: dict[int, InputStats] = {}
    out = {}
    for x in wanted:
        a, b = stats.get(x), extra[x]
        key = id(b)
        if key not in merged:
            if a is None or a.n == 0:
                merged[key] = b
            else:
                n = a.n + b.n
                merged[key] = InputStats((a.h * a.n + b.h * b.n) / n, a.abs_sum + b.abs_sum, n)
        out[x] = merged[key]
    return out


@dataclass
class BalanceGroup:
    """producer: a norm (is_norm) or a Linear; consumers: the Linears reading its output; idx (Linear
    producers): the producer channel [K_consumer] that feeds each consumer input column (GQA)."""

    producer: str
    consumers: tuple[str, ...]
    is_norm: bool
    idx: torch.Tensor | None = None


def balance_groups(block: nn.Module, smap: SmoothMap) -> list[BalanceGroup]:
    """The groups of `smap` present in this block: norms first, then Linear pairs (SmoothMap order)."""
    groups = []
    for norm, linears in smap.norms:
        try:
            block.get_submodule(norm)
            for n in linears:
                block.get_submodule(n)
        except AttributeError:
            continue
        groups.append(BalanceGroup(norm, tuple(linears), True))
    for prod, cons, idx in linear_pair_plan(block, smap):
        groups.append(BalanceGroup(prod, (cons,), False, idx))
    return groups


@torch.no_grad()
def search_group_alpha(
    weights: list[torch.Tensor], h: torch.Tensor, act_mean: torch.Tensor, idx: torch.Tensor | None,
    scheme: QuantScheme | list[str], grid: list[float],
) -> tuple[float, torch.Tensor, dict[float, float]]:
    """weights: the quantized consumers' W_c [N_c, K]; h [K, K], act_mean [K] of their (shared) input;
    scheme: the weight-only scheme, or each consumer's GGML type;
    idx [K] producer channel of each column (None: one to one). -> (alpha, s per producer channel,
    {alpha: output error}). Producer channels feeding several columns (GQA) take the mean of their
    columns' mean |x|."""
    if idx is None:
        m = act_mean
    else:
        n_prod = int(idx.max()) + 1
        m = torch.zeros(n_prod, device=act_mean.device).scatter_reduce(
            0, idx, act_mean.float(), "mean", include_self=False)
    errors: dict[float, float] = {}
    best = None
    for alpha in grid:
        s = awq_scales(m, alpha)
        cols = s if idx is None else s[idx]
        schemes = scheme if isinstance(scheme, list) else [scheme] * len(weights)
        err = sum(output_error(w.float() - balanced_fake_quant(w, cols, sc), h) for w, sc in zip(weights, schemes))
        errors[alpha] = err
        if best is None or err < errors[best[0]]:
            best = (alpha, s)
    return best[0], best[1], errors


class AWQ:
    """The engine's method: `prepare_block` balances each float block (and, for RTN, chooses each
    Linear's clipped grid); `apply` packs each Linear, by RTN on the chosen grid or by GPTQ."""

    def __init__(self, scheme: QuantScheme, layer_names: list[str], smap: SmoothMap, gptq=None,
                 grid: int = 20, clip_grid: int = 20, clip_max_shrink: float = 0.5, true_sequential: bool = False,
                 expert_min_tokens: int = 32):
        self.scheme, self.smap, self.gptq = scheme, smap, gptq
        self.expert_min_tokens = expert_min_tokens
        self.wanted = set(layer_names)
        self.grid, self.alpha_grid = grid, [round(i / grid, 6) for i in range(grid + 1)]
        self.true_sequential = true_sequential  # the engine's order of Linear groups (with GPTQ only)
        self.clip_grid, self.clip_max_shrink = clip_grid, clip_max_shrink
        self.qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.alphas: dict[str, float] = {}  # "block.i.producer" -> alpha
        self.clip_wins = {"two_sided": 0, "one_sided": 0, "clip_search_qparams": 0}  # weight groups won
        self.report: list[dict] = []
        # GPTQ gets its Hessians from prepare_block, unless each Linear group must see the inputs
        # that the already quantized groups of its block produce (true_sequential)
        self.collect_inputs = gptq is not None and true_sequential

    @torch.no_grad()
    def prepare_block(self, prefix: str, block: nn.Module, batches) -> None:
        names = [n for n, m in block.named_modules() if is_linear(m) and prefix + n in self.wanted]
        groups = balance_groups(block, self.smap)
        readers = list(dict.fromkeys(names + [c for g in groups for c in g.consumers]))

        stats = collect_input_stats(block, readers, batches())
        stats.update(rare_expert_stats(block, readers, stats, batches, self.expert_min_tokens))
        for grp in groups:
            quantized = [c for c in grp.consumers if prefix + c in self.wanted]
            if not quantized:
                continue
            st = stats[grp.consumers[0]]  # a norm's consumers share their input
            idx = None if grp.idx is None else grp.idx.to(st.h.device)
            ws = [linear_weight(block.get_submodule(c)).detach() for c in quantized]
            scheme = ([self.scheme.layer_types[prefix + c] for c in quantized] if isinstance(self.scheme, GGUFScheme)
                      else self.scheme)
            alpha, s, errors = search_group_alpha(ws, st.h, st.mean_abs, idx, scheme, self.alpha_grid)
            key = prefix + grp.producer
            self.alphas[key] = alpha
            self.report.append({"group": key, "consumers": list(grp.consumers), "alpha": alpha,
                                "error": errors[alpha], "error_rtn": errors[0.0]})
            log.info("AWQ %s -> %s: alpha %.2f, output error %.4g (%.4g unbalanced)", key,
                     ",".join(c.rpartition(".")[2] for c in grp.consumers), alpha, errors[alpha], errors[0.0])
            cols = s if idx is None else s[idx]
            if grp.is_norm:
                scale_norm(block.get_submodule(grp.producer), s, self.smap.norm_offset)
            else:
                scale_linear_outputs(block.get_submodule(grp.producer), s)
            for c in grp.consumers:
                scale_linear_inputs(block.get_submodule(c), cols)
            # the consumers now read x / s: their statistics follow (once per shared object)
            for st_c in {id(stats[c]): stats[c] for c in grp.consumers}.values():
                st_c.h /= cols[:, None] * cols[None, :]
                st_c.abs_sum /= cols
        if self.gptq is None:
            for n in names:
                if isinstance(self.scheme, GGUFScheme):  # ggml's fit, weighted by the balanced inputs' diag H
                    self.qparams[prefix + n] = torch.diagonal(stats[n].h).clone()
                    continue
                self.qparams[prefix + n] = self._clip(linear_weight(block.get_submodule(n)).detach(), stats[n].h)
        elif not self.collect_inputs:
            # GPTQ's Hessian 2/n sum x x^T of the balanced inputs is 2 * h: handed over, which saves
            # the engine a pass over the block (the same inputs up to float rounding)
            for n in names:
                st = stats[n]
                self.gptq.store.hessians[prefix + n] = [2 * st.h, st.n, prefix + n]

    def _clip(self, w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scheme
        g = s.group_size_for(w.shape[1])
        if not s.clip_search:
            return minmax_qparams(*group_minmax(w, g), s.bits, s.sym, s.torch_scale_dtype)
        ours = clip_search_qparams(w, s.bits, g, s.sym, s.torch_scale_dtype, grid=s.clip_grid,
                                   max_shrink=s.clip_max_shrink, norm=s.clip_norm,
                                   weight_power=s.clip_weight_power, col_weight=torch.diagonal(h))
        scale, zero, which = exact_clip_qparams(w, h, s, self.clip_grid, self.clip_max_shrink, [ours])
        n_two = self.clip_grid + 1
        n_one = 0 if s.sym else self.clip_grid
        self.clip_wins["two_sided"] += int((which < n_two).sum())
        self.clip_wins["one_sided"] += int(((which >= n_two) & (which < n_two + n_one)).sum())
        self.clip_wins["clip_search_qparams"] += int((which >= n_two + n_one).sum())
        return scale, zero

    def collect(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        if self.gptq is not None:
            self.gptq.collect(name, module, x)

    @property
    def all_reports(self) -> list[dict]:
        """The balancing report, then the inner method's (GPTQ's losses)."""
        return self.report + (self.gptq.report if self.gptq is not None else [])

    def record(self) -> dict:
        """What the checkpoint's method_args say of the run, once it is done."""
        log.info("AWQ (then %s): clip winners %s", "rtn" if self.gptq is None else "gptq", self.clip_wins)
        awq_args = {"then": "rtn" if self.gptq is None else "gptq", "grid": self.grid, "alphas": self.alphas}
        if self.gptq is None and getattr(self.scheme, "clip_search", False):
            awq_args.update(clip_grid=self.clip_grid, clip_max_shrink=self.clip_max_shrink, clip_wins=self.clip_wins)
        return {"awq": awq_args}

    @torch.no_grad()
    def apply(self, name: str, module: nn.Module) -> nn.Module:
        from ..nn import QuantLinear

        if self.gptq is not None:
            return self.gptq.apply(name, module)
        s = self.scheme
        w = linear_weight(module).detach()
        if isinstance(s, GGUFScheme):
            from ..nn_gguf import GGUFLinear

            t = s.layer_types[name]
            q, params = ggml.quantize(w, ggml.get_type(t), self.qparams.pop(name))
            return GGUFLinear.from_codes(q, params, t, bias=module.bias)
        g = s.group_size_for(w.shape[1])
        scale, zero = self.qparams.pop(name)
        q = quantize(w, scale, zero, s.bits, g)
        return QuantLinear.from_quantized(q, scale, zero, s.bits, g, bias=module.bias,
                                          scale_dtype=s.torch_scale_dtype)


def check_awq_model(model: nn.Module) -> SmoothMap:
    """The model's balancing table, or a one-line error naming its type."""
    smap = smooth_map_for(model)
    if smap is None:
        mt = getattr(getattr(model, "config", None), "model_type", "?")
        raise LlmsqueezeError(f"AWQ has no norm -> Linear table for model type {mt!r}: use --method gptq or rtn, "
                              "or add a row to llmsqueeze.quant.smoothquant.SMOOTH_MAPS")
    return smap


def build(job, inner=None) -> AWQ:
    """The engine method for llmsqueeze.engine.Job `job` (the method table's entry point): AWQ
    balancing, then RTN on an output-error clipped grid, or `inner`'s rounding (a GPTQ engine method,
    method "awq-gptq"), which is handed the balanced Hessians. job.extra may set the balancing `grid`
    and the RTN `clip_grid` / `clip_max_shrink`."""
    smap = check_awq_model(job.model)
    grid, clip_grid = job.extra.get("grid", 20), job.extra.get("clip_grid", 20)
    clip_max_shrink = job.extra.get("clip_max_shrink", 0.5)
    if grid < 1 or clip_grid < 1 or not 0 < clip_max_shrink < 1:
        raise LlmsqueezeError(f"AWQ grid={grid} and clip_grid={clip_grid} must be positive, clip_max_shrink="
                              f"{clip_max_shrink} in (0, 1)")
    if inner is None:
        job.method_args = dict(job.data_args)
    return AWQ(job.scheme, job.names, smap, inner, grid=grid, clip_grid=clip_grid, clip_max_shrink=clip_max_shrink,
               true_sequential=job.options.true_sequential and inner is not None,
               expert_min_tokens=job.options.expert_min_tokens)
