"""Compatibility: the checkpoint functions now live in llmsqueeze.formats (native.py: our format
and its loader; writer.py: writing any checkpoint dir; files.py: reading one). Import from there."""
from __future__ import annotations

from .formats.files import read_config, read_safetensors_header, weight_files
from .formats.native import (
    FORMAT_VERSION,
    QUANT_METHOD,
    LlmsqueezeConfig,
    LlmsqueezeHfQuantizer,
    check_checkpoint,
    compress_sparse_layers,
    from_pretrained,
    register_with_transformers,
    replace_with_quant_linear,
    save_quantized,
    verify_sparse_layers,
)
from .formats.writer import atomic_output_dir, prepare_output_dir, save_model_dir

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "LlmsqueezeConfig",
    "LlmsqueezeHfQuantizer",
    "atomic_output_dir",
    "check_checkpoint",
    "compress_sparse_layers",
    "from_pretrained",
    "prepare_output_dir",
    "read_config",
    "read_safetensors_header",
    "register_with_transformers",
    "replace_with_quant_linear",
    "save_model_dir",
    "save_quantized",
    "verify_sparse_layers",
    "weight_files",
]
