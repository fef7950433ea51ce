"""QuantLinear: a Linear whose weight lives only in packed form (GPTQ layout, true zero points).

Forward paths, chosen per call from the input's device and dtype (deterministic, so a loaded model
and the in-memory one run the same code):
  * CPU with AVX2+FMA+F16C (llmsqueeze.kernels.cpu), 2/4/8 bits, no act-order: the float32 C kernels
    on the packed buffers in place (no second copy of the weights). Up to CPU_GEMV_MAX_M rows
    (decode) a GEMV that unpacks in registers; more rows (prefill) dequantize the weight, in column
    tiles of at most CPU_TILE_BYTES, into a reused scratch buffer for the BLAS GEMM. float32 inputs
    always; bf16/fp16 inputs too (converted to float32 and back) where bf16 is not native, and for
    decode where it is;
  * CPU with native bf16, bf16 activations, CPU_GEMV_MAX_M < M <= INT4_CPU_MAX_M rows, 4 bits, no
    act-order, N % 16 == 0, a group size that is a multiple of 32 (or per-channel): PyTorch's int4
    CPU kernel (`aten._weight_int4pack_mm_for_cpu`), its packed weight built once on first use;
  * CUDA, fp16/bf16 activations: the Triton kernels of `llmsqueeze.kernels` through
    `nn_kernels.quant_linear`, which builds the kernels' view of the packed weights once
    (`_kernel_cache`, never saved; `prepare_model` builds them all up front);
  * otherwise: dequantize this layer's weight to the input dtype and matmul (the weight is freed
    after the call: the model never holds a dense copy).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import nn_kernels  # light: Triton itself is imported on the first kernel call
from .kernels import cpu as cpu_kernels
from .quant.pack import pack_cols, pack_rows, padded, unpack_cols, unpack_rows

INT4_CPU_GROUPS = (256, 128, 64, 32)  # group sizes the CPU int4 kernel accepts
# The CPU int4 kernel is fast for half-precision activations and few rows (decode); measured on a
# 2-core x86 CPU (1536x576 layer, bf16): 0.05 ms vs 0.54 ms dequantize+matmul at M=1, even at M=64,
# 2x slower at M=2048. In float32 it is 2-80x slower than dequantize+matmul at every M.
INT4_CPU_DTYPES = (torch.bfloat16,)  # fp16 runs 25x slower than bf16 in this kernel on CPU
INT4_CPU_MAX_M = 64
# The float32 C kernels: the GEMV up to this many rows (measured on 2 cores, SmolLM2 and 7B widths:
# it stays ahead of dequantize + BLAS up to ~16-32 rows, where it turns compute-bound); the prefill
# path dequantizes at most this many bytes of float32 weight at a time (one reused buffer).
CPU_GEMV_MAX_M = 16
CPU_TILE_BYTES = 64 << 20
BACKENDS = ("auto", "triton", "dequant")
BACKEND = os.environ.get("LLMSQUEEZE_BACKEND", "auto")
_DEQUANT_CACHING = 0  # > 0 inside reuse_dequantized(): the dequantize fallback keeps its weight


@contextlib.contextmanager
def reuse_dequantized(module: nn.Module):
    """Inside this context every QuantLinear that runs the dequantize+matmul fallback builds its dense
    weight once and reuses it, instead of unpacking on every call; the copies are dropped on exit.

    For the calibration engine, which runs one block over every calibration batch after quantizing
    it (on SmolLM2 GPTQ the per-call unpacking was a quarter of the run). Inside, the dense path is
    taken on every device (on a GPU, cuBLAS on the cached weight instead of the 4-bit kernels; on a
    CPU in bf16, instead of its int4 kernel): the same values up to the order of the sums, and
    bit for bit the same where the dequantize path ran anyway (float32 on the CPU)."""
    global _DEQUANT_CACHING
    _DEQUANT_CACHING += 1
    try:
        yield
    finally:
        _DEQUANT_CACHING -= 1
        for m in module.modules():
            if getattr(m, "_dense_cache", None) is not None:
                m._dense_cache = None
if BACKEND not in BACKENDS:
    raise ValueError(f"LLMSQUEEZE_BACKEND={BACKEND!r} is not one of {', '.join(BACKENDS)}: unset it or pick one")


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return ()
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """A dense matmul layer we know how to quantize: nn.Linear or GPT-2's Conv1D."""
    return isinstance(module, (nn.Linear, _conv1d_type()))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features], whatever the layer type (Conv1D stores [K, N])."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.t()


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W [N, K] stored as qweight/scales/qzeros[/g_idx].

    Buffers: qweight int32 [K_pad*bits/32, N]; scales [ceil(K/G), N] in the scheme's scale dtype;
    qzeros int32 [ceil(K/G), N_pad*bits/32]; g_idx int32 [K] (activation order only); bias [N].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        bias_dtype: torch.dtype = torch.float32,
        act_order: bool = False,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = in_features if group_size == -1 else group_size  # effective size
        ng = math.ceil(in_features / self.group_size)
        self.register_buffer(
            "qweight", torch.zeros(padded(in_features) * bits // 32, out_features, dtype=torch.int32, device=device)
        )
        self.register_buffer("scales", torch.zeros(ng, out_features, dtype=scale_dtype, device=device))
        self.register_buffer(
            "qzeros", torch.zeros(ng, padded(out_features) * bits // 32, dtype=torch.int32, device=device)
        )
        if act_order:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        else:
            self.g_idx = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None
        self._int4_cache: tuple | None = None
        self._cpu_plan = None  # kernels.cpu.QPlan: the C kernels' arguments, built on first use
        self._kernel_cache = None  # nn_kernels.KernelWeights, built on first use
        self._dense_cache: tuple | None = None  # (dtype, device, weight) inside reuse_dequantized()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_quantized(
        cls,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        scale_dtype: torch.dtype = torch.float16,
        g_idx: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """q [N, K] ints, scale/zero [N, ng] (scale already holding scale_dtype values) -> packed layer."""
        n, k = q.shape
        layer = cls(
            k, n, bits, group_size, bias=bias is not None, scale_dtype=scale_dtype,
            bias_dtype=bias.dtype if bias is not None else torch.float32, act_order=g_idx is not None,
            device=q.device,
        )
        layer.qweight.copy_(pack_rows(q.t(), bits))
        layer.scales.copy_(scale.t().to(scale_dtype))
        layer.qzeros.copy_(pack_cols(zero.t(), bits))
        if g_idx is not None:
            layer.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    # -- unpacked views -------------------------------------------------------------------------
    def unpack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (q [N, K] int32, scale [N, ng] float32, zero [N, ng] int32)."""
        q = unpack_rows(self.qweight, self.bits, self.in_features).t()
        zero = unpack_cols(self.qzeros, self.bits, self.out_features).t()
        return q, self.scales.t().float(), zero

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] = (q - zero) * scale, computed in float32, returned in `dtype`."""
        return self.dequantize_weight_t(dtype).t()

    def dequantize_weight_t(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The transposed weight [K, N], built straight from the K-major packed layout (no gather
        when groups are contiguous): the fast form for x @ W^T. Same values as `grid.dequantize`."""
        k, n, g = self.in_features, self.out_features, self.group_size
        if self._cpu_kernels_take():  # the same expression in C, bit for bit, in one pass
            return cpu_kernels.op("dequantize_q")(self.qweight, self.scales, self.qzeros, self.bits, g, k).to(dtype)
        q = unpack_rows(self.qweight, self.bits, k)  # [K, N]
        zero = unpack_cols(self.qzeros, self.bits, n).float()  # [ng, N]
        scale = self.scales.float()  # [ng, N]
        if self.g_idx is not None:
            gi = self.g_idx.long()
            return ((q.float() - zero[gi]) * scale[gi]).to(dtype)
        ng = scale.shape[0]
        if ng * g != k:  # shorter last group: pad to whole groups, then drop the padding
            q = torch.cat([q, q.new_zeros(ng * g - k, n)], dim=0)
        w = (q.view(ng, g, n).float() - zero.view(ng, 1, n)) * scale.view(ng, 1, n)
        return w.view(ng * g, n)[:k].to(dtype)

    # -- forward --------------------------------------------------------------------------------
    def _int4_cpu_group(self) -> int | None:
        """The group size to run the CPU int4 kernel with, or None when it cannot run this layer."""
        if self.bits != 4 or self.g_idx is not None or self.out_features % 16:
            return None
        if self.scales.shape[0] == 1:  # per-channel: any kernel group, same scale repeated
            return 128
        return next((g for g in INT4_CPU_GROUPS if self.group_size % g == 0), None)

    def _int4_cpu_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Build (once per dtype) the int4 kernel's packed weight and [K_k/kg, N, 2] scale/offset table.

        The kernel computes w = (q - 8) * s + o, so o = (8 - zero) * s gives our (q - zero) * s."""
        cache = self._int4_cache
        if cache is not None and cache[0] == dtype and cache[1].device == self.qweight.device:
            return cache[1:]
        kg = self._int4_cpu_group()
        k, n = self.in_features, self.out_features
        kk = math.ceil(k / kg) * kg
        q, scale, zero = self.unpack()  # [N, K], [N, ng], [N, ng]
        if kk != k:  # pad K; the padded activations are zero, so the padded weights do not matter
            q = torch.cat([q, q.new_zeros(n, kk - k)], dim=1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        groups = torch.arange(kk // kg) * kg // self.group_size  # our group of each kernel group
        groups = groups.clamp(max=scale.shape[1] - 1)
        s = scale[:, groups]
        o = (8 - zero[:, groups].float()) * s
        table = torch.stack([s, o], dim=2).transpose(0, 1).contiguous().to(dtype)  # [K_k/kg, N, 2]
        self._int4_cache = (dtype, packed, table, kg, kk)
        return packed, table, kg, kk

    def _cpu_kernels_take(self) -> bool:
        """Whether the float32 C kernels run this layer (CPU buffers, layout and CPU they take)."""
        return (self.g_idx is None and self.qweight.device.type == "cpu"
                and cpu_kernels.takes_q(self.bits, self.group_size, self.scales) and cpu_kernels.available())

    def cpu_path(self, x2: torch.Tensor) -> str:
        """Which CPU path runs an input like x2 [M, K] (see the module docstring): "gemv" or "tiles"
        (the float32 C kernels: decode, prefill), "int4" (torch's int4 kernel) or "dense" (dequantize
        this layer's weight to x2's dtype and matmul)."""
        m = x2.shape[0]
        if _DEQUANT_CACHING or BACKEND != "auto" or m == 0 or (x2.requires_grad and torch.is_grad_enabled()):
            return "dense"  # (the kernels have no backward: a gradient to x goes through the torch matmul)
        native_half = x2.dtype != torch.float32 and cpu_kernels.cpu().native_bf16
        if self._cpu_kernels_take() and (m <= CPU_GEMV_MAX_M or not native_half):
            return "gemv" if m <= CPU_GEMV_MAX_M else "tiles"
        if x2.dtype in INT4_CPU_DTYPES and m <= INT4_CPU_MAX_M and self._int4_cpu_group() is not None:
            return "int4"
        return "dense"

    def _cpu_kernel_forward(self, x2: torch.Tensor, path: str) -> torch.Tensor:
        """x2 [M, K] -> [M, N] in x2's dtype (bias added) by the float32 C kernels."""
        k, n = self.in_features, self.out_features
        args = (self.qweight, self.scales, self.qzeros, self.bits, self.group_size, k)
        compiling = torch.compiler.is_compiling()
        if path == "gemv" and not compiling and x2.dtype in cpu_kernels.SCALE_CODES:  # x2's dtype in and out
            plan = self._live_cpu_plan()
            if plan is None:  # none yet, or built for other buffers
                plan = self._cpu_plan = cpu_kernels.q_plan(*args, bias=self.bias)
            return cpu_kernels.gemv_planned(x2.contiguous(), plan)
        xf = x2.float().contiguous()
        step = min(n, max(8, CPU_TILE_BYTES // (4 * k) // 8 * 8))  # prefill: columns of W^T per tile
        if compiling:  # the kernels as operators (C++, else Python): one opaque call each
            if path == "gemv":
                y = cpu_kernels.op("gemv_q")(xf, *args, self.bias)
            elif cpu_kernels.c_ops_available():  # the tiles loop below, in C++
                y = torch.ops.llmsqueeze_c.tiles_mm(xf, *args, self.bias, step)
            else:
                y = xf @ cpu_kernels.op("dequantize_q")(*args)
                y = y if self.bias is None else y + self.bias.float()
        elif path == "gemv":  # an x2 of another dtype (float64)
            y = cpu_kernels.gemv_q(xf, *args, self.bias)
        else:  # column tiles of W^T dequantized into one reused buffer, each into the BLAS GEMM
            buf = cpu_kernels.scratch(k * step)
            y = torch.empty(xf.shape[0], n, dtype=torch.float32)
            for n0 in range(0, n, step):
                n1 = min(n, n0 + step)
                torch.mm(xf, cpu_kernels.dequantize_q(*args, out=buf, cols=(n0, n1)), out=y[:, n0:n1])
            if self.bias is not None:
                y += self.bias.float()
        return y if x2.dtype == torch.float32 else y.to(x2.dtype)

    def _live_cpu_plan(self):
        """The GEMV's plan (kernels.cpu.QPlan) if it was built for the very buffers the layer holds now
        (they may be assigned anew), else None. Plain dict reads: it runs on every decode call."""
        plan = self._cpu_plan
        if plan is None:
            return None
        b, t = self._buffers, plan.tensors
        bias = b["bias"] if "bias" in b else self.__dict__.get("bias")
        live = b["qweight"] is t[0] and b["scales"] is t[1] and b["qzeros"] is t[2] and bias is t[3]
        return plan if live else None

    def _triton_forward(self, x2: torch.Tensor) -> torch.Tensor | None:
        """x2 [M, K] -> [M, N] (bias added) by the Triton kernels, or None where they cannot run it."""
        return nn_kernels.quant_linear(x2, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self._cpu_plan is not None and x.dtype in cpu_kernels.SCALE_CODES and BACKEND == "auto" and not _DEQUANT_CACHING
                and not x.requires_grad and x.device.type == "cpu" and not torch.compiler.is_compiling()
                and 0 < x.numel() <= CPU_GEMV_MAX_M * self.in_features):
            plan = self._live_cpu_plan()  # decode's fast path: the GEMV's plan from an earlier call
            if plan is not None:
                y = cpu_kernels.gemv_planned(x.reshape(-1, self.in_features).contiguous(), plan)
                return y.view(*x.shape[:-1], self.out_features)
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = None
        caching = _DEQUANT_CACHING > 0  # many calls on one weight: a dense copy and cuBLAS/MKL beat the kernels
        if not caching and (BACKEND == "triton" or (BACKEND == "auto" and x.is_cuda)):
            y = self._triton_forward(x2)
        path = self.cpu_path(x2) if y is None and x.device.type == "cpu" else "dense"
        if path in ("gemv", "tiles"):
            y = self._cpu_kernel_forward(x2, path)
        elif path == "int4":
            packed, table, kg, kk = self._int4_cpu_weights(x.dtype)
            if kk != self.in_features:
                x2 = F.pad(x2, (0, kk - self.in_features))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, kg, table)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        if y is None:
            fp16_cpu = x.dtype == torch.float16 and x.device.type == "cpu"  # its GEMM is 14x slower on [K, N]
            cache = self._dense_cache
            if cache is not None and cache[0] == x.dtype and cache[1] == x.device:
                w = cache[2]
            else:
                w = self.dequantize_weight_t(x.dtype)  # [K, N]
                if fp16_cpu:
                    w = w.t().contiguous()  # [N, K]
                if _DEQUANT_CACHING:
                    self._dense_cache = (x.dtype, x.device, w)
            y = F.linear(x2, w) if fp16_cpu else x2 @ w
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.reshape(*shape, self.out_features)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() must not re-round the scales: they keep their storage dtype
        # (as the loader keeps them), so a cast model and a loaded one compute the same numbers.
        self._int4_cache = None  # device/dtype moves invalidate the kernels' copies
        self._cpu_plan = None
        self._kernel_cache = None
        self._dense_cache = None
        scales = self.scales
        out = super()._apply(fn, recurse)
        if self.scales.dtype != scales.dtype:
            self.scales = scales.to(self.scales.device)
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        # new packed values: the kernels' copies built from the old ones are stale
        self._int4_cache = None
        self._cpu_plan = None
        self._kernel_cache = None
        self._dense_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, act_order={self.g_idx is not None}, bias={self.bias is not None}"
        )


class LUTLinear(nn.Module):
    """y = x @ W^T + b with W [N, K] on a non-uniform grid (quant/lut.py): each weight is a `bits`-bit
    index into its group's table of 2**bits levels.

    Buffers: qweight int32 [K_pad*bits/32, N] (the indices, packed like QuantLinear's codes); for
    grid "nf" scales [ceil(K/G), N] (the group absmax; the levels are fixed, `lut.nf_levels`), for
    "kmeans" codebook [ceil(K/G), N, 2**bits] (the levels themselves), both in the scale dtype;
    bias [N]. Forward: the Triton lookup kernel on CUDA with fp16/bf16 activations
    (`nn_kernels.lut_linear`), else dequantize by table lookup in torch and matmul.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, grid: str,
                 bias: bool = False, scale_dtype: torch.dtype = torch.float16,
                 bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if grid not in ("nf", "kmeans"):
            raise ValueError(f"LUTLinear grid {grid!r}: use 'nf' or 'kmeans'")
        self.in_features, self.out_features, self.bits, self.grid = in_features, out_features, bits, grid
        self.group_size = in_features if group_size == -1 else group_size
        ng = math.ceil(in_features / self.group_size)
        self.register_buffer(
            "qweight", torch.zeros(padded(in_features) * bits // 32, out_features, dtype=torch.int32, device=device)
        )
        if grid == "nf":
            self.register_buffer("scales", torch.zeros(ng, out_features, dtype=scale_dtype, device=device))
            self.codebook = None
        else:
            self.register_buffer("codebook", torch.zeros(ng, out_features, 2**bits, dtype=scale_dtype, device=device))
            self.scales = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None
        self.g_idx = None  # never permuted: the tables are fitted per natural-order group

    @classmethod
    def from_quantized(cls, q: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | None, bits: int,
                       group_size: int, grid: str, bias: torch.Tensor | None = None,
                       scale_dtype: torch.dtype = torch.float16) -> "LUTLinear":
        """q [N, K] indices, table [N, ng, L] (kmeans: the codebook), scale [N, ng] (nf) -> packed layer."""
        n, k = q.shape
        layer = cls(k, n, bits, group_size, grid, bias=bias is not None, scale_dtype=scale_dtype,
                    bias_dtype=bias.dtype if bias is not None else torch.float32, device=q.device)
        layer.qweight.copy_(pack_rows(q.t(), bits))
        if grid == "nf":
            layer.scales.copy_(scale.t().to(scale_dtype))
        else:
            layer.codebook.copy_(table.transpose(0, 1).to(scale_dtype))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def table(self) -> torch.Tensor:
        """The levels of every (row, group): [N, ng, L] float32, as quant/lut.py builds them."""
        if self.grid == "nf":
            from .quant.lut import nf_levels

            return nf_levels(self.bits, self.scales.device).view(1, 1, -1) * self.scales.t().float().unsqueeze(2)
        return self.codebook.transpose(0, 1).float()

    def unpack(self) -> torch.Tensor:
        """-> q [N, K] int32 indices."""
        return unpack_rows(self.qweight, self.bits, self.in_features).t()

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_weight_t(dtype).t()

    def dequantize_weight_t(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W^T [K, N] = table[n, k // G, q[k, n]] (float32 lookup, returned in `dtype`)."""
        k, n, g = self.in_features, self.out_features, self.group_size
        q = unpack_rows(self.qweight, self.bits, k).long()  # [K, N]
        ng = math.ceil(k / g)
        if ng * g != k:
            q = torch.cat([q, q.new_zeros(ng * g - k, n)], dim=0)
        q = q.view(ng, g, n)
        if self.grid == "nf":
            from .quant.lut import nf_levels

            w = nf_levels(self.bits, q.device)[q] * self.scales.float().view(ng, 1, n)
        else:  # codebook [ng, N, L] gathered at [ng, N, g] indices
            w = self.codebook.float().gather(2, q.transpose(1, 2)).transpose(1, 2)
        return w.reshape(ng * g, n)[:k].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = None
        if BACKEND == "triton" or (BACKEND == "auto" and x.is_cuda):
            y = nn_kernels.lut_linear(x2, self)
        if y is None:
            w_t = self.dequantize_weight_t(x.dtype)
            y = F.linear(x2, w_t.t().contiguous()) if x.dtype == torch.float16 and x.device.type == "cpu" else x2 @ w_t
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.reshape(*shape, self.out_features)

    def _apply(self, fn, recurse=True):
        # like QuantLinear: a model cast keeps the tables in their storage dtype
        keep = {name: t for name in ("scales", "codebook") if (t := getattr(self, name)) is not None}
        out = super()._apply(fn, recurse)
        for name, t in keep.items():
            cur = getattr(self, name)
            if cur.dtype != t.dtype:
                setattr(self, name, cur.to(t.dtype))
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, grid={self.grid}, bias={self.bias is not None}")


class HalfStorageLinear(nn.Linear):
    """An nn.Linear that keeps its bf16/fp16 weight as stored and computes in float32.

    For CPUs without native half precision (compute_in_float32): float32 activations are the fast
    kind there, and a 16-bit weight read as such moves half the bytes of an upcast copy (SmolLM2's
    tied head is 113 MiB in float32, 57 in bf16, read once per decoded token). Few rows: the C GEMV
    on the 16-bit rows; more: column tiles of the weight converted into a reused float32 buffer
    for the BLAS GEMM. The values are the checkpoint's exactly (bf16 -> float32 is exact)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == w.dtype or x.device.type != "cpu" or (
                torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):  # the kernels have no backward
            return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        m, k, n = x2.shape[0], self.in_features, self.out_features
        if m <= CPU_GEMV_MAX_M and w.dtype in cpu_kernels.W16_CODES and w.is_contiguous() and cpu_kernels.available():
            y = cpu_kernels.op("gemv_w16")(x2, w, self.bias)
        elif torch.compiler.is_compiling():
            y = F.linear(x2, w.float(), None if self.bias is None else self.bias.float())
        else:
            step = min(n, max(1, CPU_TILE_BYTES // (4 * k)))
            buf = cpu_kernels.scratch(k * step)
            y = torch.empty(m, n, dtype=torch.float32)
            for n0 in range(0, n, step):
                n1 = min(n, n0 + step)
                wt = buf[: (n1 - n0) * k].view(n1 - n0, k)
                wt.copy_(w[n0:n1])
                torch.mm(x2, wt.t(), out=y[:, n0:n1])
            if self.bias is not None:
                y += self.bias.float()
        return y.to(x.dtype).reshape(*shape, n)


class Float32Embedding(nn.Embedding):
    """An nn.Embedding that keeps its 16-bit table as stored and returns float32 rows (the input
    side of a tied HalfStorageLinear head)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


def compute_in_float32(model: nn.Module) -> int:
    """Make `model` compute in float32 while its dense Linear weights and embedding tables keep their
    16-bit storage (bf16/fp16): they become HalfStorageLinear / Float32Embedding (same parameters,
    so tied weights stay tied); every other floating tensor (norms, biases, rotary tables) and any
    other module moves to float32; packed layers keep their buffers. Returns how many weights kept
    16-bit storage. For CPUs without native bf16 (kernels.cpu.best_dtype() float32)."""
    kept = {}
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.weight.dtype in (torch.bfloat16, torch.float16):
            mod.__class__ = HalfStorageLinear
            kept[id(mod.weight)] = mod.weight.numel()
        elif type(mod) is nn.Embedding and mod.weight.dtype in (torch.bfloat16, torch.float16):
            mod.__class__ = Float32Embedding
            kept[id(mod.weight)] = mod.weight.numel()
    def up(t):
        return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t

    for mod in model.modules():
        if isinstance(mod, (HalfStorageLinear, Float32Embedding)):
            if getattr(mod, "bias", None) is not None:
                mod.bias = nn.Parameter(up(mod.bias.data), requires_grad=mod.bias.requires_grad)
        else:  # packed layers' own _apply keeps what they store as is (QuantLinear: its scales)
            mod._apply(up, recurse=False)
    if hasattr(model, "config"):
        model.config.dtype = torch.float32
    return sum(kept.values())


def adapt_to_cpu(model: nn.Module) -> torch.dtype:
    """`--dtype auto` for a model loaded on the CPU in its checkpoint's dtype: where that dtype is
    half precision and not native here (kernels.cpu.auto_dtype), make it compute in float32 with its
    16-bit weights kept as stored (compute_in_float32). Returns the dtype it now computes in."""
    stored = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    want = cpu_kernels.auto_dtype(stored) if on_cpu else stored
    if want == torch.float32 and stored != torch.float32:
        compute_in_float32(model)
    return want


def prepare_model(model: nn.Module) -> int:
    """Build the kernels' weights (nn_kernels.kernel_weights) of every QuantLinear now, e.g. before
    torch.compile; returns how many layers."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        nn_kernels.kernel_weights(m)
    return len(layers)


def empty_quant_linear(in_features: int, out_features: int, scheme, bias: bool = False,
                       bias_dtype: torch.dtype = torch.float32, act_order: bool = False, device=None) -> nn.Module:
    """An empty packed layer for `scheme` (a QuantScheme), for the loader to fill: a QuantLinear on the
    uniform grid, a LUTLinear on a non-uniform one."""
    grid = getattr(scheme, "grid", "uniform")
    if grid != "uniform":
        return LUTLinear(in_features, out_features, scheme.bits, scheme.group_size, grid, bias=bias,
                         scale_dtype=scheme.torch_scale_dtype, bias_dtype=bias_dtype, device=device)
    return QuantLinear(in_features, out_features, scheme.bits, scheme.group_size, bias=bias,
                       scale_dtype=scheme.torch_scale_dtype, bias_dtype=bias_dtype, act_order=act_order, device=device)


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def index_bits(m: int) -> int:
    """Bits per stored N:M index (positions 0..m-1): the smallest packable width."""
    return next(b for b in (2, 3, 4, 8) if 2**b >= m)


class SparseLinear(nn.Module):
    """y = x @ W^T + b with a pruned W [N, K] stored compressed, in one of two formats:

      * "nm" (N:M, e.g. 2:4): the kept values [N, K*n/m] and `indices`, the position (0..m-1) of each
        kept value inside its group of m inputs, increasing within the group, packed along the row with
        `index_bits(m)` bits (2 for 2:4) as int32 [N, ceil(K*n/m/32)*bits]; a group with fewer than n
        nonzeros stores zeros. The values are either `values` (the weight dtype) or, with `quant`
        (bits, group size), a QuantLinear `qvalues` over the compressed [N, K*n/m] matrix: a group of
        g inputs of W is g*n/m compressed columns with the same scale and zero.
      * "bitmask" (unstructured): `bitmask` uint8 [N, ceil(K/8)] (input j of a row is bit j % 8 of
        byte j // 8) and `values` [nnz], the nonzeros in row-major order.

    `verify()` checks the stored pattern; the loader refuses a checkpoint that fails it. Forward: on a
    CUDA GPU with fp16/bf16 activations a 2:4 layer runs as a torch semi-structured sparse tensor
    (built once); everywhere else through the dense weight, rebuilt once and cached.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, nm: tuple[int, int] | None = None,
                 nnz: int | None = None, bias: bool = False, dtype: torch.dtype = torch.float32, device=None,
                 quant: tuple[int, int] | None = None, scale_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.nm = tuple(nm) if nm is not None else None
        if fmt == "nm":
            n, m = self.nm
            width = in_features // m * n
            ib = index_bits(m)
            self.register_buffer("indices", torch.zeros(out_features, padded(width) * ib // 32, dtype=torch.int32,
                                                        device=device))
            if quant is None:
                self.register_buffer("values", torch.zeros(out_features, width, dtype=dtype, device=device))
            else:
                bits, g = quant
                self.qvalues = QuantLinear(width, out_features, bits, g, scale_dtype=scale_dtype, device=device)
        elif fmt == "bitmask":
            self.register_buffer("values", torch.zeros(nnz, dtype=dtype, device=device))
            self.register_buffer("bitmask", torch.zeros(out_features, (in_features + 7) // 8, dtype=torch.uint8,
                                                        device=device))
        else:
            raise ValueError(f"sparse format {fmt!r}: use 'nm' or 'bitmask'")
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._cache: tuple | None = None

    @staticmethod
    def nm_positions(nonzero: torch.Tensor, n: int, m: int) -> torch.Tensor:
        """nonzero [N, K] bool -> positions [N, K/m, n]: the nonzeros first, then the lowest free slots,
        in increasing order. Raises when a group holds more than n nonzeros."""
        rows, k = nonzero.shape
        nz = nonzero.view(rows, k // m, m)
        if (nz.sum(-1) > n).any():
            raise ValueError(f"weight is not {n}:{m} sparse")
        order = nz.float() * 2 * m - torch.arange(m, device=nonzero.device)
        return order.topk(n, dim=-1).indices.sort(dim=-1).values

    @classmethod
    @torch.no_grad()
    def from_dense(cls, w: torch.Tensor, bias: torch.Tensor | None, nm: tuple[int, int] | None = None) -> "SparseLinear":
        """w [N, K] with zeros where pruned -> compressed layer ("nm" when `nm` is given, else "bitmask")."""
        n_out, k = w.shape
        if nm is not None:
            n, m = nm
            pos = cls.nm_positions(w != 0, n, m)  # [N, K/m, n]
            layer = cls(k, n_out, "nm", nm, bias=bias is not None, dtype=w.dtype, device=w.device)
            layer.values.copy_(w.view(n_out, k // m, m).gather(-1, pos).reshape(n_out, -1))
            layer.indices.copy_(pack_cols(pos.reshape(n_out, -1), index_bits(m)))
        else:
            keep = w != 0
            layer = cls(k, n_out, "bitmask", nnz=int(keep.sum()), bias=bias is not None, dtype=w.dtype, device=w.device)
            layer.values.copy_(w[keep])
            layer.bitmask.copy_(pack_bits(keep))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, q: "QuantLinear", nm: tuple[int, int]) -> "SparseLinear":
        """A packed QuantLinear whose pruned weights have q == zero -> N:M values quantized on the
        compressed matrix (needs a group size that is a multiple of m, or per-channel)."""
        n, m = nm
        k, n_out, g = q.in_features, q.out_features, q.group_size
        if q.g_idx is not None or (g % m and q.scales.shape[0] > 1):
            raise ValueError(f"group size {g} is not a multiple of {m}: cannot compress {n}:{m}")
        codes, scale, zero = q.unpack()  # [N, K], [N, ng], [N, ng]
        zero_full = zero.repeat_interleave(g, dim=1)[:, :k]
        pos = cls.nm_positions(codes != zero_full, n, m)
        width = k // m * n
        cg = width if q.scales.shape[0] == 1 else g // m * n
        layer = cls(k, n_out, "nm", nm, bias=q.bias is not None, dtype=q.bias.dtype if q.bias is not None else torch.float32,
                    device=codes.device, quant=(q.bits, cg), scale_dtype=q.scales.dtype)
        qc = codes.view(n_out, k // m, m).gather(-1, pos).reshape(n_out, width)
        layer.qvalues = QuantLinear.from_quantized(qc, scale, zero, q.bits, cg, scale_dtype=q.scales.dtype)
        layer.indices.copy_(pack_cols(pos.reshape(n_out, -1), index_bits(m)))
        if q.bias is not None:
            layer.bias.copy_(q.bias)
        return layer

    def _positions(self) -> torch.Tensor:
        """[N, K/m, n] int64 positions of the kept values inside each group."""
        n, m = self.nm
        width = self.in_features // m * n
        return unpack_cols(self.indices, index_bits(m), width).long().view(self.out_features, -1, n)

    def verify(self) -> str | None:
        """None when the stored pattern is sound, else what is wrong."""
        if self.fmt == "nm":
            n, m = self.nm
            idx = self._positions()
            if idx.numel() and int(idx.max()) >= m:
                return f"an N:M index is {int(idx.max())}, outside 0..{m - 1}"
            if n > 1 and (idx[..., 1:] <= idx[..., :-1]).any():
                return f"a group of {m} inputs holds a repeated or unordered index: not {n}:{m}"
            return None
        ones = int(unpack_bits(self.bitmask, self.in_features).sum())
        if ones != self.values.numel():
            return f"the bitmask marks {ones} weights but {self.values.numel()} values are stored"
        pad = self.bitmask.shape[1] * 8 - self.in_features
        if pad and (self.bitmask[:, -1].int() >> (8 - pad)).any():
            return "the bitmask marks inputs beyond the layer's width"
        return None

    def keep_mask(self) -> torch.Tensor:
        """[N, K] bool: the positions the stored pattern keeps (an N:M slot holding a zero included)."""
        n_out, k = self.out_features, self.in_features
        if self.fmt == "nm":
            n, m = self.nm
            keep = torch.zeros(n_out, k // m, m, dtype=torch.bool, device=self.indices.device)
            return keep.scatter_(-1, self._positions(), True).view(n_out, k)
        return unpack_bits(self.bitmask, k)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [N, K]."""
        quant = hasattr(self, "qvalues")
        dtype = dtype or (torch.float32 if quant else self.values.dtype)
        n_out, k = self.out_features, self.in_features
        dev = self.indices.device if self.fmt == "nm" else self.values.device
        w = torch.zeros(n_out, k, dtype=dtype, device=dev)
        if self.fmt == "nm":
            n, m = self.nm
            vals = self.qvalues.dequantize_weight(dtype) if quant else self.values.to(dtype)
            w.view(n_out, k // m, m).scatter_(-1, self._positions(), vals.view(n_out, k // m, n))
        else:
            w[unpack_bits(self.bitmask, k)] = self.values.to(dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if self._cache is None or self._cache[0] != key:
            w = self.to_dense(x.dtype)
            if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and self.nm == (2, 4):
                try:
                    from torch.sparse import to_sparse_semi_structured

                    w = to_sparse_semi_structured(w)
                except (RuntimeError, ValueError, ImportError):  # shapes or GPU it does not support
                    pass
            self._cache = (key, w)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x.reshape(-1, self.in_features), self._cache[1], bias)  # semi-structured wants 2-D inputs
        return y.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        self._cache = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        pattern = f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"bitmask, nnz={self.values.numel()}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {pattern}, bias={self.bias is not None}"


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [N, K] -> uint8 [N, ceil(K/8)], input j in bit j % 8 of byte j // 8."""
    n, k = mask.shape
    m = torch.zeros(n, (k + 7) // 8 * 8, dtype=torch.uint8, device=mask.device)
    m[:, :k] = mask
    weights = (2 ** torch.arange(8, device=mask.device)).to(torch.uint8)
    return (m.view(n, -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K/8)] -> bool [N, K]."""
    shifts = torch.arange(8, device=bits.device)
    return ((bits.unsqueeze(-1).int() >> shifts) & 1).bool().view(bits.shape[0], -1)[:, :k]
