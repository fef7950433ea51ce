"""Reading a model directory, for the readers of every format: config.json, the safetensors shards
(from the index when sharded), their headers checked complete, an index of every tensor, and the
model's Linears from a skeleton built on the meta device."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..config import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file, after checking the file is complete."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file; re-create or re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated (header says {n} bytes, file has {size}); re-create or re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a corrupt header; re-create or re-download it") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        raise CheckpointError(
            f"{path} is {'truncated' if size < expected else 'corrupt'} ({size} bytes, expected {expected}); "
            "re-create or re-download it"
        )
    return header


def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path} has no config.json: not a model directory; pass the directory save_quantized wrote")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg} is not valid JSON ({e.msg} at line {e.lineno}); re-create the checkpoint") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards of a model dir (from the index when sharded), each checked to exist."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index} is corrupt; re-create the checkpoint") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path} is missing shard(s) {', '.join(missing)}; re-create or re-download the checkpoint")
        return [path / f for f in files]
    single = path / SINGLE
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path} has no model.safetensors or index: no weights to load; re-create the checkpoint")


def tensor_index(path: Path) -> dict[str, tuple[Path, dict]]:
    """{tensor name: (shard file, safetensors header entry)} over all shards, each checked complete."""
    index = {}
    for f in weight_files(path):
        for k, v in read_safetensors_header(f).items():
            if k != "__metadata__":
                index[k] = (f, v)
    return index


def tensor_getter(keys: dict[str, tuple[Path, dict]]):
    """name -> its tensor, read from the shard `keys` (tensor_index) names; each shard opened once."""
    from safetensors import safe_open

    opened: dict[Path, object] = {}

    def get(name: str) -> torch.Tensor:
        f = keys[name][0]
        if f not in opened:
            opened[f] = safe_open(f, "pt")
        return opened[f].get_tensor(name)

    return get


def skeleton(path: Path, config: dict | None = None):
    """The model built on the meta device from config.json, without its quantization_config; MoE
    experts split into per-expert Linears, as our checkpoints store them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import split_fused_experts

    cfg = AutoConfig.from_pretrained(path)
    cfg.quantization_config = None
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    split_fused_experts(model)
    return model, cfg


def linear_shapes(model) -> dict[str, tuple[int, int, bool]]:
    """{name: (out_features N, in_features K, is nn.Linear)} for every quantizable Linear."""
    from ..models import all_linear_names
    from ..nn import linear_weight

    out = {}
    for name in all_linear_names(model):
        layer = model.get_submodule(name)
        n, k = linear_weight(layer).shape
        out[name] = (n, k, isinstance(layer, torch.nn.Linear))
    return out


def renamed_keys(model, keys) -> dict[str, str]:
    """{model tensor name: checkpoint key} for the checkpoint `keys` that transformers' plain renamings
    (WeightRenaming: GPT-NeoX's embed_out -> lm_head, Mixtral's block_sparse_moe -> mlp) map to another
    name on loading; fusing and splitting converters are not applied."""
    import re

    try:
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

        rules = [t for t in get_model_conversion_mapping(model) if type(t) is WeightRenaming]
    except Exception:  # noqa: BLE001 - another transformers version: no renamings
        return {}
    out = {}
    for key in keys:
        name = key
        for r in rules:
            tgt = r.target_patterns[0] if len(r.target_patterns) == 1 else None
            for i, src in enumerate(r.source_patterns):
                name = re.sub(src, tgt if tgt is not None else r.target_patterns[i], name)
        if name != key:
            out[name] = key
    return out
