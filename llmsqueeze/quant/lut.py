"""Non-uniform grids: a weight is an index into a small table of levels. Pure functions on tensors.

  nf:      w ≈ levels[q] * scale[g]     `levels`: 2**bits fixed values in [-1, 1] with an exact zero
                                        (normal-float: quantiles of N(0, 1)); scale = the group's absmax
  kmeans:  w ≈ codebook[g][q]           2**bits values fitted per (output row, group) by weighted
                                        Lloyd iterations (k-means in one dimension)

The indices q in [0, 2**bits) pack exactly like uniform codes (pack.py). Shapes follow grid.py: w is
[N, K], grouped along K in groups of G (the last may be shorter); per-group tables are [N, ng, L]
with L = 2**bits, sorted along L; scales [N, ng]. A table holds the values the checkpoint stores
(scales and codebooks rounded to their storage dtype first, the NF product levels * scale formed in
float32), so the simulated weight equals the dequantized packed weight bit for bit.
"""
from __future__ import annotations

import math

import torch

from .grid import n_groups

_NF_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def nf_levels(bits: int, device=None) -> torch.Tensor:
    """The 2**bits normal-float levels, float32 [L], increasing, from -1 to 1 with an exact 0.

    With L levels and an exact zero one side gets one level more: 2**(bits-1) positive levels are
    the N(0, 1) quantiles at probabilities 0.5 + (p - 0.5) * i / 2**(bits-1), i = 1..2**(bits-1),
    and 2**(bits-1) - 1 negative ones the mirror image with their own count; each side is divided
    by its outermost quantile, so the extremes are exactly -1 and 1 (a group's absmax is a level).
    The tail probability p = 1 - (1/(2(L-1)) + 1/(2L)) / 2 lies between the centres of the last of
    L-1 and of L equal-mass bins: the quantile of p = 1 would be infinite. For 4 bits this gives
    the NF4 table of the QLoRA paper to its 4 printed decimals."""
    key = (bits, str(device or "cpu"))
    if key not in _NF_CACHE:
        n_levels = 2**bits
        p = 1 - (1 / (2 * (n_levels - 1)) + 1 / (2 * n_levels)) / 2

        def side(count: int) -> torch.Tensor:
            probs = 0.5 + (p - 0.5) * torch.arange(1, count + 1, dtype=torch.float64) / count
            z = torch.special.ndtri(probs)
            return z / z[-1]

        pos, neg = side(2 ** (bits - 1)), side(2 ** (bits - 1) - 1)
        levels = torch.cat([-neg.flip(0), torch.zeros(1, dtype=torch.float64), pos]).float()
        _NF_CACHE[key] = levels.to(device)
    return _NF_CACHE[key]


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (wg [N, ng, G] float32 zero-padded, valid [ng, G] bool: not padding)."""
    w = w.float()
    n, k = w.shape
    ng = n_groups(k, group_size)
    pad = ng * group_size - k
    if pad:
        w = torch.cat([w, w.new_zeros(n, pad)], dim=1)
    valid = (torch.arange(ng * group_size, device=w.device) < k).view(ng, group_size)
    return w.view(n, ng, group_size), valid


def assign(wg: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Nearest level: wg [..., G], table [..., L] sorted -> indices [..., G] int64 (a weight exactly
    midway between two levels takes the lower one)."""
    mid = (table[..., 1:] + table[..., :-1]) / 2  # [..., L-1]
    lead = wg.shape[:-1]
    q = torch.searchsorted(mid.reshape(-1, mid.shape[-1]).contiguous(), wg.reshape(-1, wg.shape[-1]).contiguous())
    return q.view(*lead, wg.shape[-1])


def lookup(q: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """q [N, ng, G] indices, table [N, ng, L] -> values [N, ng, G] float32."""
    return table.float().gather(2, q.long())


def nf_table(w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16):
    """w [N, K] -> (table [N, ng, L] = levels * scale, scale [N, ng] float32 holding scale_dtype values)."""
    wg, valid = _grouped(w, group_size)
    scale = wg.abs().amax(dim=2)  # padding is 0: it never raises the absmax
    tiny = torch.finfo(scale_dtype).tiny
    scale = torch.where(scale > tiny, scale, torch.ones_like(scale)).to(scale_dtype).float()
    levels = nf_levels(bits, w.device)
    return levels.view(1, 1, -1) * scale.unsqueeze(2), scale


def _quantile_init(wg: torch.Tensor, valid: torch.Tensor, n_levels: int) -> torch.Tensor:
    """The group's empirical quantiles at (i + 1/2) / L, i = 0..L-1: [N, ng, L]."""
    big = torch.finfo(torch.float32).max
    srt = torch.where(valid, wg, big).sort(dim=2).values  # padding sorts last
    count = valid.sum(dim=1)  # [ng]
    pos = ((torch.arange(n_levels, device=wg.device) + 0.5) / n_levels).view(1, -1) * count.view(-1, 1)
    idx = pos.long().clamp(max=wg.shape[2] - 1)  # [ng, L] (count >= 1)
    return srt.gather(2, idx.unsqueeze(0).expand(wg.shape[0], -1, -1))


def _group_range(wg: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    big = torch.finfo(torch.float32).max
    return torch.where(valid, wg, big).amin(dim=2), torch.where(valid, wg, -big).amax(dim=2)


def _uniform_init(wg: torch.Tensor, valid: torch.Tensor, n_levels: int) -> torch.Tensor:
    """The asymmetric uniform min-max grid of the group (what RTN uses): [N, ng, L]."""
    lo, hi = _group_range(wg, valid)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    steps = torch.arange(n_levels, device=wg.device, dtype=torch.float32) / (n_levels - 1)
    return lo.unsqueeze(2) + (hi - lo).unsqueeze(2) * steps


def _lloyd(wg: torch.Tensor, weight: torch.Tensor, c: torch.Tensor, iters: int, ends: tuple | None = None) -> torch.Tensor:
    """Weighted 1-D k-means from sorted centres c [R, L] on wg [R, G] with weight [R or 1, G]: assign
    each weight to its nearest centre, move each centre to the weighted mean of its weights (an empty
    or weightless one stays). Neither step raises sum weight * (w - c[q])^2; the centres stay sorted
    (the weights of centre i lie between those of centres i-1 and i+1). Stops early once no
    assignment changes."""
    weight = weight.expand_as(wg)
    ww = weight * wg
    q_prev = None
    for _ in range(iters):
        q = assign(wg, c)
        if q_prev is not None and torch.equal(q, q_prev):
            break
        num = torch.zeros_like(c).scatter_add_(1, q, ww)
        den = torch.zeros_like(c).scatter_add_(1, q, weight)
        c = torch.where(den > 0, num / den.clamp_min(1e-30), c)
        if ends is not None:  # the outermost levels stay on the group's extremes
            c[:, 0], c[:, -1] = ends
        q_prev = q
    return c.sort(dim=1).values  # float rounding of the means may break exact order: restore it


def kmeans_table(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    col_weight: torch.Tensor | None = None,
    iters: int = 10,
    scale_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Per-(row, group) codebooks of 2**bits levels minimising sum_k col_weight_k (w_k - c[q_k])^2 over
    the group; col_weight [K] >= 0 (e.g. the Hessian diagonal mean x_k^2), default all ones.

    The outermost levels are pinned at the group's extremes (the uniform init's, which include 0):
    plain k-means minimises the squared error by pulling them inwards, clipping the largest weights,
    the salient ones; on SmolLM2-135M 3-bit per-channel that took perplexity from 17 to 355131 while
    the layer MSE halved vs uniform. Lloyd steps then move only the inner levels.
    Two deterministic starts, the better kept per group: the group's quantiles (levels dense where
    the weights are) refined by `iters` Lloyd steps (10 reach within 0.5 % of the error after 20 on
    SmolLM2-sized Gaussian layers), and its uniform min-max grid refined by up to 3, a safety net
    close to uniform RTN's grid (RTN also shifts its grid to put 0 on a level, so a group can still
    come out slightly worse than RTN). w [N, K] -> table [N, ng, L] float32
    holding `scale_dtype` values, sorted along L."""
    n_levels = 2**bits
    wg, valid = _grouped(w, group_size)
    weight = valid.float().unsqueeze(0)  # [1, ng, G]
    if col_weight is not None:
        cw = col_weight.float().to(w.device).clamp_min(0)
        cw = torch.cat([cw, cw.new_zeros(valid.numel() - cw.numel())]).view_as(valid)
        weight = weight * cw.unsqueeze(0)
        weight = torch.where(weight.sum(dim=2, keepdim=True) > 0, weight, valid.float().unsqueeze(0))  # all-zero group
    n, ng, g = wg.shape
    flat, fweight = wg.view(n * ng, g), weight.expand(n, ng, g).reshape(n * ng, g)
    best, best_err = None, None
    lo, hi = _group_range(wg, valid)
    ends = (lo.reshape(-1), hi.reshape(-1))
    for init, steps in ((_quantile_init, iters), (_uniform_init, min(iters, 3))):
        c = init(wg, valid, n_levels).view(n * ng, -1)
        c[:, 0], c[:, -1] = torch.minimum(c[:, 0], ends[0]), torch.maximum(c[:, -1], ends[1])
        c = _lloyd(flat, fweight, c, steps, (c[:, 0].clone(), c[:, -1].clone()))
        c = c.to(scale_dtype).float().view(n, ng, -1)
        err = (weight * (wg - lookup(assign(wg, c), c)) ** 2).sum(dim=2)  # [N, ng]
        if best is None:
            best, best_err = c, err
        else:
            better = (err < best_err).unsqueeze(2)
            best, best_err = torch.where(better, c, best), torch.minimum(err, best_err)
    return best


def lut_table(w: torch.Tensor, scheme, col_weight: torch.Tensor | None = None):
    """w [N, K] -> (table [N, ng, L], scale [N, ng] for nf or None for kmeans), for `scheme.grid`.
    col_weight [K] weighs each input column's error in the k-means fit (ignored by nf)."""
    g = scheme.group_size_for(w.shape[1])
    if scheme.grid == "nf":
        return nf_table(w, scheme.bits, g, scheme.torch_scale_dtype)
    if scheme.grid == "kmeans":
        return kmeans_table(w, scheme.bits, g, col_weight, scale_dtype=scheme.torch_scale_dtype), None
    raise ValueError(f"grid {scheme.grid!r} is not a lookup-table grid")


def lut_quantize(w: torch.Tensor, table: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [N, K], table [N, ng, L] -> q [N, K] int32, each weight's nearest level in its group."""
    n, k = w.shape
    wg, _ = _grouped(w, group_size)
    return assign(wg, table).view(n, -1)[:, :k].to(torch.int32)


def lut_dequantize(q: torch.Tensor, table: torch.Tensor, group_size: int) -> torch.Tensor:
    """q [N, K], table [N, ng, L] -> w [N, K] float32 = table[n, k // G, q]."""
    n, k = q.shape
    ng = table.shape[1]
    pad = ng * group_size - k
    qp = torch.cat([q, q.new_zeros(n, pad)], dim=1) if pad else q
    return lookup(qp.view(n, ng, group_size), table).view(n, -1)[:, :k]


def rtn_lut_quantize(w: torch.Tensor, scheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest on a non-uniform grid: w [N, K] -> (q [N, K] int32, table, scale or None)."""
    table, scale = lut_table(w, scheme)
    return lut_quantize(w, table, scheme.group_size_for(w.shape[1])), table, scale


def bits_per_weight(bits: int, grid: str, in_features: int, group_size: int, table_bits: int = 16) -> float:
    """Storage per weight of one layer, tables included: indices + per-group scale (nf) or codebook."""
    g = in_features if group_size == -1 else group_size
    ng = math.ceil(in_features / g)
    per_group = table_bits if grid == "nf" else table_bits * 2**bits
    return bits + ng * per_group / in_features
