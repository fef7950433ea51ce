#!/usr/bin/env python3
"""Floating-point formats on the real model, beside llm-compressor and beside our integer schemes.

    python -m venv /work/venvs/llmc && /work/venvs/llmc/bin/pip install torch==2.13.0 llmcompressor
    python eval/float.py --llmc-python /work/venvs/llmc/bin/python [--rows ROW ...]

Rows (each a fresh process; results are kept in the JSON as they come, and a rerun skips the rows
already there unless --redo): dense; ours for every FloatScheme format with RTN (round to nearest,
max scaling: the spec's rounding) and with GPTQ (the format's levels, group scales searched against
the Hessian diagonal); llm-compressor's FP8_DYNAMIC, FP8_BLOCK, NVFP4A16 and NVFP4 presets with its
documented recipe (QuantizationModifier, RTN) and, for NVFP4A16 / NVFP4, GPTQModifier, run in its
own virtualenv on the same calibration ids (eval/peers/llmcompressor_float.py); our integer int8
W8A8 (dynamic, SmoothQuant auto, GPTQ) and w4 g16 / g32 asymmetric GPTQ at the neighbouring bits per
weight. The head stays dense everywhere.

Protocol (../shared/README.md): calibration 128 x 512 tokens at random offsets (seed 0) of
WikiText-2 valid.txt; perplexity on WikiText-2 test.txt and, as a second text from another domain
never calibrated on, Python's own reference documentation (the `pydoc_data.topics` strings shipped
with every CPython: technical prose with code), each cut into 2048-token windows, first `--windows`
(8), float32 on the CPU. Bits per weight count the scales (and nvfp4's global scale) of the
quantized Linears. Prints a table, writes eval/results/float.json and eval/results/float.png
(perplexity vs bits per weight).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMATS = ("fp8", "fp8-block", "fp8-weight", "nvfp4-a16", "nvfp4", "mxfp4")
PEER_PRESET = {"fp8": "FP8_DYNAMIC", "fp8-block": "FP8_BLOCK", "nvfp4-a16": "NVFP4A16", "nvfp4": "NVFP4"}
# row name -> (tool, what): ours "<format>/<method>", "int/<w8a8|w4g16|w4g32>", peer "<PRESET>/<method>"
ROWS = {"dense": ("llmsqueeze", "dense")}
for f in FORMATS:
    for m in ("rtn", "gptq"):
        ROWS[f"{f} {m}"] = ("llmsqueeze", f"{f}/{m}")
for name in ("w8a8", "w4g16", "w4g32"):
    ROWS[f"int {name} gptq"] = ("llmsqueeze", f"int/{name}")
for f, preset in PEER_PRESET.items():
    ROWS[f"{f} llmc-rtn"] = ("llm-compressor", f"{preset}/rtn")
    if f.startswith("nvfp4"):
        ROWS[f"{f} llmc-gptq"] = ("llm-compressor", f"{preset}/gptq")
DEFAULT_ROWS = [r for r in ROWS if not r.startswith("fp8-weight")]


def second_text() -> str:
    from llmsqueeze.evaluate import python_docs_text

    return python_docs_text()


def bits_per_weight(model) -> float:
    """Stored bits per quantized weight over the model's quantized Linears (scales included)."""
    import torch

    from llmsqueeze.nn import QuantLinear
    from llmsqueeze.nn_float import FloatLinear
    from llmsqueeze.nn_int8 import Int8Linear

    bits = weights = 0
    for m in model.modules():
        if isinstance(m, (FloatLinear, Int8Linear, QuantLinear)):
            names = [k for k, v in m._buffers.items() if v is not None and k not in ("bias", "input_scale",
                                                                                      "input_global_scale", "g_idx")]
            bits += sum(8 * m._buffers[k].numel() * m._buffers[k].element_size() for k in names)
            weights += m.in_features * m.out_features
    return bits / weights if weights else float(torch.finfo(torch.float32).bits)


def run_ours(model: str, calib: str, test: str, test2: str, what: str, windows: int) -> dict:
    import time

    import torch

    import llmsqueeze
    from llmsqueeze.evaluate import model_bos_token_id, peak_rss_mib, perplexity

    sys.path.insert(0, str(HERE / "peers"))
    from common import cpu_seconds  # eval/peers/common.py

    torch.manual_seed(0)
    m = llmsqueeze.load_dense(model, dtype=torch.float32).eval()
    res = {"tool": f"llmsqueeze {llmsqueeze.__version__}"}
    if what != "dense":
        kind, method = what.split("/")
        if kind == "int":
            scheme = {"w8a8": llmsqueeze.W8A8Scheme(), "w4g16": llmsqueeze.QuantScheme(bits=4, group_size=16),
                      "w4g32": llmsqueeze.QuantScheme(bits=4, group_size=32)}[method]
            method = "gptq"
        else:  # RTN: the spec's rounding alone, as llm-compressor's presets; GPTQ: our defaults (smoothing auto)
            scheme = llmsqueeze.FloatScheme(format=kind, **({"smooth_alpha": None} if method == "rtn" else {}))
        t0, c0 = time.perf_counter(), cpu_seconds()
        llmsqueeze.quantize(m, scheme, data=torch.load(calib), method=method, progress=False)
        res.update(quantize_s=time.perf_counter() - t0, quantize_cpu_s=cpu_seconds() - c0, peak_rss_mib=peak_rss_mib(),
                   scheme=m.config.quantization_config["scheme"], method=method)
        res["bits_per_weight"] = bits_per_weight(m)
    else:
        res["bits_per_weight"] = 32.0
    bos = model_bos_token_id(model)  # BOS first in each window where the tokenizer puts it first
    res["ppl"] = perplexity(m, torch.load(test), windows=windows, progress=False, bos_token_id=bos)["ppl"]
    res["ppl_test2"] = perplexity(m, torch.load(test2), windows=windows, progress=False, bos_token_id=bos)["ppl"]
    return res




def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = next((r["ppl"] for r in rows if r["row"] == "dense" and "ppl" in r), None)
    groups = {"ours, RTN": ("llmsqueeze", "rtn"), "ours, GPTQ": ("llmsqueeze", "gptq"),
              "llm-compressor, RTN": ("llm-compressor", "rtn"), "llm-compressor, GPTQ": ("llm-compressor", "gptq")}
    for label, (tool, method) in groups.items():
        pts = [(r["bits_per_weight"], r["ppl"], r["row"].split()[0]) for r in rows
               if r.get("tool_name") == tool and r["row"].endswith(method) and "ppl" in r and "bits_per_weight" in r
               and not r["row"].startswith("int")]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=label, marker="o" if tool == "llmsqueeze" else "x")
            for b, p, name in pts:
                ax.annotate(name, (b, p), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ints = [(r["bits_per_weight"], r["ppl"], r["row"].split()[1]) for r in rows if r["row"].startswith("int") and "ppl" in r]
    if ints:
        ax.scatter([p[0] for p in ints], [p[1] for p in ints], label="ours, integer GPTQ", marker="s")
        for b, p, name in ints:
            ax.annotate(name, (b, p), fontsize=7, xytext=(3, -9), textcoords="offset points")
    if dense:
        ax.axhline(dense, color="grey", lw=0.8, ls="--", label=f"dense fp32 ({dense:.2f})")
    ax.set_xlabel("bits per weight (scales included)")
    ax.set_ylabel("WikiText-2 perplexity (8 windows)")
    ax.set_title("SmolLM2-135M: floating-point formats")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from llmsqueeze.evaluate import add_protocol_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--llmc-python", default="/work/venvs/llmc/bin/python", help="python of llm-compressor's venv")
    ap.add_argument("--rows", nargs="*", choices=list(ROWS), default=DEFAULT_ROWS, metavar="ROW",
                    help=f"which rows (default all but fp8-weight): {'; '.join(ROWS)}")
    ap.add_argument("--redo", action="store_true", help="run the rows again even when the JSON has them")
    ap.add_argument("--out", default="eval/results/float.json")
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:  # child: one of our runs
        print(json.dumps(run_ours(*args.one, args.windows)))
        return

    import torch
    from transformers import AutoTokenizer

    from llmsqueeze.evaluate import bos_args, protocol_files, run_json, tokenize_text, write_results

    out = Path(args.out)
    done = {r["row"]: r for r in json.loads(out.read_text())["results"]} if out.exists() else {}
    rows = list(done.values())
    with tempfile.TemporaryDirectory() as tmp:
        calib, test, protocol = protocol_files(args, tmp)
        test2 = f"{tmp}/test2.pt"
        torch.save(tokenize_text(AutoTokenizer.from_pretrained(args.model), second_text()), test2)
        for row in args.rows:
            if row in done and not args.redo and "error" not in done[row]:
                continue
            tool, what = ROWS[row]
            if tool == "llmsqueeze":
                cmd = [sys.executable, __file__, "--windows", str(args.windows), "--one", args.model, calib, test, test2,
                       what]
            else:
                preset, method = what.split("/")
                cmd = [args.llmc_python, str(HERE / "peers" / "llmcompressor_float.py"), args.model, calib, test, *bos_args(args.model),
                       "--test2", test2, "--preset", preset, "--method", method, "--windows", str(args.windows)]
            res = {"row": row, "tool_name": tool, **run_json(cmd)}
            if tool == "llm-compressor" and "ppl" in res:  # the same layout as our row of that format
                ours = next((r for r in rows if r["row"].startswith(row.split()[0] + " ") and "bits_per_weight" in r
                             and r.get("tool_name") == "llmsqueeze"), None)
                if ours is not None:
                    res["bits_per_weight"] = ours["bits_per_weight"]
            rows = [r for r in rows if r["row"] != row] + [res]
            msg = (f"ERROR {res['error']}" if "error" in res else
                   f"ppl {res['ppl']:8.3f}  other text {res.get('ppl_test2', float('nan')):8.3f}  "
                   f"bits/w {res.get('bits_per_weight', float('nan')):6.3f}  quantize {res.get('quantize_s', 0):6.0f} s")
            print(f"{row:22s} {tool:15s} {msg}", flush=True)
            order = list(ROWS)
            rows.sort(key=lambda r: order.index(r["row"]))
            write_results(out, rows, model=args.model, protocol=protocol,
                          second_text="Python reference documentation (pydoc_data.topics of this CPython)",
                          llmcompressor_recipe="QuantizationModifier(targets='Linear', scheme=PRESET, "
                                               "ignore=['lm_head']) / GPTQModifier(same, dampening_frac=0.01)")

    dense = next((r for r in rows if r["row"] == "dense" and "ppl" in r), None)
    print("\n| row | tool | bits/weight | WikiText-2 ppl | vs dense | other text ppl | vs dense | quantize |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['row']} | {r['tool_name']} | | error: {r['error']} | | | | |")
            continue
        d1 = f"{100 * (r['ppl'] / dense['ppl'] - 1):+.2f}%" if dense else ""
        d2 = f"{100 * (r['ppl_test2'] / dense['ppl_test2'] - 1):+.2f}%" if dense and "ppl_test2" in r else ""
        q = f"{r['quantize_s']:.0f} s" if "quantize_s" in r else ""
        b = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else ""
        print(f"| {r['row']} | {r['tool_name']} | {b} | {r['ppl']:.3f} | {d1} | {r.get('ppl_test2', float('nan')):.3f} "
              f"| {d2} | {q} |")
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
