"""GGML's block formats, the tensor types of GGUF files (llama.cpp's ggml-common.h), as pure functions
on tensors, and llama.cpp's per-tensor type mixes (Q4_K_M, Q3_K_M, ...).

A GGUF tensor of N rows and K columns (K: ne[0], the input width of a Linear) is stored row by row,
each row K / block blocks of `nbytes` bytes. Within a block, sub-blocks of `sub` weights share a
scale; every weight is a code q in 0..L-1 and

    legacy, symmetric   (q4_0, q5_0, q8_0)   w = (q - offset) * d                 d fp16 per block of 32
    legacy, affine      (q4_1, q5_1)         w = d * q + m                        d, m fp16 per block
    non-linear          (iq4_nl)             w = d * kvalues[q]                   d fp16 per block
    k-quant, symmetric  (q3_k, q6_k)         w = (d * sc) * (q - offset)           sc signed 6 / 8 bits
    k-quant, affine     (q2_k, q4_k, q5_k)   w = (d * sc) * q - (dmin * mn)        sc, mn unsigned 4 / 6 bits
                                                       with d, dmin fp16 per super-block of 256

(q8_0's int8 is q - 127: codes 0..254, so that no weight is -128, which ggml's int8 dot products do
not expect.) Here each format is one row of `TYPES`; a quantized tensor is its codes q [N, K]
(int64) and its parameters (`Params`: d [N, nb], m [N, nb], or d, dmin [N, nsb] with sc, mn
[N, nsb, nsub]); `dequantize` computes the weights with ggml's own float32 expressions (bit for bit
what gguf's reader gives), `levels` the table of each sub-block's values (what GPTQ rounds to),
`pack`/`unpack` the bytes of the file.

Fitting (`fit`): each sub-block's scale (and min) is searched over candidate inverse scales, each
refitted by weighted least squares on its codes (the idea of ggml's make_qx_quants/make_qkx2_quants,
written anew), weighted per input column by `importance` (the Hessian diagonal under GPTQ; none:
plain squared error); k-quants then quantize the sub-block scales and mins to their 4/6/8-bit grid
under fp16 super-block scales (`store_steps`). The codes are the nearest levels (RTN), GPTQ's
(quant/gptq.py) or learned (quant/autoround.py, which trains through `store_steps`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

QK_K = 256
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class GGMLType:
    """One GGML block format. kind: "sym" (w = step*(q - offset)), "affine" (w = step*q + bias) or
    "lut" (w = d*IQ4_NL_VALUES[q]); super: a k-quant (sub-block scales quantized to `scale_bits`,
    signed for sym, under fp16 d/dmin per block of 256); levels: codes per weight; id: the
    GGMLQuantizationType number."""

    name: str
    id: int
    block: int
    sub: int
    levels: int
    kind: str
    nbytes: int
    offset: int = 0
    super: bool = False
    scale_bits: int = 0

    @property
    def bits(self) -> int:
        return math.ceil(math.log2(self.levels))

    def row_bytes(self, k: int) -> int:
        return k // self.block * self.nbytes


TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("q4_0", 2, 32, 32, 16, "sym", 18, offset=8),
    GGMLType("q4_1", 3, 32, 32, 16, "affine", 20),
    GGMLType("q5_0", 6, 32, 32, 32, "sym", 22, offset=16),
    GGMLType("q5_1", 7, 32, 32, 32, "affine", 24),
    GGMLType("q8_0", 8, 32, 32, 255, "sym", 34, offset=127),
    GGMLType("q2_k", 10, QK_K, 16, 4, "affine", 84, super=True, scale_bits=4),
    GGMLType("q3_k", 11, QK_K, 16, 8, "sym", 110, offset=4, super=True, scale_bits=6),
    GGMLType("q4_k", 12, QK_K, 32, 16, "affine", 144, super=True, scale_bits=6),
    GGMLType("q5_k", 13, QK_K, 32, 32, "affine", 176, super=True, scale_bits=6),
    GGMLType("q6_k", 14, QK_K, 16, 64, "sym", 210, offset=32, super=True, scale_bits=8),
    GGMLType("iq4_nl", 20, 32, 32, 16, "lut", 18),
)}
DENSE_TYPES = {"f32": 0, "f16": 1, "bf16": 30}  # GGMLQuantizationType numbers of unquantized tensors

Params = dict[str, torch.Tensor]  # d [N, nb] (+ m [N, nb]) | d, (dmin,) [N, nsb] + sc, (mn,) [N, nsb, nsub]


def get_type(name: str) -> GGMLType:
    t = TYPES.get(name.lower())
    if t is None:
        raise ValueError(f"GGML type {name!r} is not one we write: use one of {', '.join(TYPES)}")
    return t


def fp16(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to the nearest fp16 (what the file stores), kept in float32."""
    return x.to(torch.float16).float()


# ------------------------------------------------------------------------------- values of the codes
def steps(t: GGMLType, p: Params) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sub-block's step and bias, [N, K/sub] float32, as ggml computes them (bias None: zero)."""
    n = p["d"].shape[0]
    if not t.super:
        return p["d"], p.get("m")
    step = (p["d"].unsqueeze(2) * p["sc"].float()).reshape(n, -1)
    if t.kind == "sym":
        return step, None
    return step, -(p["dmin"].unsqueeze(2) * p["mn"].float()).reshape(n, -1)


def dequantize(q: torch.Tensor, t: GGMLType, p: Params) -> torch.Tensor:
    """Codes q [N, K] -> weights [N, K] float32, ggml's expressions (gguf's reader gives the same bits)."""
    n, k = q.shape
    step, bias = steps(t, p)
    qs = q.view(n, -1, t.sub)
    if t.kind == "lut":
        vals = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=q.device)[qs]
        return (step.unsqueeze(2) * vals).view(n, k)
    w = step.unsqueeze(2) * (qs - t.offset).float()
    if bias is not None:
        w = w + bias.unsqueeze(2)
    return w.view(n, k)


def levels(t: GGMLType, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """The values each sub-block's codes take: (table [N, K/sub, L] sorted ascending, flip [N, K/sub]
    bool: True where the table is the codes in reverse order, i.e. code = L-1-index)."""
    step, bias = steps(t, p)
    codes = torch.arange(t.levels, device=step.device)
    if t.kind == "lut":
        vals = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=step.device)
        table = step.unsqueeze(2) * vals
    else:
        table = step.unsqueeze(2) * (codes - t.offset).float()
        if bias is not None:
            table = table + bias.unsqueeze(2)
    flip = step < 0
    table = torch.where(flip.unsqueeze(2), table.flip(2), table)
    return table, flip


def nearest_codes(w: torch.Tensor, t: GGMLType, p: Params, rows: int = 4096) -> torch.Tensor:
    """Round w [N, K] to the nearest value of its sub-block -> codes [N, K] int64 (row chunks bound
    the [rows, K/sub, L] table)."""
    n, k = w.shape
    out = torch.empty(n, k, dtype=torch.int64, device=w.device)
    for r in range(0, n, rows):
        sl = slice(r, r + rows)
        table, flip = levels(t, {key: v[sl] for key, v in p.items()})
        idx = codes_from_index(nearest_index(w[sl].float(), table), flip, t)
        out[sl] = idx
    return out


def nearest_index(w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """w [N, K], sorted table [N, K/s, L] -> index of the nearest level [N, K] (ties to the lower)."""
    n, k = w.shape
    ns = table.shape[1]
    mid = (table[..., 1:] + table[..., :-1]) / 2  # [N, ns, L-1]
    x = w.view(n, ns, -1)
    return (x.unsqueeze(3) > mid.unsqueeze(2)).sum(3).view(n, k)


def codes_from_index(idx: torch.Tensor, flip: torch.Tensor, t: GGMLType) -> torch.Tensor:
    """Index into the sorted table [N, K] -> the format's code, with flip [N, K/sub] from `levels`."""
    n, k = idx.shape
    f = flip.repeat_interleave(t.sub, dim=1)
    return torch.where(f, t.levels - 1 - idx, idx)


# ------------------------------------------------------------------------------- fitting
def _fit_sym(x: torch.Tensor, imp: torch.Tensor, t: GGMLType) -> torch.Tensor:
    """Sub-blocks x [R, S] with weights imp [R, S] -> signed step [R] of w = step*(q - offset): the
    largest-magnitude weight maps near code 0 (q - offset = -offset, the wider side), candidates
    around it, each step refitted by least squares on its codes; the least weighted error wins."""
    lo, hi = -t.offset, t.levels - 1 - t.offset  # q - offset in [lo, hi]
    amax_i = x.abs().argmax(1, keepdim=True)
    extreme = x.gather(1, amax_i).squeeze(1)  # [R] signed
    best_err = torch.full_like(extreme, float("inf"))
    best = torch.zeros_like(extreme)
    safe = torch.where(extreme == 0, torch.ones_like(extreme), extreme)
    for c in range(-9, 10):
        iscale = -(t.offset + 0.1 * c) / safe  # q - offset = round(iscale * x): the extreme goes near -offset
        ell = torch.clamp(torch.round(iscale.unsqueeze(1) * x), lo, hi)
        num, den = (imp * x * ell).sum(1), (imp * ell * ell).sum(1)
        step = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
        err = (imp * (x - step.unsqueeze(1) * ell) ** 2).sum(1)
        better = err < best_err
        best, best_err = torch.where(better, step, best), torch.where(better, err, best_err)
    return torch.where(extreme == 0, torch.zeros_like(best), best)


def _fit_affine(x: torch.Tensor, imp: torch.Tensor, t: GGMLType) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-blocks x [R, S] -> (step >= 0, bias <= 0) [R] of w = step*q + bias, q in 0..L-1: candidate
    inverse scales around (L-1)/(max - min) with min <= 0, each (step, bias) refitted by weighted
    least squares (bias clamped to <= 0, as ggml stores a non-negative min)."""
    nmax = t.levels - 1
    lo = x.min(1).values.clamp_max(0)
    hi = x.max(1).values
    rng = (hi - lo).clamp_min(1e-30)
    sw, swx = imp.sum(1), (imp * x).sum(1)
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_b = (hi - lo) / nmax, lo
    for c in range(0, 21):
        iscale = (nmax - 1 + 0.1 * c) / rng
        ell = torch.clamp(torch.round(iscale.unsqueeze(1) * (x - lo.unsqueeze(1))), 0, nmax)
        swl, swll, swlx = (imp * ell).sum(1), (imp * ell * ell).sum(1), (imp * ell * x).sum(1)
        det = sw * swll - swl * swl
        s = torch.where(det > 0, (sw * swlx - swl * swx) / det.clamp_min(1e-30), (hi - lo) / nmax)
        b = torch.where(det > 0, (swll * swx - swl * swlx) / det.clamp_min(1e-30), lo)
        pos = b > 0  # the min must be <= 0: refit the step alone with bias 0
        s = torch.where(pos, swlx / swll.clamp_min(1e-30), s)
        b = torch.where(pos, torch.zeros_like(b), b)
        s = s.clamp_min(0)
        err = (imp * (x - s.unsqueeze(1) * ell - b.unsqueeze(1)) ** 2).sum(1)
        better = err < best_err
        best_s, best_b, best_err = (torch.where(better, s, best_s), torch.where(better, b, best_b),
                                    torch.where(better, err, best_err))
    return best_s, best_b


def _fit_lut(x: torch.Tensor, imp: torch.Tensor) -> torch.Tensor:
    """Sub-blocks x [R, S] -> d [R] of w = d*IQ4_NL_VALUES[q]: candidates mapping the largest |x|
    near the end value -127, each refitted by least squares on its nearest values."""
    vals = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=x.device)
    extreme = x.gather(1, x.abs().argmax(1, keepdim=True)).squeeze(1)
    safe = torch.where(extreme == 0, torch.ones_like(extreme), extreme)
    best_err = torch.full_like(extreme, float("inf"))
    best = torch.zeros_like(extreme)
    for c in range(-8, 9):
        d = safe / (-127 + c)  # d < 0 when the extreme is positive: it goes to -127 * d
        table = d.unsqueeze(1) * vals
        table, _ = torch.sort(table, dim=1)
        mid = (table[:, 1:] + table[:, :-1]) / 2
        idx = (x.unsqueeze(2) > mid.unsqueeze(1)).sum(2)
        v = table.gather(1, idx) / d.unsqueeze(1)  # the IQ4_NL value of each weight
        num, den = (imp * x * v).sum(1), (imp * v * v).sum(1)
        dd = torch.where(den > 0, num / den.clamp_min(1e-30), d)
        err = (imp * (x - dd.unsqueeze(1) * v) ** 2).sum(1)
        better = err < best_err
        best, best_err = torch.where(better, dd, best), torch.where(better, err, best_err)
    return torch.where(extreme == 0, torch.zeros_like(best), best)


def _super_unsigned(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-block values v [N, nsb, nsub] >= 0 -> (fp16 d [N, nsb], codes [N, nsb, nsub] in 0..2**bits-1)."""
    top = 2**bits - 1
    d = fp16(v.amax(2) / top)
    codes = torch.where(d.unsqueeze(2) > 0, torch.round(v / d.unsqueeze(2).clamp_min(1e-30)), torch.zeros_like(v))
    return d, codes.clamp(0, top).to(torch.int64)


def _super_signed(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed sub-block steps v [N, nsb, nsub] -> (fp16 d, codes in -2**(bits-1)..2**(bits-1)-1): the
    largest |step| maps to -2**(bits-1) (the wider side), as ggml does."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    extreme = v.gather(2, v.abs().argmax(2, keepdim=True)).squeeze(2)
    d = fp16(extreme / lo)
    codes = torch.where(d.unsqueeze(2) != 0, torch.round(v / torch.where(d == 0, 1.0, d).unsqueeze(2)),
                        torch.zeros_like(v))
    return d, codes.clamp(lo, hi).to(torch.int64)


def store_steps(t: GGMLType, step: torch.Tensor, bias: torch.Tensor | None = None) -> Params:
    """Each sub-block's step [N, K/sub] (and bias <= 0 [N, K/sub], affine types) -> the parameters the
    file stores: fp16 per block of 32, or for the k-quants the sub-block steps (and mins -bias)
    quantized to scale_bits under fp16 super-block scales. `steps` of the result gives the values
    the codes are then rounded against (what `fit` and learned rounding both store)."""
    m = step.shape[0]
    if not t.super:
        return {"d": fp16(step)} if t.kind != "affine" else {"d": fp16(step), "m": fp16(bias)}
    nsub = t.block // t.sub
    if t.kind == "sym":
        d, sc = _super_signed(step.reshape(m, -1, nsub), t.scale_bits)
        return {"d": d, "sc": sc}
    d, sc = _super_unsigned(step.reshape(m, -1, nsub), t.scale_bits)
    dmin, mn = _super_unsigned((-bias).reshape(m, -1, nsub), t.scale_bits)
    return {"d": d, "sc": sc, "dmin": dmin, "mn": mn}


@torch.no_grad()
def fit(w: torch.Tensor, t: GGMLType, importance: torch.Tensor | None = None, rows: int = 2048) -> Params:
    """Block parameters of w [N, K] (K a multiple of t.block) in format t. importance [K] (e.g. the
    Hessian diagonal, mean x_k^2) weighs each input column's squared error; None: plain error."""
    n, k = w.shape
    if k % t.block:
        raise ValueError(f"{t.name} needs rows that fill whole blocks of {t.block}, got {k}")
    out: dict[str, list[torch.Tensor]] = {}
    col = torch.ones(k, device=w.device) if importance is None else importance.float().to(w.device).clamp_min(0)
    for r in range(0, n, rows):
        x = w[r:r + rows].float()
        m = x.shape[0]
        xs = x.reshape(-1, t.sub)  # [R, S] sub-blocks, row-major
        imp = col.view(1, k).expand(m, k).reshape(-1, t.sub)
        imp = imp + 1e-12 * (imp.sum(1, keepdim=True) == 0)  # an all-zero importance: plain error there
        if t.kind == "lut":
            part = store_steps(t, _fit_lut(xs, imp).view(m, -1))
        elif t.kind == "sym":
            part = store_steps(t, _fit_sym(xs, imp, t).view(m, -1))
        else:
            part = store_steps(t, *(v.view(m, -1) for v in _fit_affine(xs, imp, t)))
        for key, v in part.items():
            out.setdefault(key, []).append(v)
    return {key: torch.cat(v) for key, v in out.items()}


def quantize(w: torch.Tensor, t: GGMLType, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, Params]:
    """Round-to-nearest into format t: w [N, K] -> (codes [N, K], params)."""
    p = fit(w, t, importance)
    return nearest_codes(w.float(), t, p), p


# ------------------------------------------------------------------------------- bytes
def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[..., ] float32 holding fp16 values -> [..., 2] uint8 (little endian)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).view(*x.shape, 2)


def _f16_of(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> [...] float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(q: torch.Tensor, half: int) -> torch.Tensor:
    """q [..., 2*half] (values < 16) -> [..., half] bytes: element j low nibble, j+half high."""
    return (q[..., :half] | (q[..., half:] << 4)).to(torch.uint8)


def _bits_of(q: torch.Tensor, shift: int, width: int) -> torch.Tensor:
    return (q >> shift) & ((1 << width) - 1)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bits [..., 8, L] (0/1), bit b of byte l = bits[..., b, l] -> [..., L] uint8."""
    weights = (1 << torch.arange(8, device=bits.device)).view(8, 1)
    return (bits * weights).sum(-2).to(torch.uint8)


def pack(q: torch.Tensor, t: GGMLType, p: Params) -> torch.Tensor:
    """Codes q [N, K] and params -> the file's bytes [N, K/block*nbytes] uint8 (ggml-common.h layouts)."""
    n, k = q.shape
    nb = k // t.block
    q = q.long().view(n, nb, t.block)
    parts: list[torch.Tensor]
    if not t.super:
        parts = [_f16_bytes(p["d"])]
        if t.kind == "affine":
            parts.append(_f16_bytes(p["m"]))
        if t.name == "q8_0":
            parts.append((q - 127).to(torch.int8).view(torch.uint8))
        else:
            if t.levels == 32:  # qh: bit j of a little-endian uint32 = bit 4 of element j
                parts.append(_pack_bits(_bits_of(q, 4, 1).view(n, nb, 4, 8).transpose(2, 3)))
            parts.append(_nibbles(q & 15, 16))
    elif t.name == "q2_k":
        sc = (p["sc"] | (p["mn"] << 4)).to(torch.uint8)  # [N, nb, 16]
        parts = [sc, _crumbs(q), _f16_bytes(p["d"]), _f16_bytes(p["dmin"])]
    elif t.name == "q3_k":
        hmask = _pack_bits(_bits_of(q, 2, 1).view(n, nb, 8, 32))  # bit b of byte l: element b*32 + l
        s = p["sc"] + 32  # [N, nb, 16] in 0..63
        low = (s[..., :8] & 15) | ((s[..., 8:] & 15) << 4)
        high = (s >> 4).view(n, nb, 4, 4)  # [.., k, i] -> scale k*4 + i
        hb = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
        parts = [hmask, _crumbs(q & 3), low.to(torch.uint8), hb.to(torch.uint8), _f16_bytes(p["d"])]
    elif t.name in ("q4_k", "q5_k"):
        parts = [_f16_bytes(p["d"]), _f16_bytes(p["dmin"]), _k_scales(p["sc"], p["mn"])]
        if t.name == "q5_k":
            parts.append(_pack_bits(_bits_of(q, 4, 1).view(n, nb, 8, 32)))
        low = (q & 15).view(n, nb, 4, 64)  # chunk c: elements c*64 + h*32 + l -> nibble h of byte c*32 + l
        parts.append(_nibbles(low, 32).reshape(n, nb, 128))
    elif t.name == "q6_k":
        v = q.view(n, nb, 2, 128)
        ql = _nibbles(v & 15, 64)  # [.., 2, 64]: byte h*64 + j = element h*128 + j | element h*128 + 64 + j << 4
        hi = (v >> 4).view(n, nb, 2, 4, 32)
        qh = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)  # [.., 2, 32]
        parts = [ql.reshape(n, nb, 128), qh.reshape(n, nb, 64).to(torch.uint8), p["sc"].to(torch.int8).view(torch.uint8),
                 _f16_bytes(p["d"])]
    else:
        raise ValueError(f"no packing for {t.name}")
    out = torch.cat([x.to(torch.uint8).reshape(n, nb, -1) for x in parts], dim=2)
    assert out.shape[2] == t.nbytes, (t.name, out.shape)
    return out.reshape(n, nb * t.nbytes)


def _crumbs(q: torch.Tensor) -> torch.Tensor:
    """2-bit codes [N, nb, 256] -> [N, nb, 64]: element h*128 + s*32 + l at bits 2s of byte h*32 + l."""
    n, nb = q.shape[:2]
    v = (q & 3).view(n, nb, 2, 4, 32)
    return (v[..., 0, :] | (v[..., 1, :] << 2) | (v[..., 2, :] << 4) | (v[..., 3, :] << 6)).reshape(n, nb, 64)


def _k_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's 8 6-bit scales and mins [N, nb, 8] -> 12 bytes: bytes 0-3 scale j (j<4) and the top
    2 bits of scale j+4; 4-7 the same for mins; 8-11 low nibbles of scale j+4 | min j+4 << 4."""
    b0 = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    b1 = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    b2 = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return torch.cat([b0, b1, b2], dim=-1).to(torch.uint8)


def unpack(blocks: torch.Tensor, t: GGMLType, k: int) -> tuple[torch.Tensor, Params]:
    """The file's bytes [N, K/block*nbytes] -> (codes [N, K] int64, params): the inverse of `pack`."""
    n = blocks.shape[0]
    nb = k // t.block
    b = blocks.reshape(n, nb, t.nbytes).long()

    def take(*sizes):
        out, at = [], 0
        for s in sizes:
            out.append(b[..., at:at + s])
            at += s
        return out

    def lo_hi(x, half):  # bytes [.., half] -> [.., 2*half] low nibbles then high nibbles
        return torch.cat([x & 15, x >> 4], dim=-1)

    p: Params = {}
    if not t.super:
        if t.name == "q8_0":
            d, qs = take(2, 32)
            p["d"] = _f16_of(d.to(torch.uint8))
            q = qs.to(torch.uint8).view(torch.int8).long() + 127
        else:
            sizes = (2,) + ((2,) if t.kind == "affine" else ()) + ((4,) if t.levels == 32 else ()) + (16,)
            got = take(*sizes)
            p["d"] = _f16_of(got[0].to(torch.uint8))
            if t.kind == "affine":
                p["m"] = _f16_of(got[1].to(torch.uint8))
            q = lo_hi(got[-1], 16)
            if t.levels == 32:
                qh = got[-2]
                bits = ((qh.unsqueeze(-1) >> torch.arange(8)) & 1).reshape(n, nb, 32)  # element 8*byte + bit
                q = q | (bits << 4)
        return q.reshape(n, k), p
    if t.name == "q2_k":
        sc, qs, d, dmin = take(16, 64, 2, 2)
        p["d"], p["dmin"] = _f16_of(d.to(torch.uint8)), _f16_of(dmin.to(torch.uint8))
        p["sc"], p["mn"] = sc & 15, sc >> 4
        q = _uncrumb(qs)
    elif t.name == "q3_k":
        hmask, qs, low, hb, d = take(32, 64, 8, 4, 2)
        p["d"] = _f16_of(d.to(torch.uint8))
        lows = torch.cat([low & 15, low >> 4], dim=-1)  # [.., 16]
        highs = torch.stack([(hb >> (2 * j)) & 3 for j in range(4)], dim=-2).reshape(n, nb, 16)
        p["sc"] = (lows | (highs << 4)) - 32
        hbit = ((hmask.unsqueeze(-2) >> torch.arange(8).view(8, 1)) & 1).reshape(n, nb, 256)
        q = _uncrumb(qs) | (hbit << 2)
    elif t.name in ("q4_k", "q5_k"):
        sizes = (2, 2, 12) + ((32,) if t.name == "q5_k" else ()) + (128,)
        got = take(*sizes)
        p["d"], p["dmin"] = _f16_of(got[0].to(torch.uint8)), _f16_of(got[1].to(torch.uint8))
        s = got[2]
        p["sc"] = torch.cat([s[..., :4] & 63, (s[..., 8:] & 15) | ((s[..., :4] >> 6) << 4)], dim=-1)
        p["mn"] = torch.cat([s[..., 4:8] & 63, (s[..., 8:] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
        qs = got[-1].view(n, nb, 4, 32)
        q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(n, nb, 256)
        if t.name == "q5_k":
            hbit = ((got[3].unsqueeze(-2) >> torch.arange(8).view(8, 1)) & 1).reshape(n, nb, 256)
            q = q | (hbit << 4)
    elif t.name == "q6_k":
        ql, qh, sc, d = take(128, 64, 16, 2)
        p["d"] = _f16_of(d.to(torch.uint8))
        p["sc"] = sc.to(torch.uint8).view(torch.int8).long()
        low = ql.view(n, nb, 2, 64)
        low = torch.cat([low & 15, low >> 4], dim=-1)  # [.., 2, 128]
        hi = torch.stack([(qh.view(n, nb, 2, 32) >> (2 * j)) & 3 for j in range(4)], dim=-2).reshape(n, nb, 2, 128)
        q = (low | (hi << 4)).reshape(n, nb, 256)
    else:
        raise ValueError(f"no unpacking for {t.name}")
    return q.reshape(n, k), p


def _uncrumb(qs: torch.Tensor) -> torch.Tensor:
    n, nb = qs.shape[:2]
    v = qs.view(n, nb, 2, 1, 32) >> (2 * torch.arange(4)).view(1, 1, 1, 4, 1)
    return (v & 3).reshape(n, nb, 256)


def dequantize_bytes(blocks: torch.Tensor, t: GGMLType, k: int) -> torch.Tensor:
    """The file's bytes [N, row_bytes] -> weights [N, K] float32."""
    q, p = unpack(blocks, t, k)
    return dequantize(q, t, p)


# ------------------------------------------------------------------------------- llama.cpp's mixes
@dataclass(frozen=True)
class Mix:
    """A llama.cpp file type (`llama-quantize`'s TYPE): its default tensor type and number."""

    name: str
    default: str
    file_type: int


MIXES: dict[str, Mix] = {m.name: m for m in (
    Mix("q4_0", "q4_0", 2), Mix("q4_1", "q4_1", 3), Mix("q8_0", "q8_0", 7), Mix("q5_0", "q5_0", 8),
    Mix("q5_1", "q5_1", 9), Mix("q2_k", "q2_k", 10), Mix("q3_k_s", "q3_k", 11), Mix("q3_k_m", "q3_k", 12),
    Mix("q3_k_l", "q3_k", 13), Mix("q4_k_s", "q4_k", 14), Mix("q4_k_m", "q4_k", 15), Mix("q5_k_s", "q5_k", 16),
    Mix("q5_k_m", "q5_k", 17), Mix("q6_k", "q6_k", 18), Mix("iq4_nl", "iq4_nl", 25),
)}
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(mix: str, role: str, layer: int, n_layers: int, ncols: int, n_gqa: int = 1,
             tied: bool = False, imatrix: bool = False) -> str:
    """The GGML type llama.cpp's `llama-quantize` gives a tensor under file type `mix` (llama-quant.cpp,
    dense models, not Falcon or 70B): role the GGUF tensor's base name (attn_q, attn_k, attn_v,
    attn_output, attn_qkv, ffn_gate, ffn_up, ffn_down, token_embd, output), layer its block, ncols
    its row width; a type whose block does not divide ncols falls back as llama.cpp does."""
    m = MIXES[mix]
    t = m.default
    if role == "output" or (tied and role == "token_embd"):
        t = "q8_0" if ncols % TYPES[t].block else ("q6_k" if t != "q8_0" else t)
    elif role == "attn_v":
        if mix == "q2_k":
            t = "q4_k" if n_gqa >= 4 else "q3_k"
        elif mix == "q3_k_m":
            t = "q5_k" if layer < 2 else "q4_k"
        elif mix == "q3_k_l":
            t = "q5_k"
        elif mix == "iq4_nl" and n_gqa >= 4:
            t = "q5_k"
        elif mix in ("q4_k_m", "q5_k_m") and _more_bits(layer, n_layers):
            t = "q6_k"
        elif mix == "q4_k_s" and layer < 4:
            t = "q5_k"
    elif role == "ffn_down":
        if mix == "q2_k":
            t = "q3_k"
        elif mix == "q3_k_m":
            t = "q5_k" if layer < n_layers // 16 else "q4_k"
        elif mix == "q3_k_l":
            t = "q5_k"
        elif mix in ("q4_k_m", "q5_k_m"):
            if _more_bits(layer, n_layers):
                t = "q6_k"
        elif mix == "iq4_nl" and layer < n_layers // 8 and not imatrix:
            t = "q5_k"
        elif mix == "q4_k_s" and layer < n_layers // 8:
            t = "q5_k"
        elif mix in ("q4_0", "q5_0") and imatrix and layer < n_layers // 8:
            t = "q4_1" if mix == "q4_0" else "q5_1"
    elif role == "attn_output":
        t = {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(mix, t)
    elif role == "attn_qkv":
        t = {"q3_k_m": "q4_k", "q3_k_l": "q4_k", "q4_k_m": "q5_k", "q5_k_m": "q6_k"}.get(mix, t)
    if ncols % TYPES[t].block:
        t = FALLBACK.get(t, t)
        if ncols % TYPES[t].block:
            return "f16"
    return t
