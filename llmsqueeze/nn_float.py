"""FloatLinear: a Linear whose weights are FP8 (E4M3) or FP4 (E2M1) with their scales, and whose
inputs are quantized on the way in where the format says so (quant/fp.py has the formats).

Buffers (compressed-tensors' names and layouts, so export renames nothing):
  fp8, fp8-weight   weight float8_e4m3fn [N, K]; weight_scale float32 [N, 1]
  fp8-block         weight float8_e4m3fn [N, K]; weight_scale float32 [ceil(N/128), ceil(K/128)]
  nvfp4(-a16)       weight_packed uint8 [N, K/2]; weight_scale float8_e4m3fn [N, K/16];
                    weight_global_scale float32 [1]; nvfp4: input_global_scale float32 [1]
  mxfp4             weight_packed uint8 [N, K/2]; weight_scale uint8 (E8M0) [N, K/32]
  fp8 static        input_scale float32 [1]
  bias [N]

Compute: on the CPU (and on GPUs without the tensor cores for the format) exact emulation: the
activations go through the format and back in float32, the weight is dequantized to the activation
dtype (float32 stays exact), and an ordinary matmul runs. On CUDA with compute capability >= 8.9,
per-channel fp8 with dynamic per-token activations runs torch._scaled_mm (fp8 x fp8, both scales
applied in the GEMM's epilogue); where that call is refused it logs once and emulates.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .quant import fp

log = logging.getLogger(__name__)

_scaled_mm_failed = False


def _can_scaled_mm(x: torch.Tensor, fmt: fp.FloatFormat, static: bool, n: int, k: int) -> bool:
    if _scaled_mm_failed or not x.is_cuda or fmt.name != "fp8" or static or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 9) and k % 16 == 0 and n % 16 == 0


def scaled_mm_fp8(x2: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    """x2 [M, K] 16-bit CUDA, weight E4M3 [N, K], w_scale [N, 1] -> [M, N]: x quantized per token to
    E4M3, then one fp8 GEMM with the row (token) and column (channel) scales in its epilogue."""
    xf = x2.float()
    sx = (xf.abs().amax(dim=1, keepdim=True) / fp.E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    xq = (xf / sx).clamp_(-fp.E4M3_MAX, fp.E4M3_MAX).to(fp.FP8)
    # cuBLASLt's row-wise scaled fp8 GEMM writes bfloat16 (fp16 output is refused): cast after for fp16
    mm_dtype = torch.bfloat16 if out_dtype == torch.float16 else out_dtype
    y = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=w_scale.view(1, -1).float(),
                         bias=None if bias is None else bias.to(mm_dtype), out_dtype=mm_dtype)
    return y.to(out_dtype)


class FloatLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, format: str, bias: bool = False, static: bool = False,
                 bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        fmt = fp.FORMATS[format]
        self.in_features, self.out_features, self.format = in_features, out_features, format
        n, k = out_features, in_features
        sr, sc = fmt.n_scales(n, k)
        if fmt.element == "e4m3":
            self.register_buffer("weight", torch.zeros(n, k, dtype=fp.FP8, device=device))
        else:
            self.register_buffer("weight_packed", torch.zeros(n, -(-k // 2), dtype=torch.uint8, device=device))
        scale_dtype = {"fp32": torch.float32, "e4m3": fp.FP8, "e8m0": torch.uint8}[fmt.scale]
        self.register_buffer("weight_scale", torch.ones(sr, sc, device=device).to(scale_dtype))
        if fmt.scale == "e4m3":
            self.register_buffer("weight_global_scale", torch.ones(1, dtype=torch.float32, device=device))
        scale = torch.ones(1, dtype=torch.float32, device=device)
        self.register_buffer("input_global_scale", scale.clone() if fmt.act == "nvfp4" else None)
        self.register_buffer("input_scale", scale.clone() if static and fmt.act == "token" else None)
        if bias:
            self.register_buffer("bias", torch.zeros(n, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @property
    def fmt(self) -> fp.FloatFormat:
        return fp.FORMATS[self.format]

    @property
    def weight_tensors(self) -> dict[str, torch.Tensor]:
        names = ("weight", "weight_packed", "weight_scale", "weight_global_scale")
        return {k: v for k, v in self._buffers.items() if k in names and v is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], format: str, bias: torch.Tensor | None = None,
                     input_scale: torch.Tensor | None = None, in_features: int | None = None) -> "FloatLinear":
        """A layer holding fp.quantize_weight's tensors (and the calibrated activation scale: fp8
        static's input_scale, nvfp4's input_global_scale)."""
        fmt = fp.FORMATS[format]
        codes = tensors.get("weight", tensors.get("weight_packed"))
        n = codes.shape[0]
        k = in_features or (codes.shape[1] if fmt.element == "e4m3" else 2 * codes.shape[1])
        layer = cls(k, n, format, bias=bias is not None, static=input_scale is not None and fmt.act == "token",
                    bias_dtype=bias.dtype if bias is not None else torch.float32, device=codes.device)
        for name, t in tensors.items():
            getattr(layer, name).copy_(t)
        if input_scale is not None:
            layer.set_input_scale(input_scale)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_float(cls, w: torch.Tensor, format: str, bias: torch.Tensor | None = None,
                   input_scale: torch.Tensor | None = None) -> "FloatLinear":
        """Round to nearest from a float weight [N, K]."""
        return cls.from_tensors(fp.quantize_weight(w.detach(), fp.FORMATS[format]), format, bias, input_scale,
                                w.shape[1])

    def set_input_scale(self, scale: torch.Tensor | float) -> None:
        """The calibrated activation scale: nvfp4's input_global_scale, or fp8's static input_scale
        (which makes the layer static)."""
        t = torch.as_tensor(scale, dtype=torch.float32).reshape(1).to(self.weight_scale.device)
        if self.fmt.act == "nvfp4":
            self.input_global_scale = t
        elif self.fmt.act == "token":
            self.input_scale = t
        else:
            raise ValueError(f"format {self.format} keeps its activations in 16 bits: no input scale")

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return fp.dequantize_weight(self.weight_tensors, self.fmt, self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global _scaled_mm_failed
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        fmt = self.fmt
        if _can_scaled_mm(x2, fmt, self.input_scale is not None, self.out_features, self.in_features):
            try:
                y = scaled_mm_fp8(x2, self.weight, self.weight_scale, self.bias, x.dtype)
                return y.reshape(*shape, self.out_features)
            except RuntimeError as e:  # an older torch or GPU refusing the row-wise scaled GEMM
                _scaled_mm_failed = True
                log.warning("FloatLinear: torch._scaled_mm refused (%s); emulating fp8 from here on",
                            str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        xq = fp.fake_quant_input(x2, fmt, self.input_scale, self.input_global_scale).to(x.dtype)
        w = self.dequantize_weight(x.dtype)
        y = torch.nn.functional.linear(xq, w, None if self.bias is None else self.bias.to(x.dtype))
        return y.reshape(*shape, self.out_features)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not convert the codes or the scales (float8 counts as floating point):
        # they follow the device only, with their values as stored
        keep = {k: v for k, v in self._buffers.items() if v is not None and k != "bias"}
        out = super()._apply(fn, recurse)
        for k, v in keep.items():
            if self._buffers[k].dtype != v.dtype:
                self._buffers[k] = v.to(self._buffers[k].device)
        return out

    def extra_repr(self) -> str:
        act = self.fmt.act or "16-bit"
        if self.input_scale is not None:
            act = "fp8 static"
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"activations={act}, bias={self.bias is not None}")
