#!/usr/bin/env python3
"""Generation latency of 4-bit models vs the same model dense: time to first token, decode tokens/s, memory.

CPU (the default), batch 1, a real model:

    python eval/latency.py --model ~/.cache/llmsqueeze/smollm2-135m --threads 2

  quantizes the model once (RTN 4-bit, group 128) into a temp dir, then measures dense fp32, dense
  bf16, 4-bit with bf16 activations (CPU int4 kernel for decode) and 4-bit with fp32 activations
  (dequantize + matmul), and W8A8 (int8 GEMM, per-token dynamic activations) with fp32 and bf16
  activations. Writes eval/results/latency_cpu.json. W8A8 is a prefill (compute-bound) scheme:

    python eval/latency.py --prompt-len 2048 --new-tokens 8 --configs 0 1 4 5 --out eval/results/latency_cpu_w8a8.json

CPU, a Llama-shaped model with random weights (no download), int4 CPU path vs bf16:

    python eval/latency.py --synthetic llama-small --prompt-len 64 --new-tokens 16

GPU: fp16 vs 4-bit (Triton kernels), a Llama-2-7B-shaped model (random weights from its config,
quantized with RTN layer by layer on the GPU: values do not change speed) and the real small model,
batch 1 and 8, prompt 512, 256 new tokens. Both run the same static KV cache and the same
torch.compile(mode="reduce-overhead") forward (CUDA graphs), so the comparison measures the
kernels, not Python overhead. Then the "fits" demo: the GPU capped at 8 GiB with
torch.cuda.set_per_process_memory_fraction, fp16 7B fails to load and 4-bit 7B loads and generates.

    python eval/latency.py --device cuda --model ~/.cache/llmsqueeze/smollm2-135m --fits

(Each 7B configuration builds, compiles and times in its own process, minutes each: split a run
with --batch, --no-real, --fits-only where a session limits command time.)

Every configuration runs in a fresh process (peak memory belongs to it alone); JSON to --out
(default eval/results/latency_{cpu,cuda}.json) and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmsqueeze.kernels.cpu import as_avx2_env

CPU_CONFIGS = [
    # label, which model, dtype ("auto": what --dtype auto picks on this CPU, kernels/cpu.py)
    ("dense fp32", "dense", "float32"),
    ("dense bf16", "dense", "bfloat16"),
    ("rtn w4 g128, bf16 activations", "q4", "bfloat16"),
    ("rtn w4 g128, fp32 activations", "q4", "float32"),
    ("w8a8 dynamic (int8 GEMM), fp32 activations", "w8a8", "float32"),
    ("w8a8 dynamic (int8 GEMM), bf16 activations", "w8a8", "bfloat16"),
    ("dense auto", "dense", "auto"),
    ("rtn w4 g128, auto", "q4", "auto"),
    # the same two with a static KV cache and torch.compile'd steps (evaluate.latency(compile=True))
    ("dense auto, compiled", "dense", "auto"),
    ("rtn w4 g128, auto, compiled", "q4", "auto"),
    ("dense fp32, compiled", "dense", "float32"),
]
# llama.cpp's llama-bench on the same model as GGUF (its own converter and quantizer), same threads
LLAMA_CPP_TYPES = ("F16", "Q8_0", "Q4_0", "Q4_K_M")
AVX2_ENV = as_avx2_env()  # the child processes of --as-avx2 (torch, MKL, oneDNN, our kernels, Inductor's cache)
SYNTHETIC = {  # Llama configs by shape; vocab 32000, untied head, as Llama-2
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32),
    "llama-small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8),
}
GROUP_SIZE = 128


# ------------------------------------------------------------------------------------------------
# models


def build_synthetic(name: str, weights: str, device: str, dtype, seed: int = 0):
    """A LlamaForCausalLM of shape `name` with random weights, built without a dense copy of the
    quantized layers: each decoder Linear is drawn on `device`, RTN-quantized (4-bit, group 128)
    and packed one at a time. weights: "dense" or "q4"."""
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmsqueeze.config import QuantScheme
    from llmsqueeze.models import quantizable_modules
    from llmsqueeze.nn import QuantLinear, set_module
    from llmsqueeze.quant.rtn import rtn_quantize

    cfg = LlamaConfig(**SYNTHETIC[name], vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    if weights == "q4":
        scheme = QuantScheme(bits=4, group_size=GROUP_SIZE)
        for lname in quantizable_modules(model, scheme):
            lin = model.get_submodule(lname)
            w = torch.randn(lin.out_features, lin.in_features, generator=g, device=device) * 0.02
            q, s, z = rtn_quantize(w, scheme)
            del w
            set_module(model, lname, QuantLinear.from_quantized(q, s, z, 4, scheme.group_size_for(lin.in_features)))
            del q, s, z
    for mname, mod in model.named_modules():  # materialize what is still on the meta device
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                t = (torch.ones(p.shape, device=device) if "norm" in mname else
                     torch.randn(p.shape, generator=g, device=device) * 0.02)
                mod._parameters[pname] = nn.Parameter(t.to(dtype), requires_grad=False)
    rot = model.model.rotary_emb  # its inv_freq is computed at construction: build it again off meta
    model.model.rotary_emb = type(rot)(config=cfg).to(device)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    return model.eval()


def load_real(model_dir: str, dtype: str, device: str):
    from llmsqueeze.cli import _load_any

    model, _ = _load_any(model_dir, dtype)
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------
# measurement


def generate_timed(model, batch: int, prompt_len: int, new_tokens: int, compile_: bool, repeats: int, seed: int = 0) -> dict:
    """Greedy generation: prefill (time to first token) then `new_tokens` one-token steps, best of
    `repeats` after warm-up (evaluate.latency: compiled, a static KV cache and torch.compile, with CUDA
    graphs on a GPU), plus the GPU's peak memory."""
    import torch

    from llmsqueeze.evaluate import latency

    cuda = model.get_input_embeddings().weight.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    mode = ("reduce-overhead" if cuda else True) if compile_ else False
    res = latency(model, prompt_len=prompt_len, new_tokens=new_tokens - 1, batch=batch, repeats=repeats, seed=seed,
                  compile=mode)
    res["new_tokens"] = new_tokens  # the first new token comes from the prefill
    if cuda:
        res["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def weights_mib(model) -> float:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20


def measure_one(spec: dict) -> dict:
    """Child process: one configuration."""
    import torch

    from llmsqueeze.evaluate import latency, peak_rss_mib

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec.get("device", "cpu")
    if spec.get("cap_gib"):  # the fits demo: the GPU as if it had cap_gib
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(spec["cap_gib"] * 2**30 / total)
    t0 = time.perf_counter()
    try:
        if spec["model"].startswith("synthetic:"):
            model = build_synthetic(spec["model"].split(":", 1)[1], spec["weights"], device, getattr(torch, spec["dtype"]))
            if spec.get("adapt"):
                from llmsqueeze.nn import adapt_to_cpu

                adapt_to_cpu(model)
        else:
            model = load_real(spec["model"], spec["dtype"], device)
    except torch.OutOfMemoryError as e:
        return {"loaded": False, "error": f"OutOfMemoryError: {str(e).splitlines()[0][:200]}"}
    res = {"loaded": True, "load_s": time.perf_counter() - t0, "weights_mib": weights_mib(model),
           "rss_after_load_mib": peak_rss_mib()}
    if device == "cuda":
        from llmsqueeze.nn import prepare_model

        prepare_model(model)  # the kernels' weights, before compile
        res["gpu_after_load_mib"] = torch.cuda.memory_allocated() / 2**20
    try:
        if spec.get("legacy"):  # the CPU table's protocol (eager: dynamic cache; compiled: static cache)
            res.update(latency(model, prompt_len=spec["prompt_len"], new_tokens=spec["new_tokens"], batch=1,
                               repeats=spec["repeats"], compile=spec.get("compile", False)))
        else:
            res.update(generate_timed(model, spec["batch"], spec["prompt_len"], spec["new_tokens"],
                                      spec.get("compile", False), spec["repeats"]))
        res["generated"] = True
    except torch.OutOfMemoryError as e:
        res.update(generated=False, error=f"OutOfMemoryError: {str(e).splitlines()[0][:200]}")
    from llmsqueeze.evaluate import compute_summary

    res["compute"] = compute_summary(model)
    # the CPU int4 kernel's own packed copy of each 4-bit layer, built on first decode step
    caches = [m._int4_cache for m in model.modules() if getattr(m, "_int4_cache", None) is not None]
    res["int4_kernel_copy_mib"] = sum(c[1].numel() * c[1].element_size() + c[2].numel() * c[2].element_size()
                                      for c in caches) / 2**20
    return res


def run_child(spec: dict, timeout: float | None = None, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"loaded": False, "error": f"exit {p.returncode}: {tail[:300]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def quantize_dir(model: str, tmp: str) -> str:
    q4 = str(Path(tmp) / "q4")
    subprocess.run([sys.executable, "-m", "llmsqueeze.cli", "quantize", model, "--bits", "4", "--group-size",
                    str(GROUP_SIZE), "--out", q4], check=True, stdout=subprocess.DEVNULL)
    return q4


def quantize_w8a8_dir(model: str, tmp: str) -> str:
    """W8A8 dynamic; speed does not depend on SmoothQuant, so its calibration is skipped."""
    out = str(Path(tmp) / "w8a8")
    subprocess.run([sys.executable, "-m", "llmsqueeze.cli", "quantize", model, "--scheme", "w8a8", "--smooth-alpha",
                    "off", "--out", out], check=True, stdout=subprocess.DEVNULL)
    return out


def llama_cpp_rows(args) -> list[dict]:
    """llama-bench on the model as GGUF (llama.cpp's convert_hf_to_gguf.py, then llama-quantize from the
    exact bf16 file), each type in LLAMA_CPP_TYPES: pp = prompt of --prompt-len, tg = --new-tokens steps."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gguf_llama_cpp as g

    bin_dir, src = g.build_llama_cpp()
    work = Path("~/.cache/llmsqueeze/latency-gguf").expanduser() / Path(args.model).name
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for outtype in ("bf16", "f16"):
        f = work / f"{outtype}.gguf"
        if not f.exists():
            g.sh([sys.executable, src / "convert_hf_to_gguf.py", args.model, "--outtype", outtype, "--outfile", f])
        files[outtype.upper()] = f
    rows = []
    for t in LLAMA_CPP_TYPES:
        f = files.get(t) or work / f"{t.lower()}.gguf"
        if not f.exists():
            g.sh([bin_dir / "llama-quantize", files["BF16"], f, t])
        out = g.sh([bin_dir / "llama-bench", "-m", f, "-p", args.prompt_len, "-n", args.new_tokens, "-t", args.threads,
                    "-r", max(args.repeats, 3), "-o", "json"])
        bench = json.loads(out[out.find("["):])
        pp = next(r for r in bench if r["n_prompt"])
        tg = next(r for r in bench if r["n_gen"])
        rows.append({"config": f"llama.cpp {t}", "engine": "llama.cpp", "generated": True, "gguf": str(f),
                     "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "threads": args.threads,
                     "prefill_tok_s": pp["avg_ts"], "decode_tok_s": tg["avg_ts"], "decode_tok_s_stdev": tg.get("stddev_ts", tg.get("stdev_ts")),
                     "weights_mib": f.stat().st_size / 2**20, "llama_cpp": g.llama_cpp_version(src),
                     "build": "GGML_NATIVE=OFF, AVX2 + FMA + F16C"})
        print(f"{rows[-1]['config']:44s} prefill {pp['avg_ts']:8.1f} tok/s  decode {tg['avg_ts']:8.2f} tok/s  "
              f"file {rows[-1]['weights_mib']:7.1f} MiB", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
# plans


def plan_cpu_real(args, tmp: str) -> list[tuple[str, dict]]:
    configs = [CPU_CONFIGS[i] for i in args.configs] if args.configs else CPU_CONFIGS
    dirs = {"dense": args.model}
    if any(c[1] == "q4" for c in configs):
        dirs["q4"] = quantize_dir(args.model, tmp)
    if any(c[1] == "w8a8" for c in configs):
        dirs["w8a8"] = quantize_w8a8_dir(args.model, tmp)
    return [(label, {"model": dirs[which], "dtype": dtype, "device": "cpu", "legacy": True,
                     "compile": label.endswith(", compiled"), "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads})
            for label, which, dtype in configs]


def plan_generate(args, models: list[tuple[str, str, str]], device: str, dtype: str) -> list[tuple[str, dict]]:
    """models: (label, dense model, 4-bit model) -> dense vs 4-bit at each batch size."""
    plan = []
    for label, dense, q4 in models:
        for batch in args.batch:
            auto = ", auto" if device == "cpu" else ""  # the CPU rows adapt to the CPU as --dtype auto does
            for wname, model in (("dense " + dtype + auto, dense), ("rtn w4 g128" + auto, q4)):
                spec = {"model": model, "dtype": dtype, "device": device, "batch": batch,
                        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                        "compile": args.compile, "threads": args.threads}
                if model.startswith("synthetic:"):
                    spec["weights"] = "q4" if wname.startswith("rtn") else "dense"
                    if device == "cpu":  # --dtype auto as from_pretrained does it: float32 compute without native bf16
                        spec["adapt"] = True
                spec["group"] = f"{label} b{batch}"  # dense and 4-bit of one group are compared
                spec["kind"] = "q4" if wname.startswith("rtn") else "dense"
                plan.append((f"{label} {wname} b{batch}", spec))
    return plan


def table(rows: list[dict]) -> str:
    lines = ["| config | ttft (prompt) | prefill tok/s | decode tok/s | decode speed-up | weights | peak memory |",
             "|---|---|---|---|---|---|---|"]
    dense_tok = {r.get("group"): r["decode_tok_s"] for r in rows if r.get("kind") == "dense" and r.get("generated")}
    for r in rows:
        if not r.get("generated"):
            lines.append(f"| {r['config']} | {r.get('error', 'failed')} | | | | | |")
            continue
        sp = r["decode_tok_s"] / dense_tok[r["group"]] if r.get("kind") == "q4" and r.get("group") in dense_tok else None
        mem = r.get("peak_gpu_mib", r.get("peak_rss_mib"))
        lines.append(f"| {r['config']} | {r['ttft_s'] * 1e3:.1f} ms ({r['prompt_len']}) | {r['prefill_tok_s']:.0f} "
                     f"| {r['decode_tok_s']:.1f} | {f'{sp:.2f}x' if sp else ''} | {r['weights_mib']:.0f} MiB "
                     f"| {mem:.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path("~/.cache/llmsqueeze/smollm2-135m").expanduser()),
                    help="a real dense model dir (quantized here with RTN w4 g128)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="also run a random-weight Llama of this shape "
                    "(default on cuda: llama2-7b; on cpu only when given, and then instead of the real-model table)")
    ap.add_argument("--no-real", action="store_true", help="skip the real model")
    ap.add_argument("--batch", type=int, nargs="*", help="batch sizes (cuda default 1 8; cpu 1)")
    ap.add_argument("--prompt-len", type=int, help="default 512 on cuda, 128 on cpu")
    ap.add_argument("--new-tokens", type=int, help="default 256 on cuda, 64 on cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile(mode=reduce-overhead) for both dense and 4-bit (default: on for cuda)")
    ap.add_argument("--fits", action="store_true", help="cuda: the 8 GiB demo with the 7B shape")
    ap.add_argument("--fits-only", action="store_true", help="cuda: only the 8 GiB demo")
    ap.add_argument("--cap-gib", type=float, default=8.0)
    ap.add_argument("--configs", nargs="*", type=int, help="CPU real-model mode: indices into its configuration list")
    ap.add_argument("--llama-cpp", action="store_true", help="CPU: also llama.cpp's llama-bench on the model as GGUF "
                    f"({', '.join(LLAMA_CPP_TYPES)}; builds llama.cpp once, about 20 minutes on 2 cores)")
    ap.add_argument("--as-avx2", action="store_true", help="CPU: every configuration runs as on an AVX2-only CPU "
                    "(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 "
                    "LLMSQUEEZE_CPU_FLAGS=avx2,fma,f16c); dense bf16 rows are then skipped (oneDNN's AVX2 fallback "
                    "is slower than a real AVX2 CPU's bf16 path; the bandwidth ceiling bounds it instead)")
    ap.add_argument("--out", help="JSON path (default eval/results/latency_{device}.json)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:  # child process: one configuration, JSON on the last line of stdout
        print(json.dumps(measure_one(json.loads(args.one))))
        return

    cuda = args.device == "cuda"
    args.prompt_len = args.prompt_len or (512 if cuda else 128)
    args.new_tokens = args.new_tokens or (256 if cuda else 64)
    args.batch = args.batch or ([1, 8] if cuda else [1])
    args.compile = cuda if args.compile is None else args.compile
    args.out = args.out or f"eval/results/latency_{args.device}.json"
    if cuda:
        import torch

        if not torch.cuda.is_available():
            sys.exit("eval/latency.py --device cuda needs a CUDA GPU; without one run the CPU modes (see --help)")
        args.synthetic = args.synthetic or "llama2-7b"
    dtype = "float16" if cuda else "bfloat16"
    real = Path(args.model).expanduser().is_dir() and not args.no_real

    from llmsqueeze.evaluate import read_bandwidth_gbs, write_results

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not cuda and not args.synthetic:
            plan = plan_cpu_real(args, tmp)
        else:
            models = []
            if args.synthetic:
                models.append((args.synthetic, "synthetic:" + args.synthetic, "synthetic:" + args.synthetic))
            if real and cuda and not args.fits_only:
                models.append((Path(args.model).name, args.model, quantize_dir(args.model, tmp)))
            plan = [] if args.fits_only else plan_generate(args, models, args.device, dtype)
        if (args.fits or args.fits_only) and cuda:
            for wname, weights in (("dense float16", "dense"), ("rtn w4 g128", "q4")):
                plan.append((f"fits {args.cap_gib:g} GiB: llama2-7b {wname} b1", {
                    "model": "synthetic:llama2-7b", "weights": weights, "dtype": "float16", "device": "cuda",
                    "cap_gib": args.cap_gib, "batch": 1, "prompt_len": args.prompt_len, "new_tokens": 32,
                    "repeats": 1, "compile": False}))
        env = AVX2_ENV if args.as_avx2 else None
        if args.as_avx2:
            plan = [(label, spec) for label, spec in plan if spec["dtype"] != "bfloat16"]
        for label, spec in plan:
            res = run_child(spec, env=env)
            row = {"config": label, **spec, **res}
            rows.append(row)
            if res.get("generated"):
                print(f"{label:44s} ttft {res['ttft_s'] * 1e3:8.1f} ms  prefill {res['prefill_tok_s']:8.1f} tok/s  "
                      f"decode {res['decode_tok_s']:8.2f} tok/s  weights {res['weights_mib']:7.1f} MiB", flush=True)
            else:
                print(f"{label:44s} {res.get('error', 'failed')}", flush=True)

        if args.llama_cpp and not cuda:
            rows += llama_cpp_rows(args)

    print()
    extra = {}
    if not cuda and not args.synthetic:  # the CPU table, with each row's ceiling: its weights read once per token
        bw = read_bandwidth_gbs(args.threads)
        extra = {"bandwidth_gbs": bw, "as_avx2": args.as_avx2, "env": AVX2_ENV if args.as_avx2 else {}}
        print(f"| model | prefill tok/s ({args.prompt_len} tokens) | decode tok/s | decode ceiling at {bw:.1f} GB/s "
              "| weights in memory | peak RSS |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if not r.get("generated"):
                print(f"| {r['config']} | {r.get('error', 'failed')} | | | | |")
                continue
            r["decode_ceiling_tok_s"] = bw * 1e9 / (r["weights_mib"] * 2**20)
            rss = f"{r['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in r else ""
            print(f"| {r['config']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['decode_ceiling_tok_s']:.0f} "
                  f"| {r['weights_mib']:.0f} MiB | {rss} |")
        for r in rows:
            if r.get("compute"):
                print(f"  {r['config']}: {r['compute']}")
    else:
        print(table(rows))
    write_results(args.out, rows, model=args.model, device=args.device, **extra)


if __name__ == "__main__":
    main()
