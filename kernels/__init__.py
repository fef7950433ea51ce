"""Triton kernels for packed weights, installed as `llmsqueeze.kernels`.

    quant_linear(x2, module)   what QuantLinear.forward calls on CUDA: x2 [M, K] -> [M, N] (bias added)
    lut_linear(x2, module)     the same for LUTLinear (non-uniform grids): the lookup kernel (lookup.py)
    quant_matmul(...)          the custom op llmsqueeze::quant_matmul, kernel picked by M (dispatch.py)
    gemv, gemm, dequantize     the individual kernels' launchers (quant_matmul.py)
    kernel_weights(module)     the kernels' cached view of a QuantLinear (layout.py)
    prepare_model(model)       build that view for every QuantLinear up front (before torch.compile)
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
    "quant_matmul": "dispatch", "kernel_for": "dispatch", "lut_matmul": "dispatch", "lut_gemm": "lookup", "kernel_weights": "layout", "KernelWeights": "layout",
}


_TRITON = importlib.util.find_spec("triton") is not None  # looked up once: torch.compile traces quant_linear


def available() -> bool:
    """Triton importable (any device: without a GPU only under TRITON_INTERPRET=1)."""
    return _TRITON


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)


def quant_linear(x2, module):
    """x2 [M, K] -> y [M, N] = x2 @ W^T + bias through the Triton kernels, or None when this layer or
    input cannot run on them (Triton missing, float32 activations), so the caller falls back to torch."""
    import torch

    if not _TRITON or x2.dtype not in (torch.float16, torch.bfloat16):
        return None
    from .dispatch import quant_matmul
    from .layout import kernel_weights

    if x2.shape[0] == 0:  # an empty grid is not a launch
        return None
    w = kernel_weights(module)
    x = x2 if w.perm is None else x2.index_select(1, w.perm)
    y = quant_matmul(x.contiguous(), w.qweight, w.scales, w.qzeros, w.g_idx, w.bits, w.group_size, w.in_features)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y


def lut_linear(x2, module):
    """x2 [M, K] -> y [M, N] = x2 @ W^T + bias for a LUTLinear through the lookup kernel, or None when
    it cannot run (Triton missing, float32 activations, no rows): the caller falls back to torch."""
    import torch

    if not _TRITON or x2.dtype not in (torch.float16, torch.bfloat16) or x2.shape[0] == 0:
        return None
    from llmsqueeze.quant.lut import nf_levels

    from .dispatch import lut_matmul

    if module.grid == "nf":
        scales, table = module.scales, nf_levels(module.bits, x2.device)
    else:
        scales, table = None, module.codebook
    y = lut_matmul(x2.contiguous(), module.qweight, scales, table, module.bits, module.group_size, module.in_features)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y


def prepare_model(model) -> int:
    """Build the kernels' weights of every QuantLinear now; returns how many layers."""
    from llmsqueeze.nn import QuantLinear

    from .layout import kernel_weights

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        kernel_weights(m)
    return len(layers)


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
