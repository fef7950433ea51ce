"""Streamed, resumable checkpoint writing: a quantized checkpoint built block by block in
`OUT.partial/` beside OUT, renamed to OUT once complete.

    OUT.partial/
      manifest.json                what is done: the run's key (scheme, method options, calibration
                                   hash, model files), blocks done, shards and pieces written
      inputs-00012.pt              the hidden states block 12 starts from (calibrated methods)
      block-00010.safetensors ...  pieces: finished blocks not yet gathered into a shard
      shard-00001.safetensors ...  shards, each up to max_shard_size (a lone larger block excepted)

Every file is written under a temp name and renamed; the manifest is replaced last, so whatever is
on disk after a crash or a signal, the manifest describes a consistent state and files it does not
name are leftovers to delete. Pieces are gathered into a shard as soon as the next piece would
overflow it, by copying their bytes tensor by tensor: host memory holds one block, never one shard.
At the end the non-block tensors become the last piece, shards get their final names
(model-0000k-of-0000n.safetensors, or model.safetensors alone), and the index, config and
tokenizer are written before the rename; names, index and rename are formats.writer's, as for every
checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import struct
import threading
from pathlib import Path

import torch

from .config import LlmsqueezeError
from .formats.files import read_safetensors_header
from .formats.writer import publish_dir, shard_names, write_index

log = logging.getLogger("llmsqueeze")

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
CHUNK = 16 << 20  # bytes copied at a time between files

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def partial_dir(out: Path) -> Path:
    return out.parent / (out.name + ".partial")


def parse_size(size: str | int) -> int:
    """'2GB' / '500MB' / '20KB' / 1000 -> bytes (decimal units, as transformers reads them)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                       ("B", 1)):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise LlmsqueezeError(f"--max-shard-size {size!r} is not a size: use e.g. 2GB, 500MB or a byte count") from None


# ---------------------------------------------------------------------------------- safetensors
class Entry:
    """One tensor to write: name, dtype name, shape, byte length, and where its bytes come from
    (an in-memory tensor, or a byte range of a file)."""

    def __init__(self, name, dtype, shape, nbytes, tensor=None, file=None, offset=0):
        self.name, self.dtype, self.shape, self.nbytes = name, dtype, list(shape), nbytes
        self.tensor, self.file, self.offset = tensor, file, offset

    @classmethod
    def of_tensor(cls, name: str, t: torch.Tensor) -> "Entry":
        t = t.detach().to("cpu").contiguous()
        return cls(name, DTYPE_NAMES[t.dtype], t.shape, t.numel() * t.element_size(), tensor=t)

    def copy_to(self, f) -> None:
        if self.tensor is not None:
            if self.nbytes:
                f.write(memoryview(self.tensor.reshape(-1).view(torch.uint8).numpy()))
            return
        with open(self.file, "rb") as src:
            src.seek(self.offset)
            left = self.nbytes
            while left:
                chunk = src.read(min(CHUNK, left))
                if not chunk:
                    raise OSError(f"{self.file} ended early while copying {self.name}")
                f.write(chunk)
                left -= len(chunk)


def write_safetensors(path: Path, entries: list[Entry]) -> None:
    """Write a .safetensors file from `entries`, streaming each tensor's bytes (widest dtypes first,
    so every tensor is aligned to its element size), under a temp name renamed at the end."""
    entries = sorted(entries, key=lambda e: (-torch.empty(0, dtype=DTYPES[e.dtype]).element_size(), e.name))
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            e.copy_to(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_entries(path: Path) -> list[Entry]:
    """The tensors of a .safetensors file as entries that copy from it (header checked first)."""
    header = read_safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return [
        Entry(k, v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0], file=path,
              offset=8 + n + v["data_offsets"][0])
        for k, v in header.items() if k != "__metadata__"
    ]


# ---------------------------------------------------------------------------------- signals
@contextlib.contextmanager
def deferred_signals(reraise: bool = True):
    """Hold SIGINT/SIGTERM until the block ends (a manifest commit is never cut in half), then
    raise KeyboardInterrupt if one came (unless not `reraise`: the work it guarded is complete)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got and reraise:
            raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's kill) behaves like Ctrl-C: KeyboardInterrupt, so state is saved."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_n, _f):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------------------------- the run
def tensor_sha256(t: torch.Tensor | None) -> str | None:
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_files_key(path: Path) -> dict:
    """Name -> [size, mtime_ns] of the model's weight and config files: a cheap fingerprint that a
    changed or re-downloaded model no longer matches."""
    out = {}
    for p in sorted(path.iterdir()):
        if p.suffix in (".safetensors", ".json") and p.is_file():
            st = p.stat()
            out[p.name] = [st.st_size, st.st_mtime_ns]
    return out


_KEY_WORDS = {
    "scheme": "scheme", "method": "method", "method_args": "method options", "calibration": "calibration data",
    "model": "model", "model_files": "model files", "dtype": "dtype", "max_shard_size": "max shard size",
    "layers": "layer selection",
}


class PartialCheckpoint:
    """OUT.partial/ and its manifest: the state of a streamed run, saved after every block."""

    def __init__(self, out: Path, key: dict, n_blocks: int, max_shard_size: int, resume: bool, overwrite: bool):
        self.out = out
        self.dir = partial_dir(out)
        self.max_shard_size = max_shard_size
        if resume:
            self.m = self._load(key)
        else:
            if self.dir.exists():
                if not overwrite:
                    raise LlmsqueezeError(
                        f"{self.dir} holds an interrupted run: pass --resume to continue it, or --overwrite to start over"
                    )
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
            self.m = {"version": MANIFEST_VERSION, "out": str(out), "key": key, "n_blocks": n_blocks,
                      "blocks_done": 0, "inputs": None, "pieces": [], "shards": [], "outside_done": False}
            self._commit()
        self._clean()

    def _load(self, key: dict) -> dict:
        mpath = self.dir / MANIFEST
        if not mpath.is_file():
            raise LlmsqueezeError(f"--resume: no interrupted run at {self.dir}; drop --resume to start one")
        try:
            m = json.loads(mpath.read_text())
        except json.JSONDecodeError:
            raise LlmsqueezeError(f"--resume: {mpath} is corrupt; delete {self.dir} and start over") from None
        if m.get("version") != MANIFEST_VERSION:
            raise LlmsqueezeError(f"--resume: {self.dir} was written by another llmsqueeze version; delete it and start over")
        for k, word in _KEY_WORDS.items():
            if m["key"].get(k) != key.get(k):
                raise LlmsqueezeError(
                    f"--resume: the interrupted run in {self.dir} used another {word} "
                    f"({_short(m['key'].get(k))} vs now {_short(key.get(k))}); rerun with its options, "
                    "or pass --overwrite without --resume to start over"
                )
        for s in m["shards"]:
            if not (self.dir / s["file"]).is_file():
                raise LlmsqueezeError(f"--resume: {self.dir} lacks its shard {s['file']}; delete it and start over")
        for p in m["pieces"]:
            if not (self.dir / p).is_file():
                raise LlmsqueezeError(f"--resume: {self.dir} lacks {p}; delete it and start over")
        log.info("resuming %s after block %d of %d", self.dir, m["blocks_done"], m["n_blocks"])
        return m

    def _clean(self) -> None:
        """Delete what the manifest does not name: files of a step that a crash cut short."""
        keep = {MANIFEST, *self.m["pieces"], *(s["file"] for s in self.m["shards"])}
        if self.m["inputs"]:
            keep.add(self.m["inputs"])
        for p in self.dir.iterdir():
            if p.name not in keep:
                p.unlink() if p.is_file() else shutil.rmtree(p)

    def _commit(self) -> None:
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.m, indent=1))
        os.replace(tmp, self.dir / MANIFEST)

    @property
    def blocks_done(self) -> int:
        return self.m["blocks_done"]

    def load_inputs(self) -> list[torch.Tensor] | None:
        if not self.m["inputs"]:
            return None
        return torch.load(self.dir / self.m["inputs"], map_location="cpu", weights_only=True)

    def written_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())

    # -- adding work ---------------------------------------------------------------------------
    def _add_piece(self, name: str, entries: list[Entry]) -> None:
        """Write a piece, gathering earlier pieces into a shard first if this one would overflow it."""
        size = sum(e.nbytes for e in entries)
        pending = sum(sum(e.nbytes for e in file_entries(self.dir / p)) for p in self.m["pieces"])
        if self.m["pieces"] and pending + size > self.max_shard_size:
            self._gather()
        write_safetensors(self.dir / name, entries)
        self.m["pieces"].append(name)

    def _gather(self) -> None:
        """Pieces -> one shard; the manifest is committed before the pieces are deleted."""
        entries = [e for p in self.m["pieces"] for e in file_entries(self.dir / p)]
        name = f"shard-{len(self.m['shards']) + 1:05d}.safetensors"
        write_safetensors(self.dir / name, entries)
        pieces, self.m["pieces"] = self.m["pieces"], []
        self.m["shards"].append({"file": name, "tensors": sorted(e.name for e in entries),
                                 "bytes": sum(e.nbytes for e in entries)})
        self._commit()
        for p in pieces:
            (self.dir / p).unlink()

    def block_done(self, i: int, tensors: dict[str, torch.Tensor], inputs: list[torch.Tensor] | None) -> None:
        """Block i's tensors and the next block's inputs are saved, then the manifest says so."""
        with deferred_signals():
            self._add_piece(f"block-{i:05d}.safetensors", [Entry.of_tensor(k, v) for k, v in tensors.items()])
            old = self.m["inputs"]
            self.m["inputs"] = None
            if inputs and i + 1 < self.m["n_blocks"]:
                name = f"inputs-{i + 1:05d}.pt"
                tmp = self.dir / (name + ".tmp")
                torch.save([h.cpu() for h in inputs], tmp)
                os.replace(tmp, self.dir / name)
                self.m["inputs"] = name
            self.m["blocks_done"] = i + 1
            self._commit()
            if old and old != self.m["inputs"]:
                (self.dir / old).unlink(missing_ok=True)

    def finish(self, outside: list[Entry], write_extras) -> Path:
        """Write the non-block tensors (`outside`), name the shards, write the index and `write_extras(dir)`
        (config, tokenizer), verify, and rename the dir to OUT (replacing it when it exists)."""
        from .formats.loader import check_checkpoint

        with deferred_signals(reraise=False):  # a signal now would only stop a run that is done
            if not self.m["outside_done"]:
                self._add_piece("outside.safetensors", outside)
                self.m["outside_done"] = True
                self._commit()
            if self.m["pieces"]:
                self._gather()
            shards = self.m["shards"]
            n = len(shards)
            names = shard_names(n)
            weight_map, total = {}, 0
            for s, final in zip(shards, names):
                for t in s["tensors"]:
                    weight_map[t] = final
                total += s["bytes"]
            for s, final in zip(shards, names):
                os.replace(self.dir / s["file"], self.dir / final)
            if n > 1:
                write_index(self.dir, weight_map, {"metadata": {"total_size": total}})
            (self.dir / MANIFEST).unlink()
            if self.m["inputs"]:
                (self.dir / self.m["inputs"]).unlink(missing_ok=True)
            write_extras(self.dir)
            check_checkpoint(self.dir)
            publish_dir(self.dir, self.out)
        return self.out


def _short(v) -> str:
    text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return text if len(text) <= 60 else text[:57] + "..."
