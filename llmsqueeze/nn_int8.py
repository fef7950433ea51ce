"""Int8Linear: the W8A8 layer. Integer weights, activations quantized to int8 on the way in, an
int8 x int8 -> int32 GEMM, one float rescale on the way out.

Backends, chosen per call (LLMSQUEEZE_INT8_BACKEND, or set `BACKEND` in this module):
  * "triton" on CUDA (auto: when Triton is installed and the input is a CUDA fp16/bf16/fp32 tensor):
    the kernels of llmsqueeze.kernels.int8_matmul, a one-pass per-token quantization kernel and an int8
    GEMM whose epilogue applies both scales (and the bias) and writes the output dtype directly;
  * "torch" everywhere else: quant.int8's functions, torch._int_mm and a separate float rescale.
Both compute the same numbers bit for bit (see kernels/int8_matmul.py); "triton" on CPU tensors runs
only under TRITON_INTERPRET=1 (the tests).

Buffers (the names and layout of compressed-tensors' int-quantized format, so export renames nothing):
weight int8 [N, K]; weight_scale float32 [N]; input_scale float32 [1] (static activations only);
bias [N].
"""
from __future__ import annotations

import os

import torch
from torch import nn

from . import kernels  # light: Triton itself is imported on the first kernel call
from .quant.int8 import int8_mm, quantize_per_token, quantize_static, quantize_weight_per_channel, rescale

BACKENDS = ("auto", "triton", "torch")
BACKEND = os.environ.get("LLMSQUEEZE_INT8_BACKEND", "auto")
if BACKEND not in BACKENDS:
    raise ValueError(f"LLMSQUEEZE_INT8_BACKEND={BACKEND!r} is not one of {', '.join(BACKENDS)}: unset it or pick one")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_last_input: tuple | None = None  # (x, x._version, xq, scale): the last input quantized per token


def use_triton(x: torch.Tensor) -> bool:
    """Whether Int8Linear runs this input on the Triton kernels (see the module docstring)."""
    if BACKEND == "torch" or not kernels.available() or x.dtype not in TRITON_DTYPES or x.numel() == 0:
        return False
    return BACKEND == "triton" or x.is_cuda


def quantize_input(x2: torch.Tensor, triton: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_token (the Triton kernel where `triton`), reused when the next Int8Linear reads the
    very same tensor (q/k/v read one norm output, gate/up another): a reference to x is held so its
    identity cannot pass to another tensor, and its _version changes with any in-place write. Both
    quantizers give the same bits, so the cache does not care which one filled it."""
    global _last_input
    last = _last_input
    if last is not None and last[0] is x2 and last[1] == x2._version:
        return last[2], last[3]
    xq, scale = kernels.int8_quantize_per_token(x2) if triton else quantize_per_token(x2)
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
        shape = x.shape[:-1]
        triton = use_triton(x)
        if self.input_scale is None:
            # the cache keys on the tensor itself, so key on x (a reshape makes a new view each call)
            xq, xs = quantize_input(x, triton)
            xq = xq.reshape(-1, self.in_features)
            xs = xs.reshape(-1)
        elif triton:
            xq, xs = kernels.int8_quantize_static(x.reshape(-1, self.in_features), self.input_scale), self.input_scale
        else:
            xq, xs = quantize_static(x.reshape(-1, self.in_features), self.input_scale), self.input_scale
        if triton:  # one kernel: the int32 product is rescaled in registers and written in x.dtype
            y = kernels.int8_scaled_mm(xq, self.weight, xs, self.weight_scale, self.bias, x.dtype)
        else:
            y = rescale(int8_mm(xq, self.weight), xs, self.weight_scale, self.bias, x.dtype)
        return y.reshape(*shape, self.out_features)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not re-round the scales: they stay float32, as saved
        keep = {k: v for k, v in (("weight_scale", self.weight_scale), ("input_scale", self.input_scale)) if v is not None}
        out = super()._apply(fn, recurse)
        for k, v in keep.items():
            if getattr(self, k).dtype != v.dtype:
                setattr(self, k, getattr(self, k).to(v.dtype))
        return out

    def extra_repr(self) -> str:
        act = "static" if self.input_scale is not None else "dynamic"
        return f"in_features={self.in_features}, out_features={self.out_features}, act={act}, bias={self.bias is not None}"
