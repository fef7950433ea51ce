"""Perplexity and latency, as used by the CLI and the eval/ scripts.

Perplexity follows the project's protocol (shared/README.md): tokenize the whole test text with the
model's tokenizer, cut it into non-overlapping windows of `seq_len` tokens, average the token NLL
over the first `windows` windows (8: "quick"; all: "full"), logits in float32. For a tokenizer that
puts a BOS token first by default (data.bos_token_id: Gemma, Llama 2/3), each window is that BOS and
seq_len - 1 text tokens, as llama.cpp's perplexity starts each chunk with BOS: the same number of
tokens scored per window, none of them a BOS. SmolLM2's tokenizer adds none: its windows are unchanged.
"""
from __future__ import annotations

import inspect
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import LlmsqueezeError
from .data import prepend_bos
from .engine import peak_rss_mib  # noqa: F401 (part of evaluate's interface: eval/ scripts use it)

DATASETS = {
    # name -> (datasets path, config, split, joiner)
    "wikitext2": ("wikitext", "wikitext-2-v1", "test", ""),
    "wikitext2-raw": ("wikitext", "wikitext-2-raw-v1", "test", ""),
}



def read_bandwidth_gbs(threads: int | None = None, gib: float = 1.0) -> float:
    """The machine's read bandwidth in GB/s, as a GEMV sees it: the best of 5 sums over `gib` GiB of
    float32 with `threads` torch threads (this process's setting when None)."""
    if threads:
        torch.set_num_threads(threads)
    a = torch.ones(int(gib * 2**28))
    a.sum()
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best

def python_docs_text() -> str:
    """A second domain that needs no download: the Python reference documentation that ships with
    CPython (pydoc_data.topics), topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_eval_text(source: str) -> str:
    """A local text file (.txt), "python-docs" (python_docs_text), or a dataset name (wikitext2)
    fetched through `datasets`."""
    path = Path(source).expanduser()
    if path.is_file():
        from .data import read_text_file

        return read_text_file(path, "evaluation data")
    if source == "python-docs":
        return python_docs_text()
    if source in DATASETS:
        name, config, split, joiner = DATASETS[source]
        try:
            from datasets import load_dataset

            rows = load_dataset(name, config, split=split)["text"]
        except Exception as e:  # offline, hub errors: one line
            raise LlmsqueezeError(
                f"cannot fetch dataset {source!r} ({type(e).__name__}); offline, pass the text file instead, "
                "e.g. --data ../shared/data/wikitext-2/test.txt"
            ) from None
        return joiner.join(rows)
    raise LlmsqueezeError(f"evaluation data {source!r}: no such file, and not one of {', '.join(DATASETS)}")


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """[T] int64 token ids of the whole text (no truncation)."""
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False, truncation=False, verbose=False)
    return enc.input_ids[0]


@torch.no_grad()
def perplexity(
    model, ids: torch.Tensor, seq_len: int = 2048, windows: int | None = 8, progress: bool = True,
    bos_token_id: int | None = None,
) -> dict:
    """ids [T] -> {"ppl", "nll", "windows", "tokens", "bos"} over the first `windows` windows (None:
    all). With `bos_token_id` (data.bos_token_id(tokenizer): the tokenizer puts one first by default)
    each window is BOS + seq_len - 1 text tokens, else seq_len text tokens; seq_len - 1 predictions
    are scored either way."""
    from .lazy import check_positions

    if seq_len < 2:
        raise LlmsqueezeError(f"seq_len={seq_len} is too short: use at least 2 (the protocol uses 2048)")
    if getattr(model, "config", None) is not None:  # past learned positions: one line, not an IndexError
        check_positions(model.config, seq_len, "seq_len")
    width = seq_len - (bos_token_id is not None)  # text tokens per window
    total = ids.numel() // width
    if total == 0:
        raise LlmsqueezeError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}; use a longer text")
    n = total if windows is None else min(windows, total)
    if windows is not None and windows <= 0:
        raise LlmsqueezeError(f"windows={windows} must be positive (or omitted for all {total})")
    device = next(model.parameters()).device
    nlls = []
    bar = tqdm(range(n), desc="perplexity", disable=not progress, unit="window")
    for i in bar:
        x = prepend_bos(ids[i * width : (i + 1) * width].view(1, -1), bos_token_id).to(device)  # [1, seq_len]
        logits = model(x, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="mean").item()
        if not math.isfinite(nll):
            raise LlmsqueezeError(f"window {i} gave a non-finite loss ({nll}): the model's outputs hold NaN/Inf")
        nlls.append(nll)
        bar.set_postfix(ppl=f"{math.exp(sum(nlls) / len(nlls)):.3f}")
    nll = sum(nlls) / len(nlls)
    return {"ppl": math.exp(nll), "nll": nll, "windows": n, "windows_available": total, "seq_len": seq_len,
            "tokens": n * width, "bos": bos_token_id is not None}


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
@torch.no_grad()
def latency(model, prompt_len: int = 128, new_tokens: int = 32, batch: int = 1, repeats: int = 3, seed: int = 0,
            compile: bool | str = False) -> dict:
    """Time prefill (one forward over the prompt) and greedy decode (one token per step with the KV
    cache), best of `repeats` after warm-up. Returns tokens/s for each, time to first token and the
    greedy tokens.

    compile: False runs eager transformers with its dynamic cache; True (or a torch.compile mode,
    "reduce-overhead" for CUDA graphs) runs a static KV cache and a compiled forward, as transformers'
    generate does with cache_implementation="static": the prefill and each decode step then run as
    compiled graphs, so the per-step Python of the modelling code is gone (compilation happens in two
    warm-up rounds, not timed)."""
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # transformers >= 5.x names the KV cache `cache`; earlier releases `past_key_values`
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    if compile:
        forward, new_cache, positions = _static_decoding(model, batch, prompt, prompt_len + new_tokens + 1, compile)
    else:
        forward = model
    best_prefill, best_decode = float("inf"), float("inf")
    # untimed rounds first: caches, lazily built kernel weights; compiled, one eager round (kernel
    # autotuning outside compilation and graph capture), then two compiled (compile, capture)
    warm = 3 if compile else 1
    pos = (lambda a, b: {"position_ids": positions[:, a:b]}) if compile else (lambda a, b: {})
    for r in range(repeats + warm):
        kw = {cache_kw: new_cache()} if compile else {}
        step = model if r == 0 else forward
        t0 = time.perf_counter()
        out = step(input_ids=prompt, use_cache=True, **kw, **pos(0, prompt_len))
        nxt = out.logits[:, -1:].argmax(-1)
        sync()
        t1 = time.perf_counter()
        past = kw[cache_kw] if compile else _cache_of(out)
        tokens = [nxt]
        for i in range(new_tokens):
            p = prompt_len + i
            out = step(input_ids=nxt, use_cache=True, **{cache_kw: past}, **pos(p, p + 1))
            past = past if compile else _cache_of(out)
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(nxt)
        sync()
        t2 = time.perf_counter()
        if r >= warm:
            best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, t2 - t1)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "compile": compile,
        "ttft_s": best_prefill,
        "prefill_tok_s": batch * prompt_len / best_prefill,
        "decode_tok_s": batch * new_tokens / best_decode,
        "threads": torch.get_num_threads(),
        "peak_rss_mib": peak_rss_mib(),
        "tokens": torch.cat(tokens, 1)[0].tolist(),  # the last round's greedy tokens (batch row 0)
    }


def _static_decoding(model, batch: int, prompt: torch.Tensor, max_len: int, mode: bool | str):
    """-> (compiled forward, a function returning the reset static cache, position ids [1, max_len])."""
    from transformers import StaticCache

    cfg = model.config.get_text_config()
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():  # the dtype the model computes in (a float32 embedding of a 16-bit table under --dtype auto)
        act_dtype = model.get_input_embeddings()(prompt[:, :1]).dtype
    cache.early_initialization(batch, cfg.num_key_value_heads, head_dim, act_dtype, prompt.device)
    forward = torch.compile(model.forward, mode=mode if isinstance(mode, str) else None, dynamic=False)

    def new_cache():
        cache.reset()
        return cache

    return forward, new_cache, torch.arange(max_len, device=prompt.device).view(1, -1)


def environment() -> dict:
    """Device and versions, for every results JSON."""
    import platform

    import transformers

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        from . import __version__

        info["llmsqueeze"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return info


def add_protocol_args(ap) -> None:
    """The options of the evaluation protocol (shared/README.md) that every eval/ script comparing
    methods on the real model takes: --model --calib --test --n-samples --seq-len --windows."""
    ap.add_argument("--model", default=str(Path("~/.cache/llmsqueeze/smollm2-135m").expanduser()))
    ap.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt")
    ap.add_argument("--test", default="../shared/data/wikitext-2/test.txt")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)


def model_bos_token_id(model: str | os.PathLike) -> int | None:
    """data.bos_token_id of the tokenizer saved with `model` (a dir or hub id): what an eval/ script
    holding only the model's path and torch-saved token ids (a child run) passes to perplexity."""
    from transformers import AutoTokenizer

    from .data import bos_token_id

    return bos_token_id(AutoTokenizer.from_pretrained(os.path.expanduser(str(model))))


def bos_args(model: str | os.PathLike) -> list[str]:
    """The peer scripts' `--bos ID` (eval/peers/common.py) for `model`'s tokenizer, [] where it puts no
    BOS first: the peers, which run without llmsqueeze, then cut perplexity windows as perplexity() does."""
    bos = model_bos_token_id(model)
    return [] if bos is None else ["--bos", str(bos)]


def protocol_data(args) -> tuple[torch.Tensor, torch.Tensor, str]:
    """-> (calibration token ids [n_samples, seq_len] drawn with seed 0, the test text's token ids,
    the protocol in words for the results JSON), from add_protocol_args' options. Both follow the
    tokenizer's BOS (data.bos_token_id); perplexity's callers pass model_bos_token_id(args.model)."""
    from transformers import AutoTokenizer

    from .data import bos_token_id, calibration_batches

    tok = AutoTokenizer.from_pretrained(args.model)
    calib = calibration_batches(tok, args.calib, args.n_samples, args.seq_len, seed=0)
    test = tokenize_text(tok, load_eval_text(args.test))
    bos = ", BOS first" if bos_token_id(tok) is not None else ""
    protocol = (f"calibration {args.n_samples}x{args.seq_len} tokens (seed 0{bos}) of {args.calib}; perplexity on "
                f"{args.test}, 2048-token windows{bos}, first {args.windows}, float32 CPU")
    return calib, test, protocol


def protocol_files(args, tmp: str) -> tuple[str, str, str]:
    """protocol_data saved once under `tmp` for child processes -> (calib.pt, test.pt, protocol)."""
    calib, test, protocol = protocol_data(args)
    paths = (f"{tmp}/calib.pt", f"{tmp}/test.pt")
    torch.save(calib, paths[0])
    torch.save(test, paths[1])
    return *paths, protocol


def run_json(cmd: list[str]) -> dict:
    """Run an eval child process that prints its result as a JSON line; -> that dict, or
    {"error": "exit N: <last stderr line>"} when it failed or printed none."""
    import json
    import subprocess

    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"error": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}"}
    return json.loads(lines[-1])


def write_results(path: str | Path, results: list, **fields) -> Path:
    """The JSON every eval/ script writes: the command that made it, `fields`, the environment
    (device, versions, date) and the result rows."""
    import json
    import shlex
    import sys

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), **fields,
           "environment": environment(), "results": results}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def compute_summary(model) -> str:
    """What a loaded model computes in on this machine and why (the CPU's instruction sets), one line."""
    from .kernels import cpu
    from .nn import HalfStorageLinear

    dtype = str(next(p.dtype for p in model.parameters() if p.is_floating_point())).removeprefix("torch.")
    kernels = "float32 C kernels on" if cpu.available() else "float32 C kernels off"
    if any(isinstance(m, HalfStorageLinear) for m in model.modules()):
        return f"float32 compute, dense weights kept in {dtype}, {kernels}; CPU {cpu.cpu().describe()}"
    return f"{dtype} compute, {kernels}; CPU {cpu.cpu().describe()}"

