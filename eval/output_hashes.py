"""Hashes of what each method writes on the real model, for refactors that must not change a bit.

Runs the CLI (the path users take: lazy where the method allows it, and --no-lazy beside it) for
RTN, GPTQ, AWQ, AWQ+GPTQ, autoround (short), a non-uniform grid, mixed precision, Wanda, SparseGPT,
2:4 + 4-bit and W8A8 on SmolLM2-135M with a small calibration set, and hashes every tensor of each
checkpoint (name, dtype, shape, bytes) and its quantization_config. Run it on two commits and diff
the JSON:

    python eval/output_hashes.py --out eval/results/output_hashes_before.json      # on main
    python eval/output_hashes.py --out eval/results/output_hashes_after.json       # after the change
    python eval/output_hashes.py --compare eval/results/output_hashes_before.json eval/results/output_hashes_after.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = Path(os.environ.get("LLMSQUEEZE_SMOLLM2", "~/.cache/llmsqueeze/smollm2-135m")).expanduser()
CALIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"
SMALL = ["--calib", str(CALIB), "--n-samples", "8", "--seq-len", "128"]

RUNS = {
    "rtn w4 g128": ["quantize", "--bits", "4", "--group-size", "128"],
    "rtn w4 g128 no-lazy": ["quantize", "--bits", "4", "--group-size", "128", "--no-lazy"],
    "rtn w3 g64 sym lm-head": ["quantize", "--bits", "3", "--group-size", "64", "--sym", "--lm-head"],
    "gptq w4 g64": ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "64", *SMALL],
    # the clip search (GPTQ's default) costs minutes on 2 cores and is the same code in every path: one
    # run above has it, the others turn it off
    "gptq w4 g64 no-lazy no-clip": ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "64", "--no-lazy",
                                    "--no-clip-search", *SMALL],
    "gptq w4 g64 lazy no-clip": ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "64",
                                 "--no-clip-search", *SMALL],
    "gptq w4 g128 act-order dynamic": ["quantize", "--method", "gptq", "--bits", "4", "--act-order", "dynamic",
                                       "--no-clip-search", *SMALL],
    "gptq nf4 g64": ["quantize", "--method", "gptq", "--grid", "nf", "--bits", "4", "--group-size", "64", *SMALL],
    "awq w4 g64": ["quantize", "--method", "awq", "--bits", "4", "--group-size", "64", *SMALL],
    "awq-gptq w4 g64": ["quantize", "--method", "awq-gptq", "--bits", "4", "--group-size", "64", "--no-clip-search",
                        *SMALL],
    "autoround w4 g64 iters 4": ["quantize", "--method", "autoround", "--bits", "4", "--group-size", "64", "--iters", "4",
                                 *SMALL],
    "mixed rtn avg 3.5": ["quantize", "--avg-bits", "3.5", "--group-size", "64", *SMALL],
    "w8a8 dynamic sq auto rtn": ["quantize", "--scheme", "w8a8", *SMALL],
    "w8a8 static gptq": ["quantize", "--scheme", "w8a8", "--act", "static", "--method", "gptq", *SMALL],
    "magnitude 50%": ["prune", "--method", "magnitude", "--sparsity", "0.5"],
    "wanda 50%": ["prune", "--method", "wanda", "--sparsity", "0.5", *SMALL],
    "sparsegpt 2:4": ["prune", "--method", "sparsegpt", "--pattern", "2:4", *SMALL],
    "sparsegpt 2:4 + w4 g64": ["prune", "--method", "sparsegpt", "--pattern", "2:4", "--bits", "4", "--group-size", "64",
                               *SMALL],
    "structured mlp 0.75": ["prune", "--structured", "--mlp-ratio", "0.75", *SMALL],
}


def checkpoint_hash(d: Path) -> dict:
    """sha256 over every tensor (sorted names; name, dtype, shape, bytes), and the quantization_config."""
    from safetensors import safe_open

    h = hashlib.sha256()
    n = 0
    names = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                names[k] = f
    for k in sorted(names):
        with safe_open(names[k], "pt") as fh:
            t = fh.get_tensor(k).contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
        n += 1
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg.get("quantization_config")
    return {"tensors": n, "sha256": h.hexdigest(),
            "quantization_config_sha256": hashlib.sha256(json.dumps(qc, sort_keys=True).encode()).hexdigest(),
            "quantization_config": qc}


def run(names: list[str], out: Path) -> dict:
    results = json.loads(out.read_text())["runs"] if out.is_file() else {}  # a run cut short continues
    for name in names:
        if name in results and "error" not in results[name]:
            continue
        argv = RUNS[name]
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp) / "out"
            cmd = [sys.executable, "-m", "llmsqueeze.cli", argv[0], str(MODEL), *argv[1:], "--out", str(dst)]
            if argv[0] == "prune":
                cmd.append("--quiet")
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            secs = time.perf_counter() - t0
            if p.returncode:
                results[name] = {"error": p.stderr.strip().splitlines()[-1:], "seconds": secs}
            else:
                results[name] = {**checkpoint_hash(dst), "seconds": round(secs, 1)}
        r = results[name]
        print(f"{name:34s} {r.get('sha256', r.get('error'))!s:70.70s} {r['seconds']:7.1f} s", flush=True)
        out.write_text(json.dumps({"command": " ".join(sys.argv), "model": str(MODEL), "runs": results}, indent=1) + "\n")
    return results


def compare(a: Path, b: Path) -> int:
    ra, rb = json.loads(a.read_text())["runs"], json.loads(b.read_text())["runs"]
    bad = 0
    print(f"| run | {a.name} | {b.name} | same |\n|---|---|---|---|")
    for name in [*ra, *(n for n in rb if n not in ra)]:
        x, y = ra.get(name, {}), rb.get(name, {})
        if "sha256" not in x or "sha256" not in y:
            verdict = "not run on both"
        else:
            same = x["sha256"] == y["sha256"] and x.get("quantization_config") == y.get("quantization_config")
            bad += not same
            verdict = "yes" if same else "NO"
        print(f"| {name} | {str(x.get('sha256', x.get('error', '-')))[:16]} | "
              f"{str(y.get('sha256', y.get('error', '-')))[:16]} | {verdict} |")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("eval/results/output_hashes.json"))
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), metavar="RUN")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    run(args.runs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
