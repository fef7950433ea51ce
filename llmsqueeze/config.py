"""Schemes: what to quantize and how. Small validated dataclasses that round-trip through JSON."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
METHODS = ("rtn", "gptq", "awq", "awq-gptq", "autoround")  # awq: AWQ balancing then RTN; awq-gptq: then GPTQ;
# autoround: learned rounding (quant/autoround.py)
LAZY_METHODS = ("rtn", "gptq")  # what quantize_lazy runs block by block; the others run in memory
GRIDS = ("uniform", "nf", "kmeans")  # quant/grid.py (uniform), quant/lut.py (nf, kmeans)
LUT_BITS = (2, 3, 4)  # non-uniform grids: indices into 2**bits levels


class LlmsqueezeError(ValueError):
    """Bad input from the user: the message says what was given, what is allowed and what to do.

    The CLI prints it as one line and exits with code 2."""


class CheckpointError(LlmsqueezeError):
    """A checkpoint that is missing, corrupt, truncated or made by another tool."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class QuantScheme:
    """Block-wise weight quantization: `bits` per weight, one scale (and zero) per `group_size` inputs.

    group_size -1 means one group per output channel; a size that does not divide the input width
    leaves a shorter last group. `sym` uses a zero point fixed at mid-grid (2**(bits-1)); asymmetric
    stores a true integer zero point per group. `clip_search` grid-searches a shrink of the min/max
    range per group that minimises the quantization error sum |w|^clip_weight_power * |w - q(w)|^clip_norm
    (1.0: each weight's error weighed by its magnitude; 0.0: plain L^p error); under GPTQ each input
    column's error is also weighed by its Hessian diagonal (mean x_k^2). None (the default) means
    "auto", resolved by `with_method`: on for GPTQ (3-bit g64 on SmolLM2: 23.77 perplexity vs 28.63
    without), off for RTN (where it lost at 4-bit g64 asym).

    Modules: every Linear (and GPT-2 Conv1D) inside the decoder blocks, then `include` keeps only
    names matching one of its regexes and `exclude` drops matches; `lm_head` adds the output head
    (untied from the embeddings if they were tied).

    `grid` chooses the levels: "uniform" (the integer grid above), "nf" (normal-float levels, quantiles
    of N(0, 1) with an exact zero, times a per-group absmax scale) or "kmeans" (2**bits levels per
    group fitted by weighted Lloyd iterations, stored as a codebook); see quant/lut.py. Non-uniform
    grids take 2-4 bits and have no zero point, `sym` or clipping search.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    scale_dtype: str = "float16"
    clip_search: bool | None = None
    clip_grid: int = 100
    clip_max_shrink: float = 0.8
    clip_norm: float = 2.0
    clip_weight_power: float = 1.0
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    lm_head: bool = False
    grid: str = "uniform"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise LlmsqueezeError(f"bits={self.bits!r} is not supported: use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
            self.group_size != -1 and self.group_size <= 0
        ):
            raise LlmsqueezeError(
                f"group_size={self.group_size!r} is not valid: use -1 (one group per output channel) or a positive size such as 128"
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise LlmsqueezeError(f"scale_dtype={self.scale_dtype!r} is not supported: use one of {', '.join(SCALE_DTYPES)}")
        if self.clip_search not in (None, True, False):
            raise LlmsqueezeError(f"clip_search={self.clip_search!r} must be true, false or null (auto)")
        if not (isinstance(self.clip_grid, int) and self.clip_grid >= 1):
            raise LlmsqueezeError(f"clip_grid={self.clip_grid!r} must be a positive integer, e.g. 100")
        if not (0.0 < self.clip_max_shrink <= 1.0):
            raise LlmsqueezeError(f"clip_max_shrink={self.clip_max_shrink!r} must lie in (0, 1], e.g. 0.8")
        if not self.clip_norm > 0:
            raise LlmsqueezeError(f"clip_norm={self.clip_norm!r} must be positive, e.g. 2.0")
        if not self.clip_weight_power >= 0:
            raise LlmsqueezeError(f"clip_weight_power={self.clip_weight_power!r} must be >= 0, e.g. 1.0")
        if self.grid not in GRIDS:
            raise LlmsqueezeError(f"grid={self.grid!r} is not known: use one of {', '.join(GRIDS)}")
        if self.grid != "uniform":
            if self.bits not in LUT_BITS:
                raise LlmsqueezeError(
                    f"grid={self.grid!r} with bits={self.bits}: non-uniform grids take {', '.join(map(str, LUT_BITS))} bits; "
                    "use grid='uniform' for 8 bits"
                )
            if self.sym:
                raise LlmsqueezeError(f"sym=True applies to the uniform grid; grid={self.grid!r} has no zero point: drop sym")
            if self.clip_search:
                raise LlmsqueezeError(f"clip_search applies to the uniform grid; with grid={self.grid!r} drop it")
        for pattern in [*self.include, *self.exclude]:
            try:
                re.compile(pattern)
            except re.error as e:
                raise LlmsqueezeError(f"module pattern {pattern!r} is not a valid regular expression ({e})") from None

    def with_method(self, method: str) -> "QuantScheme":
        """This scheme with clip_search "auto" (None) resolved for `method`: on for gptq, awq and awq-gptq
        (awq: its output-error clip search; gptq, awq-gptq: GPTQ's), off for rtn and autoround (which
        starts from the clip-searched grid only with init="clip"), and always off on a non-uniform grid."""
        if self.clip_search is not None:
            return self
        clip = method in ("gptq", "awq", "awq-gptq") and self.grid == "uniform"  # non-uniform grids: no clip search
        return QuantScheme.from_dict({**self.to_dict(), "clip_search": clip})

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def group_size_for(self, in_features: int) -> int:
        """The effective group size for a layer of `in_features` inputs (-1 -> the whole row)."""
        return in_features if self.group_size == -1 else self.group_size

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["grid"] == "uniform":  # uniform checkpoints stay as they were (readable by older versions)
            del d["grid"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantScheme":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LlmsqueezeError(f"unknown scheme fields {sorted(unknown)}: allowed are {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "QuantScheme":
        return cls.from_dict(json.loads(s))
