#!/usr/bin/env python3
"""GGUF exports on the real model by our own protocol: learned rounding (autoround) into the GGML
types beside GPTQ (and RTN) into the same types, each exported to .gguf and read back by our loader.

    python eval/gguf_autoround.py --rows "q4_k_m autoround" "q4_0 autoround" "q4_k_m gptq" "q4_0 gptq" \
        --iters 200 --threads 1

Each row (a fresh process): llmsqueeze.quantize(model, GGUFScheme(mix=MIX), method=METHOD) on the
protocol's calibration ids (../shared/README.md: 128 x 512 tokens at random offsets, seed 0, of
WikiText-2 valid.txt), save_quantized, `export --format gguf` (the file llama.cpp would run: the
embeddings in llama-quantize's type for them, Q8_0 on SmolLM2), then llmsqueeze.from_pretrained(FILE.gguf)
(our GGUF loader: each block Linear a GGUFLinear of the file's bytes) and its perplexity on WikiText-2
test.txt and on Python's reference documentation (pydoc_data.topics, never calibrated on), 2048-token
windows, first --windows (8), float32 on the CPU. These are NOT llama-perplexity's numbers in
eval/results/gguf.json (it scores only the second half of each 2048-token chunk): compare rows of
this file with each other. Results go to eval/results/gguf_autoround.json as they come (a rerun skips
rows already there unless --redo).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = Path("~/.cache/llmsqueeze/gguf-autoround").expanduser()
MIXES = ("q4_k_m", "q4_0", "q3_k_m")
METHODS = ("rtn", "gptq", "autoround")
ROWS = [f"{m} {meth}" for m in MIXES for meth in METHODS]


def cpu_flags() -> list[str]:
    want = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile"}
    return sorted(want & set(Path("/proc/cpuinfo").read_text().split()))


def run_one(model_path: str, calib: str, test: str, test2: str, row: str, iters: int, windows: int,
            threads: int) -> dict:
    import torch

    import llmsqueeze
    from llmsqueeze import GGUFScheme
    from llmsqueeze.evaluate import model_bos_token_id, perplexity

    import logging

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mix, method = row.split()
    WORK.mkdir(parents=True, exist_ok=True)  # the run's log (a block per line) to follow it while it runs
    logging.basicConfig(filename=WORK / f"{row.replace(' ', '-')}.log", level=logging.INFO,
                        format="%(asctime)s %(message)s")
    m = llmsqueeze.load_dense(model_path, dtype=torch.float32).eval()
    kw = {"iters": iters} if method == "autoround" else {}
    data = None if method == "rtn" else torch.load(calib)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    llmsqueeze.quantize(m, GGUFScheme(mix=mix), data=data, method=method, progress=False, **kw)
    res = {"row": row, "quantize_s": round(time.perf_counter() - t0, 1), "loadavg_before": load0,
           "loadavg_after": os.getloadavg(), "threads": threads,
           "method_args": m.config.quantization_config["method_args"]}
    cli = (f"llmsqueeze quantize {model_path} --scheme gguf:{mix} --method {method}"
           + ("" if method == "rtn" else " --calib ../shared/data/wikitext-2/valid.txt --n-samples 128 --seq-len 512 --seed 0")
           + (f" --iters {iters}" if method == "autoround" else "") + f" --out {WORK / row.replace(' ', '-')}")
    res["command"] = cli + f" && llmsqueeze export {WORK / row.replace(' ', '-')} --format gguf --out " \
                           f"{WORK / row.replace(' ', '-')}.gguf"
    report = getattr(m, "_llmsqueeze_report", [])
    if method == "autoround":
        res["block_losses"] = [{k: r[k] for k in ("block", "loss_before", "loss_after", "seconds")} for r in report]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)  # the export writes the tokenizer into the .gguf
    d = llmsqueeze.save_quantized(m, WORK / row.replace(" ", "-"), tokenizer=tok, overwrite=True)
    del m
    f = llmsqueeze.export(d, "gguf", WORK / f"{row.replace(' ', '-')}.gguf", overwrite=True, progress=False)
    res["file_bytes"] = f.stat().st_size
    g = llmsqueeze.from_pretrained(f).eval()
    bos = model_bos_token_id(model_path)
    res["ppl"] = perplexity(g, torch.load(test), windows=windows, progress=False, bos_token_id=bos)["ppl"]
    res["ppl_test2"] = perplexity(g, torch.load(test2), windows=windows, progress=False, bos_token_id=bos)["ppl"]
    return res


def main() -> None:
    from llmsqueeze.evaluate import add_protocol_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--rows", nargs="*", choices=ROWS, default=["q4_k_m autoround", "q4_0 autoround"], metavar="ROW",
                    help=f"which rows: {'; '.join(ROWS)}")
    ap.add_argument("--iters", type=int, default=200, help="autoround steps per block (the uniform default: 200)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "gguf_autoround.json"))
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.model, *args.one, args.iters, args.windows, args.threads)))
        return

    import torch
    from transformers import AutoTokenizer

    from llmsqueeze.evaluate import python_docs_text, protocol_files, run_json, tokenize_text, write_results

    WORK.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    rows = json.loads(out.read_text())["results"] if out.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        calib, test, protocol = protocol_files(args, tmp)
        test2 = f"{tmp}/test2.pt"
        torch.save(tokenize_text(AutoTokenizer.from_pretrained(args.model), python_docs_text()), test2)
        for row in args.rows:
            if any(r["row"] == row and "error" not in r for r in rows) and not args.redo:
                continue
            cmd = [sys.executable, __file__, "--model", args.model, "--windows", str(args.windows), "--iters",
                   str(args.iters), "--threads", str(args.threads), "--one", calib, test, test2, row]
            res = {"row": row, **run_json(cmd)}
            rows = [r for r in rows if r["row"] != row] + [res]
            msg = (f"ERROR {res['error']}" if "error" in res else
                   f"ppl {res['ppl']:8.3f}  python docs {res['ppl_test2']:8.3f}  quantize {res['quantize_s']:6.0f} s")
            print(f"{row:20s} {msg}", flush=True)
            rows.sort(key=lambda r: ROWS.index(r["row"]))
            write_results(out, rows, model=args.model, protocol=protocol + "; perplexity of the exported .gguf read "
                          "by llmsqueeze.from_pretrained (Q8_0 embeddings included)",
                          second_text="Python reference documentation (pydoc_data.topics of this CPython)",
                          cpu_flags=cpu_flags())


if __name__ == "__main__":
    main()
