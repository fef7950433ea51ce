"""The peer formats as a table (quant_method -> module), and what importing any of them shares: a
peer's quantization_config translated to ours (`imported_config`), the tensors our layout does
without, transformers' weight converters, and the one-line description for `llmsqueeze info`.
What each module must define is listed in formats/__init__.py."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import CheckpointError, LlmsqueezeError, QuantScheme
from . import awq, compressed_tensors, gptq
from .files import linear_shapes, skeleton
from .native import FORMAT_VERSION, QUANT_METHOD, describe

FORMATS = {"gptq": gptq, "awq": awq, "compressed-tensors": compressed_tensors}  # quant_method -> module
IMPORT_METHODS = tuple(FORMATS)
EXPORT_FORMATS = ("compressed-tensors", "gptq", "gguf")  # gguf: formats/gguf.py, a file, not a peer dir
LAYER_TENSORS = {name: fmt.LAYER_TENSORS for name, fmt in FORMATS.items()}  # (for `llmsqueeze info`)


# ====================================================================================== import
def imported_config(path: Path, config: dict, keys: dict) -> dict:
    """A peer's quantization_config -> ours, with `source` saying how to convert its tensors.
    Raises CheckpointError naming the fields we cannot read."""
    qc = config["quantization_config"]
    method = qc.get("quant_method")
    fmt = FORMATS[method]
    fmt.check_import(path, qc)
    marker = fmt.MARKER
    prefixes = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith("." + marker)})
    if not prefixes:
        raise CheckpointError(f"{path}: a {method} checkpoint without quantized weights (no *.{marker}); re-download it")
    for p in prefixes:
        missing = [s for s in fmt.REQUIRED if f"{p}.{s}" not in keys]
        if missing:
            raise CheckpointError(f"{path}: layer {p} lacks {', '.join(missing)}; the checkpoint is corrupt, re-download it")
    scheme, args, extra, bad = fmt.import_scheme(path, qc, keys, prefixes)
    source = {"format": method, **extra}
    if bad:
        raise CheckpointError(f"{path}: {method} checkpoint with fields llmsqueeze does not read: {'; '.join(bad)}")
    try:
        QuantScheme.from_dict(scheme)
    except LlmsqueezeError as e:
        raise CheckpointError(f"{path}: {method} checkpoint with an unsupported scheme ({e})") from None
    model, _ = skeleton(path)
    shapes = linear_shapes(model)
    unknown = [p for p in prefixes if p not in shapes]
    if unknown:
        raise CheckpointError(f"{path}: quantized tensors for {unknown[0]}, which is not a Linear of this model")
    for p in prefixes:
        n, k, _ = shapes[p]
        for suffix, want in fmt.expected_shapes(scheme, n, k).items():
            got = keys.get(f"{p}.{suffix}", (None, {"shape": None}))[1]["shape"]
            if got is not None and list(got) not in want:
                raise CheckpointError(
                    f"{path}: {p}.{suffix} has shape {list(got)}, but a {k}->{n} layer with bits={scheme['bits']} "
                    f"group_size={scheme['group_size']} needs {want[0]}: config.json does not match the weights; re-download it"
                )
    fmt.finish_import(args, keys, prefixes, shapes, scheme)
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "method": fmt.IMPORTED_METHOD,
        "scheme": scheme,
        "method_args": args,
        "modules_to_not_convert": sorted(set(shapes) - set(prefixes)),
        "source": source,
    }


def ignored_on_import(source: dict, method_args: dict) -> list[str]:
    """Regexes of checkpoint tensors that carry nothing our layout needs."""
    return FORMATS[source["format"]].ignored_on_import(source, method_args)


def _op_class():
    from transformers.core_model_loading import ConversionOps

    class _Convert(ConversionOps):
        """One checkpoint tensor -> our buffer(s), by a function of (tensor, the target QuantLinear)."""

        llmsqueeze_import = True  # dropped after loading: the model then holds our layout

        def __init__(self, fn, suffix: str):
            self.fn, self.suffix = fn, suffix

        @torch.no_grad()
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            (value,) = input_dict.values()
            value = value[0] if isinstance(value, list) else value
            layer_name = kwargs["full_layer_name"].rsplit(".", 1)[0]
            module = kwargs["model"].get_submodule(layer_name)
            out = self.fn(value, module)
            if isinstance(out, dict):
                return out
            return {target_patterns[0]: out}

        def __repr__(self):
            return f"llmsqueeze.convert({self.suffix})"

    return _Convert


def weight_conversions(source: dict) -> list:
    """transformers WeightConverters that turn a peer checkpoint's tensors into our buffers."""
    return FORMATS[source["format"]].weight_conversions(source, _op_class())


def describe_source(qc: dict) -> str:
    """'gptq checkpoint (checkpoint_format gptq), imported' or 'llmsqueeze format v1', for `llmsqueeze info`."""
    src = qc.get("source") or {}
    fmt = FORMATS.get(src.get("format"))
    return describe(qc) if fmt is None else fmt.describe(src)
