"""Every quantization and pruning method as a row of one table: its name -> what runs it and what it
supports. The orchestrator (pipeline.py), the API and the CLI read this table; nothing else
dispatches on a method's name.

A row points at an algorithm's entry point:
  build(job) -> an engine method (collect / apply, optional prepare_block / record), run block by
               block by the engine; `inner` builds a second engine method that `build` wraps (AWQ
               then GPTQ, W8A8 with GPTQ's rounding);
  run(job)   -> None, for a method that needs the whole model at once (magnitude with a global
               scope, gradient saliency).
Each entry point fills job.method_args with what the checkpoint records. Adding a method is one
algorithm module with a `build` (or `run`) and one row here.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from .config import LlmsqueezeError
from .pruning import magnitude, saliency, sparsegpt, wanda
from .quant import autoround, awq, gptq, rtn, w8a8


@dataclass(frozen=True)
class MethodRow:
    """name: what users type (--method); kind: "quantize" or "prune"; calibrated: needs data (a W8A8
    scheme with SmoothQuant or static activations needs it too); lazy: can run block by block from
    the checkpoint on disk (llmsqueeze.lazy), not only on a model in memory; grids: the weight grids
    it rounds to; mixed: takes per-layer widths (avg_bits); act_order: GPTQ's column order applies
    (and with dynamic order the checkpoint stores g_idx); sample_batches: the engine hands it one
    calibration sample per batch; recorded_as: the method name the checkpoint records."""

    name: str
    kind: str
    build: Callable | None = None
    inner: Callable | None = None
    run: Callable | None = None
    build_w8a8: Callable | None = None  # the entry point with a W8A8Scheme or a FloatScheme (None: weight-only only)
    inner_w8a8: Callable | None = None
    inner_float: Callable | None = None  # with a FloatScheme, when the method rounds the weights itself
    build_gguf: Callable | None = None  # the entry point with a GGUFScheme (None: not available)
    inner_gguf: Callable | None = None
    calibrated: bool = True
    lazy: bool = False
    grids: tuple[str, ...] = ("uniform",)
    mixed: bool = False
    act_order: bool = False
    sample_batches: bool = False
    recorded_as: str | None = None
    # pruning
    scopes: tuple[str, ...] = ()
    default_scope: str | None = None
    owl: bool = False  # outlier-weighted per-layer sparsity applies
    refit_default: bool | str | None = None  # None: the method does not refit
    clip_search: bool = False  # the clip search of the scheme's "auto" (None): awq's output-error one,
    # GPTQ's Hessian-weighted one (rtn: it lost at 4-bit g64 asym; autoround starts from it only with init="clip")
    help: str = ""  # what --help says in brackets after the name (rows with the same text are grouped)

    @property
    def record_name(self) -> str:
        return self.recorded_as or self.name


QUANTIZE = {row.name: row for row in (
    MethodRow("rtn", "quantize", build=rtn.build, build_w8a8=w8a8.build, build_gguf=rtn.build, calibrated=False, lazy=True,
              grids=("uniform", "nf", "kmeans"), mixed=True, help="default, no data"),
    MethodRow("gptq", "quantize", build=gptq.build, build_w8a8=w8a8.build, inner_w8a8=gptq.build_int8,
              inner_float=gptq.build_float, build_gguf=gptq.build_gguf, lazy=True,
              grids=("uniform", "nf", "kmeans"), mixed=True, act_order=True, clip_search=True),
    MethodRow("awq", "quantize", build=awq.build, build_gguf=awq.build, clip_search=True, help="AWQ then RTN"),
    MethodRow("awq-gptq", "quantize", build=awq.build, inner=gptq.build, build_gguf=awq.build,
              inner_gguf=gptq.build_gguf, act_order=True, clip_search=True,
              recorded_as="awq", help="AWQ then GPTQ"),
    MethodRow("autoround", "quantize", build=autoround.build, build_gguf=autoround.build, sample_batches=True,
              help="learned rounding"),
)}

PRUNE = {row.name: row for row in (
    MethodRow("magnitude", "prune", run=magnitude.run, calibrated=False, scopes=("row", "layer", "global"),
              default_scope="layer", help="no data"),
    MethodRow("wanda", "prune", build=wanda.build, scopes=("row", "layer"), default_scope="row", owl=True,
              refit_default=False, help="default"),
    MethodRow("sparsegpt", "prune", build=sparsegpt.build, scopes=("row", "layer"), default_scope="row", owl=True,
              refit_default="auto"),
    MethodRow("snip", "prune", run=partial(magnitude.run, scores=partial(saliency.layer_scores, criterion="snip")),
              scopes=("row", "layer", "global"), default_scope="row", help="gradient saliency"),
    MethodRow("random", "prune", run=partial(magnitude.run, scores=saliency.random_layer_scores), calibrated=False,
              scopes=("row", "layer", "global"), default_scope="layer", help="the baseline"),
    MethodRow("taylor", "prune", run=partial(magnitude.run, scores=partial(saliency.layer_scores, criterion="taylor")),
              scopes=("row", "layer", "global"), default_scope="row", help="gradient saliency"),
)}

METHODS = tuple(QUANTIZE)  # the quantization methods, in the order --help lists them
LAZY_METHODS = tuple(n for n, r in QUANTIZE.items() if r.lazy)
PRUNE_METHODS = tuple(PRUNE)
GRID_METHODS = tuple(n for n, r in QUANTIZE.items() if len(r.grids) > 1)
MIXED_METHODS = tuple(n for n, r in QUANTIZE.items() if r.mixed)
W8A8_METHODS = tuple(n for n, r in QUANTIZE.items() if r.build_w8a8 is not None)
GGUF_METHODS = tuple(n for n, r in QUANTIZE.items() if r.build_gguf is not None)


def describe(table: dict[str, MethodRow], oxford: bool = False) -> str:
    """The methods of a table for --help: 'a (its help), b or c / d (their help)'."""
    groups: list[tuple[list[str], str]] = []
    for row in table.values():
        if groups and row.help and groups[-1][1] == row.help:
            groups[-1][0].append(row.name)
        else:
            groups.append(([row.name], row.help))
    parts = [" / ".join(names) + (f" ({text})" if text else "") for names, text in groups]
    text = ", ".join(parts[:-1]) + ("," if oxford and len(parts) > 2 else "") + " or " + parts[-1]
    if table is QUANTIZE:
        free = [r.name for r in table.values() if not r.calibrated]
        text += f"; all but {' and '.join(free)} are calibrated"
    return text


def quantize_method(name: str) -> MethodRow:
    row = QUANTIZE.get(name)
    if row is None:
        raise LlmsqueezeError(f"method {name!r} is not available: use one of {', '.join(METHODS)}")
    return row


def prune_method(name: str) -> MethodRow:
    row = PRUNE.get(name)
    if row is None:
        raise LlmsqueezeError(f"pruning method {name!r} is not available: use one of {', '.join(PRUNE_METHODS)}")
    return row


def resolve_scheme(scheme, method: str):
    """`scheme` with its "auto" clip search (a FloatScheme: its weight scale search) resolved for
    `method`: on for calibrated methods; a W8A8Scheme is returned as is."""
    row = quantize_method(method)
    if hasattr(scheme, "with_search_default"):
        return scheme.with_search_default(row.calibrated)
    return scheme.with_clip_default(row.clip_search) if hasattr(scheme, "with_clip_default") else scheme


def check_quantize_options(row: MethodRow, grid: str = "uniform", avg_bits: float | None = None,
                           w8a8: bool | str = False) -> None:
    """One-line errors for a method, a grid, mixed precision and W8A8 (or a float format: w8a8 is then
    its name) that do not work together."""
    if w8a8 == "gguf":
        if avg_bits is not None:
            raise LlmsqueezeError("avg_bits mixes integer bit widths; a gguf scheme takes llama.cpp's mix: drop avg_bits")
        if row.build_gguf is None:
            raise LlmsqueezeError(f"method {row.name!r} is not available for gguf: use {' or '.join(GGUF_METHODS)}")
        return
    if w8a8:
        what = w8a8 if isinstance(w8a8, str) else "w8a8"
        if avg_bits is not None:
            raise LlmsqueezeError(f"avg_bits mixes integer weight-only bit widths; it does not apply to {what}")
        if row.build_w8a8 is None:
            raise LlmsqueezeError(f"method {row.name!r} is not available for {what}: use {' or '.join(W8A8_METHODS)}")
        return
    if grid not in row.grids:
        raise LlmsqueezeError(f"method {row.name!r} quantizes on the uniform grid; grid={grid!r} works with "
                              f"{' or '.join(GRID_METHODS)}")
    if avg_bits is not None and grid != "uniform":
        raise LlmsqueezeError(f"avg_bits mixes widths on the uniform grid; grid={grid!r} takes one width: "
                              "drop avg_bits (--avg-bits) or use grid='uniform'")
    if avg_bits is not None and not row.mixed:
        raise LlmsqueezeError(f"avg_bits (mixed precision) works with {' or '.join(MIXED_METHODS)}, not method "
                              f"{row.name!r}: drop avg_bits (--avg-bits) or change the method")
