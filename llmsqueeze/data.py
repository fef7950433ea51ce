"""Calibration data: text from a dataset name (online) or a local file/dir (offline), tokenized and
cut into `n_samples` random windows of `seq_len` tokens (reproducible from `seed`).

The project's protocol (shared/README.md): 128 samples of 512 tokens, seed 0, from WikiText-2's
validation text; never calibrate on the test text. For a tokenizer that puts a BOS token first by
default (Gemma, Llama 2/3: `bos_token_id`), each sample is that BOS and seq_len - 1 text tokens, as
the model saw its training sequences; SmolLM2's tokenizer adds none, so its samples are plain text.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import LlmsqueezeError

# name -> (datasets path, config, split, data_files or None)
CALIBRATION_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", None),
    "c4": ("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"}),
    "pileval": ("mit-han-lab/pile-val-backup", None, "validation", None),
}


def read_text_file(path: Path, what: str) -> str:
    """A file's text, or one line naming it when it is not UTF-8 text (a binary, an archive)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LlmsqueezeError(f"{what} {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): "
                              "pass a .txt or .jsonl file") from None
    except OSError as e:
        raise LlmsqueezeError(f"{what} {path}: cannot read it ({e.strerror or type(e).__name__})") from None


def bos_token_id(tokenizer) -> int | None:
    """The BOS token id when `tokenizer` puts one first by default (Gemma, Llama 2/3, ...), else None
    (SmolLM2, GPT-2: text alone). Decided by what the tokenizer does with special tokens on, not by
    whether it has a BOS token at all."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe = "The text"
    with_special = tokenizer(probe, add_special_tokens=True).input_ids
    plain = tokenizer(probe, add_special_tokens=False).input_ids
    first = bool(with_special) and with_special[0] == bos and (not plain or plain[0] != bos)
    return int(bos) if first else None


def _texts_from_path(path: Path) -> list[str]:
    if path.is_dir():  # a `datasets` dir written by save_to_disk
        try:
            from datasets import load_from_disk

            ds = load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - any failure to read is the user's input
            raise LlmsqueezeError(f"calibration data {path}: not a datasets directory ({type(e).__name__}); "
                                  "pass a .txt or .jsonl file, or a dir from Dataset.save_to_disk") from None
        if hasattr(ds, "keys"):  # a DatasetDict: take its first split
            ds = ds[next(iter(ds.keys()))]
        if "text" not in ds.column_names:
            raise LlmsqueezeError(f"calibration data {path}: no 'text' column (has {ds.column_names})")
        return list(ds["text"])
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(read_text_file(path, "calibration data").splitlines()):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LlmsqueezeError(f"{path} line {i + 1}: expected a JSON object with a 'text' field") from None
        return texts
    return [read_text_file(path, "calibration data")]


def load_calibration_texts(source: str) -> list[str]:
    """Texts from a local .txt / .jsonl file or datasets dir, or a dataset name (wikitext2, c4, pileval)."""
    path = Path(source).expanduser()
    if path.exists():
        return _texts_from_path(path)
    if source in CALIBRATION_DATASETS:
        name, config, split, files = CALIBRATION_DATASETS[source]
        try:
            from datasets import load_dataset

            ds = load_dataset(name, config, split=split, data_files=files)
        except Exception as e:  # noqa: BLE001 - offline, hub errors
            raise LlmsqueezeError(
                f"cannot fetch calibration dataset {source!r} ({type(e).__name__}); offline, pass a local file, "
                "e.g. --calib ../shared/data/wikitext-2/valid.txt"
            ) from None
        texts = ds["text"]
        return ["\n\n".join(texts)] if source == "wikitext2" else list(texts)
    raise LlmsqueezeError(
        f"calibration data {source!r}: no such file, and not one of {', '.join(CALIBRATION_DATASETS)}"
    )


def calibration_batches(
    tokenizer, source: str | list[str], n_samples: int = 128, seq_len: int = 512, seed: int = 0,
    name: str | None = None,
) -> torch.Tensor:
    """-> [n_samples, seq_len] int64 token ids: windows at random offsets of the tokenized text (all
    texts joined by blank lines), each led by the BOS token where the tokenizer puts one first by
    default (bos_token_id; then seq_len - 1 text tokens). `source` is a name/path for
    load_calibration_texts, or the texts; `name` what errors call the texts (the --calib path)."""
    if n_samples < 1 or seq_len < 2:
        raise LlmsqueezeError(f"n_samples={n_samples}, seq_len={seq_len}: use n_samples >= 1 and seq_len >= 2")
    texts = load_calibration_texts(source) if isinstance(source, str) else source
    text = "\n\n".join(texts)
    name = name or (source if isinstance(source, str) else "texts")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, truncation=False, verbose=False).input_ids[0]
    bos = bos_token_id(tokenizer)
    width = seq_len - (bos is not None)  # text tokens per sample
    if ids.numel() < width + 1:
        raise LlmsqueezeError(
            f"calibration data {name} has {ids.numel()} tokens, fewer than one sample of {seq_len}; "
            "use more text or a smaller --seq-len"
        )
    return random_windows(ids, n_samples, seq_len, bos, torch.Generator().manual_seed(seed))


def prepend_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """windows [n, w] -> [n, w + 1] led by the BOS token id `bos` (bos_token_id); unchanged when None."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype, device=windows.device), windows], 1)


def random_windows(ids: torch.Tensor, n: int, seq_len: int, bos: int | None, generator: torch.Generator) -> torch.Tensor:
    """ids [T] -> [n, seq_len] windows at random starts drawn from `generator`: with a BOS token id
    `bos` (bos_token_id) each is that BOS and seq_len - 1 consecutive text tokens, else seq_len text
    tokens (the starts drawn as before BOS was added, so a tokenizer without one samples as it did).
    Calibration samples (calibration_batches) and training batches (pruning/finetune.py) alike."""
    width = seq_len - (bos is not None)  # text tokens per window
    starts = torch.randint(0, ids.numel() - width, (n,), generator=generator)
    return prepend_bos(torch.stack([ids[s : s + width] for s in starts.tolist()]), bos)  # [n, seq_len]
