"""Triton kernels for packed weights, installed as `llmsqueeze.kernels`.

Below nn: these functions take tensors and plain values only, and nothing here imports from
`llmsqueeze` (tests/test_layout.py checks every import). What turns a layer into those tensors
lives on the nn side, in llmsqueeze/nn_kernels.py: `quant_linear(x2, module)` and
`lut_linear(x2, module)` (QuantLinear's and LUTLinear's kernel paths), `kernel_weights(module)`
(the cached, act-order-permuted view of a QuantLinear's buffers), and `llmsqueeze.nn.prepare_model`.

    quant_matmul(x, qweight, scales, qzeros, g_idx, bits, group_size, in_features)
                               the custom op llmsqueeze::quant_matmul, kernel picked by M (dispatch.py)
    lut_matmul(x, qweight, scales, table, bits, group_size, in_features)
                               the custom op llmsqueeze::lut_matmul: the lookup kernel (lookup.py)
    gemv, gemm, dequantize     the individual kernels' launchers (quant_matmul.py)
    int8_quantize_per_token(x), int8_quantize_static(x, scale), int8_scaled_mm(xq, wq, sx, sw, bias, dtype)
                               what Int8Linear.forward calls on CUDA: the W8A8 kernels (int8_matmul.py);
                               under torch.compile as the custom ops llmsqueeze::int8_*

Triton is imported on first use, not with this package: the interpreter (TRITON_INTERPRET=1) is
chosen when a kernel is defined, so tests can set it after `import llmsqueeze`.
"""
from __future__ import annotations

import importlib
import importlib.util

_LAZY = {
    "gemv": "quant_matmul", "gemm": "quant_matmul", "dequantize": "quant_matmul", "interpreting": "quant_matmul",
    "quant_matmul": "dispatch", "kernel_for": "dispatch", "lut_matmul": "dispatch", "lut_gemm": "lookup",
}
# the module glue that lived here before it moved to the nn side: a clear error instead of a bare one
_MOVED = {
    "quant_linear": "llmsqueeze.nn_kernels", "lut_linear": "llmsqueeze.nn_kernels",
    "kernel_weights": "llmsqueeze.nn_kernels", "KernelWeights": "llmsqueeze.nn_kernels",
    "prepare_model": "llmsqueeze.nn",
}


_TRITON = importlib.util.find_spec("triton") is not None  # looked up once: torch.compile traces nn_kernels.quant_linear


def available() -> bool:
    """Triton importable (any device: without a GPU only under TRITON_INTERPRET=1)."""
    return _TRITON


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in _MOVED:
        raise AttributeError(f"{__name__}.{name} takes a module and moved to the nn side: use {_MOVED[name]}.{name}")
    raise AttributeError(name)


# -- W8A8 (Int8Linear): plain launchers when eager (a custom op's dispatch costs microseconds, as much
# as a small kernel), the opaque custom ops while torch.compile traces ----------------------------


def int8_quantize_per_token(x):
    """x [..., K] -> (xq int8 [..., K], scale float32 [...]): quant.int8.quantize_per_token's bits."""
    import torch

    from . import int8_matmul as im

    return (im.quant_per_token_op if torch.compiler.is_compiling() else im.quantize_per_token)(x)


def int8_quantize_static(x, scale):
    """x [..., K], scale float32 [1] -> xq int8 [..., K]: quant.int8.quantize_static's bits."""
    import torch

    from . import int8_matmul as im

    return (im.quant_static_op if torch.compiler.is_compiling() else im.quantize_static)(x, scale)


def int8_scaled_mm(xq, wq, x_scale, w_scale, bias, dtype):
    """xq [M, K] int8, wq [N, K] int8 -> (xq @ wq^T) * x_scale * w_scale (+ bias) [M, N] in `dtype`."""
    import torch

    from . import int8_matmul as im

    return (im.scaled_mm_op if torch.compiler.is_compiling() else im.scaled_mm)(xq, wq, x_scale, w_scale, bias, dtype)
