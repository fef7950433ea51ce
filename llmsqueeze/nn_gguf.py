"""GGUFLinear: a Linear stored in one GGML block format (quant/ggml.py), as the very bytes a GGUF file
holds for it: `blocks` uint8 [N, K/block*nbytes], row n the weights of output n. Exporting to GGUF
copies these bytes; what GPTQ chose is what llama.cpp reads.

Compute (CPU and GPU alike): the rows are dequantized with ggml's own float32 expressions to the
activation dtype and an ordinary matmul runs; GGUF files are served by llama.cpp, this path is for
evaluating and checking them in PyTorch.
"""
from __future__ import annotations

import torch
from torch import nn

from .quant import ggml


class GGUFLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, ggml_type: str, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        t = ggml.get_type(ggml_type)
        if in_features % t.block:
            raise ValueError(f"{t.name} needs in_features that fill whole blocks of {t.block}, got {in_features}")
        self.in_features, self.out_features, self.ggml_type = in_features, out_features, t.name
        self.register_buffer("blocks", torch.zeros(out_features, t.row_bytes(in_features), dtype=torch.uint8,
                                                   device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_codes(cls, q: torch.Tensor, params: ggml.Params, ggml_type: str, bias=None) -> "GGUFLinear":
        """Codes [N, K] and their block parameters (quant/ggml.py) -> a packed layer."""
        n, k = q.shape
        layer = cls(k, n, ggml_type, bias=bias is not None, device=q.device,
                    bias_dtype=bias.dtype if bias is not None else torch.float32)
        layer.blocks.copy_(ggml.pack(q, ggml.get_type(ggml_type), params))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @property
    def type(self) -> ggml.GGMLType:
        return ggml.get_type(self.ggml_type)

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32, bit for bit what gguf's reader gives for these bytes."""
        return ggml.dequantize_bytes(self.blocks, self.type, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.ggml_type}"
