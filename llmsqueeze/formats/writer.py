"""The one way a checkpoint directory is written, whatever its format: checked up front
(`prepare_output_dir`), built in a temp dir beside OUT and renamed into place at the end
(`atomic_output_dir`, `publish_dir`), with shards named and indexed as transformers names them
(`shard_names`, `write_index`), config.json (`write_config`) and the source's side files
(`copy_side_files`: tokenizer, generation config ...).

Writers: `save_model_dir` (a model through save_pretrained: our format, structured pruning, W8A8 as
compressed-tensors), `write_shards` (a checkpoint rewritten shard by shard: the peer-format exports
of formats/, each format's module converting the layers it is handed with an `ExportJob`), and
streaming.PartialCheckpoint (resumable, block by block), which shares the shard names, the index
and the final rename.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..config import LlmsqueezeError, QuantScheme
from .files import INDEX, SINGLE

log = logging.getLogger("llmsqueeze")


@dataclass
class ExportJob:
    """What a format's writer is told about the llmsqueeze checkpoint it rewrites."""

    scheme: QuantScheme
    layers: dict[str, tuple[int, int]]  # quantized layer -> (out_features N, in_features K)
    dense: list[str] = field(default_factory=list)  # the Linears left unquantized
    conv1d: list[str] = field(default_factory=list)  # quantized layers that are Conv1D, not nn.Linear
    g_idx_stored: bool = False  # act-order with a stored g_idx
    method: str = "rtn"
    method_args: dict = field(default_factory=dict)
    not_converted: list[str] = field(default_factory=list)  # modules_to_not_convert
    head: str | None = None  # the output head's module name
    checkpoint_format: str = "gptq"  # gptq: "gptq" (v1) or "gptq_v2"
    scale_dtype: str | None = None  # compressed-tensors: "float32" widens the scales


def check_apart(out: str | os.PathLike, inputs: tuple = ()) -> None:
    """One line when `out` is, contains or lies inside one of the local `inputs` (the model read, its
    calibration text, a teacher): writing there would replace what is read, or nest a checkpoint inside
    it, whatever --overwrite says. Inputs that are no local path (hub ids, dataset names) pass."""
    target = Path(out).expanduser().resolve()
    for source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue
        src = Path(source).expanduser().resolve()
        how = ("is" if target == src else "lies inside" if src in target.parents else
               "contains" if target in src.parents else None)
        if how is not None:
            raise LlmsqueezeError(f"--out {target} {how} the input {src}; llmsqueeze never writes over or inside what it "
                                  "reads (--overwrite included): choose an --out outside it")


def prepare_output_dir(out: str | os.PathLike, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Check that `out` can be written and lies apart from the `inputs` (check_apart); return it
    resolved. Nothing is left behind."""
    check_apart(out, inputs)
    out = Path(out).expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            raise LlmsqueezeError(f"--out {out} is a file; pass a directory path")
        if any(out.iterdir()) and not overwrite:
            raise LlmsqueezeError(f"--out {out} is not empty; pass --overwrite to replace it, or choose another path")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LlmsqueezeError(f"--out {out}: {parent} is a file, not a directory; choose another path")
    try:  # a real probe: permission bits say nothing for root, read-only mounts, /proc ...
        shutil.rmtree(tempfile.mkdtemp(prefix=".llmsqueeze-probe-", dir=parent))
    except OSError as e:
        raise LlmsqueezeError(
            f"--out {out}: cannot write in {parent} ({e.strerror or type(e).__name__}); choose a writable path"
        ) from None
    return out


def publish_dir(tmp: Path, out: Path) -> None:
    """Give the finished dir `tmp` the usual permissions (temp dirs are private) and rename it to
    `out`, replacing an existing `out` (moved aside first, deleted once `tmp` is in place)."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for f in tmp.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_output_dir(out: Path):
    """Yield a temp dir beside `out` to write into; on success it is renamed to `out` (replacing it
    when `overwrite`), on any failure it is removed with the parents made for it: never a half-written dir."""
    created = [p for p in reversed(out.parents) if not p.exists()]  # parents we make, outermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        publish_dir(tmp, out)
    except BaseException:  # leave nothing behind: no temp dir, no parents we made
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                pass
        raise


def shard_names(n: int) -> list[str]:
    """The names of n shards: model.safetensors alone, else model-0000k-of-0000n.safetensors."""
    return [SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


def write_index(directory: Path, weight_map: dict[str, str], rest: dict) -> None:
    """model.safetensors.index.json: `rest` (its other entries, e.g. {"metadata": {"total_size": ...}},
    in their order) with `weight_map` (tensor -> shard file), sorted by tensor name."""
    index = dict(rest)
    index["weight_map"] = dict(sorted(weight_map.items()))
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_config(directory: Path, config: dict) -> None:
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_shards(src: Path, keys: dict, tmp: Path, tensors_of) -> None:
    """Write each shard of `src` again in `tmp`: tensors_of(name) -> the tensors that replace `name`
    (a layer's converted tensors go to the shard that held the tensor that produced them), and the
    index with the new names when the checkpoint is sharded."""
    from safetensors.torch import save_file

    shard_of = {}
    for name, (f, _) in keys.items():
        shard_of.setdefault(f, []).append(name)
    weight_map = {}
    for f, names in shard_of.items():
        tensors = {}
        for name in sorted(names):
            tensors.update(tensors_of(name))
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / f.name, metadata={"format": "pt"})
        weight_map.update({k: f.name for k in tensors})
    index = src / INDEX
    if index.is_file():
        write_index(tmp, weight_map, json.loads(index.read_text()))


def copy_side_files(src: Path, tmp: Path) -> None:
    """Tokenizer, generation config, chat template ...: everything but config.json and the weights."""
    for item in src.iterdir():
        if item.name in ("config.json", INDEX) or item.suffix == ".safetensors":
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)


def save_model_dir(model, out: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                   max_shard_size: str | int = "2GB") -> Path:
    """model.save_pretrained (+ tokenizer) into a temp dir beside `out`, renamed into place at the end."""
    out = prepare_output_dir(out, overwrite)
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    log.info("saved %s", out)
    return out
