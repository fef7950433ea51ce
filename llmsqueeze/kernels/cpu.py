"""What this CPU runs fast, and the C kernels for float32 activations (cpu_kernels.c).

CPUs differ in what torch's half-precision and int8 paths cost. With AVX-512 BF16 / AMX the bf16
GEMM is native and several times faster than float32; with AVX2 + FMA only (most laptops, AMD before
Zen 4, many cloud VMs) a bf16 GEMM falls back to conversions and runs ~35x slower than float32 at
M=512, and `torch._int_mm` ~22x. `cpu()` reads the instruction sets once; `best_dtype()` is the
activation dtype every default follows (`--dtype auto`): bfloat16 where it is native, else float32.

The float32 kernels read the checkpoint's packed layout in place (no repacked copy) and need AVX2,
FMA and F16C; where the CPU also has AVX-512 F+BW the same source is built with them and the GEMV
runs 16 columns a vector (`CFLAGS_AVX512`). They are compiled on first use with the system C compiler (`CC`, default `cc`) into
~/.cache/llmsqueeze/cpu-kernels (`LLMSQUEEZE_CACHE` moves it) and called through ctypes, which
releases the GIL; their OpenMP threads are torch's (the same libgomp), `torch.get_num_threads()` of
them. Without a compiler, or on another architecture, `library()` is None after one warning and the
callers keep their torch paths. `LLMSQUEEZE_CPU_KERNELS=0` turns them off.

    gemv_q(x, qweight, scales, qzeros, bits, group_size, in_features, bias)   x [M, K] fp32 -> [M, N]
                                                     (gemv_planned: fp16/bf16 x too, -> [M, N] in x's dtype)
    dequantize_q(qweight, scales, qzeros, bits, group_size, in_features, out) -> W^T [K, N] fp32
    gemv_w16(x, weight, bias)              x [M, K] fp32, weight [N, K] bf16/fp16 -> [M, N] fp32

Under torch.compile the kernels are operators registered in C++ (`cpu_ops.cpp`, torch.ops.llmsqueeze_c.*,
built on the first compiled trace with the system C++ compiler; `LLMSQUEEZE_CPU_OPS=0` turns them off),
or Python custom ops where that build fails: one opaque call each in the graph, no graph break.

`LLMSQUEEZE_CPU_FLAGS=avx2,fma,f16c` (a comma list) makes `cpu()` report those flags instead of
/proc/cpuinfo's (tests; a dry run of what an AVX2 machine would choose). `ATEN_CPU_CAPABILITY=avx2`
is honoured too: torch then runs no AVX-512 code, so neither do the choices made here.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("llmsqueeze")

FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx_vnni",
         "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
WIDE = ("avx512", "amx")  # flag prefixes torch leaves unused when its capability is AVX2 or lower


def as_avx2_env() -> dict[str, str]:
    """The environment a child process runs in to behave as on an AVX2-only CPU (eval scripts'
    --as-avx2): torch, MKL, oneDNN and these kernels capped at AVX2, and Inductor's cache in a folder
    of its own. torch 2.13 keys that cache without the capability, so a kernel compiled under the cap
    would be loaded by an uncapped process, built for 8-wide vectors where 16-wide are assumed: heap
    corruption ("double free or corruption"), seen on an AVX-512 machine."""
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "torchinductor"))
    return {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "LLMSQUEEZE_CPU_FLAGS": "avx2,fma,f16c", "TORCHINDUCTOR_CACHE_DIR": cache + "-as-avx2"}


@dataclass(frozen=True)
class CpuInfo:
    machine: str  # platform.machine(): x86_64, aarch64, ...
    flags: frozenset  # the FLAGS this CPU has (as torch may use them)
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, DEFAULT, ...
    source: str  # "/proc/cpuinfo", "LLMSQUEEZE_CPU_FLAGS" or "none"

    @property
    def x86_avx2(self) -> bool:
        """AVX2 + FMA + F16C on x86-64: what the float32 C kernels need."""
        return self.machine in ("x86_64", "AMD64") and {"avx2", "fma", "f16c"} <= self.flags

    @property
    def avx512(self) -> bool:
        """AVX-512 F + BW (and torch allowed to use them): the C kernels' GEMV is built 16 columns wide."""
        return self.x86_avx2 and {"avx512f", "avx512bw"} <= self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX-512 BF16 or AMX-BF16): bf16 GEMMs beat float32."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def native_int8(self) -> bool:
        """int8 dot products in hardware (VNNI or AMX-INT8): torch._int_mm beats float32."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    @property
    def best_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.native_bf16 else torch.float32

    def describe(self) -> str:
        """One line: the flags that matter and what they make llmsqueeze choose."""
        shown = " ".join(f for f in FLAGS if f in self.flags) or "none of " + "/".join(FLAGS[:3])
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        int8 = "native int8" if self.native_int8 else "no native int8"
        return (f"{self.machine} {shown} ({bf16}, {int8}; torch {self.torch_capability}): "
                f"{str(self.best_dtype).removeprefix('torch.')} activations by default")


def _proc_flags() -> frozenset | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


_CPU: CpuInfo | None = None


def cpu() -> CpuInfo:
    """This CPU, read once (see the module docstring for the overrides); `forget()` reads it again.
    A plain global once read, so torch.compile traces it as a constant."""
    global _CPU
    if _CPU is None:
        _CPU = _detect()
    return _CPU


def forget() -> None:
    """Read the CPU again on the next cpu() call (after changing LLMSQUEEZE_CPU_FLAGS, in tests)."""
    global _CPU
    _CPU = None


def _detect() -> CpuInfo:
    cap = torch.backends.cpu.get_cpu_capability()
    env = os.environ.get("LLMSQUEEZE_CPU_FLAGS")
    if env is not None:
        flags, source = frozenset(f.strip() for f in env.split(",") if f.strip()), "LLMSQUEEZE_CPU_FLAGS"
    else:
        found = _proc_flags()
        flags, source = (found, "/proc/cpuinfo") if found is not None else (frozenset(), "none")
    if cap in ("AVX2", "DEFAULT", "NO_AVX"):  # torch was told (or found) to run no wider code
        flags = frozenset(f for f in flags if not f.startswith(WIDE))
    return CpuInfo(platform.machine(), frozenset(f for f in flags if f in FLAGS), cap, source)


def best_dtype() -> torch.dtype:
    """The activation dtype for CPU work here: bfloat16 where it is native, else float32."""
    return cpu().best_dtype


def auto_dtype(stored: torch.dtype) -> torch.dtype:
    """What `--dtype auto` computes a model stored in `stored` in, on this CPU: the stored dtype,
    raised to float32 where half precision is not native here (bf16 without AVX-512 BF16/AMX; fp16
    always: torch's CPU fp16 GEMM is many times slower than float32). Never below the stored dtype."""
    if stored == torch.bfloat16 and cpu().native_bf16:
        return stored
    return torch.float32 if stored in (torch.bfloat16, torch.float16) else stored


# ------------------------------------------------------------------------------------------------
# the C library

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None | bool = False  # False: not tried yet
SOURCE = Path(__file__).with_name("cpu_kernels.c")
INCLUDED = (Path(__file__).with_name("cpu_gemv_tile.inc"),)  # what SOURCE includes: part of the build's key
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
CFLAGS_AVX512 = ["-mavx512f", "-mavx512bw"]  # added where cpu().avx512: the GEMV's 16-wide strips
VERSION = 3  # lsq_version() of cpu_kernels.c


def _cache_dir() -> Path:
    root = os.environ.get("LLMSQUEEZE_CACHE")
    return Path(root).expanduser() if root else Path("~/.cache/llmsqueeze").expanduser() / "cpu-kernels"


def _compile_once(compiler_env: str, default: str, source: Path, prefix: str, args: list[str],
                  key_parts: tuple = ()) -> Path:
    """Compile `source` into a shared library once per source, compiler, arguments and key_parts,
    into the cache (atomically: another process building the same key gets a whole file); -> its path.
    args: the compiler's arguments, "{src}" and "{out}" standing for the source and the output."""
    cc = os.environ.get(compiler_env, default)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    key = hashlib.sha256("\0".join([source.read_text(), cc, version, *key_parts, *args]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{prefix}_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *(a.format(src=source, out=tmp) for a in args)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(((r.stderr or r.stdout).strip().splitlines() or ["no output"])[-1][:300])
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _build(wide: bool | None = None) -> Path:
    """Compile cpu_kernels.c once per source (and what it includes), compiler and flags: with the
    AVX-512 ones where `wide` (default: where this CPU has them); -> the shared library's path."""
    extra = CFLAGS_AVX512 if (cpu().avx512 if wide is None else wide) else []
    return _compile_once("CC", "cc", SOURCE, "lsq_cpu", [*CFLAGS, *extra, "{src}", "-o", "{out}"],
                         tuple(p.read_text() for p in INCLUDED))


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot run here (one warning says why)."""
    global _LIB
    if _LIB is not False:
        return _LIB
    with _LOCK:
        if _LIB is not False:
            return _LIB
        lib = None
        why = None
        if os.environ.get("LLMSQUEEZE_CPU_KERNELS", "1") == "0":
            why = None  # turned off on purpose: no warning
        elif not cpu().x86_avx2:
            why = f"this CPU ({cpu().machine}, flags {' '.join(sorted(cpu().flags)) or 'none'}) lacks AVX2+FMA+F16C"
        else:
            try:
                lib = ctypes.CDLL(str(_build()))
                if lib.lsq_version() != VERSION:
                    raise RuntimeError(f"built library reports version {lib.lsq_version()}, expected {VERSION}")
                _declare(lib)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                lib, why = None, f"could not build them ({e})"
        if why:
            log.warning("llmsqueeze: the float32 CPU kernels are off: %s; using torch's paths", why)
        _LIB = lib
        return lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lsq_gemv_q.argtypes = [p, i64, i64, p, p, i32, p, i64, p, p, i64, i64, i32, i32]
    lib.lsq_gemv_qx.argtypes = [p, i32, i64, i64, p, p, i32, p, i64, p, p, i64, i64, i32, i32]
    lib.lsq_dequant_q.argtypes = [p, p, i32, p, i64, p, i64, i64, i64, i32, i64, i64, i32]
    lib.lsq_gemv_w16.argtypes = [p, i64, i64, p, i32, p, p, i64, i32]
    for f in (lib.lsq_gemv_q, lib.lsq_gemv_qx, lib.lsq_dequant_q, lib.lsq_gemv_w16):
        f.restype = i32


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing (the build takes a lock)
def available() -> bool:
    """Whether the float32 kernels run here (built and loaded on the first call)."""
    if _LIB is not False:
        return _LIB is not None
    return library() is not None


SCALE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the kernels' dtype codes (scales, x)
W16_CODES = {torch.float16: 1, torch.bfloat16: 2}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise ValueError(f"llmsqueeze CPU kernel {what} refused its arguments (code {rc})")


def takes_q(bits: int, group_size: int, scales: torch.Tensor) -> bool:
    """Whether gemv_q/dequantize_q run this layout: 2/4/8 bits, groups of whole words."""
    return bits in (2, 4, 8) and group_size % (32 // bits) == 0 and scales.dtype in SCALE_CODES


def gemv_q(x: torch.Tensor, qweight, scales, qzeros, bits: int, group_size: int, in_features: int,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 -> x @ W^T + bias [M, N] float32 from the packed layout (module docstring)."""
    library()
    return gemv_planned(x, q_plan(qweight, scales, qzeros, bits, group_size, in_features, bias))


@dataclass(frozen=True)
class QPlan:
    """A packed layer's arguments to the kernels, built once (plain ints beside the tensors they point
    into, which it keeps alive), so a decode call converts only x and the output."""

    tensors: tuple  # qweight, scales, qzeros, bias (as the layer holds it) or None: what the plan was built
    # for; then the float32 bias the kernel reads (kept alive)
    head: tuple  # (qweight*, scales*, scode, qzeros*, zstride)
    tail: tuple  # (bias* or None, N, G, bits)
    in_features: int
    out_features: int


def q_plan(qweight, scales, qzeros, bits: int, group_size: int, in_features: int, bias=None) -> QPlan:
    b = None if bias is None else bias.detach().float().contiguous()
    return QPlan((qweight, scales, qzeros, bias, b),
                 (qweight.data_ptr(), scales.data_ptr(), SCALE_CODES[scales.dtype], qzeros.data_ptr(), qzeros.shape[1]),
                 (_ptr(b), qweight.shape[1], group_size, bits), in_features, qweight.shape[1])


def gemv_planned(x: torch.Tensor, plan: QPlan) -> torch.Tensor:
    """gemv_q with the layer's arguments from q_plan: x [M, K] contiguous, float32, float16 or bfloat16
    -> [M, N] in x's dtype (a 16-bit x is widened and the result rounded in the kernel, as .to() rounds)."""
    out = torch.empty(x.shape[0], plan.out_features, dtype=x.dtype)
    rc = _LIB.lsq_gemv_qx(x.data_ptr(), SCALE_CODES[x.dtype], x.shape[0], plan.in_features, *plan.head, plan.tail[0],
                          out.data_ptr(), *plan.tail[1:], torch.get_num_threads())
    if rc:
        _check(rc, "gemv_q")
    return out


def dequantize_q(qweight, scales, qzeros, bits: int, group_size: int, in_features: int,
                 out: torch.Tensor | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
    """-> W^T[:, n0:n1] float32 [K, n1 - n0] = (q - zero) * scale (all N columns unless `cols`), written
    into `out` (a float32 buffer of at least that many elements) when given."""
    lib = library()
    k, n = in_features, qweight.shape[1]
    n0, n1 = cols or (0, n)
    w = torch.empty(k * (n1 - n0), dtype=torch.float32) if out is None else out[: k * (n1 - n0)]
    _check(lib.lsq_dequant_q(qweight.data_ptr(), scales.data_ptr(), SCALE_CODES[scales.dtype], qzeros.data_ptr(),
                             qzeros.shape[1], w.data_ptr(), k, n, group_size, bits, n0, n1, torch.get_num_threads()),
           "dequantize_q")
    return w.view(k, n1 - n0)


_SCRATCH = threading.local()


def scratch(numel: int) -> torch.Tensor:
    """A float32 buffer of at least `numel` elements, reused by this thread's later calls (the
    dequantized tiles of prefill), so no call allocates and faults in a layer-sized tensor."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH.buf = torch.empty(numel, dtype=torch.float32)
    return buf


def gemv_w16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32, weight [N, K] bfloat16/float16 -> x @ weight^T + bias [M, N] float32."""
    lib = library()
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    b = None if bias is None else bias.float().contiguous()
    _check(lib.lsq_gemv_w16(x.data_ptr(), m, k, weight.data_ptr(), W16_CODES[weight.dtype], _ptr(b), out.data_ptr(),
                            n, torch.get_num_threads()), "gemv_w16")
    return out


# ------------------------------------------------------------------------------------------------
# the same kernels as torch custom ops, for torch.compile (one opaque call in the graph; eager code
# calls the functions above directly: a custom op's dispatch costs microseconds per call)

# shapes and dtypes of each operator's output, for tracing (the Python ops and the C++ ones alike)

def _gemv_q_fake(x, qweight, scales, qzeros, bits, group_size, in_features, bias):
    return x.new_empty(x.shape[0], qweight.shape[1], dtype=torch.float32)


def _dequantize_q_fake(qweight, scales, qzeros, bits, group_size, in_features):
    return qweight.new_empty(in_features, qweight.shape[1], dtype=torch.float32)


def _tiles_mm_fake(x, qweight, scales, qzeros, bits, group_size, in_features, bias, tile_cols):
    return x.new_empty(x.shape[0], qweight.shape[1], dtype=torch.float32)


def _gemv_w16_fake(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


@torch.library.custom_op("llmsqueeze::cpu_gemv_q", mutates_args=())
def _gemv_q_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int,
               group_size: int, in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return gemv_q(x.contiguous(), qweight, scales, qzeros, bits, group_size, in_features, bias)


_gemv_q_op.register_fake(_gemv_q_fake)


@torch.library.custom_op("llmsqueeze::cpu_dequantize_q", mutates_args=())
def _dequantize_q_op(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int, group_size: int,
                     in_features: int) -> torch.Tensor:
    return dequantize_q(qweight, scales, qzeros, bits, group_size, in_features)


_dequantize_q_op.register_fake(_dequantize_q_fake)


@torch.library.custom_op("llmsqueeze::cpu_gemv_w16", mutates_args=())
def _gemv_w16_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return gemv_w16(x.contiguous(), weight, bias)


_gemv_w16_op.register_fake(_gemv_w16_fake)


_OPS = {"gemv_q": _gemv_q_op, "dequantize_q": _dequantize_q_op, "gemv_w16": _gemv_w16_op}


# ------------------------------------------------------------------------------------------------
# the same operators registered in C++ (cpu_ops.cpp): the generated code of torch.compile calls
# them at ~13 us each where a Python custom op costs ~60 us (one decode step of a 30-layer model
# makes ~210 of these calls). Built on the first compiled trace with the system C++ compiler (`CXX`,
# default `c++`) against torch's headers, cached beside the kernels; without a compiler (or with
# LLMSQUEEZE_CPU_OPS=0) compiled graphs keep the Python custom ops above, with one warning.

OPS_SOURCE = Path(__file__).with_name("cpu_ops.cpp")
_C_OPS: bool | None = None  # None: not tried yet


def _build_ops() -> Path:
    """Compile cpu_ops.cpp once per source, compiler and torch; -> the shared library's path."""
    from torch.utils.cpp_extension import include_paths, library_paths

    flags = ["-O2", "-std=c++20", "-shared", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *(f"-I{p}" for p in include_paths())]
    libs = [*(f"-L{p}" for p in library_paths()), *(f"-Wl,-rpath,{p}" for p in library_paths()), "-ltorch_cpu", "-lc10"]
    return _compile_once("CXX", "c++", OPS_SOURCE, "lsq_ops", [*flags, "{src}", "-o", "{out}", *libs],
                         key_parts=(torch.__version__,))


def _register_c_fakes() -> None:
    for name, fake in (("gemv_q", _gemv_q_fake), ("dequantize_q", _dequantize_q_fake), ("gemv_w16", _gemv_w16_fake),
                       ("tiles_mm", _tiles_mm_fake)):
        torch.library.register_fake(f"llmsqueeze_c::{name}")(fake)


@torch.compiler.assume_constant_result  # built and loaded once, while the first graph traces
def c_ops_available() -> bool:
    """Whether the C++-registered operators (torch.ops.llmsqueeze_c.*) run here."""
    global _C_OPS
    if _C_OPS is not None:
        return _C_OPS
    library()  # (takes the lock itself)
    with _LOCK:
        if _C_OPS is None:
            _C_OPS = _load_c_ops()
    return _C_OPS


def _load_c_ops() -> bool:
    if os.environ.get("LLMSQUEEZE_CPU_OPS", "1") == "0" or library() is None:
        return False
    try:
        torch.ops.load_library(str(_build_ops()))
        addr = [ctypes.cast(f, ctypes.c_void_p).value for f in (_LIB.lsq_gemv_q, _LIB.lsq_dequant_q, _LIB.lsq_gemv_w16)]
        torch.ops.llmsqueeze_c.set_kernels(*addr)
        _register_c_fakes()
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("llmsqueeze: compiled graphs call the CPU kernels through Python custom ops (~60 us a call): "
                    "the C++ operators could not be built (%s)", e)
        return False
    return True


def op(name: str):
    """The function to call for kernel `name` ("gemv_q", "dequantize_q", "gemv_w16"): while
    torch.compile traces, the C++ operator (or the Python custom op where it cannot be built); the
    plain function otherwise."""
    if not torch.compiler.is_compiling():
        return _PLAIN[name]
    return getattr(torch.ops.llmsqueeze_c, name).default if c_ops_available() else _OPS[name]


_PLAIN = {"gemv_q": gemv_q, "dequantize_q": dequantize_q, "gemv_w16": gemv_w16}
