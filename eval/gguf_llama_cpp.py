#!/usr/bin/env python3
"""Our GGUF exports in llama.cpp itself, beside llama.cpp's own quantizer, on the real model.

    python eval/gguf_llama_cpp.py [--types q4_k_m q3_k_m q4_0] [--chunks 8] [--no-bench] [--redo]

llama.cpp is built from the llama-cpp-python source distribution (PyPI; cmake on its vendor/llama.cpp,
only the tools used here; about 20 minutes on 2 cores) into ~/.cache/llmsqueeze/llama.cpp. Built for AVX2 + FMA + F16C (GGML_NATIVE=OFF): a native
build for a CPU whose cpuinfo lists AMX stopped with "Illegal instruction" in this sandbox.

Rows per llama.cpp type T (a `llama-quantize` file type such as Q4_K_M):
  llama.cpp             llama-quantize of the dense GGUF (llama.cpp's convert_hf_to_gguf.py, f32: the bf16
                        weights exactly)
  llama.cpp + imatrix   the same with an importance matrix from llama-imatrix on our calibration text
  ours rtn              llmsqueeze quantize --scheme gguf:T (no data), exported with --format gguf
  ours gptq             llmsqueeze quantize --scheme gguf:T --method gptq on our calibration ids (also
                        awq-gptq with --methods: AWQ balancing, then GPTQ)
Each file: its size, its tensor types (ours must equal llama.cpp's no-imatrix mix tensor for tensor),
llama-perplexity on WikiText-2 test.txt and on Python's reference documentation (pydoc_data.topics: a
second domain, never calibrated on) with -c 2048 over the first --chunks chunks (llama-perplexity
scores the second half of each chunk), a greedy generation, and llama-bench (pp128, tg64, 2 threads, 10 repetitions).

Calibration (../shared/README.md): 128 x 512 tokens at random offsets (seed 0) of WikiText-2 valid.txt;
for llama-imatrix the same 128 samples are decoded to text, one per line, and read with -c 512.
Results are kept in eval/results/gguf.json as they come (a rerun skips rows already there unless
--redo); prints a table and writes eval/results/gguf.png (perplexity vs bits per weight).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared"
MODEL = Path("~/.cache/llmsqueeze/smollm2-135m").expanduser()
CACHE = Path("~/.cache/llmsqueeze/llama.cpp").expanduser()
WORK = Path("~/.cache/llmsqueeze/gguf-eval").expanduser()
OUT = HERE / "results" / "gguf.json"
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-bench", "llama-completion")


def sh(cmd: list[str], log: Path | None = None, **kw) -> str:
    """Run a command; its output (stdout + stderr) returned, or written to `log`; a failure stops the script."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    text = p.stdout + p.stderr
    if log is not None:
        log.write_text(text)
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{text[-2000:]}")
    return text


def build_llama_cpp() -> tuple[Path, Path]:
    """-> (bin dir, llama.cpp source dir), building once into CACHE."""
    src = next(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    bin_dir = CACHE / "build" / "bin"
    if src is None:
        CACHE.mkdir(parents=True, exist_ok=True)
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python", "-d", CACHE])
        tar = next(CACHE.glob("llama_cpp_python-*.tar.gz"))
        sh(["tar", "xzf", tar, "-C", CACHE])
        src = next(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not all((bin_dir / t).exists() for t in TOOLS):
        print("building llama.cpp (about 20 minutes on 2 cores) ...", file=sys.stderr)
        sh(["cmake", "-S", src, "-B", CACHE / "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=OFF",
            "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON"])
        sh(["cmake", "--build", CACHE / "build", "-j", str(os.cpu_count() or 2), "--target", *TOOLS])
    return bin_dir, src


def llama_cpp_version(src: Path) -> str:
    m = re.search(r"llama_cpp_python-([\d.]+)", str(src))
    return f"llama-cpp-python {m.group(1) if m else '?'} sdist (vendor/llama.cpp)"


def second_text() -> str:
    from llmsqueeze.evaluate import python_docs_text

    return python_docs_text()


def cpu_flags() -> list[str]:
    flags = set(open("/proc/cpuinfo").read().split())
    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile"})


def calibration_text(path: Path) -> None:
    """Our 128 x 512 calibration samples (seed 0, valid.txt) decoded, one per line, for llama-imatrix."""
    from transformers import AutoTokenizer

    from llmsqueeze.data import calibration_batches, load_calibration_texts

    tok = AutoTokenizer.from_pretrained(MODEL)
    ids = calibration_batches(tok, load_calibration_texts(str(SHARED / "data/wikitext-2/valid.txt")), 128, 512, 0)
    path.write_text("\n".join(tok.decode(row) for row in ids) + "\n")


def perplexity(bin_dir: Path, model: Path, text: Path, chunks: int) -> dict:
    t0 = time.time()
    out = sh([bin_dir / "llama-perplexity", "-m", model, "-f", text, "-c", 2048, "--chunks", chunks, "-t", 2, "-b", 2048])
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out)
    n = re.search(r"tokenizing the input[\s\S]*?calculating perplexity over (\d+) chunks", out)
    if m is None:
        sys.exit(f"no perplexity in llama-perplexity's output for {model}:\n{out[-1500:]}")
    return {"ppl": float(m.group(1)), "ppl_err": float(m.group(2)), "chunks": int(n.group(1)) if n else None,
            "seconds": round(time.time() - t0, 1), "warnings": [x for x in out.splitlines() if " W " in x][:5]}


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def bits_per_weight(path: Path) -> float:
    import gguf

    r = gguf.GGUFReader(str(path))
    return 8 * sum(int(t.n_bytes) for t in r.tensors) / sum(int(t.n_elements) for t in r.tensors)


def generate(bin_dir: Path, model: Path) -> str:
    out = sh([bin_dir / "llama-completion", "-m", model, "-p", "The capital of France is", "-n", 16, "--temp", 0,
              "-no-cnv", "-t", 2])
    warnings = [x for x in out.splitlines() if " W " in x or "warning" in x.lower()]
    text = out[out.find("The capital of France is"):].split("\n\n")[0].strip()
    return text + (f"  [warnings: {warnings[:2]}]" if warnings else "")


def bench(bin_dir: Path, model: Path) -> dict:
    out = sh([bin_dir / "llama-bench", "-m", model, "-p", 128, "-n", 64, "-t", 2, "-r", 10, "-o", "json"])
    rows = json.loads(out[out.find("["):])
    return {("pp" if r["n_prompt"] else "tg"): round(r["avg_ts"], 1) for r in rows}


def transformers_check(t: str, method: str, windows: int = 8) -> dict:
    """Our protocol's perplexity (../shared/README.md, `windows` x 2048 tokens of WikiText-2 test) of
    our checkpoint through llmsqueeze and of its .gguf export through transformers' GGUF loader
    (gguf_file=: it dequantizes every tensor, the Q8_0 embeddings included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmsqueeze
    from llmsqueeze.evaluate import perplexity as ppl
    from llmsqueeze.data import bos_token_id
    from llmsqueeze.evaluate import tokenize_text

    f = WORK / f"{t}-{method}.gguf"
    tok = AutoTokenizer.from_pretrained(MODEL)
    ids, bos = tokenize_text(tok, (SHARED / "data/wikitext-2/test.txt").read_text()), bos_token_id(tok)
    ours_model = llmsqueeze.from_pretrained(f.with_suffix(""), dtype=torch.float32)
    a = ppl(ours_model, ids, windows=windows, progress=False, bos_token_id=bos)["ppl"]
    del ours_model
    tf_model = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32).eval()
    b = ppl(tf_model, ids, windows=windows, progress=False, bos_token_id=bos)["ppl"]
    return {"llmsqueeze_checkpoint": round(a, 4), "transformers_gguf_file": round(b, 4),
            "relative": round(b / a - 1, 5), "windows": windows}


def families(bin_dir: Path) -> dict:
    """Each family the exporter writes, as a tiny random model (hidden 256, 2 layers, a byte-level BPE
    tokenizer trained on WikiText-2 valid.txt) quantized to Q4_K_M and exported: llama.cpp loads it
    and generates 8 tokens; its error and warning lines are kept (a tiny model's 128-token context
    draws one warning about the context size)."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import llmsqueeze
    from llmsqueeze import GGUFScheme

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator([(SHARED / "data/wikitext-2/valid.txt").read_text()[:200000]], trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=["<unk>", "<s>", "</s>", "<|endoftext|>"]))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    kw = dict(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    configs = {"llama": tf.LlamaConfig(**kw), "mistral": tf.MistralConfig(**kw, sliding_window=None),
               "qwen2": tf.Qwen2Config(**kw), "qwen3": tf.Qwen3Config(**kw, head_dim=64),
               "gemma2": tf.Gemma2Config(**kw, head_dim=64), "gemma3_text": tf.Gemma3TextConfig(**kw, head_dim=64),
               "phi3": tf.Phi3Config(**kw)}
    out = {}
    for fam, cfg in configs.items():
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        llmsqueeze.quantize(model, GGUFScheme(mix="q4_k_m"), progress=False)
        d = llmsqueeze.save_quantized(model, WORK / f"tiny-{fam}", tokenizer=tok, overwrite=True)
        f = llmsqueeze.export(d, "gguf", WORK / f"tiny-{fam}.gguf", overwrite=True, progress=False)
        p = subprocess.run([str(bin_dir / "llama-completion"), "-m", str(f), "-p", "The", "-n", "8", "--temp", "0",
                            "-no-cnv", "-t", "2"], capture_output=True, text=True, errors="replace")
        log = p.stdout + p.stderr
        out[fam] = {"rc": p.returncode, "arch": f.name, "problems": [x for x in log.splitlines()
                                                                    if " E " in x or (" W " in x and "n_ctx" not in x and "trained on only" not in x)]}
        print(fam, out[fam], file=sys.stderr)
    return out


def ours(t: str, method: str, out_gguf: Path) -> dict:
    """llmsqueeze quantize (in a fresh process, timed) and export to out_gguf."""
    qdir = out_gguf.with_suffix("")
    cmd = [sys.executable, "-m", "llmsqueeze.cli", "quantize", MODEL, "--scheme", f"gguf:{t}", "--method", method,
           "--out", qdir, "--overwrite"]
    if method != "rtn":
        cmd += ["--calib", SHARED / "data/wikitext-2/valid.txt", "--n-samples", 128, "--seq-len", 512, "--seed", 0]
    t0 = time.time()
    sh(cmd)
    seconds = time.time() - t0
    sh([sys.executable, "-m", "llmsqueeze.cli", "export", qdir, "--format", "gguf", "--out", out_gguf, "--overwrite"])
    return {"quantize_seconds": round(seconds, 1), "command": " ".join(map(str, cmd[2:]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="+", default=["q4_k_m", "q3_k_m", "q4_0"])
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["llama.cpp", "llama.cpp+imatrix", "rtn", "gptq"])
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--families", action="store_true", help="only: tiny models of every family written, loaded and "
                    "run by llama.cpp")
    ap.add_argument("--bench-only", action="store_true", help="re-measure llama-bench of the rows already there "
                    "(on a quiet machine) and nothing else")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--transformers-check", nargs="*", default=None, metavar="TYPE",
                    help="also load our gptq export of TYPE (default q4_k_m) with transformers' GGUF loader and compare "
                         "our protocol's perplexity with the llmsqueeze checkpoint's")
    args = ap.parse_args()

    bin_dir, src = build_llama_cpp()
    WORK.mkdir(parents=True, exist_ok=True)
    texts = {"wikitext2": SHARED / "data/wikitext-2/test.txt", "python-docs": WORK / "python-docs.txt"}
    if not texts["python-docs"].exists():
        texts["python-docs"].write_text(second_text())
    dense = WORK / "smollm2-f32.gguf"  # the bf16 weights exactly, in the type llama.cpp's CPU path runs fastest
    if not dense.exists():  # llama.cpp's own converter, from its source tree
        sh([sys.executable, src / "convert_hf_to_gguf.py", MODEL, "--outtype", "f32", "--outfile", dense],
           env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
    imatrix = WORK / "imatrix.gguf"
    if not imatrix.exists() and "llama.cpp+imatrix" in args.methods:
        calib = WORK / "calibration.txt"
        calibration_text(calib)
        sh([bin_dir / "llama-imatrix", "-m", dense, "-f", calib, "-c", 512, "-o", imatrix, "-t", 2])

    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results["meta"] = {"model": "SmolLM2-135M-Instruct (../shared/models/smollm2.py)", "llama_cpp": llama_cpp_version(src),
                       "cpu_flags": cpu_flags(), "threads": 2, "chunks": args.chunks, "ctx": 2048,
                       "command": "python eval/gguf_llama_cpp.py " + " ".join(sys.argv[1:])}
    rows = results.setdefault("rows", {})
    if args.families:
        results["families"] = families(bin_dir)
        OUT.write_text(json.dumps(results, indent=1) + "\n")
        return
    if args.transformers_check is not None:
        for t in args.transformers_check or ["q4_k_m"]:
            rows[f"{t} gptq"]["transformers_check"] = transformers_check(t, "gptq")
            print(t, rows[f"{t} gptq"]["transformers_check"], file=sys.stderr)
        OUT.write_text(json.dumps(results, indent=1) + "\n")
        return
    if args.bench_only:
        for key, row in rows.items():
            f = dense if key == "dense" else WORK / f"{key.split()[0]}-{row['method'].replace('+', '-').replace('.', '')}.gguf"
            row["bench_tokens_per_s"] = bench(bin_dir, f)
            print(key, row["bench_tokens_per_s"], file=sys.stderr)
        results["meta"]["bench_command"] = "python eval/gguf_llama_cpp.py --bench-only"
        OUT.write_text(json.dumps(results, indent=1) + "\n")
        report(results)
        return
    if "dense" not in rows or args.redo:
        rows["dense"] = {"type": "F32", "method": "dense", "file_bytes": dense.stat().st_size, "bits_per_weight": 32.0,
                         **{name: perplexity(bin_dir, dense, text, args.chunks) for name, text in texts.items()}}
        OUT.write_text(json.dumps(results, indent=1) + "\n")
    for t in args.types:
        for method in args.methods:
            key = f"{t} {method}"
            if key in rows and not args.redo:
                continue
            f = WORK / f"{t}-{method.replace('+', '-').replace('.', '')}.gguf"
            row: dict = {"type": t.upper(), "method": method}
            if method.startswith("llama.cpp"):
                cmd = [bin_dir / "llama-quantize"] + (["--imatrix", imatrix] if "imatrix" in method else []) + [
                    dense, f, t.upper(), 2]
                t0 = time.time()
                sh(cmd)
                row.update(quantize_seconds=round(time.time() - t0, 1), command=" ".join(map(str, cmd)))
            else:
                row.update(ours(t, method, f))
            row["file_bytes"] = f.stat().st_size
            row["bits_per_weight"] = round(bits_per_weight(f), 4)
            if not method.startswith("llama.cpp"):
                ref = WORK / f"{t}-llamacpp.gguf"
                if ref.exists():
                    a, b = tensor_types(ref), tensor_types(f)
                    row["types_equal_llama_cpp"] = a == b
                    row["size_vs_llama_cpp"] = round(f.stat().st_size / ref.stat().st_size - 1, 6)
            for name, text in texts.items():
                row[name] = perplexity(bin_dir, f, text, args.chunks)
            row["generation"] = generate(bin_dir, f)
            if not args.no_bench:
                row["bench_tokens_per_s"] = bench(bin_dir, f)
            rows[key] = row
            OUT.write_text(json.dumps(results, indent=1) + "\n")
            print(f"{key}: {row['wikitext2']['ppl']:.3f} / {row['python-docs']['ppl']:.3f}", file=sys.stderr)
    report(results)


def report(results: dict) -> None:
    rows = results["rows"]
    m = results["meta"]
    print(f"SmolLM2-135M in llama.cpp ({m['llama_cpp']}), llama-perplexity -c {m['ctx']} --chunks {m['chunks']}, "
          f"CPU flags {' '.join(m['cpu_flags'])}, {m['threads']} threads")
    print(f"{'type':8} {'method':18} {'bits/w':>7} {'MiB':>7} {'WikiText-2':>11} {'Python docs':>12} {'tg t/s':>7}  same types")
    for r in rows.values():
        print(f"{r['type']:8} {r['method']:18} {r['bits_per_weight']:7.3f} {r['file_bytes'] / 2**20:7.2f} "
              f"{r['wikitext2']['ppl']:11.3f} {r['python-docs']['ppl']:12.3f} "
              f"{(r.get('bench_tokens_per_s') or {}).get('tg', float('nan')):7.1f}  {r.get('types_equal_llama_cpp', '')}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, text in zip(axes, ("wikitext2", "python-docs")):
        for method, marker in (("llama.cpp", "s"), ("llama.cpp+imatrix", "D"), ("rtn", "o"), ("gptq", "*"),
                               ("awq-gptq", "P")):
            pts = sorted((r["bits_per_weight"], r[text]["ppl"], r["type"]) for r in rows.values() if r["method"] == method)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=method if method.startswith("llama")
                        else f"llmsqueeze {method}")
                for x, y, t in pts:
                    ax.annotate(t, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("bits per weight (whole file)")
        ax.set_ylabel("perplexity (llama-perplexity)")
        ax.set_title(text)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
