"""Floating-point grids: the FP8 E4M3 and FP4 E2M1 element types, the E8M0 power-of-two scale, and
the weight / activation layouts built on them. Pure functions on tensors.

Element and scale types (OCP 8-bit Floating Point v1.0, OCP Microscaling (MX) v1.0):
  E4M3 ("e4m3fn")  s eeee mmm, bias 7; e = 0: subnormal 2**-6 * m/8; e = 15, m = 7: NaN (no
                   infinities); largest finite 448, smallest subnormal 2**-9
  E2M1 (FP4)       s ee m, bias 1: +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}; no NaN, no infinities
  E8M0             eeeeeeee: 2**(e - 127); 0xFF is NaN; no sign, no zero
Encoding rounds to nearest, ties to the even code (lsb 0), and saturates: a finite value (or an
infinity) beyond the largest finite value becomes that value, as NVIDIA's cvt.satfinite and the OCP
"saturating" mode do. NaN stays NaN in E4M3; E2M1 has no NaN, so quantizers refuse non-finite weights.

Layouts (w [N, K] as nn.Linear holds it; x [M, K]):
  fp8          weight E4M3, one fp32 scale per output row  (scale = max|w_n| / 448)   [N, 1]
  fp8-block    weight E4M3, one fp32 scale per 128x128 block                           [ceil(N/128), ceil(K/128)]
  nvfp4        weight E2M1 in groups of 16 along K; each group's scale is E4M3 under one fp32 global
               scale per tensor:  global = 448 * 6 / max|w|,  sf = e4m3(max|w_g| / 6 * global),
               w ~ e2m1 * (sf / global)                                                 sf [N, K/16]
  mxfp4        weight E2M1 in groups of 32 along K, scale E8M0 = 2**(floor(log2 max|w_g|) - 2) (the OCP
               MX rule: the group max lands in [4, 8), values past 6 saturate)          [N, K/32]
Activations: fp8 per token (max|x_m| / 448, at run time) or one static scale per tensor; fp8 in 1x128
groups per token; nvfp4 in groups of 16 per token with E4M3 group scales under a calibrated static
global scale (448 * 6 / max|x| over the calibration data).
The tensor names and conventions are compressed-tensors' (what vLLM reads), so export renames nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of codes 0..7; code | 8 is the negative
E2M1_EMAX = 2  # floor(log2(6)): the exponent of E2M1's largest power of two
E8M0_BIAS = 127
FP8 = torch.float8_e4m3fn


# ------------------------------------------------------------------------------ element types
def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """x float -> float32 holding the nearest E4M3 value (ties to even, saturating at +-448; NaN stays)."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(FP8).float()


def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """x float -> the same shape in torch.float8_e4m3fn (ties to even, saturating; NaN stays NaN)."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def e4m3_levels() -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32 [253] increasing, codes uint8 [253]): every distinct finite E4M3 value and its
    code (+0 for zero). For GPTQ's nearest-level rounding."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = codes.view(FP8).float()
    keep = torch.isfinite(vals) & ~((codes == 0x80))  # drop NaNs and -0
    vals, codes = vals[keep], codes[keep]
    order = torch.argsort(vals)
    return vals[order], codes[order]


_E2M1 = torch.tensor(E2M1_VALUES)
_E2M1_MID = (_E2M1[1:] + _E2M1[:-1]) / 2  # 0.25 0.75 1.25 1.75 2.5 3.5 5


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """x float (finite) -> uint8 codes 0..15 of the same shape: sign in bit 3, magnitude index in bits
    0-2; round to nearest, ties to the even index (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 2.5 -> 2, 5 -> 4),
    saturating at 6. -0 (and values rounding to 0 from below) encode as +0's code 0 only when x >= 0:
    a negative value rounding to zero keeps its sign (code 8), as a cast does."""
    xf = x.float()
    a = xf.abs().contiguous()
    mid = _E2M1_MID.to(a.device)
    lower = torch.bucketize(a, mid, right=False)  # number of midpoints strictly below |x|, 0..7
    tie = (lower < 7) & (a == mid[lower.clamp(max=6)])  # exactly on the midpoint above the lower level
    idx = lower + (tie & (lower % 2 == 1)).long()  # a tie goes to the even index
    return (idx | (torch.signbit(xf).long() << 3)).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 -> float32 values."""
    c = codes.long()
    mag = _E2M1.to(codes.device)[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """x float -> float32 holding the nearest E2M1 value, equal to e2m1_decode(e2m1_encode(x)) but in
    float arithmetic only (the activation path runs it on every forward): the grid has a uniform step
    in each of [0, 2) (0.5), [2, 4) (1) and [4, 6] (2), and torch.round rounds half to even, which on
    each region's multiples of the step is the even code; past 6 it saturates. NaN stays NaN."""
    xf = x.float()
    a = xf.abs()
    r = torch.where(a < 2, torch.round(a * 2) * 0.5, torch.where(a < 4, torch.round(a), torch.round(a * 0.5) * 2))
    return torch.copysign(r.clamp_(max=E2M1_MAX), xf)


def e2m1_levels() -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32 [15] increasing, codes uint8 [15]): the distinct E2M1 values and their codes."""
    codes = torch.tensor([15, 14, 13, 12, 11, 10, 9, 0, 1, 2, 3, 4, 5, 6, 7], dtype=torch.uint8)
    return e2m1_decode(codes), codes


def e8m0_encode_exponent(exp: torch.Tensor) -> torch.Tensor:
    """Unbiased integer exponents -> uint8 E8M0 codes, clamped to the finite range 2**-127 .. 2**127."""
    return (exp.long() + E8M0_BIAS).clamp(0, 254).to(torch.uint8)


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 codes -> float32 2**(code - 127); 0xFF -> NaN."""
    c = codes.long()
    val = torch.ldexp(torch.ones_like(c, dtype=torch.float32), (c - E8M0_BIAS).to(torch.int32))
    return torch.where(c == 255, torch.full_like(val, float("nan")), val)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for a > 0, exactly (from the float's exponent, no log rounding): int64."""
    _, e = torch.frexp(a.float())  # a = m * 2**e, m in [0.5, 1)
    return e.long() - 1


# ------------------------------------------------------------------------------ fp4 packing
def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., K] (K even) -> uint8 [..., K/2]: element 2j in the low nibble, 2j+1 in the high
    one (compressed-tensors' and vLLM's order)."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> codes uint8 [..., K]."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


# ------------------------------------------------------------------------------ the formats
@dataclass(frozen=True)
class FloatFormat:
    """One scheme's layout (see the module docstring). `group`: weights sharing a scale, (rows, cols)
    with -1 for the whole dimension; `act`: how activations are quantized (None: 16-bit)."""

    name: str
    element: str  # "e4m3" or "e2m1"
    group: tuple[int, int]
    scale: str  # "fp32", "e4m3" (under a global fp32 scale) or "e8m0"
    act: str | None  # None, "token" (fp8 per token or static), "group128" (fp8 1x128), "nvfp4"

    @property
    def levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        return e4m3_levels() if self.element == "e4m3" else e2m1_levels()

    @property
    def element_max(self) -> float:
        return E4M3_MAX if self.element == "e4m3" else E2M1_MAX

    def n_scales(self, n: int, k: int) -> tuple[int, int]:
        r, c = self.group
        return (1 if r == -1 else -(-n // r)), (1 if c == -1 else -(-k // c))


FORMATS = {f.name: f for f in (
    FloatFormat("fp8", "e4m3", (1, -1), "fp32", "token"),
    FloatFormat("fp8-block", "e4m3", (128, 128), "fp32", "group128"),
    FloatFormat("fp8-weight", "e4m3", (1, -1), "fp32", None),
    FloatFormat("nvfp4", "e2m1", (1, 16), "e4m3", "nvfp4"),
    FloatFormat("nvfp4-a16", "e2m1", (1, 16), "e4m3", None),
    FloatFormat("mxfp4", "e2m1", (1, 32), "e8m0", None),
)}


def _blocked(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """t [N, K] zero-padded to whole blocks of rows x cols -> a view [ceil(N/rows), rows, ceil(K/cols),
    cols] (zero padding raises no max|.| and adds nothing to a sum)."""
    n, k = t.shape
    pr, pc = -n % rows, -k % cols
    if pr or pc:
        t = torch.nn.functional.pad(t, (0, pc, 0, pr))
    return t.view(-(-n // rows), rows, -(-k // cols), cols)


def _group_amax(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """max|w| over blocks of rows x cols (the last ones may be shorter): [ceil(N/rows), ceil(K/cols)]."""
    return _blocked(w.float().abs(), rows, cols).amax(dim=(1, 3))


def expand_scales(s: torch.Tensor, n: int, k: int, rows: int, cols: int) -> torch.Tensor:
    """Per-block [ceil(N/rows), ceil(K/cols)] -> per-weight [N, K]."""
    return s.repeat_interleave(rows, dim=0)[:n].repeat_interleave(cols, dim=1)[:, :k]


def global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """NVFP4's fp32 global scale [1] = 448 * 6 / max|t| (1 for an all-zero tensor)."""
    a = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    g = (E4M3_MAX * E2M1_MAX) / a.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(torch.isfinite(g) & (a > 0), g, torch.ones_like(g))


def nvfp4_group_scales(amax_g: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Group max|.| [...] and the global scale -> E4M3 group scales (float8_e4m3fn) = e4m3(amax / 6 *
    global), at least the smallest subnormal 2**-9 so that no scale is 0."""
    sf = (amax_g.float() / E2M1_MAX) * global_scale.float()
    return e4m3_encode(sf.clamp_min(E4M3_MIN_SUBNORMAL))


def mx_exponent(amax_g: torch.Tensor) -> torch.Tensor:
    """OCP MX: the shared exponent floor(log2(max|w_g|)) - emax(E2M1) (all-zero group: 2**-127)."""
    e = floor_log2(amax_g.clamp_min(2.0**-126)) - E2M1_EMAX
    return torch.where(amax_g > 0, e, torch.full_like(e, -E8M0_BIAS))


def weight_scales(w: torch.Tensor, fmt: FloatFormat, shrink: torch.Tensor | None = None,
                  global_amax: float | None = None) -> dict[str, torch.Tensor]:
    """w [N, K] -> the scale tensors of `fmt` (the buffer names of FloatLinear). `shrink` (optional,
    the shape of the scale grid): a factor in (0, 1] on each group's max|w| before its scale is formed
    (a searched clipping; the global scale of nvfp4 stays at the tensor's max). `global_amax`: the
    max|w| nvfp4's global scale is formed from, when several layers share one (vLLM fuses q/k/v and
    gate/up into one GEMM with one global scale), else this layer's own."""
    n, k = w.shape
    rows, cols = fmt.group
    amax = _group_amax(w, n if rows == -1 else rows, k if cols == -1 else cols)
    if shrink is not None:
        amax = amax * shrink
    if fmt.scale == "fp32":
        return {"weight_scale": (amax / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)}
    if fmt.scale == "e4m3":
        gs = global_scale_from_amax(w.float().abs().amax() if global_amax is None else global_amax)
        return {"weight_scale": nvfp4_group_scales(amax, gs), "weight_global_scale": gs}
    return {"weight_scale": e8m0_encode_exponent(mx_exponent(amax))}


def scale_grid(scales: dict[str, torch.Tensor], fmt: FloatFormat, n: int, k: int) -> torch.Tensor:
    """The float32 step of every weight group, [N, ng] with ng groups of fmt.group[1] along K (for a
    block format: each row's copy of its block's scale), as dequantization multiplies it."""
    s = scales["weight_scale"]
    if fmt.scale == "e4m3":
        s = s.float() / scales["weight_global_scale"].float()
    elif fmt.scale == "e8m0":
        s = e8m0_decode(s)
    rows = fmt.group[0]
    if rows not in (1, -1):
        s = s.repeat_interleave(rows, dim=0)[:n]
    return s.float()


def group_cols(fmt: FloatFormat, k: int) -> int:
    """The number of inputs sharing a scale (K for a per-channel format)."""
    return k if fmt.group[1] == -1 else fmt.group[1]


def encode(w: torch.Tensor, step: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """w [N, K], step [N, ng] -> codes: float8_e4m3fn [N, K] (e4m3) or uint8 [N, K] 0..15 (e2m1);
    round to nearest on w / step (as compressed-tensors divides), saturating."""
    n, k = w.shape
    s = step.repeat_interleave(group_cols(fmt, k), dim=1)[:, :k]
    x = w.float() / s
    return e4m3_encode(x) if fmt.element == "e4m3" else e2m1_encode(x)


def decode(codes: torch.Tensor, step: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """codes [N, K] (as `encode` returns them), step [N, ng] -> w [N, K] float32 = value * step."""
    n, k = codes.shape
    s = step.repeat_interleave(group_cols(fmt, k), dim=1)[:, :k]
    vals = codes.float() if fmt.element == "e4m3" else e2m1_decode(codes)
    return vals * s


def _group_sum(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Sum over blocks of rows x cols (the last ones may be shorter): [ceil(N/rows), ceil(K/cols)]."""
    return _blocked(t, rows, cols).sum(dim=(1, 3))


def search_weight_scales(w: torch.Tensor, fmt: FloatFormat, grid: int = 20, max_shrink: float = 0.3,
                         col_weight: torch.Tensor | None = None, global_amax: float | None = None
                         ) -> dict[str, torch.Tensor]:
    """Per scale group, the shrink p of its max|w| (p = 1, 1 - 1/grid, ... down to 1 - max_shrink;
    for E8M0 scales also p = 2, the next power of two, which saturates nothing) whose scale gives
    the least sum_k col_weight_k (w_k - deq(w_k))**2 over the group. The scale is then rounded to
    the format's scale type as weight_scales does, so the result is one the format stores; p = 1 is
    plain max scaling, never beaten by a worse candidate. col_weight [K] >= 0 (e.g. the Hessian
    diagonal mean x_k**2), default all ones. w [N, K] -> weight_scales' tensors."""
    n, k = w.shape
    rows, cols = fmt.group
    r, c = (n if rows == -1 else rows), (k if cols == -1 else cols)
    wf = w.float()
    cw = torch.ones(k) if col_weight is None else col_weight.float().clamp_min(0).cpu()
    cw = cw.to(wf.device).view(1, k)
    candidates = [1 - i / grid for i in range(int(max_shrink * grid) + 1)] + ([2.0] if fmt.scale == "e8m0" else [])
    best, best_err = None, None
    for p in candidates:
        sc = weight_scales(wf, fmt, shrink=torch.tensor(p), global_amax=global_amax)
        step = scale_grid(sc, fmt, n, k)
        err = _group_sum((decode(encode(wf, step, fmt), step, fmt) - wf).square_().mul_(cw), r, c)
        if best is None:
            best, best_err = sc, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        for name in best:
            if best[name].shape == better.shape:  # the per-group scale (the global one stays)
                old, new = best[name].view(torch.uint8) if best[name].dtype == FP8 else best[name], sc[name]
                new = new.view(torch.uint8) if new.dtype == FP8 else new
                merged = torch.where(better, new, old)
                best[name] = merged.view(FP8) if sc[name].dtype == FP8 else merged
    return best


def layer_scales(w: torch.Tensor, fmt: FloatFormat, search: bool, grid: int = 20, max_shrink: float = 0.3,
                 col_weight: torch.Tensor | None = None, global_amax: float | None = None) -> dict[str, torch.Tensor]:
    """A layer's scale tensors: searched (search_weight_scales, errors weighted by `col_weight`) or
    each group's max|w| (weight_scales); `global_amax` as there."""
    if search:
        return search_weight_scales(w, fmt, grid, max_shrink, col_weight, global_amax)
    return weight_scales(w, fmt, global_amax=global_amax)


def quantize_weight(w: torch.Tensor, fmt: FloatFormat, scales: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Round to nearest: w [N, K] -> FloatLinear's weight tensors: "weight" (E4M3 [N, K]) or
    "weight_packed" (uint8 [N, K/2]) with "weight_scale" (+ "weight_global_scale"); `scales`: given
    ones (search_weight_scales'), else each group's max|w|."""
    scales = weight_scales(w, fmt) if scales is None else scales
    codes = encode(w, scale_grid(scales, fmt, *w.shape), fmt)
    return {**stored_codes(codes, fmt), **scales}


def stored_codes(codes: torch.Tensor, fmt: FloatFormat) -> dict[str, torch.Tensor]:
    """codes [N, K] -> {"weight": E4M3 [N, K]} or {"weight_packed": uint8 [N, K/2]}."""
    return {"weight": codes.to(FP8)} if fmt.element == "e4m3" else {"weight_packed": pack_fp4(codes)}


def dequantize_weight(t: dict[str, torch.Tensor], fmt: FloatFormat, n: int, k: int) -> torch.Tensor:
    """FloatLinear's weight tensors -> w [N, K] float32."""
    codes = t["weight"] if fmt.element == "e4m3" else unpack_fp4(t["weight_packed"])[:, :k]
    return decode(codes, scale_grid(t, fmt, n, k), fmt)


def non_finite(w: torch.Tensor, name: str, fmt_name: str) -> str | None:
    """The one-line refusal of NaN/Inf weights (E2M1 has no NaN; a NaN max|w| would poison every scale
    of its group), or None when all are finite."""
    if torch.isfinite(w).all():
        return None
    return f"{name} holds NaN or Inf weights, which {fmt_name} cannot encode: fix or exclude the layer (--exclude)"


def check_shape(fmt: FloatFormat, n: int, k: int) -> str | None:
    """What the format cannot hold about a k -> n layer, or None (fp4 packs pairs; nvfp4 / mxfp4
    groups must tile K: compressed-tensors, vLLM and the tensor cores refuse a shorter last group)."""
    cols = fmt.group[1]
    if fmt.element == "e2m1" and k % cols:
        return f"in_features={k} is not a multiple of {fmt.name}'s group of {cols}"
    return None


# ------------------------------------------------------------------------------ activations
def fake_quant_fp8_rows(x2: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [M, K] -> x2 through E4M3 and back, float32: per row (token) scale max|x_m| / 448, or the
    static `scale` [1]."""
    xf = x2.float()
    if scale is None:
        scale = (torch.linalg.vector_norm(xf, float("inf"), dim=-1, keepdim=True) / E4M3_MAX).clamp_min(
            torch.finfo(torch.float32).tiny)
    return e4m3_round(xf / scale) * scale


def fake_quant_fp8_groups(x2: torch.Tensor, cols: int = 128) -> torch.Tensor:
    """x2 [M, K] -> through E4M3 in 1 x `cols` groups per row (the last may be shorter), float32."""
    m, k = x2.shape
    xf = x2.float()
    pad = -k % cols
    xp = torch.nn.functional.pad(xf, (0, pad)).view(m, -1, cols)
    s = (xp.abs().amax(dim=2, keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (e4m3_round(xp / s) * s).view(m, -1)[:, :k]


def fake_quant_nvfp4(x2: torch.Tensor, global_scale: torch.Tensor, cols: int = 16) -> torch.Tensor:
    """x2 [M, K] (K a multiple of `cols`) -> through NVFP4 per row in groups of 16 with E4M3 group
    scales under the static global scale [1], float32."""
    m, k = x2.shape
    xg = x2.float().view(m, k // cols, cols)
    gs = global_scale.float()
    step = nvfp4_group_scales(xg.abs().amax(dim=2, keepdim=True), gs).float() / gs
    return (e2m1_round(xg / step) * step).view(m, k)


def fake_quant_input(x2: torch.Tensor, fmt: FloatFormat, input_scale: torch.Tensor | None = None,
                     input_global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [M, K] -> what the format's activations hold, float32 (fmt.act None: unchanged)."""
    if fmt.act == "token":
        return fake_quant_fp8_rows(x2, input_scale)
    if fmt.act == "group128":
        return fake_quant_fp8_groups(x2, 128)
    if fmt.act == "nvfp4":
        return fake_quant_nvfp4(x2, input_global_scale)
    return x2.float()


def static_input_scale(fmt: FloatFormat, absmax: float) -> torch.Tensor:
    """The calibrated activation scale [1] from max|x|: fp8 static amax / 448 ("input_scale"), nvfp4
    its global scale 448 * 6 / amax ("input_global_scale")."""
    if fmt.act == "nvfp4":
        return global_scale_from_amax(absmax)
    return torch.tensor([max(absmax, 1e-12) / E4M3_MAX], dtype=torch.float32)

