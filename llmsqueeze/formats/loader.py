"""Loading: every checkpoint we read (ours, or a peer's translated on the way in) is verified by
`check_checkpoint` and loaded through transformers' own `from_pretrained`, with our HfQuantizer
registered for quant_method "llmsqueeze"."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..config import CheckpointError, LlmsqueezeError, check_layer_schemes, first_line, scheme_from_dict
from ..nn import adapt_to_cpu
from .files import read_config, tensor_index
from .native import FORMAT_VERSION, QUANT_METHOD, check_native, replace_with_quant_linear, verify_sparse_layers
from .peers import IMPORT_METHODS, ignored_on_import, imported_config, weight_conversions


def check_checkpoint(path: str | os.PathLike) -> dict:
    """Verify a llmsqueeze checkpoint dir before any model is built: ours, a version we read,
    complete shards, every quantized layer with all its tensors. Returns its quantization_config."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    config = read_config(path)
    qc = config.get("quantization_config")
    if qc is None:
        raise CheckpointError(f"{path} is not quantized (no quantization_config); load it with transformers or quantize it first")
    method = qc.get("quant_method")
    if method in IMPORT_METHODS:  # a peer's checkpoint: translated to ours, converted while loading
        return imported_config(path, config, tensor_index(path))
    if method != QUANT_METHOD:
        raise CheckpointError(
            f"{path} was made by another tool (quant_method={method!r}); llmsqueeze reads its own format "
            f"'{QUANT_METHOD}' and imports {', '.join(IMPORT_METHODS)}: load it with transformers, or re-quantize "
            "the dense model with llmsqueeze"
        )
    return check_native(path, qc)


# ---------------------------------------------------------------------------------------- load
class LlmsqueezeConfig(QuantizationConfigMixin):
    """transformers' view of our `quantization_config` (quant_method 'llmsqueeze')."""

    def __init__(self, scheme=None, method="rtn", format_version=FORMAT_VERSION, modules_to_not_convert=None,
                 method_args=None, source=None, sparsity=None, layer_schemes=None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.source = dict(source) if source else None  # a peer format being imported (formats/)
        self.format_version = format_version
        self.method = method
        self.method_args = dict(method_args or {})
        self.sparsity = None if sparsity is None else dict(sparsity)
        self.scheme = None if scheme is None and sparsity is not None else dict(scheme or {})
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        # validated here, raised by the quantizer once the checkpoint's path is known (a bad config met
        # inside transformers' from_pretrained: the same one-line CheckpointError llmsqueeze's own gives)
        self.problem = None
        try:
            self.layer_schemes = {k: dict(v) for k, v in check_layer_schemes(layer_schemes).items()}
            if self.scheme is not None:
                scheme_from_dict(self.scheme)
        except (LlmsqueezeError, TypeError, KeyError, AttributeError, ValueError) as e:
            self.layer_schemes, self.problem = {}, first_line(e)

    def to_dict(self) -> dict:
        d = {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "method": self.method,
            "scheme": None if self.scheme is None else dict(self.scheme),
            "method_args": dict(self.method_args),
            "modules_to_not_convert": list(self.modules_to_not_convert),
            **({"source": dict(self.source)} if self.source else {}),
        }
        if self.sparsity is not None:
            d["sparsity"] = dict(self.sparsity)
        if self.layer_schemes:  # mixed precision (format_version 3)
            d["layer_schemes"] = {k: dict(v) for k, v in self.layer_schemes.items()}
        return d

    def to_diff_dict(self) -> dict:
        return self.to_dict()


class LlmsqueezeHfQuantizer(HfQuantizer):
    """Loads llmsqueeze checkpoints inside `from_pretrained`: swaps Linears for empty QuantLinears
    on the meta skeleton, then transformers fills their packed buffers from the shards."""

    requires_calibration = True  # only pre-quantized checkpoints; quantizing is llmsqueeze.quantize()

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        problem = self.quantization_config.problem
        if problem is not None:
            path = getattr(model.config, "name_or_path", "") or (Path(checkpoint_files[0]).parent if checkpoint_files else "")
            if path and Path(path).is_dir():
                check_checkpoint(path)  # says what llmsqueeze.from_pretrained says, with the path
            raise CheckpointError(f"{path or 'the checkpoint'} has an invalid scheme in config.json ({problem}); "
                                  "re-create the checkpoint")
        names = replace_with_quant_linear(model, self.quantization_config.to_dict())
        if self.quantization_config.source:  # tensors of the peer format that our layout does without
            model._keys_to_ignore_on_load_unexpected = {
                *(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()),
                *ignored_on_import(self.quantization_config.source, self.quantization_config.method_args),
            }
        # The checkpoint holds every packed buffer, so transformers' random init must not visit the
        # QuantLinears, nor their parents, whose _init_weights may reach for `child.weight` (GPT-2
        # rescales c_proj.weight in GPT2Attention/GPT2MLP).
        for name in names:
            model.get_submodule(name)._is_hf_initialized = True
            parent = name.rpartition(".")[0]
            if parent:
                model.get_submodule(parent)._is_hf_initialized = True

    def update_weight_conversions(self, weight_conversions, model):
        """Without the family's fusing of per-expert tensors into 3-D experts: our checkpoints keep
        each expert's matrices, and the skeleton its per-expert layers (models.split_fused_experts)."""
        from ..nn_moe import MoEExperts

        if any(isinstance(m, MoEExperts) for m in model.modules()):
            weight_conversions = [c for c in weight_conversions if not _fuses_experts(c)]
        return super().update_weight_conversions(weight_conversions, model)

    def get_weight_conversions(self):
        if not self.quantization_config.source:
            return super().get_weight_conversions()
        return weight_conversions(self.quantization_config.source)

    def _process_model_after_weight_loading(self, model, **kwargs):
        verify_sparse_layers(model, self.quantization_config.to_dict())
        # the buffers now hold our layout: saving the model writes a plain llmsqueeze checkpoint, so
        # neither the config nor transformers' save (which reverts load-time conversions) may recall
        # the peer format
        self.quantization_config.source = None
        convs = getattr(model, "_weight_conversions", None)
        if convs:
            model._weight_conversions = [
                c for c in convs if not any(getattr(op, "llmsqueeze_import", False) for op in getattr(c, "operations", ()))
            ]
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False


def _fuses_experts(conversion) -> bool:
    """A transformers WeightConverter whose targets are fused expert tensors (experts.gate_up_proj ...)."""
    targets = getattr(conversion, "_original_target_patterns", None) or getattr(conversion, "target_patterns", ())
    targets = [targets] if isinstance(targets, str) else list(targets)
    return bool(targets) and all(t.rstrip("$").endswith(("experts.gate_up_proj", "experts.down_proj")) for t in targets)


_REGISTERED = False


def register_with_transformers() -> None:
    """Make `transformers.AutoModelForCausalLM.from_pretrained` read llmsqueeze checkpoints."""
    global _REGISTERED
    if _REGISTERED:
        return
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LlmsqueezeHfQuantizer:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a reloaded module's stale classes
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(LlmsqueezeConfig)
        register_quantizer(QUANT_METHOD)(LlmsqueezeHfQuantizer)
    _REGISTERED = True


def from_pretrained(path: str | os.PathLike, device_map=None, dtype: torch.dtype | str = "auto", **kwargs) -> nn.Module:
    """Load a llmsqueeze checkpoint (local dir, verified first; or a hub id) as a causal LM; a local
    .gguf file loads with its quantized Linears kept in their GGML blocks (formats/gguf.load).

    dtype "auto" (the default): the checkpoint's dtype, except on a CPU without native half
    precision (AVX2 machines: bf16 GEMMs ~35x slower than float32 there), where the model computes
    in float32 and keeps its dense 16-bit weights as stored (nn.adapt_to_cpu). A dtype given
    explicitly is used as given."""
    from transformers import AutoModelForCausalLM

    register_with_transformers()
    local = Path(str(path)).expanduser()
    if local.suffix == ".gguf" and local.is_file():
        from .gguf import load

        return load(local, torch.float32 if dtype == "auto" else getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if local.exists() or str(path).startswith((".", "/", "~")):
        qc = check_checkpoint(local)
        path = str(local)
        if qc.get("source") and "config" not in kwargs:  # a peer's checkpoint: load it as ours
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path)
            config.quantization_config = qc
            kwargs["config"] = config
    try:
        model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype=dtype, **kwargs)
    except OSError as e:
        first = first_line(e)
        raise CheckpointError(f"cannot load {path}: {first}") from None
    if dtype == "auto":  # the checkpoint's dtype, computed in float32 where half is slow on this CPU
        adapt_to_cpu(model)
    return model
