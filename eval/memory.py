#!/usr/bin/env python3
"""Peak host memory of quantizing a model bigger than you would like to hold: lazy (block by block
from the shards, straight to disk) vs loading the whole model first.

    python eval/memory.py                       # all four rows (RTN and GPTQ, lazy and not)
    python eval/memory.py --rows lazy-rtn,full-rtn,lazy-gptq --gptq-layers 4

Builds a random bfloat16 Llama once (default 24 layers x hidden 2048 x intermediate 5504, vocab
32000: 1.35 B parameters, 2.7 GB), written shard by shard so the build itself stays small, into
~/.cache/llmsqueeze/random-llama-2048x24. Each row then runs in a fresh process and reports its peak
RSS (VmHWM) minus the RSS after imports (the interpreter + torch + transformers baseline).
GPTQ rows calibrate on random token ids (--n-samples x --seq-len); --gptq-layers N quantizes only
the Linears of the first N blocks (the others are still loaded, run and written) to keep the row
short on a small CPU. Prints a table and writes eval/results/memory.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = ("lazy-rtn", "full-rtn", "lazy-gptq", "full-gptq")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def rss_mib() -> float:
    """Resident memory now (VmRSS)."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak resident memory of this process image (VmHWM). Not ru_maxrss: Linux carries that over
    from the parent through fork and exec, so a child would inherit the builder's peak."""
    try:
        return _status_mib("VmHWM")
    except (OSError, KeyError):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(path: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> int:
    """A random bf16 Llama, one shard per block (plus one for embeddings, norm and head); -> bytes."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmsqueeze.streaming import Entry, write_safetensors

    if (path / "model.safetensors.index.json").is_file():
        return sum(p.stat().st_size for p in path.glob("*.safetensors"))
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, max_position_embeddings=4096,
                      tie_word_embeddings=False, dtype="bfloat16")
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    groups: dict[str, list[tuple[str, tuple]]] = {}
    for name, p in model.state_dict().items():
        part = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(part, []).append((name, tuple(p.shape)))
    n = len(groups)
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for k, tensors in enumerate(groups.values()):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        entries = []
        for name, shape in tensors:
            t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
            entries.append(Entry.of_tensor(name, t.to(torch.bfloat16)))
            weight_map[name] = fname
            total += entries[-1].nbytes
        write_safetensors(tmp / fname, entries)
        print(f"  built {fname}", file=sys.stderr)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(tmp)
    tmp.rename(path)
    return total


def child(row: str, model: str, out: str, n_samples: int, seq_len: int, gptq_layers: int) -> dict:
    """One row, in this (fresh) process: -> measurements."""
    import accelerate  # noqa: F401 - everything imported before the baseline is taken
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    import llmsqueeze
    from llmsqueeze.pipeline import quantize_lazy

    base = rss_mib()
    method = row.split("-")[1]
    kw = {}
    if method == "gptq" and gptq_layers:
        kw["include"] = [rf"^model\.layers\.({'|'.join(map(str, range(gptq_layers)))})\."]
    scheme = llmsqueeze.QuantScheme(bits=4, group_size=128, **kw)
    data = None
    if method == "gptq":
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        data = torch.randint(0, vocab, (n_samples, seq_len), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    if row.startswith("lazy"):
        quantize_lazy(model, out, scheme, data=data, method=method, progress=False, device="cpu")
    else:
        m = llmsqueeze.load_dense(model)
        llmsqueeze.quantize(m, scheme, data=data, method=method, progress=False, device="cpu")
        llmsqueeze.save_quantized(m, out)
    secs = time.perf_counter() - t0
    out_bytes = sum(p.stat().st_size for p in Path(out).iterdir())
    peak = peak_rss_mib()
    return {"row": row, "baseline_rss_mib": base, "peak_rss_mib": peak, "peak_above_baseline_mib": peak - base,
            "seconds": secs, "output_mib": out_bytes / 2**20, "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(Path("~/.cache/llmsqueeze/random-llama-2048x24").expanduser()))
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5504)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--gptq-layers", type=int, default=0, help="GPTQ rows: quantize only the first N blocks (0: all)")
    ap.add_argument("--out", default="eval/results/memory.json")
    ap.add_argument("--child", nargs=2, metavar=("ROW", "OUT_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        res = child(args.child[0], args.model_dir, args.child[1], args.n_samples, args.seq_len, args.gptq_layers)
        print(json.dumps(res))
        return

    model_dir = Path(args.model_dir)
    model_bytes = build(model_dir, args.layers, args.hidden, args.intermediate, args.vocab)
    model_mib = model_bytes / 2**20
    print(f"model: {model_dir} ({model_mib:,.0f} MiB bf16)")
    results = []
    for row in args.rows.split(","):
        if row not in ROWS:
            sys.exit(f"unknown row {row!r}: use {', '.join(ROWS)}")
        with tempfile.TemporaryDirectory(prefix="llmsqueeze-mem-") as tmp:
            cmd = [sys.executable, __file__, "--model-dir", str(model_dir), "--n-samples", str(args.n_samples),
                   "--seq-len", str(args.seq_len), "--gptq-layers", str(args.gptq_layers),
                   "--child", row, str(Path(tmp) / "q")]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{row} failed:\n{r.stderr[-3000:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
        res["fraction_of_model"] = res["peak_above_baseline_mib"] / model_mib
        results.append(res)
        print(f"  {row}: {res['peak_above_baseline_mib']:,.0f} MiB above baseline "
              f"({res['fraction_of_model']:.1%} of the model), {res['seconds']:.0f} s", flush=True)

    print(f"\n| run | peak RSS above baseline | of the model ({model_mib:,.0f} MiB) | baseline | time | output |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['peak_above_baseline_mib']:,.0f} MiB | {r['fraction_of_model']:.1%} | "
              f"{r['baseline_rss_mib']:,.0f} MiB | {r['seconds']:.0f} s | {r['output_mib']:,.0f} MiB |")
    from llmsqueeze.evaluate import write_results

    write_results(args.out, results, model={"dir": str(model_dir), "layers": args.layers, "hidden": args.hidden,
                                            "intermediate": args.intermediate, "vocab": args.vocab,
                                            "bytes": model_bytes, "dtype": "bfloat16"},
                  scheme="4-bit group 128 asym", n_samples=args.n_samples, seq_len=args.seq_len,
                  gptq_layers=args.gptq_layers or args.layers, limit="peak above baseline <= 25% of the model")


if __name__ == "__main__":
    main()
