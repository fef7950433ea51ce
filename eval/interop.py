#!/usr/bin/env python3
"""Interoperability on a real model: perplexity through our loader vs through the loaders of the
formats we export to, and the files' sizes (the protocol of shared/README.md).

    python eval/interop.py --model ~/.cache/llmsqueeze/smollm2-135m \
        --data ../shared/data/wikitext-2/test.txt --windows 8

Quantizes the model (RTN 4-bit group 64 asymmetric by default; or pass --src with a llmsqueeze
checkpoint, e.g. a GPTQ one), exports it to compressed-tensors (as is, and with float32 scales) and
GPTQ, and measures perplexity of:
  llmsqueeze checkpoint, our loader            (llmsqueeze.from_pretrained)
  compressed-tensors export, transformers' own compressed-tensors loader (decompressed on CPU), with
    the checkpoint's fp16 scales (it dequantizes in fp16: one rounding per weight) and with float32 scales
  compressed-tensors export, imported by llmsqueeze
  GPTQ export, imported by llmsqueeze
Prints a markdown table and writes JSON to eval/results/interop.json.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

import llmsqueeze
from llmsqueeze.data import bos_token_id
from llmsqueeze.evaluate import load_eval_text, perplexity, tokenize_text, write_results


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path("~/.cache/llmsqueeze/smollm2-135m").expanduser()))
    ap.add_argument("--src", help="an existing llmsqueeze checkpoint to export instead of quantizing --model")
    ap.add_argument("--data", default="../shared/data/wikitext-2/test.txt")
    ap.add_argument("--windows", type=int, default=8, help="8 = quick protocol; 0 = all windows")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--rows", type=int, nargs="+", help="measure only these rows (0-based), e.g. to split a long run")
    ap.add_argument("--workdir", help="where the checkpoints go (default: a temp dir, removed at the end)")
    ap.add_argument("--out", default="eval/results/interop.json")
    args = ap.parse_args()
    windows = args.windows or None
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    tmp = tempfile.TemporaryDirectory(prefix="llmsqueeze-interop-") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    tok = AutoTokenizer.from_pretrained(args.src or args.model)
    ids = tokenize_text(tok, load_eval_text(args.data))
    bos = bos_token_id(tok)  # BOS first in each window where the tokenizer puts it first

    if args.src:
        src = Path(args.src).expanduser()
        scheme = llmsqueeze.check_checkpoint(src)["scheme"]
    else:
        model = llmsqueeze.load_dense(args.model)  # its own dtype (bf16): the saved dense parts keep their size
        scheme = llmsqueeze.QuantScheme(bits=args.bits, group_size=args.group_size, sym=args.sym)
        llmsqueeze.quantize(model, scheme, progress=False)
        src = llmsqueeze.save_quantized(model, work / "llmsqueeze", tokenizer=tok, overwrite=True)
        scheme = scheme.to_dict()
        del model
    exports = {}
    for name, fmt, kw in (("compressed-tensors", "compressed-tensors", {}), ("gptq", "gptq", {}),
                          ("compressed-tensors-f32", "compressed-tensors", {"scale_dtype": "float32"})):
        t0 = time.perf_counter()
        exports[name] = llmsqueeze.export(src, fmt, work / name, overwrite=True, **kw)
        print(f"export {name}: {time.perf_counter() - t0:.1f} s, {weights_bytes(exports[name]) / 2**20:.1f} MiB")

    loaders = [
        ("llmsqueeze checkpoint", "llmsqueeze.from_pretrained", src, lambda p: llmsqueeze.from_pretrained(p, dtype=torch.float32)),
        ("compressed-tensors export", "transformers + compressed-tensors (decompressed)", exports["compressed-tensors"],
         lambda p: AutoModelForCausalLM.from_pretrained(
             p, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))),
        ("compressed-tensors export, float32 scales", "transformers + compressed-tensors (decompressed)",
         exports["compressed-tensors-f32"], lambda p: AutoModelForCausalLM.from_pretrained(
             p, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))),
        ("compressed-tensors export", "llmsqueeze.from_pretrained (import)", exports["compressed-tensors"],
         lambda p: llmsqueeze.from_pretrained(p, dtype=torch.float32)),
        ("gptq export", "llmsqueeze.from_pretrained (import)", exports["gptq"],
         lambda p: llmsqueeze.from_pretrained(p, dtype=torch.float32)),
    ]
    rows = []
    for i, (checkpoint, loader, path, load) in enumerate(loaders):
        if args.rows and i not in args.rows:
            continue
        t0 = time.perf_counter()
        model = load(path).eval()
        t_load = time.perf_counter() - t0
        with torch.no_grad():
            res = perplexity(model, ids, windows=windows, progress=False, bos_token_id=bos)
        rows.append({"checkpoint": checkpoint, "loader": loader, "ppl": res["ppl"], "nll": res["nll"],
                     "windows": res["windows"], "weights_bytes": weights_bytes(path), "load_s": t_load})
        print(f"{checkpoint:42s} {loader:50s} ppl {res['ppl']:.4f}  (load {t_load:.1f} s, "
              f"ppl {time.perf_counter() - t0 - t_load:.1f} s)", flush=True)
        del model

    base = rows[0]["ppl"] if rows[0]["loader"] == loaders[0][1] else None  # our loader's perplexity
    print(f"\nscheme {scheme['bits']}-bit group {scheme['group_size']} {'sym' if scheme['sym'] else 'asym'}; "
          f"{rows[0]['windows']} windows")
    print("| checkpoint | loader | perplexity | vs ours | weights on disk |\n|---|---|---|---|---|")
    for r in rows:
        r["equal_to_3_decimals"] = None if base is None else round(r["ppl"], 3) == round(base, 3)
        vs = "" if base is None else f"{r['ppl'] - base:+.4f}"
        print(f"| {r['checkpoint']} | {r['loader']} | {r['ppl']:.3f} | {vs} | "
              f"{r['weights_bytes'] / 2**20:.1f} MiB |")
    write_results(
        args.out, rows, model=args.src or args.model, scheme=scheme,
        protocol=f"WikiText-2 test, seq_len 2048, {'all' if windows is None else windows} windows, float32 CPU",
        compressed_tensors=__import__("compressed_tensors").__version__,
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
