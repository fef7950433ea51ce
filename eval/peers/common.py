"""What every peer script shares (they run in the peers' own virtualenvs, without llmsqueeze): the
perplexity of the project's protocol (the windows of llmsqueeze.evaluate.perplexity) and the one JSON
line a failed run prints."""
import argparse
import json
import math
import resource
import time
import traceback

import torch
import torch.nn.functional as F


def peer_parser() -> argparse.ArgumentParser:
    """The arguments every peer script takes: MODEL CALIB.pt TEST.pt, --windows (perplexity windows),
    --bos (the BOS token id that leads each window, where the model's tokenizer puts one first:
    llmsqueeze.evaluate.bos_args) and --threads (0: torch's default)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("test")
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 2048 tokens (the pruning peer: 0 skips it)")
    ap.add_argument("--bos", type=int, default=None, help="BOS token id first in each perplexity window")
    ap.add_argument("--threads", type=int, default=0)
    return ap


def load_inputs(args):
    """-> (the dense model in float32, calibration ids [n, T], test ids [N]) from peer_parser's
    arguments, torch's threads set first."""
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    return model, torch.load(args.calib), torch.load(args.test)


@torch.no_grad()
def perplexity(model, ids, seq_len=2048, windows=8, bos=None):
    """llmsqueeze.evaluate.perplexity's windows of ids [T], which this venv cannot import: seq_len text
    tokens each, or the BOS id `bos` and seq_len - 1 text tokens."""
    width = seq_len - (bos is not None)
    nlls = []
    for i in range(min(windows, ids.numel() // width)):
        x = ids[i * width : (i + 1) * width]
        x = (x if bos is None else torch.cat([torch.tensor([bos], dtype=x.dtype), x])).view(1, -1)
        logits = model(x, use_cache=False).logits.float()
        nlls.append(F.cross_entropy(logits[0, :-1], x[0, 1:]).item())
    return math.exp(sum(nlls) / len(nlls))


def print_error(result: dict, e: Exception) -> None:
    """The run's result with the error's first line and the traceback's tail, as one JSON line."""
    result.update(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                  traceback=traceback.format_exc()[-2000:])
    print(json.dumps(result))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children (compile workers): a run's
    cost that, unlike wall time, a second job on the machine does not inflate much."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(result: dict, fn, key: str = "quantize") -> bool:
    """Run fn() (a peer's quantization or pruning) and record {key}_s, {key}_cpu_s and the process's
    peak_rss_mib in `result`; -> True. If fn raises, print the result with the error (print_error)
    and -> False: the caller returns."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    try:
        fn()
    except Exception as e:  # e.g. a group size that does not divide the width
        print_error(result, e)
        return False
    result[f"{key}_s"] = time.perf_counter() - t0
    result[f"{key}_cpu_s"] = cpu_seconds() - c0
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return True


def oneshot_timed(result: dict, model, calib: torch.Tensor, recipe, key: str = "quantize") -> bool:
    """llm-compressor's oneshot on calibration token ids [n_samples, seq_len] (every sample, whole), timed."""
    from datasets import Dataset
    from llmcompressor import oneshot

    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    return timed(result, lambda: oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=calib.shape[1],
                                         num_calibration_samples=calib.shape[0]), key)
