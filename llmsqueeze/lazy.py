"""Where dense models come from: a local dir or a hub id, checked (load_dense, dense_config), and
models bigger than memory as a block source (LazyModel): the model is built on the meta device and
each decoder block's weights are read from the safetensors shards only when the engine reaches it;
the orchestrator (llmsqueeze.pipeline.quantize_lazy) writes the block out (llmsqueeze.streaming) and
frees it. Embeddings, final norm and head are read once. A run saves its state after every block
and `resume=True` continues it, bit for bit as if it had never stopped. check_resources says, before
any work, when the disk or the device is too small.

Host memory: the non-block tensors + one block (+ its activations for calibrated methods); the
model's dtype is the checkpoint's (or `dtype`). Tensors are read with plain file reads into fresh
buffers rather than through a memory map: a mapped shard's pages would count in the process's
resident memory until unmapped, and the point here is that nothing but one block stays resident.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path

import torch
from torch import nn

from .config import CheckpointError, LlmsqueezeError, QuantScheme, first_line
from .models import expert_disk_sources, fused_part

log = logging.getLogger("llmsqueeze")



def resolve_model_dir(model_id: str) -> Path:
    """A local model dir, or a hub id fetched (weights, configs, tokenizer) with snapshot_download."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or model_id.startswith((".", "~")) or path.exists():
        raise LlmsqueezeError(f"model {model_id!r}: no such directory; pass a local model dir or a hub id like 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                  "*.tiktoken"]))
    except Exception as e:  # noqa: BLE001 - network, auth, unknown repo: one line
        raise LlmsqueezeError(f"cannot fetch model {model_id!r} ({first_line(e)}); check the name and the network, "
                              "or pass a local dir") from None


def has_safetensors(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


class ShardReader:
    """Where each tensor of a safetensors checkpoint lies; every shard's header is checked (index
    complete, file lengths as the headers say) before anything is read."""

    def __init__(self, path: Path):
        from .formats.files import read_safetensors_header, weight_files
        from .streaming import DTYPES

        self.tensors: dict[str, tuple[Path, torch.dtype, list[int], int, int]] = {}
        files = weight_files(path)
        index = path / "model.safetensors.index.json"
        weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
        for f in files:
            header = read_safetensors_header(f)
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                if v["dtype"] not in DTYPES:
                    raise CheckpointError(f"{f}: tensor {k} has dtype {v['dtype']}, which llmsqueeze cannot read")
                start, end = v["data_offsets"]
                self.tensors[k] = (f, DTYPES[v["dtype"]], v["shape"], 8 + n + start, end - start)
        if weight_map is not None:
            for k, fname in weight_map.items():
                if k not in self.tensors or self.tensors[k][0].name != fname:
                    raise CheckpointError(f"{index} names {k} in {fname}, which does not hold it; "
                                          "re-create or re-download the checkpoint")

    def read(self, key: str) -> torch.Tensor:
        f, dtype, shape, offset, nbytes = self.tensors[key]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(f, "rb") as fh:
            fh.seek(offset)
            if nbytes and fh.readinto(memoryview(buf.numpy())) != nbytes:
                raise CheckpointError(f"{f} ended while reading {key}; re-create or re-download it")
        return buf.view(dtype).reshape(shape)


def check_shards(path: str | os.PathLike) -> None:
    """For a local dir with safetensors weights: every shard present, complete, and holding what
    the index says (CheckpointError naming the file otherwise). Anything else passes unchecked."""
    path = Path(path)
    if path.is_dir() and has_safetensors(path):
        ShardReader(path)


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[attr] = t


class LazyModel:
    """A causal LM whose decoder blocks stay on the meta device until `load_block(i)` reads them;
    `release_block(i)` makes them meta again. Non-block tensors are loaded at construction."""

    def __init__(self, model_id: str, dtype: torch.dtype | str = "auto"):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        from .models import get_arch, split_fused_experts

        self.path = resolve_model_dir(model_id)
        _, config = dense_config(str(self.path))
        if not has_safetensors(self.path):
            raise LlmsqueezeError(f"model {model_id!r} has no safetensors weights, which lazy loading reads; "
                                  "pass --no-lazy (or convert it to safetensors)")
        self.reader = ShardReader(self.path)  # every header checked before any work
        if dtype == "auto":
            dtype = config.dtype if isinstance(config.dtype, torch.dtype) else None
            if dtype is None and isinstance(getattr(config, "dtype", None), str):
                dtype = getattr(torch, config.dtype)
            if dtype is None:
                dtype = next((t[1] for t in self.reader.tensors.values() if t[1].is_floating_point), torch.float32)
        self.dtype = dtype
        with init_empty_weights(include_buffers=False):  # buffers (rotary tables) computed for real
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        split_fused_experts(self.model)  # MoE: per-expert Linears, read from the per-expert (or fused) tensors
        self.arch = get_arch(self.model)
        self.blocks = self.model.get_submodule(self.arch.blocks)
        self._fused: dict[str, torch.Tensor] = {}  # fused expert tensors of the block being read
        self._map_keys()
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        self.head_names = {n + ".weight" for n, m in self.model.named_modules() if head is not None and m is head}

    def load_outside(self, head: bool = False) -> None:
        """Read the tensors outside the blocks (embeddings, final norm; the output head only when
        `head`: the engine's capture never reaches it, and unchanged it is copied file to file)."""
        prefix = self.arch.blocks + "."
        for name in self.keys:
            if not name.startswith(prefix) and (head or name not in self.head_names):
                if self._get(name).is_meta:
                    self._load(name)
        self.model.tie_weights()

    def release_outside(self) -> None:
        """Drop the non-block tensors read from the checkpoint (once the engine has captured the
        block inputs, nothing reads them again: unchanged, they are copied file to file at the end)."""
        prefix = self.arch.blocks + "."
        for name in self.keys:
            t = self._get(name)
            if not name.startswith(prefix) and not t.is_meta:
                _set_tensor(self.model, name, torch.empty_like(t, device="meta"))
        self.model.tie_weights()
        trim_host_memory()

    def _get(self, name: str) -> torch.Tensor:
        mod_name, _, attr = name.rpartition(".")
        mod = self.model.get_submodule(mod_name) if mod_name else self.model
        t = mod._parameters.get(attr)
        return mod._buffers.get(attr) if t is None else t

    def _map_keys(self) -> None:
        """Model tensor name -> checkpoint key (same, without or with the base model's prefix)."""
        base = getattr(self.model, "base_model_prefix", "") or ""
        tied = set(getattr(self.model, "_tied_weights_keys", None) or ())
        text = self.model.config.get_text_config()
        ties = getattr(text, "tie_word_embeddings", False)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        persistent = set(params) | set(self.model.state_dict())
        renamed = self._renamings()
        experts = expert_disk_sources(self.model)

        def variants(k):
            out = [k]
            if base and k.startswith(base + "."):
                out.append(k[len(base) + 1:])
            elif base:
                out.append(f"{base}.{k}")
            return out

        def expert_key(sources):  # the per-expert tensor on disk, else expert e's part of the fused one
            for src in sources:
                found = next((k for k in variants(src[1]) if k in self.reader.tensors), None)
                if found is not None:
                    return found if src[0] == "tensor" else (found, *src[2:])
            return None

        self.keys: dict[str, str | tuple] = {}  # a key, or (fused key, expert, role, layout)
        self.renamed: set[str] = set()  # names saved under their checkpoint key (save_pretrained reverses renamings)
        for name in persistent:
            options = [name]
            if base and name.startswith(base + "."):
                options.append(name[len(base) + 1:])
            elif base:
                options.append(f"{base}.{name}")
            key = next((k for k in options if k in self.reader.tensors), None)
            if key is None and name in renamed:
                key = renamed[name]
                self.renamed.add(name)
            if key is None and name in experts:
                key = expert_key(experts[name])
            if key is not None:
                self.keys[name] = key
            elif not (ties and name in tied):
                if name in params:
                    raise CheckpointError(f"{self.path}: no tensor for {name} in the checkpoint; lazy loading "
                                          "cannot map its names, pass --no-lazy")
        # shapes checked now, so a mismatch is found before any work
        for name, key in self.keys.items():
            want = tuple(params[name].shape) if name in params else None
            if isinstance(key, tuple):  # a part of a fused expert tensor
                fused, e, role, layout = key
                have = tuple(fused_part(layout, torch.empty(self.reader.tensors[fused][2], device="meta"), e, role).shape)
                key = fused
            else:
                have = tuple(self.reader.tensors[key][2])
            if want is not None and want != have:
                raise CheckpointError(f"{self.path}: {key} has shape {have}, the model expects {want}; "
                                      "the checkpoint does not match its config.json")

    def _renamings(self) -> dict[str, str]:
        """Model name -> checkpoint key under the plain renamings transformers applies on loading
        (GPT-NeoX: embed_out -> lm_head); checkpoints that need fusing or splitting fail to map."""
        from .formats.files import renamed_keys

        return renamed_keys(self.model, self.reader.tensors)

    def block_state(self, i: int) -> dict[str, torch.Tensor]:
        """Block i's tensors under the names save_pretrained writes: it reverts transformers' load-time
        renamings (Mixtral: mlp. -> block_sparse_moe.), so the lazy checkpoint equals the in-memory one."""
        state = self.blocks[i].state_dict(prefix=self.block_prefix(i))
        try:
            from transformers.core_model_loading import revert_weight_conversion
        except ImportError:  # another transformers version: the module names
            return state
        return revert_weight_conversion(self.model, state)

    def _read(self, key: str | tuple) -> torch.Tensor:
        if not isinstance(key, tuple):
            return self.reader.read(key)
        fused, e, role, layout = key
        if fused not in self._fused:  # each fused tensor is read once per block
            self._fused[fused] = self.reader.read(fused)
        return fused_part(layout, self._fused[fused], e, role)

    def _load(self, name: str) -> None:
        key = self.keys[name]
        t = self._read(key)
        mod_name, _, attr = name.rpartition(".")
        mod = self.model.get_submodule(mod_name) if mod_name else self.model
        current = mod._parameters.get(attr)
        if current is None:
            current = mod._buffers.get(attr)
        if current is not None and current.is_floating_point() and t.dtype != current.dtype:
            t = t.to(current.dtype)
        _set_tensor(self.model, name, t)

    def block_prefix(self, i: int) -> str:
        return f"{self.arch.blocks}.{i}."

    def load_block(self, i: int) -> None:
        prefix = self.block_prefix(i)
        for name in self.keys:
            if name.startswith(prefix):
                self._load(name)
        self._fused.clear()

    def release_block(self, i: int) -> None:
        for mod in self.blocks[i].modules():
            for k, p in mod._parameters.items():
                if p is not None:
                    mod._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for k, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[k] = torch.empty_like(b, device="meta")
        trim_host_memory()

    def block_bytes(self, i: int) -> int:
        return sum(p.numel() * p.element_size() for p in self.blocks[i].parameters())

    def outside_entries(self) -> list:
        """The non-block tensors as save_pretrained writes them (tied copies once, under the first
        name), as streaming.Entry: in-memory tensors where loaded or changed, else byte ranges of
        the source shards (cast in memory, one tensor at a time, when the dtype changes)."""
        from .streaming import DTYPE_NAMES, Entry

        prefix = self.arch.blocks + "."
        text = self.model.config.get_text_config()
        tied = set(getattr(self.model, "_tied_weights_keys", None) or ()) if text.tie_word_embeddings else set()
        out, seen = [], set()
        for name, t in self.model.state_dict(keep_vars=True).items():
            if name.startswith(prefix) or name in tied:
                continue
            saved = self.keys[name] if name in self.renamed else name
            if not t.is_meta:
                ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
                if ptr not in seen:
                    seen.add(ptr)
                    out.append(Entry.of_tensor(saved, t))
                continue
            f, dtype, shape, offset, nbytes = self.reader.tensors[self.keys[name]]
            if dtype == t.dtype:
                out.append(Entry(saved, DTYPE_NAMES[dtype], shape, nbytes, file=f, offset=offset))
            else:
                out.append(_LoadedEntry(name, self, t.dtype, saved))
        return out


def _glibc():
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


_LIBC = None
M_MMAP_THRESHOLD = -3
# Measured on the 2.6 GB model of eval/memory.py (RTN, 2 busy cores), peak RSS above baseline and
# wall time of the whole process: 1 MiB 262 MB / 120 s; 4 MiB 325 MB / 105 s; 32 MiB (glibc's own
# ceiling) 724 MB / 67 s, and up to 1.5 GB in some runs. Below the threshold the kernel zero-fills
# every fresh mapping, so a lower one costs time.
MMAP_THRESHOLD = 4 << 20


def bound_heap_growth() -> None:
    """Serve every allocation of MMAP_THRESHOLD or more with its own mmap, returned to the OS when
    freed. glibc's default raises that threshold to 32 MiB after the first large free, after which
    each block's tensors of a few MB land in the heap, whose holes it keeps: resident memory then
    grew by up to ~60 MB a block, by chance (a 24-block, 2.6 GB model: 0.3 to 1.5 GB above baseline
    in identical runs). Process-wide, like MALLOC_MMAP_THRESHOLD_=4194304; glibc only."""
    libc = _glibc()
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim_host_memory() -> None:
    """Hand free heap pages back to the OS (after each block)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


class _LoadedEntry:
    """A source tensor cast to the model's dtype when it is written, not before."""

    def __init__(self, name: str, lazy: LazyModel, dtype: torch.dtype, saved: str):
        from .streaming import DTYPE_NAMES

        _, _, shape, _, _ = lazy.reader.tensors[lazy.keys[name]]
        self.source, self.name, self.shape, self.dtype = name, saved, list(shape), DTYPE_NAMES[dtype]
        self.nbytes = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        self._lazy, self._dtype = lazy, dtype

    def copy_to(self, f) -> None:
        from .streaming import Entry

        Entry.of_tensor(self.name, self._lazy.reader.read(self._lazy.keys[self.source]).to(self._dtype)).copy_to(f)


def load_dense(model_id: str, dtype: torch.dtype | str = "auto", **kwargs) -> nn.Module:
    """Load a dense causal LM from a local dir or a hub id, turning loader failures into one line."""
    from transformers import AutoModelForCausalLM

    path, _ = dense_config(model_id)
    check_shards(path)  # a truncated or incomplete download: one line, before the slow load
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise LlmsqueezeError(f"cannot load model {model_id!r}: {first}") from None


def dense_config(model_id: str):
    """-> (local path or hub id, config) of a dense causal LM, after the checks that make bad input
    one line: no such dir, not a causal LM, already quantized."""
    from transformers import AutoConfig

    looks_local = os.path.isabs(model_id) or model_id.startswith((".", "~")) or os.path.exists(model_id)
    if looks_local and not os.path.isdir(os.path.expanduser(model_id)):
        raise LlmsqueezeError(f"model {model_id!r}: no such directory; pass a local model dir or a hub id like 'org/name'")
    path = os.path.expanduser(model_id) if looks_local else model_id
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise LlmsqueezeError(
            f"cannot load model {model_id!r} ({first}); check the name or path, and the network for hub ids"
        ) from None
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_MASKED_LM_MAPPING,
    )

    # BERT-like encoders also register a CausalLM head class; they are still not decoder LMs.
    encoder = type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or encoder or getattr(config, "is_encoder_decoder", False):
        raise LlmsqueezeError(
            f"model {model_id!r} is a {config.model_type!r} model, which is not a causal LM: "
            "llmsqueeze compresses decoder-only LMs (Llama, Qwen, Mistral, GPT-2, ...)"
        )
    if getattr(config, "quantization_config", None) is not None:
        method = config.quantization_config.get("quant_method", "?") if isinstance(config.quantization_config, dict) else "?"
        raise LlmsqueezeError(
            f"model {model_id!r} is already quantized ({method}): start from the dense model"
        )
    return path, config


def model_config(model_id: str):
    """The transformers config of a model dir or hub id (dense or a checkpoint), or None when it cannot
    be read: the loader that follows says why, in one line."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(os.path.expanduser(model_id))
    except Exception:  # noqa: BLE001 - reported by the loader
        return None


def position_limit(config) -> tuple[int | None, bool]:
    """-> (the most positions the model's config declares, whether they are learned): a model without
    RoPE settings (GPT-2's n_positions, OPT's max_position_embeddings) has a learned table that a
    longer sequence indexes past; a RoPE model computes any position but was trained up to its limit."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None, False
    fields = text.to_dict()
    rotary = any(("rope" in k or "rotary" in k) and v is not None for k, v in fields.items())
    return limit, not (rotary or fields.get("position_embedding_type") == "rotary")


_WARNED: set[tuple] = set()  # (model type, limit, length) already warned about


def check_positions(config, seq_len: int, what: str = "seq_len", clip: bool = False) -> int:
    """`seq_len` against the model's positions (position_limit), before any work. Past learned
    positions: clipped to them with a one-line notice (`clip`, the CLI) or refused in one line (the
    API); past a RoPE model's max_position_embeddings: a one-line warning. -> the length to use."""
    limit, learned = position_limit(config)
    if limit is None or seq_len <= limit:
        return seq_len
    kind = getattr(config, "model_type", "the model")
    if not learned:
        if (kind, limit, seq_len) not in _WARNED:  # once: the CLI checks before loading, the library again
            _WARNED.add((kind, limit, seq_len))
            log.warning("%s %d is past %s's max_position_embeddings %d: RoPE runs on, but the model was not trained "
                        "on sequences that long", what, seq_len, kind, limit)
        return seq_len
    if not clip:
        raise LlmsqueezeError(f"{what}={seq_len} is longer than the {limit} positions {kind} has learned "
                              f"(max_position_embeddings): use {what} <= {limit}")
    log.warning("%s %d is longer than the %d positions %s has learned (max_position_embeddings): using %d",
                what, seq_len, limit, kind, limit)
    return limit


# ---------------------------------------------------------------------------------- checks
def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def quantized_bytes(model: nn.Module, names: list[str], scheme: QuantScheme, act_order_g_idx: bool) -> int:
    """Bytes of the checkpoint: packed layers per the format (README), everything else as stored."""
    import math

    from .nn import linear_weight
    from .quant.pack import padded

    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    sb = torch.empty(0, dtype=scheme.torch_scale_dtype).element_size()
    for name in names:
        layer = model.get_submodule(name)
        n, k = linear_weight(layer).shape
        ng = math.ceil(k / scheme.group_size_for(k))
        total -= n * k * layer.weight.element_size()
        if scheme.grid == "uniform":
            total += padded(k) * scheme.bits // 8 * n + ng * n * sb + ng * padded(n) * scheme.bits // 8
        else:  # indices + nf scales or k-means codebooks (2**bits levels per group)
            total += padded(k) * scheme.bits // 8 * n + ng * n * sb * (1 if scheme.grid == "nf" else 2**scheme.bits)
        total += 4 * k if act_order_g_idx else 0
    return total


def available_memory(device: torch.device) -> int:
    """Free bytes on `device` (CUDA: mem_get_info; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def check_resources(lazy: LazyModel, names: list[str], scheme: QuantScheme, out: Path, *, device: str,
                    offload: str | None, data: torch.Tensor | None, act_order_g_idx: bool, max_shard_size: int,
                    already_written: int = 0) -> None:
    """One-line errors before any work: too little free disk for the output, or a device that cannot
    hold one block (+ activations and Hessians for calibrated methods)."""
    from .nn import is_linear, linear_weight
    from .streaming import partial_dir

    need = quantized_bytes(lazy.model, names, scheme, act_order_g_idx)
    hidden_size = lazy.model.config.get_text_config().hidden_size
    act = 0 if data is None else data.numel() * hidden_size * torch.empty(0, dtype=lazy.dtype).element_size()
    work = min(max_shard_size, need) + 2 * act  # pieces awaiting their shard, the saved inputs
    where = out.parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need + work - already_written > free:
        raise LlmsqueezeError(
            f"--out {out}: the checkpoint needs about {_gib(need)} on disk plus {_gib(work)} of working files in "
            f"{partial_dir(out).name}, but {where} has {_gib(free)} free; free some space or choose another --out"
        )
    dev = torch.device(device)
    block = max(lazy.block_bytes(i) for i in range(len(lazy.blocks)))
    hess = 0
    if data is not None:
        widths = {linear_weight(m).shape[1] for m in lazy.blocks[0].modules() if is_linear(m)}
        hess = sum(4 * k * k for k in widths)
    on_device = act if (offload is None or torch.device(offload) == dev) else 0
    needed = block * 2 + hess + 2 * on_device  # the block, its packed/float32 working copies, in and out activations
    free_mem = available_memory(dev)
    if needed > free_mem:
        raise LlmsqueezeError(
            f"quantizing needs one block on {dev}: {_gib(block)} of weights (+ {_gib(block + hess)} working memory, "
            f"{_gib(2 * on_device)} of activations), about {_gib(needed)}, but only {_gib(free_mem)} is free; "
            "use a device with more memory, --offload cpu, or fewer --n-samples"
        )


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file()) if d.is_dir() else 0


def save_generation_config(model: nn.Module, src: Path, dst: Path) -> None:
    from transformers import GenerationConfig

    if (src / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(src).save_pretrained(dst)
    elif getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(dst)
