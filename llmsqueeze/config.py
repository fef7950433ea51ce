"""Schemes: what to quantize and how. Small validated dataclasses that round-trip through JSON."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import NamedTuple

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GRIDS = ("uniform", "nf", "kmeans")  # quant/grid.py (uniform), quant/lut.py (nf, kmeans)
LUT_BITS = (2, 3, 4)  # non-uniform grids: indices into 2**bits levels
# W8A8 (quant/w8a8.py)
ACT_MODES = ("dynamic", "static")
STATIC_CLIPS = ("mse", "max")  # static activation scale: searched for the least layer-output error, or max|x|
SMOOTH_PAIRS = ("norm", "all")  # smoothing folded into the norms only, or also v -> o and up -> down
WEIGHTS = "int8 per-channel sym"
# floating-point formats (quant/fp.py): weights (and activations where the format says so)
FLOAT_FORMATS = ("fp8", "fp8-block", "fp8-weight", "nvfp4", "nvfp4-a16", "mxfp4")
FLOAT_ACT = {"fp8": "fp8 per token (dynamic) or one calibrated scale (static)", "fp8-block": "fp8 in 1x128 groups per token",
             "fp8-weight": None, "nvfp4": "fp4 in groups of 16 per token under a calibrated global scale",
             "nvfp4-a16": None, "mxfp4": None}
LAYER_FIELDS = ("bits",)  # what a mixed-precision layer override may change


class LlmsqueezeError(ValueError):
    """Bad input from the user: the message says what was given, what is allowed and what to do.

    The CLI prints it as one line and exits with code 2."""


class CheckpointError(LlmsqueezeError):
    """A checkpoint that is missing, corrupt, truncated or made by another tool."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _from_dict(cls, d: dict, what: str):
    """A scheme dataclass from its JSON dict; unknown fields are one line naming the allowed ones."""
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise LlmsqueezeError(f"unknown {what} fields {sorted(unknown)}: allowed are {sorted(known)}")
    return cls(**d)


def check_patterns(include: list[str], exclude: list[str]) -> None:
    """One line for a module pattern that is not a valid regular expression."""
    for pattern in [*include, *exclude]:
        try:
            re.compile(pattern)
        except re.error as e:
            raise LlmsqueezeError(f"module pattern {pattern!r} is not a valid regular expression ({e})") from None


def check_smoothing(scheme) -> None:
    """SmoothQuant's fields of a W8A8Scheme or FloatScheme (smooth_alpha, smooth_grid, smooth_refine,
    smooth_pairs), each refusal one line."""
    a = scheme.smooth_alpha
    if not (a is None or a == "auto" or (isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1)):
        raise LlmsqueezeError(f"smooth_alpha={a!r} is not valid: use a number in [0, 1], 'auto' or None (no smoothing)")
    if not scheme.smooth_grid or not all(isinstance(g, (int, float)) and 0 <= g <= 1 for g in scheme.smooth_grid):
        raise LlmsqueezeError(f"smooth_grid={scheme.smooth_grid!r} must be a non-empty list of numbers in [0, 1]")
    if not all(isinstance(g, (int, float)) and 0 < g < 1 for g in scheme.smooth_refine):
        raise LlmsqueezeError(f"smooth_refine={scheme.smooth_refine!r} must be a list of steps in (0, 1), e.g. [0.1, 0.05]")
    if scheme.smooth_pairs not in SMOOTH_PAIRS:
        raise LlmsqueezeError(f"smooth_pairs={scheme.smooth_pairs!r} is not valid: use one of {', '.join(SMOOTH_PAIRS)}")


@dataclass
class QuantScheme:
    """Block-wise weight quantization: `bits` per weight, one scale (and zero) per `group_size` inputs.

    group_size -1 means one group per output channel; a size that does not divide the input width
    leaves a shorter last group. `sym` uses a zero point fixed at mid-grid (2**(bits-1)); asymmetric
    stores a true integer zero point per group. `clip_search` grid-searches a shrink of the min/max
    range per group that minimises the quantization error sum |w|^clip_weight_power * |w - q(w)|^clip_norm
    (1.0: each weight's error weighed by its magnitude; 0.0: plain L^p error); under GPTQ each input
    column's error is also weighed by its Hessian diagonal (mean x_k^2). None (the default) means
    "auto", resolved per method by `llmsqueeze.methods.resolve_scheme`: on for GPTQ (3-bit g64 on SmolLM2: 23.77 perplexity vs 28.63
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
        check_patterns(self.include, self.exclude)

    def with_clip_default(self, on: bool) -> "QuantScheme":
        """This scheme with clip_search "auto" (None) resolved: `on` (the method's default, from
        llmsqueeze.methods: on for gptq, awq and awq-gptq, off for rtn and autoround), and always off
        on a non-uniform grid. An explicit True/False is kept."""
        if self.clip_search is not None:
            return self
        return QuantScheme.from_dict({**self.to_dict(), "clip_search": bool(on) and self.grid == "uniform"})

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
        return _from_dict(cls, d, "scheme")

    @classmethod
    def from_json(cls, s: str) -> "QuantScheme":
        return cls.from_dict(json.loads(s))


@dataclass
class W8A8Scheme:
    """Integer-only inference: every selected Linear gets int8 per-channel symmetric weights and
    int8 activations, `act` "dynamic" (one scale per token, computed at run time) or "static" (one
    scale per layer, calibrated and saved: `static_clip` "mse" searches a fraction of max|x| for the
    least layer-output error on sampled calibration tokens, "max" takes max|x|). `smooth_alpha` (a
    float in [0, 1], "auto" to search a grid per block on calibration data, or None for none)
    migrates activation outliers into the weights (SmoothQuant) before quantizing (auto: the best of
    `smooth_grid`, refined by best +- each step of `smooth_refine`); `smooth_pairs` "norm" folds the
    smoothing into the norms before q/k/v and gate/up, "all" also smooths v -> o and up -> down. include/exclude/lm_head
    pick layers as in QuantScheme (the head stays dense by default)."""

    act: str = "dynamic"
    static_clip: str = "mse"
    smooth_alpha: float | str | None = "auto"
    smooth_grid: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    smooth_refine: list[float] = field(default_factory=lambda: [0.1, 0.05])
    smooth_pairs: str = "all"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    lm_head: bool = False
    type: str = "w8a8"
    weights: str = WEIGHTS

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.type != "w8a8":
            raise LlmsqueezeError(f"scheme type {self.type!r} is not 'w8a8'")
        if self.weights != WEIGHTS:
            raise LlmsqueezeError(f"weights={self.weights!r}: only {WEIGHTS!r} is supported")
        if self.act not in ACT_MODES:
            raise LlmsqueezeError(f"act={self.act!r} is not valid: use dynamic (per token) or static (calibrated)")
        if self.static_clip not in STATIC_CLIPS:
            raise LlmsqueezeError(f"static_clip={self.static_clip!r} is not valid: use mse (searched) or max (max|x|)")
        check_smoothing(self)
        check_patterns(self.include, self.exclude)

    @property
    def needs_data(self) -> bool:
        return self.smooth_alpha is not None or self.act == "static"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "W8A8Scheme":
        return _from_dict(cls, d, "w8a8 scheme")


@dataclass
class FloatScheme:
    """Floating-point quantization (quant/fp.py): `format` one of
      fp8         E4M3 weights, one fp32 scale per output channel; E4M3 activations per token at run
                  time (`act` "dynamic") or one calibrated scale per layer ("static": `static_clip`
                  "max" takes max|x|, "mse" searches a fraction of it for the least layer-output error)
      fp8-block   E4M3 weights in 128x128 blocks, activations in 1x128 groups per token (DeepSeek-V3)
      fp8-weight  E4M3 weights as fp8, 16-bit activations
      nvfp4       E2M1 weights in groups of 16 with E4M3 group scales under an fp32 global scale, and
                  activations the same way per token, their global scale calibrated (W4A4)
      nvfp4-a16   NVFP4 weights, 16-bit activations
      mxfp4       E2M1 weights in groups of 32 with E8M0 (power-of-two) scales, 16-bit activations
    `smooth_alpha` etc. balance activation outliers into the weights as in W8A8Scheme, for formats
    that quantize activations: by default "auto" there (on SmolLM2 fp8 per token loses 2.7 % of
    perplexity without it, as int8 W8A8 does), None (off) for weight-only formats; None makes fp8
    dynamic data-free. `scale_search` (None: auto, on for calibrated
    methods) searches each weight group's scale as a fraction of its max|w| for the least
    (Hessian-weighted under GPTQ) error; the searched scale is still one the format stores.
    include/exclude/lm_head pick layers as in QuantScheme."""

    format: str = "fp8"
    act: str = "dynamic"
    static_clip: str = "max"
    smooth_alpha: float | str | None = "default"  # "auto" where activations are quantized, else None
    smooth_grid: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    smooth_refine: list[float] = field(default_factory=lambda: [0.1, 0.05])
    smooth_pairs: str = "all"
    scale_search: bool | None = None
    scale_grid: int = 20
    scale_max_shrink: float = 0.3
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    lm_head: bool = False
    type: str = "float"

    def __post_init__(self) -> None:
        if self.smooth_alpha == "default":
            self.smooth_alpha = "auto" if self.quantizes_activations else None
        self.validate()

    def validate(self) -> None:
        if self.type != "float":
            raise LlmsqueezeError(f"scheme type {self.type!r} is not 'float'")
        if self.format not in FLOAT_FORMATS:
            raise LlmsqueezeError(f"format={self.format!r} is not known: use one of {', '.join(FLOAT_FORMATS)}")
        if self.act not in ACT_MODES:
            raise LlmsqueezeError(f"act={self.act!r} is not valid: use dynamic (per token) or static (calibrated)")
        if self.act == "static" and self.format != "fp8":
            raise LlmsqueezeError(f"act=static (one calibrated scale per layer) applies to format fp8, not {self.format}: "
                                  "drop --act static")
        if self.static_clip not in STATIC_CLIPS:
            raise LlmsqueezeError(f"static_clip={self.static_clip!r} is not valid: use mse (searched) or max (max|x|)")
        check_smoothing(self)
        if self.smooth_alpha is not None and not self.quantizes_activations:
            raise LlmsqueezeError(f"smooth_alpha balances quantized activations; format {self.format} keeps them in "
                                  "16 bits: drop --smooth-alpha")
        if self.scale_search not in (None, True, False):
            raise LlmsqueezeError(f"scale_search={self.scale_search!r} must be true, false or null (auto)")
        if not (isinstance(self.scale_grid, int) and self.scale_grid >= 1):
            raise LlmsqueezeError(f"scale_grid={self.scale_grid!r} must be a positive integer, e.g. 20")
        if not (0.0 <= self.scale_max_shrink < 1.0):
            raise LlmsqueezeError(f"scale_max_shrink={self.scale_max_shrink!r} must lie in [0, 1), e.g. 0.3")
        check_patterns(self.include, self.exclude)

    @property
    def quantizes_activations(self) -> bool:
        return FLOAT_ACT.get(self.format) is not None  # (an unknown format is refused by validate)

    @property
    def needs_data(self) -> bool:
        """Smoothing, fp8 static scales and nvfp4's activation global scale come from calibration data."""
        return self.smooth_alpha is not None or self.act == "static" or self.format == "nvfp4"

    @property
    def calibrated_input(self) -> bool:
        """Whether a per-layer activation scale is calibrated (fp8 static, nvfp4's global scale)."""
        return self.act == "static" or self.format == "nvfp4"

    def with_search_default(self, on: bool) -> "FloatScheme":
        """This scheme with scale_search "auto" (None) resolved to `on` (an explicit value is kept)."""
        return self if self.scale_search is not None else replace(self, scale_search=bool(on))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FloatScheme":
        return _from_dict(cls, d, "float scheme")


# GGUF (quant/ggml.py): llama.cpp's file types (llama-quantize's TYPE) and the GGML block types
GGUF_MIXES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
              "q5_k_s", "q5_k_m", "q6_k", "iq4_nl")
GGUF_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl")


@dataclass
class GGUFScheme:
    """Weights quantized into GGML's block formats, the tensor types of GGUF files (quant/ggml.py):
    `mix` a llama.cpp file type (q4_k_m, q3_k_m, q4_0, ...: each tensor gets the type llama-quantize
    gives it, by its role, its block and its width, with llama.cpp's fallbacks for widths a type's
    block does not divide), or with `pure` the mix's one type for every tensor (llama-quantize --pure),
    or `mix` a GGML type (q4_k, ...) alone, which means pure. GPTQ, AWQ, learned rounding or RTN chooses the codes inside
    each format's own block structure (the sub-block scales and mins on their 4/6/8-bit grids), so an
    export writes exactly what was optimized. `layer_types` ({Linear name: GGML type}) is filled when
    the model is known (llmsqueeze.pipeline) and saved with the checkpoint. include/exclude/lm_head
    pick layers as in QuantScheme; the embeddings (and a tied head) take the mix's type on export."""

    mix: str = "q4_k_m"
    pure: bool = False
    imatrix_rules: bool = False  # the mix as llama-quantize builds it with an importance matrix
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    lm_head: bool = False
    layer_types: dict[str, str] = field(default_factory=dict)
    type: str = "gguf"

    def __post_init__(self) -> None:
        if isinstance(self.mix, str):
            self.mix = self.mix.lower().removeprefix("gguf:")
            if self.mix not in GGUF_MIXES and self.mix in GGUF_TYPES:
                self.mix, self.pure = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}[self.mix], True
        self.validate()

    def validate(self) -> None:
        if self.type != "gguf":
            raise LlmsqueezeError(f"scheme type {self.type!r} is not 'gguf'")
        if self.mix not in GGUF_MIXES:
            raise LlmsqueezeError(f"gguf type {self.mix!r} is not known: use a llama.cpp file type "
                                  f"({', '.join(GGUF_MIXES)}) or a GGML type ({', '.join(GGUF_TYPES)})")
        if not isinstance(self.layer_types, dict) or not all(v in GGUF_TYPES for v in self.layer_types.values()):
            bad = next((v for v in dict(self.layer_types or {}).values() if v not in GGUF_TYPES), self.layer_types)
            raise LlmsqueezeError(f"layer_types holds {bad!r}, not a GGML type ({', '.join(GGUF_TYPES)})")
        check_patterns(self.include, self.exclude)

    def with_layer_types(self, types: dict[str, str]) -> "GGUFScheme":
        return replace(self, layer_types=dict(types))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GGUFScheme":
        return _from_dict(cls, d, "gguf scheme")


SCHEME_TYPES = {"w8a8": W8A8Scheme, "float": FloatScheme, "gguf": GGUFScheme}  # "type" in a scheme dict -> its class


def scheme_from_dict(d: dict):
    """A QuantScheme (weight-only), W8A8Scheme or FloatScheme, by the dict's "type" (absent: weight-only)."""
    if not isinstance(d, dict):
        raise LlmsqueezeError(f"scheme must be a JSON object, got {type(d).__name__}")
    cls = SCHEME_TYPES.get(d.get("type", "weight-only"))
    if cls is not None:
        return cls.from_dict(d)
    if "type" in d:
        raise LlmsqueezeError(f"scheme type {d['type']!r} is not known: this llmsqueeze reads weight-only, "
                              f"{' and '.join(SCHEME_TYPES)}")
    return QuantScheme.from_dict(d)


# ------------------------------------------------------------------------- mixed precision
def check_layer_schemes(layer_schemes) -> dict[str, dict]:
    """Validate a `layer_schemes` mapping (None -> {}): {name: {"bits": b}} with b a supported width."""
    if layer_schemes is None:
        return {}
    if not isinstance(layer_schemes, dict):
        raise LlmsqueezeError(f"layer_schemes must map module names to overrides, got {type(layer_schemes).__name__}")
    for name, over in layer_schemes.items():
        if not isinstance(over, dict) or not over or set(over) - set(LAYER_FIELDS):
            raise LlmsqueezeError(f"layer_schemes[{name!r}] = {over!r}: an override holds only {', '.join(LAYER_FIELDS)}")
        b = over["bits"]
        if isinstance(b, bool) or b not in SUPPORTED_BITS:
            raise LlmsqueezeError(f"layer_schemes[{name!r}] bits={b!r}: use one of {', '.join(map(str, SUPPORTED_BITS))}")
    return layer_schemes


def scheme_for(scheme: QuantScheme, layer_schemes: dict | None, name: str) -> QuantScheme:
    """The scheme of layer `name`: the base scheme with its override (if any) applied."""
    over = (layer_schemes or {}).get(name)
    if not over:
        return scheme
    return replace(scheme, **over)


# ------------------------------------------------------------------------------- sparsity
SPARSITY_SCOPES = ("row", "layer", "global")


class NMPattern(NamedTuple):
    """N:M sparsity: keep `n` of every `m` consecutive inputs (NVIDIA's 2:4 is NMPattern(2, 4)).
    Parsed once where it enters (`parse`), carried as this value, written as "n:m" (`str`)."""

    n: int
    m: int

    @classmethod
    def parse(cls, pattern: "str | tuple[int, int] | NMPattern | None") -> "NMPattern | None":
        """'2:4' or (2, 4) -> NMPattern(2, 4), checked (1 <= N < M); None stays None."""
        if pattern is None:
            return None
        if isinstance(pattern, str):
            try:
                n, m = (int(p) for p in pattern.split(":"))
            except ValueError:
                raise LlmsqueezeError(f"pattern {pattern!r} is not N:M: write e.g. 2:4 (keep 2 of every 4 inputs)") from None
        else:
            n, m = pattern
        if not (1 <= n < m):
            raise LlmsqueezeError(f"pattern {n}:{m}: need 1 <= N < M (keep N of every M inputs), e.g. 2:4 or 4:8")
        return cls(int(n), int(m))

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (0.0 <= sparsity < 1.0):
        raise LlmsqueezeError(f"sparsity={sparsity!r} must lie in [0, 1), e.g. 0.5 (half the weights set to zero)")
    return float(sparsity)


@dataclass
class SparsityScheme:
    """What pruning makes: `sparsity` in [0, 1) unstructured, or an N:M `pattern` (which fixes the
    sparsity at 1 - N/M); `scope` is the group an unstructured mask is chosen in ("row", "layer",
    "global"; None: the method's default). Validated once; `pattern` is an NMPattern from then on."""

    sparsity: float | None = None
    pattern: NMPattern | None = None
    scope: str | None = None

    def __post_init__(self) -> None:
        self.pattern = NMPattern.parse(self.pattern)
        if self.pattern is not None:
            if self.sparsity is not None and abs(self.sparsity - self.pattern.sparsity) > 1e-9:
                raise LlmsqueezeError(f"pattern {self.pattern} fixes the sparsity at {self.pattern.sparsity:g}; "
                                      f"drop sparsity={self.sparsity}")
            self.sparsity = self.pattern.sparsity
        elif self.sparsity is None:
            raise LlmsqueezeError("give a sparsity (e.g. 0.5) or an N:M pattern (e.g. '2:4')")
        else:
            self.sparsity = check_sparsity(self.sparsity)
        if self.scope is not None and self.scope not in SPARSITY_SCOPES:
            raise LlmsqueezeError(f"scope {self.scope!r} is not known: use one of {', '.join(SPARSITY_SCOPES)}")


# ------------------------------------------------------------------------------- options

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16", "model")


@dataclass
class CalibrationOptions:
    """How a calibrated method runs, the same for every method (the engine's and GPTQ's options):
    `device` where each block computes (default: CUDA when present, else CPU), `offload` where block
    activations wait between blocks, `true_sequential` calibrates a block's Linears in the
    architecture's order, GPTQ's `act_order` / `static_groups` / `damp` (a fraction of the mean
    Hessian diagonal) / `block_size`, and `batch_size` calibration samples per forward.
    `compute_dtype`: what each block computes in while it is calibrated ("auto": on a CPU the
    model's dtype raised to float32 where half precision is not native, kernels.cpu.auto_dtype; on
    a GPU the model's dtype; "model": the model's dtype everywhere); the block is stored back in the
    model's dtype, so the checkpoint's dense tensors keep theirs."""

    device: str | None = None
    offload: str | None = None
    true_sequential: bool = False
    act_order: bool = True
    static_groups: bool = True
    damp: float = 0.01
    block_size: int = 128
    batch_size: int = 1
    compute_dtype: str = "auto"  # what blocks compute in on a CPU: auto (kernels.cpu.auto_dtype), float32, bfloat16, model
    expert_min_tokens: int = 32  # MoE: an expert routed fewer calibration tokens in a block sees all of them (engine)
    experts_per_pass: int | None = None  # MoE: experts calibrated per pass over a block (None: all at once)

    def validate(self) -> None:
        """One-line errors for values no method can use (checked when calibration data is used)."""
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise LlmsqueezeError(f"compute_dtype={self.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        if not (0 < self.damp < 1):
            raise LlmsqueezeError(f"damp={self.damp} must lie in (0, 1), e.g. 0.01 (1% of the mean Hessian diagonal)")
        if not isinstance(self.expert_min_tokens, int) or self.expert_min_tokens < 1:
            raise LlmsqueezeError(f"expert_min_tokens={self.expert_min_tokens!r} must be a positive number of tokens "
                                  "(experts routed fewer calibration tokens are calibrated on all of them)")
        if self.experts_per_pass is not None and (not isinstance(self.experts_per_pass, int) or self.experts_per_pass < 1):
            raise LlmsqueezeError(f"experts_per_pass={self.experts_per_pass!r} must be a positive number of experts, "
                                  "or None (all of a block's experts in one pass)")
        if self.block_size < 1 or self.batch_size < 1:
            raise LlmsqueezeError(f"block_size={self.block_size} and batch_size={self.batch_size} must be positive")
