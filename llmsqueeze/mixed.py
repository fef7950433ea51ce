"""Mixed precision: bits per layer chosen to meet an average bits-per-weight budget.

1. Sensitivity, measured once on the calibration data by the shared engine (the model is left
   dense): for each Linear and each candidate bit width b, the output error of round-to-nearest

       err_l(b) = tr(E H E^T) / tr(W H W^T),   E = Q_b(W) - W  [N, K]

   the noise-to-signal ratio of the layer's output over the calibration tokens, with H = 2/n sum x x^T
   [K, K] the layer's input Hessian (the one GPTQ uses); relative=False keeps the absolute error
   1/2 tr(E H E^T) = mean ||E x||^2. Upstream blocks stay dense, so every layer sees the inputs of
   the unquantized model.
2. Allocation: minimise sum_l err_l(b_l) subject to sum_l cost_l(b_l) <= avg_bits * sum_l N_l K_l, where
   cost_l(b) is what the layer really stores in bits (packed qweight, scales, qzeros, g_idx: the
   "overhead" of group scales and zeros counted). Lagrangian relaxation: each layer picks
   argmin err + lam * cost, lam found by bisection (the cheapest point of the convex hull that fits);
   the budget left over is then spent greedily on the upgrade with the best error drop per extra bit.
3. Quantization (RTN or GPTQ) with each layer's own scheme.

Checkpoint: `quantization_config["layer_schemes"] = {module name: {"bits": b}}` overrides the base
`scheme` for the named layers (format_version 3); layers not named use `scheme` (DESIGN.md).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter

import torch
from torch import nn

from .config import SUPPORTED_BITS, LlmsqueezeError, QuantScheme

log = logging.getLogger("llmsqueeze")

DEFAULT_CANDIDATES = (2, 3, 4, 8)
MIXED_FORMAT_VERSION = 3


# ------------------------------------------------------------------------------- checkpoint side
# ------------------------------------------------------------------------------------- costs
def layer_bits_cost(n: int, k: int, bits: int, scheme: QuantScheme, g_idx: bool = False) -> int:
    """Bits a packed N x K layer stores: qweight [K_pad*b/32, N], scales [ng, N], qzeros [ng, N_pad*b/32],
    g_idx [K] int32 when stored (bias excluded, as `llmsqueeze info` does)."""
    from .quant.pack import padded

    ng = math.ceil(k / scheme.group_size_for(k))
    sb = torch.empty(0, dtype=scheme.torch_scale_dtype).element_size() * 8
    return padded(k) * bits * n + ng * n * sb + ng * padded(n) * bits + (32 * k if g_idx else 0)


# ------------------------------------------------------------------------------- sensitivity
class Sensitivity:
    """The engine's method for step 1: accumulates each Linear's Hessian, then measures the RTN output
    error at every candidate width; `apply` returns the Linear unchanged (the model stays dense)."""

    def __init__(self, scheme: QuantScheme, candidates=DEFAULT_CANDIDATES, relative: bool = True):
        from .quant.hessian import HessianStore

        self.relative = relative
        # plain min/max grids: the clipping search is 100x the cost and barely changes the ranking
        self.schemes = {b: dataclasses.replace(scheme, bits=b, clip_search=False) for b in candidates}
        self.store = HessianStore()
        self.table: dict[str, dict[int, float]] = {}

    def collect(self, name: str, module, x: torch.Tensor) -> None:
        self.store.collect(name, x)

    @torch.no_grad()
    def apply(self, name: str, module):
        from .nn import linear_weight

        h, _ = self.store.pop(name)
        w = linear_weight(module)
        errors = output_errors(w, h, self.schemes)
        if self.relative:  # noise-to-signal ratio of the layer's output: comparable across layers
            wf = w.detach().float()
            signal = 0.5 * float(((wf @ h.to(wf.device)) * wf).sum())
            errors = {b: e / max(signal, 1e-30) for b, e in errors.items()}
        self.table[name] = errors
        return module


def output_errors(w: torch.Tensor, h: torch.Tensor, schemes: dict[int, QuantScheme]) -> dict[int, float]:
    """w [N, K], h [K, K] -> {bits: 1/2 tr(E H E^T)} for E the RTN error of each scheme."""
    from .quant.grid import dequantize, rtn_quantize

    w = w.detach().float()
    h = h.to(w.device)
    out = {}
    for b, s in schemes.items():
        q, scale, zero = rtn_quantize(w, s)
        e = dequantize(q, scale, zero, s.group_size_for(w.shape[1])) - w  # [N, K]
        out[b] = 0.5 * float(((e @ h) * e).sum())
    return out


def measure_sensitivity(model: nn.Module, names: list[str], data, scheme: QuantScheme,
                        candidates=DEFAULT_CANDIDATES, *, device=None, offload=None, batch_size: int = 1,
                        progress: bool = True, relative: bool = True) -> dict[str, dict[int, float]]:
    """{layer: {bits: output error}} for `names` (inside the decoder blocks), from calibration token
    ids `data` [n_samples, seq_len]. One engine pass; the model is unchanged. `relative` (default)
    divides each layer's error by its output energy 1/2 tr(W H W^T): the absolute error is dominated
    by the late layers, whose outputs are large (SmolLM2: layer 29's down_proj 1e5x layer 0's v_proj),
    and on SmolLM2 RTN it chose 2 bits for 30 early layers and gave 228.75 perplexity at 3.5 bits/weight,
    worse than uniform 3-bit (52.03)."""
    from .engine import calibration_ids, check_devices, run_sequential

    candidates = check_candidates(candidates)
    if data is None:
        raise LlmsqueezeError("avg_bits needs calibration data to measure each layer's sensitivity: pass data= "
                              "token ids [n_samples, seq_len] (--calib on the command line)")
    from .models import get_arch

    outside = [n for n in names if not n.startswith(get_arch(model).blocks + ".")]
    if outside:
        raise LlmsqueezeError(f"mixed precision chooses widths for the layers inside the decoder blocks; {outside[0]} "
                              "is not: drop --lm-head (lm_head=True) or exclude it")
    if batch_size < 1:
        raise LlmsqueezeError(f"batch_size={batch_size} must be positive")
    batches = list(calibration_ids(data, "mixed precision").split(batch_size))
    device = check_devices(device, offload)
    method = Sensitivity(scheme, candidates, relative)
    run_sequential(model, batches, method, names, device=device, offload=offload, progress=progress)
    return {n: method.table[n] for n in names}


# -------------------------------------------------------------------------------- allocation
def check_candidates(candidates) -> tuple[int, ...]:
    cands = tuple(sorted(set(candidates)))
    bad = [b for b in cands if isinstance(b, bool) or b not in SUPPORTED_BITS]
    if not cands or bad:
        raise LlmsqueezeError(f"bit candidates {list(candidates)}: use widths among {', '.join(map(str, SUPPORTED_BITS))}")
    return cands


def _budget_error(avg_bits, lo: float, hi: float, cands) -> LlmsqueezeError:
    return LlmsqueezeError(
        f"avg_bits={avg_bits!r} is outside what bit widths {list(cands)} allow here: {lo:.3f} (all {cands[0]}-bit) "
        f"to {hi:.3f} (all {cands[-1]}-bit) bits per weight, scales and zeros included; choose a budget in that range"
    )


def check_budget(model: nn.Module, names: list[str], scheme: QuantScheme, avg_bits, candidates=DEFAULT_CANDIDATES,
                 g_idx: bool = False) -> None:
    """One-line error, before any work, when `avg_bits` lies outside [all cheapest, all dearest]."""
    from .nn import linear_weight

    cands = check_candidates(candidates)
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or not math.isfinite(avg_bits):
        raise LlmsqueezeError(f"avg_bits={avg_bits!r} must be a number of bits per weight, e.g. 3.5")
    shapes = [tuple(linear_weight(model.get_submodule(n)).shape) for n in names]
    total = sum(n * k for n, k in shapes)
    lo, hi = (sum(layer_bits_cost(n, k, b, scheme, g_idx) for n, k in shapes) / total for b in (cands[0], cands[-1]))
    if not lo <= avg_bits <= hi:
        raise _budget_error(avg_bits, lo, hi, cands)


def allocate_bits(errors: dict[str, dict[int, float]], costs: dict[str, dict[int, int]],
                  weights: dict[str, int], avg_bits: float) -> dict[str, int]:
    """Pick one width per layer minimising the summed error with sum cost <= avg_bits * sum weights.

    errors[l][b], costs[l][b] (bits stored), weights[l] (N*K). Raises a one-line error when even the
    cheapest choice everywhere exceeds the budget, or the dearest stays below it (nothing to decide)."""
    names = list(errors)
    total_w = sum(weights[n] for n in names)
    budget = avg_bits * total_w
    lo_cost = sum(min(costs[n].values()) for n in names)
    hi_cost = sum(max(costs[n].values()) for n in names)
    if not (isinstance(avg_bits, (int, float)) and math.isfinite(avg_bits)) or lo_cost > budget or budget > hi_cost:
        raise _budget_error(avg_bits, lo_cost / total_w, hi_cost / total_w, sorted({b for n in names for b in costs[n]}))

    def pick(lam: float) -> dict[str, int]:
        return {n: min(errors[n], key=lambda b: (errors[n][b] + lam * costs[n][b], costs[n][b])) for n in names}

    def cost(choice):
        return sum(costs[n][choice[n]] for n in names)

    # error per bit spans many decades: bisect lam on a log scale
    scale = max(max(e.values()) for e in errors.values()) / max(min(c.values()) for c in costs.values())
    lo, hi = 0.0, max(scale, 1e-30)
    while cost(pick(hi)) > budget:
        hi *= 2
    for _ in range(200):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e12
        if cost(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
        if lo > 0 and hi / lo < 1 + 1e-12:
            break
    choice = pick(hi)
    # greedy fill: spend what is left on the upgrade with the largest error drop per extra bit
    spent = cost(choice)
    while True:
        best, best_ratio = None, 0.0
        for n in names:
            for b in errors[n]:
                extra = costs[n][b] - costs[n][choice[n]]
                gain = errors[n][choice[n]] - errors[n][b]
                if extra > 0 and gain > 0 and spent + extra <= budget and gain / extra > best_ratio:
                    best, best_ratio = (n, b), gain / extra
        if best is None:
            break
        spent += costs[best[0]][best[1]] - costs[best[0]][choice[best[0]]]
        choice[best[0]] = best[1]
    return choice


def plan_bits(model: nn.Module, names: list[str], scheme: QuantScheme, avg_bits: float, sensitivity: dict,
              g_idx: bool = False) -> tuple[QuantScheme, dict[str, dict], dict]:
    """Allocate widths for `names` from a sensitivity table -> (base scheme with the most common width,
    layer_schemes for the layers that differ, report {avg_bits, bits_per_weight, histogram, layers})."""
    from .nn import linear_weight

    missing = [n for n in names if n not in sensitivity]
    if missing:
        raise LlmsqueezeError(f"the sensitivity table has no entry for {missing[0]}: measure it on this model")
    shapes = {n: tuple(linear_weight(model.get_submodule(n)).shape) for n in names}
    errors = {n: {int(b): float(e) for b, e in sensitivity[n].items()} for n in names}
    costs = {n: {b: layer_bits_cost(*shapes[n], b, scheme, g_idx) for b in errors[n]} for n in names}
    weights = {n: shapes[n][0] * shapes[n][1] for n in names}
    choice = allocate_bits(errors, costs, weights, avg_bits)
    hist = Counter(choice.values())
    base_bits = max(hist, key=lambda b: (hist[b], b))
    base = dataclasses.replace(scheme, bits=base_bits)
    layer_schemes = {n: {"bits": b} for n, b in choice.items() if b != base_bits}
    achieved = sum(costs[n][choice[n]] for n in names) / sum(weights.values())
    report = {
        "avg_bits": avg_bits,
        "bits_per_weight": achieved,
        "histogram": {str(b): hist[b] for b in sorted(hist)},
        "layers": [{"name": n, "shape": list(shapes[n]), "bits": choice[n],
                    "error": {str(b): errors[n][b] for b in sorted(errors[n])},
                    "bits_per_weight": {str(b): costs[n][b] / weights[n] for b in sorted(costs[n])}} for n in names],
    }
    log.info("mixed precision: %.4f bits/weight (target %s), widths %s", achieved, avg_bits, report["histogram"])
    return base, layer_schemes, report
