"""Int8Linear: the W8A8 layer. Integer weights, activations quantized to int8 on the way in, an
int8 x int8 -> int32 GEMM, one float rescale on the way out.

Backends, chosen per call (LLMSQUEEZE_INT8_BACKEND, or set `BACKEND` in this module):
  * "triton" on CUDA (auto: when Triton is installed and the input is a CUDA fp16/bf16/fp32 tensor):
    the kernels of llmsqueeze.kernels.int8_matmul, a one-pass per-token quantization kernel and an int8
    GEMM whose epilogue applies both scales (and the bias) and writes the output dtype directly;
  * "compile" on the CPU (auto: inputs of at least FUSE_MIN_ELEMENTS, i.e. prefill, not decode):
    quant.int8's quantization and rescale compiled by Inductor, each into one C++ loop instead of
    torch's three or four memory-bound passes, around torch._int_mm; that is what lets W8A8 beat bf16
    on the CPU (README, "W8A8": eval/w8a8.py --gemm). Compiled once per process and dtype;
    where compiling fails (no C++ compiler) it logs one warning and stays on "torch";
  * "torch" everywhere else: quant.int8's functions, torch._int_mm and a separate float rescale.
Under torch.compile (a whole model, fullgraph or not) the layer traces as plain "torch" ops with no
input cache, so Inductor fuses the quantization and the rescale itself, on any device.
All three compute the same numbers bit for bit (llmsqueeze/kernels/int8_matmul.py; tests/test_int8_kernels.py,
tests/test_w8a8.py); "triton" on CPU tensors runs only under TRITON_INTERPRET=1 (the tests).

Buffers (the names and layout of compressed-tensors' int-quantized format, so export renames nothing):
weight int8 [N, K]; weight_scale float32 [N]; input_scale float32 [1] (static activations only);
bias [N].
"""
from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

from . import kernels  # light: Triton itself is imported on the first kernel call
from .quant.int8 import (
    int8_mm,
    quantize_per_token,
    quantize_static,
    quantize_weight_per_channel,
    rescale,
    w8a8_linear,
)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "compile", "torch")
BACKEND = os.environ.get("LLMSQUEEZE_INT8_BACKEND", "auto")
if BACKEND not in BACKENDS:
    raise ValueError(f"LLMSQUEEZE_INT8_BACKEND={BACKEND!r} is not one of {', '.join(BACKENDS)}: unset it or pick one")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# below this many input elements (decode: one token; the tests' tiny models) torch's passes cost no
# more than a compiled call, and nothing gets compiled
FUSE_MIN_ELEMENTS = 1 << 16

_compile_failed = False  # set once compiling failed: every later call stays eager

_last_input: tuple | None = None  # (x, x._version, xq, scale): the last input quantized per token


def use_triton(x: torch.Tensor) -> bool:
    """Whether Int8Linear runs this input on the Triton kernels (see the module docstring)."""
    if BACKEND == "torch" or not kernels.available() or x.dtype not in TRITON_DTYPES or x.numel() == 0:
        return False
    return BACKEND == "triton" or x.is_cuda


def use_compiled(x: torch.Tensor) -> bool:
    """Whether Int8Linear runs this CPU input's quantization and rescale as compiled loops."""
    if x.is_cuda or _compile_failed or BACKEND in ("torch", "triton"):
        return False
    return BACKEND == "compile" or x.numel() >= FUSE_MIN_ELEMENTS


@functools.cache
def fused(fn):
    """fn (one of quant.int8's pure functions) compiled by Inductor, called like fn; the eager fn once
    compiling failed. dynamic=True: one graph for any number of tokens."""
    compiled = torch.compile(fn, dynamic=True)

    def call(*args):
        global _compile_failed
        if not _compile_failed:
            try:
                return compiled(*args)
            except Exception as e:  # no C++ compiler, an unsupported platform: the eager passes still work
                _compile_failed = True
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                log.warning("W8A8: compiling the int8 quantization failed (%s: %s); using torch's eager ops "
                            "(LLMSQUEEZE_INT8_BACKEND=torch skips the attempt)", type(e).__name__, first)
        return fn(*args)

    return call


def forget_quantized_input() -> None:
    """Drop the cached quantized input, so the next Int8Linear call quantizes its input again even when it
    is the same tensor (benchmarks timing the quantization, tests switching backends)."""
    global _last_input
    _last_input = None


def quantize_input(x2: torch.Tensor, triton: bool = False, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_token (the Triton kernel where `triton`), reused when the next Int8Linear reads the
    very same tensor (q/k/v read one norm output, gate/up another): a reference to x is held so its
    identity cannot pass to another tensor, and its _version changes with any in-place write. Both
    quantizers give the same bits, so the cache does not care which one filled it."""
    global _last_input
    last = _last_input
    if last is not None and last[0] is x2 and last[1] == x2._version:
        return last[2], last[3]
    if triton:
        xq, scale = kernels.int8_quantize_per_token(x2)
    else:
        xq, scale = (fused(quantize_per_token) if compiled else quantize_per_token)(x2)
    _last_input = (x2, x2._version, xq, scale)
    return xq, scale


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, static: bool = False,
                 bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if static:
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_quantized(cls, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                       input_scale: torch.Tensor | float | None = None) -> "Int8Linear":
        """wq [N, K] integers in [-128, 127], w_scale [N]; input_scale: the static activation scale."""
        n, k = wq.shape
        layer = cls(k, n, bias=bias is not None, static=input_scale is not None,
                    bias_dtype=bias.dtype if bias is not None else torch.float32, device=wq.device)
        layer.weight.copy_(wq.to(torch.int8))
        layer.weight_scale.copy_(w_scale.reshape(n).float())
        if input_scale is not None:
            layer.input_scale.fill_(float(input_scale))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None,
                   input_scale: torch.Tensor | float | None = None) -> "Int8Linear":
        """Round-to-nearest from a float weight [N, K]."""
        wq, scale = quantize_weight_per_channel(w)
        return cls.from_quantized(wq, scale, bias, input_scale)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] = weight * weight_scale."""
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes quant.int8.w8a8_linear with this layer's buffers (on either backend)."""
        if torch.compiler.is_compiling():  # traced: plain ops for Inductor to fuse (no tensor identity to cache on)
            return w8a8_linear(x, self.weight, self.weight_scale, self.bias, self.input_scale)
        shape = x.shape[:-1]
        triton = use_triton(x)
        compiled = not triton and use_compiled(x)
        if self.input_scale is None:
            # the cache keys on the tensor itself, so key on x (a reshape makes a new view each call)
            xq, xs = quantize_input(x, triton, compiled)
            xq = xq.reshape(-1, self.in_features)
            xs = xs.reshape(-1)
        elif triton:
            xq, xs = kernels.int8_quantize_static(x.reshape(-1, self.in_features), self.input_scale), self.input_scale
        else:
            quant = fused(quantize_static) if compiled else quantize_static
            xq, xs = quant(x.reshape(-1, self.in_features), self.input_scale), self.input_scale
        if triton:  # one kernel: the int32 product is rescaled in registers and written in x.dtype
            y = kernels.int8_scaled_mm(xq, self.weight, xs, self.weight_scale, self.bias, x.dtype)
        else:
            y = (fused(rescale) if compiled else rescale)(int8_mm(xq, self.weight), xs, self.weight_scale, self.bias,
                                                           x.dtype)
        return y.reshape(*shape, self.out_features)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not re-round the scales: they stay the float32 values saved (the
        # originals follow the device; converting the converted tensor back would keep bf16 rounding)
        keep = {k: v for k, v in (("weight_scale", self.weight_scale), ("input_scale", self.input_scale)) if v is not None}
        out = super()._apply(fn, recurse)
        for k, v in keep.items():
            if getattr(self, k).dtype != v.dtype:
                setattr(self, k, v.to(getattr(self, k).device))
        return out

    def extra_repr(self) -> str:
        act = "static" if self.input_scale is not None else "dynamic"
        return f"in_features={self.in_features}, out_features={self.out_features}, act={act}, bias={self.bias is not None}"
