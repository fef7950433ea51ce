#!/usr/bin/env python3
"""Methods past one-shot GPTQ (learned rounding: --method autoround) beside GPTQ, on the real model,
same calibration samples, same protocol (shared/README.md).

    python eval/beyond_gptq.py --schemes 3:64:asym --runs autoround gptq
    python eval/beyond_gptq.py --schemes 3:64:asym --runs 'autoround:{"iters": 50, "init": "clip"}'
    python eval/beyond_gptq.py --schemes 3:64:asym --runs autoround peer-autoround peer-llmc-gptq \
        --autoround-python /work/venvs/arpeer/bin/python --llmc-python /work/venvs/llmc/bin/python

Peers run in their own virtualenvs on the same token ids and evaluate with the same windows:
`peer-autoround[:{"iters": 200}]` is Intel's AutoRound (eval/peers/autoround_peer.py, installed with
`pip install torch==2.13.0 auto-round==0.16.1`), `peer-llmc-gptq` llm-compressor's GPTQModifier
(eval/peers/llmcompressor_gptq.py).

Calibration: 128 samples x 512 tokens at random offsets (seed 0) of WikiText-2 valid.txt, tokenized
once here and handed to every run as token ids. Perplexity: WikiText-2 test, 2048-token windows, first
8, float32 CPU. Each run is a fresh process: wall time of the quantization alone, peak RSS, and the
machine's load average before/after (the CPU may be shared: times are inflated by other jobs).
Prints a markdown table and writes eval/results/beyond_gptq.json (rows appended across invocations
with the same --out, so long runs can be done one by one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def run_one(model: str, calib: str, test: str, bits: int, group: int, sym: bool, method: str, opts: dict,
            windows: int, threads: int = 0) -> dict:
    import logging
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)

    import llmsqueeze
    from llmsqueeze.evaluate import model_bos_token_id, peak_rss_mib, perplexity

    sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
    from common import cpu_seconds  # eval/peers/common.py

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    ids = torch.load(calib)
    model_ = llmsqueeze.load_dense(model, dtype=torch.float32).eval()
    load0 = os.getloadavg()
    t0, c0 = time.perf_counter(), cpu_seconds()
    llmsqueeze.quantize(model_, llmsqueeze.QuantScheme(bits=bits, group_size=group, sym=sym), data=ids,
                        method=method, progress=False, **opts)
    tq, cq = time.perf_counter() - t0, cpu_seconds() - c0
    load1 = os.getloadavg()
    rss = peak_rss_mib()
    bos = model_bos_token_id(model)  # BOS first in each window where the tokenizer puts it first
    ppl = perplexity(model_, torch.load(test), windows=windows, progress=False, bos_token_id=bos)["ppl"]
    report = getattr(model_, "_llmsqueeze_report", None)
    blocks = [r for r in (report or []) if "block" in r]
    return {"tool": f"llmsqueeze {llmsqueeze.__version__}", "method": method, "options": opts,
            "method_args": model_.config.quantization_config.get("method_args"), "quantize_s": tq, "quantize_cpu_s": cq,
            "peak_rss_mib": rss, "ppl": ppl, "loadavg_before": load0, "loadavg_after": load1,
            "threads": torch.get_num_threads(), "block_losses": blocks}


def peer_command(args, method: str, opts: dict, calib: str, test: str, bits: int, group: int,
                 sym: bool) -> list[str] | None:
    """The command line of a peer run in its own venv, or None for one of ours."""
    from llmsqueeze.evaluate import bos_args

    here = Path(__file__).resolve().parent / "peers"
    common = [args.model, calib, test, *bos_args(args.model), "--bits", str(bits), "--group-size", str(group), "--windows",
              str(args.windows), *(["--sym"] if sym else [])]
    threads = ["--threads", str(args.threads)] if args.threads else []
    if method == "peer-autoround":
        extra = [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", str(v))]
        return [args.autoround_python, str(here / "autoround_peer.py"), *common, *threads, *extra]
    if method == "peer-llmc-gptq":
        return [args.llmc_python, str(here / "llmcompressor_gptq.py"), *common, *threads]
    if method.startswith("peer-"):
        raise SystemExit(f"unknown peer run {method!r}: use peer-autoround or peer-llmc-gptq")
    return None


def parse_run(text: str) -> tuple[str, dict]:
    method, _, opts = text.partition(":")
    return method, json.loads(opts) if opts else {}


def main() -> None:
    from llmsqueeze.evaluate import add_protocol_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--schemes", nargs="*", default=["3:64:asym", "4:64:asym", "2:64:asym"])
    ap.add_argument("--runs", nargs="*", default=["autoround"],
                    help='method[:json options for quantize()], e.g. gptq autoround \'autoround:{"iters": 100}\'')
    ap.add_argument("--out", default="eval/results/beyond_gptq.json")
    ap.add_argument("--autoround-python", default="/work/venvs/arpeer/bin/python",
                    help="python of AutoRound's venv (for peer-autoround runs)")
    ap.add_argument("--llmc-python", default="/work/venvs/llmc/bin/python",
                    help="python of llm-compressor's venv (for peer-llmc-gptq runs)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (default: torch's own)")
    ap.add_argument("--one", nargs=8, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:  # child: one run
        model, calib, test, bits, group, sym, method, opts = args.one
        print(json.dumps(run_one(model, calib, test, int(bits), int(group), sym == "1", method, json.loads(opts),
                                 args.windows, args.threads)))
        return

    import shlex
    import time

    from llmsqueeze.evaluate import protocol_files, run_json, write_results

    out = Path(args.out)
    rows = json.loads(out.read_text())["results"] if out.exists() else []
    schemes = [(int(b), int(g), s == "sym") for b, g, s in (x.split(":") for x in args.schemes)]
    cmdline = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    with tempfile.TemporaryDirectory() as tmp:
        calib, test, protocol = protocol_files(args, tmp)
        for bits, group, sym in schemes:
            name = f"w{bits} g{group} {'sym' if sym else 'asym'}"
            for spec in args.runs:
                method, opts = parse_run(spec)
                cmd = peer_command(args, method, opts, calib, test, bits, group, sym)
                if cmd is None:
                    cmd = [sys.executable, __file__, "--windows", str(args.windows), "--threads", str(args.threads),
                           "--one", args.model, calib, test, str(bits), str(group), "1" if sym else "0", method,
                           json.dumps(opts)]
                t0 = time.time()
                load0 = os.getloadavg()
                res = run_json(cmd)
                if method.startswith("peer-") and "error" not in res:
                    res.update(loadavg_before=load0, loadavg_after=os.getloadavg(), threads=args.threads or None)
                row = {"scheme": name, "bits": bits, "group_size": group, "sym": sym, "run": spec,
                       "command": cmdline, "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t0)), **res}
                rows.append(row)
                if "error" in res:
                    print(f"{name:14s} {spec:40s} ERROR {res['error']}", flush=True)
                else:
                    print(f"{name:14s} {spec:40s} ppl {res['ppl']:8.3f}  quantize {res['quantize_s']:7.1f} s  "
                          f"load {res['loadavg_before'][0]:.1f}->{res['loadavg_after'][0]:.1f}", flush=True)
                write_results(  # after every run: a long series keeps what it has
                    out, rows, model=args.model,
                    protocol=protocol,
                )

    print("\n| scheme | run | perplexity | quantize time | load avg (1 min, before/after) |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['scheme']} | {r['run']} | error: {r['error']} | | |")
        else:
            print(f"| {r['scheme']} | `{r['run']}` | {r['ppl']:.2f} | {r['quantize_s']:.0f} s | "
                  f"{r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f} |")


if __name__ == "__main__":
    main()
