"""The sequential, block-by-block calibration engine, shared by every method that needs data (GPTQ
here; Wanda and SparseGPT later).

1. Capture: run the model on the calibration batches with every decoder block replaced by a stub
   that records what the block is called with (hidden states for the first block; masks, position
   embeddings and other kwargs for every block, since layer types may differ) and passes the hidden
   states through unchanged; the last stub stops the forward, so the head never runs.
2. For each block: move it alone to the compute device; for each group of Linears (one group, or
   the architecture's true-sequential order), hook their inputs into `method.collect`, run the
   block over all batches, then let `method.apply` replace each Linear (a packed QuantLinear for
   GPTQ). Finally re-run the block, now quantized, and its outputs become the next block's inputs,
   so each block is calibrated on what the compressed model upstream really produces.

Host memory: the model plus one set of block activations (on `offload` device); compute device
memory: one block plus, unless offloaded, the activations. With a `block_loader` (llmsqueeze.lazy)
the blocks start empty (meta tensors): each is read from disk when its turn comes and handed to
`block_done`, which writes and frees it, so the host holds one block at a time. With no batches
(round-to-nearest) there is nothing to capture or re-run: each block is loaded, compressed, handed on.
"""
from __future__ import annotations

import fnmatch
import inspect
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import CalibrationOptions, LlmsqueezeError
from .kernels import cpu as cpu_kernels
from .models import get_arch
from .nn import is_linear, reuse_dequantized, set_module
from .nn_moe import MoEExperts

log = logging.getLogger("llmsqueeze")


class Method(Protocol):
    """What the engine drives: statistics in, replacement modules out."""

    def collect(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        """x [..., in_features]: one batch of the layer's inputs."""

    def apply(self, name: str, module: nn.Module) -> nn.Module:
        """The module that replaces `module` (statistics for it are complete)."""

    # Optional: `collect_inputs = False` when collect needs no calls (the engine then skips that pass);
    # prepare_block(prefix, block, batches) rewrites the float block in place before its
    # Linears are calibrated (SmoothQuant folds scales into norms and Linears); `batches()` yields
    # the block's calibration inputs (hidden [B, T, H], kwargs) on the compute device.
    # `float_targets = True`: prepare_block is also passed targets=, a callable yielding, batch by
    # batch, the float block's outputs on the float (never quantized) model's inputs [B, T, H].


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_devices(device: str | None, offload: str | None) -> str:
    """The calibration device (default: CUDA when present, else CPU), after checking that it and the
    offload device exist here; raises a one-line LlmsqueezeError otherwise."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for what, dev in (("device", device), ("offload", offload)):
        if dev is None:
            continue
        try:
            kind = torch.device(dev).type
        except RuntimeError:
            raise LlmsqueezeError(f"--{what} {dev!r} is not a device: use cpu or cuda (cuda:N)") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise LlmsqueezeError(f"--{what} {dev!r}: no CUDA GPU is visible here; use --{what} cpu")
        if kind == "cuda" and (torch.device(dev).index or 0) >= torch.cuda.device_count():
            raise LlmsqueezeError(f"--{what} {dev!r}: only {torch.cuda.device_count()} CUDA GPU(s) here; use cuda:0")
    return device


def calibration_ids(data, what: str) -> torch.Tensor:
    """Calibration data (token ids [n_samples, seq_len], or batches of them) as one int64 tensor;
    a one-line LlmsqueezeError when missing or malformed. `what` names the method asking for it."""
    if data is None:
        raise LlmsqueezeError(f"method {what!r} needs calibration data: pass data= token ids [n_samples, seq_len] "
                              "(llmsqueeze.data.calibration_batches), or --calib on the command line")
    ids = data if isinstance(data, torch.Tensor) else torch.cat(list(data))
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise LlmsqueezeError(f"calibration data must be integer token ids [n_samples, seq_len], got {tuple(ids.shape)} {ids.dtype}")
    return ids.long()


class _StopForward(Exception):
    pass


@dataclass
class EngineStats:
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    peak_device_mib: float | None = None
    blocks: int = 0
    layers: int = 0
    per_block_s: list[float] = field(default_factory=list)
    rare_experts: list[dict] = field(default_factory=list)  # experts calibrated on all tokens (MoE)


@dataclass
class Job:
    """One compression run as an algorithm sees it: built by the orchestrator (llmsqueeze.pipeline),
    read by each algorithm's `build(job)` (the engine method that runs block by block) or
    `run(job)` (a method that needs the whole model at once), which also fills `method_args`, what
    the checkpoint records of the run."""

    model: nn.Module
    names: list[str]  # the layers to compress, in model order
    scheme: object = None  # QuantScheme, W8A8Scheme, or None (pruning without quantization)
    options: CalibrationOptions = field(default_factory=CalibrationOptions)
    batches: list[torch.Tensor] = field(default_factory=list)  # calibration token ids, [B, T] each
    ids: torch.Tensor | None = None  # all calibration token ids [n_samples, seq_len]
    device: str = "cpu"  # where blocks compute
    progress: bool = True
    extra: dict = field(default_factory=dict)  # the method's own options (autoround's iters, refit, ...)
    layer_schemes: dict | None = None  # mixed precision: per-layer overrides of the scheme
    sparsity: object = None  # SparsityScheme when pruning
    layer_sparsity: dict | None = None  # per-layer sparsity (OWL), when allocated
    method_args: dict = field(default_factory=dict)

    @property
    def data_args(self) -> dict:
        """n_samples and seq_len of the calibration data (nothing without data)."""
        return {} if self.ids is None else {"n_samples": int(self.ids.shape[0]), "seq_len": int(self.ids.shape[1])}


def _to(obj, device, dtype=None):
    """Move every tensor inside nested tuples/lists/dicts (floating ones to `dtype` too, if given)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def compute_dtype(stored: torch.dtype, device: torch.device, option: str = "auto") -> torch.dtype:
    """What a block stored in `stored` computes in on `device` (CalibrationOptions.compute_dtype)."""
    if option == "model" or not stored.is_floating_point:
        return stored
    if option != "auto":
        return getattr(torch, option)
    return cpu_kernels.auto_dtype(stored) if device.type == "cpu" else stored


def _move_outside(model: nn.Module, blocks_path: str, device) -> None:
    """Move every parameter and buffer that is not inside the decoder blocks (embeddings, rotary
    tables, final norm, head) to `device`; tensors not loaded (meta, a lazy model's head) stay."""
    prefix = blocks_path + "."
    for name, module in model.named_modules():
        if name == blocks_path or name.startswith(prefix):
            continue
        module._apply(lambda t: t if t.is_meta else t.to(device), recurse=False)


def _outside_device(model: nn.Module, blocks_path: str) -> torch.device:
    """Where the parameters outside the decoder blocks (embeddings, final norm, head) live."""
    prefix = blocks_path + "."
    return next((p.device for n, p in model.named_parameters() if not n.startswith(prefix)), torch.device("cpu"))


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], device, offload
) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """-> (hidden [n_batches] each [B, T, H] on `offload`, kwargs[n_batches][n_blocks])."""
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = []
    own = [b.__dict__.get("forward") for b in blocks]  # an instance-level forward (e.g. accelerate hooks)
    signatures = [inspect.signature(b.forward) for b in blocks]
    # tensors shared by several blocks (masks, rotary tables) are moved once per batch; the original
    # is held beside its copy so that its id cannot be reused by another tensor meanwhile
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def offloaded(v):
        if isinstance(v, torch.Tensor):
            if id(v) not in cache:
                cache[id(v)] = (v, v.to(offload))
            return cache[id(v)][1]
        return _to(v, offload)

    def stub(index):
        def forward(*args, **kw):
            # name every argument (GPT-2 passes the cache and mask positionally), so the block can be
            # re-called as block(hidden, **kwargs)
            sig = signatures[index]
            bound = sig.bind_partial(*args, **kw).arguments
            h = bound.pop(next(iter(sig.parameters)))  # the hidden states
            for p in sig.parameters.values():
                if p.kind is p.VAR_KEYWORD:  # flatten **kwargs back into keywords
                    bound.update(bound.pop(p.name, {}))
            if index == 0:
                hidden.append(h.to(offload))
            kwargs[-1].append({k: offloaded(v) for k, v in bound.items()})
            if index == len(blocks) - 1:
                raise _StopForward
            return h

        return forward

    try:
        for i, b in enumerate(blocks):
            b.forward = stub(i)
        for ids in batches:
            kwargs.append([])
            cache.clear()
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for b, f in zip(blocks, own):
            if f is None:
                del b.forward  # back to the class method
            else:
                b.forward = f
    return hidden, kwargs


def block_output(out):
    """A decoder block's hidden states [B, T, H] from what its forward returns (a tensor or a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _groups(names: list[str], order: tuple[tuple[str, ...], ...], true_sequential: bool):
    """The Linears of a block to calibrate together, in order; leftovers (not in the table) last."""
    if not true_sequential or not order:
        return [names]
    groups, seen = [], set()
    for g in order:  # an entry with "*" (MoE experts: "mlp.experts.*.gate_proj") stands for any expert
        present = [n for p in g for n in ([p] if "*" not in p else fnmatch.filter(names, p)) if n in names]
        if present:
            groups.append(present)
            seen.update(present)
    rest = [n for n in names if n not in seen]
    return groups + ([rest] if rest else [])


def _expert_chunks(groups: list[list[str]], moes: dict[str, MoEExperts], per_pass: int | None) -> list[list[str]]:
    """Each group's MoE experts split into passes of `per_pass` experts, before the group's other
    Linears (None: unchanged). A pass holds only its experts' statistics (GPTQ: their Hessians), so
    peak memory holds a few experts' instead of all of them, at the cost of one block pass each. The
    result does not change: experts read the MoE layer's input, which no expert changes, and the
    other Linears (attention, shared experts) come last, as they would in one pass."""
    if per_pass is None or not moes:
        return groups
    out = []
    for group in groups:
        experts: dict[tuple[str, int], list[str]] = {}
        rest = []
        for g in group:
            owner = next(((n, int(g[len(n) + 1:].partition(".")[0])) for n in moes if g.startswith(n + ".")), None)
            (experts.setdefault(owner, []) if owner is not None else rest).append(g)
        keys = list(experts)
        for j in range(0, len(keys), per_pass):
            out.append([g for k in keys[j:j + per_pass] for g in experts[k]])
        if rest:
            out.append(rest)
    return out


def _count_routed(moes: dict[str, MoEExperts], group: list[str]) -> dict[str, MoEExperts]:
    """Start counting the routed tokens of the MoE layers whose experts are in `group`."""
    counted = {n: m for n, m in moes.items() if any(g.startswith(n + ".") for g in group)}
    for m in counted.values():
        m.routed_tokens = [0] * m.num_experts
    return counted


def _collect_pass(block, bprefix, names, method, hidden, kwargs, i, device, work) -> None:
    """One pass of the block over the calibration batches with method.collect hooked on `names` only."""
    handles = []
    for n in names:
        def hook(module, args, out, full=bprefix + n):
            method.collect(full, module, args[0])

        handles.append(block.get_submodule(n).register_forward_hook(hook))
    try:
        for h, kw in zip(hidden, kwargs):
            block(_to(h, device, work), **_to(kw[i], device, work))
    finally:
        for hd in handles:
            hd.remove()


def _calibrate_rare_experts(moes: dict[str, MoEExperts], routed: dict[str, list[int]], group: list[str], bprefix: str,
                            min_tokens: int, n_tokens: int, collect_pass) -> list[dict]:
    """The rare-expert policy: each expert of `group` routed fewer than `min_tokens` calibration
    tokens in this block (none, for some experts of a small calibration set) collects its statistics
    once more from all `n_tokens` tokens reaching its MoE layer, as llm-compressor's "calibrate all
    experts" does for every expert, so that no Hessian is empty or near rank one (and no scale NaN).
    Its few routed tokens then count twice (at most min_tokens of n_tokens): collect has no undo.
    The block output is unchanged: only routed tokens enter it. Logged per expert; -> the records."""
    rare = {}
    for n, counts in routed.items():
        experts = [e for e, c in enumerate(counts)
                   if c < min_tokens and any(g.startswith(f"{n}.{e}.") for g in group)]
        if experts:
            rare[n] = experts
    if not rare:
        return []
    records = []
    for n, experts in rare.items():
        for e in experts:
            log.info("%s%s.%d: %d routed calibration tokens (< %d): calibrated on all %d tokens of the layer",
                     bprefix, n, e, routed[n][e], min_tokens, n_tokens)
            records.append({"expert": f"{bprefix}{n}.{e}", "routed_tokens": routed[n][e], "calibrated_on": n_tokens})
        moes[n].calibrate_all = frozenset(experts)
    names = [g for g in group if any(g.startswith(f"{n}.{e}.") for n, es in rare.items() for e in es)]
    try:
        collect_pass(names)
    finally:
        for n in rare:
            moes[n].calibrate_all = frozenset()
    return records


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    batches: list[torch.Tensor],
    method: Method,
    layer_names: list[str],
    device: str | torch.device = "cpu",
    offload: str | torch.device | None = None,
    true_sequential: bool = False,
    progress: bool = True,
    *,
    block_loader: Callable[[int], None] | None = None,
    block_done: Callable[[int, nn.Module, list[torch.Tensor]], None] | None = None,
    start_block: int = 0,
    start_hidden: list[torch.Tensor] | None = None,
    on_captured: Callable[[], None] | None = None,
    compute: str = "auto",
    expert_min_tokens: int = 32,
    experts_per_pass: int | None = None,
) -> EngineStats:
    """Calibrate `layer_names` (full module names, all inside the decoder blocks) block by block.

    batches: token id tensors [B, T] (none: a data-free method, blocks are only compressed); device:
    where each block computes; offload: where block activations wait between blocks (default:
    `device`). block_loader(i) fills block i's weights before its turn (the block then stays on
    `device` for block_done to free); block_done(i, block, hidden) runs once block i is compressed,
    with `hidden` the next block's inputs. start_block/start_hidden resume a run: blocks before
    start_block are skipped and start_hidden (as block_done saw it) replaces the captured inputs.
    on_captured() runs once the block inputs are captured (a lazy model drops its embeddings there).
    compute: CalibrationOptions.compute_dtype; each block is cast to it for its turn (activations
    between blocks stay in it) and back to its own dtype before it is handed on.
    expert_min_tokens: a MoE expert routed fewer calibration tokens than this in a block is then
    calibrated on every token of that block (the rare-expert policy, _calibrate_rare_experts);
    experts_per_pass: calibrate that many experts per pass over the block (_expert_chunks; None: all)."""
    device = torch.device(device)
    offload = torch.device(offload) if offload is not None else device
    arch = get_arch(model)
    blocks = model.get_submodule(arch.blocks)
    prefix = arch.blocks + "."
    outside = [n for n in layer_names if not n.startswith(prefix)]
    if outside:
        raise LlmsqueezeError(
            f"calibrated methods handle layers inside the decoder blocks only; {outside[0]} is not: "
            "exclude it (e.g. drop --lm-head) or use --method rtn"
        )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = EngineStats()
    t0 = time.perf_counter()
    home = next(blocks[0].parameters()).device
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = []
    if batches:
        outside_home = _outside_device(model, arch.blocks)
        _move_outside(model, arch.blocks, device)
        hidden, kwargs = capture_block_inputs(model, blocks, batches, device, offload)
        _move_outside(model, arch.blocks, outside_home)
        log.info("captured %d batches of block inputs %s", len(hidden), tuple(hidden[0].shape))
        if start_hidden is not None:
            if len(start_hidden) != len(hidden):
                raise LlmsqueezeError(
                    f"resume: {len(start_hidden)} saved input batches, but the data make {len(hidden)}; "
                    "resume with the same calibration options"
                )
            hidden = [h.to(offload) for h in start_hidden]
    if on_captured is not None:
        on_captured()

    # a method with `float_targets = True` (learned rounding) is also handed, per block, the float
    # model's outputs on the float model's inputs: a second stream of activations, never quantized, so
    # each block learns to undo the error of the quantized blocks upstream (AutoRound does the same)
    float_targets = bool(getattr(method, "float_targets", False)) and bool(hidden)
    if float_targets and start_hidden is not None:
        raise LlmsqueezeError("resume keeps the quantized stream only; a float-target method must start again")
    fp_hidden = list(hidden)  # the same tensors until block 0 replaces `hidden`'s entries
    wanted = set(layer_names)
    bar = tqdm(range(start_block, len(blocks)), desc="blocks", disable=not progress, unit="block",
               initial=start_block, total=len(blocks))
    for i in bar:
        tb = time.perf_counter()
        if block_loader is not None:
            block_loader(i)
        block = blocks[i].to(device)
        stored = next((p.dtype for p in block.parameters() if p.is_floating_point()), None)
        work = compute_dtype(stored, device, compute) if stored is not None else None
        if work is not None and work != stored:
            if i == start_block:
                log.info("blocks stored in %s compute in %s on this %s", stored, work, device.type)
            block = block.to(work)
        else:
            work = None
        bprefix = f"{prefix}{i}."
        prepare = getattr(method, "prepare_block", None)
        fp_out = None
        if float_targets:  # the float block on the float stream: the targets, and that stream's next inputs
            fp_out = [block_output(block(_to(h, device, work), **_to(kw[i], device, work))).to(offload)
                      for h, kw in zip(fp_hidden, kwargs)]
        if prepare is not None:
            inputs = lambda: ((_to(h, device, work), _to(kw[i], device, work)) for h, kw in zip(hidden, kwargs))  # noqa: E731
            if float_targets:
                prepare(bprefix, block, inputs, targets=lambda: (t.to(device) for t in fp_out))
            else:
                prepare(bprefix, block, inputs)
        moes = {n: m for n, m in block.named_modules() if isinstance(m, MoEExperts)}
        with reuse_dequantized(block):  # the passes over quantized Linears unpack each weight once
            names = [n for n, m in block.named_modules() if is_linear(m) and bprefix + n in wanted]
            for group in _expert_chunks(_groups(names, arch.sequential, true_sequential), moes, experts_per_pass):
                if not group:  # a block with nothing selected: only its outputs are needed
                    continue
                def collect_pass(hook_names, i=i):
                    _collect_pass(block, bprefix, hook_names, method, hidden, kwargs, i, device, work)

                # a method that needs no inputs (e.g. W8A8 round-to-nearest) says so: skip the pass
                collecting = bool(hidden) and getattr(method, "collect_inputs", True)
                counted = _count_routed(moes, group) if collecting else {}
                try:
                    if collecting:
                        collect_pass(group)
                finally:
                    routed = {n: m.routed_tokens for n, m in counted.items()}
                    for m in counted.values():
                        m.routed_tokens = None
                if routed:
                    stats.rare_experts += _calibrate_rare_experts(moes, routed, group, bprefix, expert_min_tokens,
                                                                  sum(h.shape[0] * h.shape[1] for h in hidden),
                                                                  collect_pass)
                for n in group:
                    set_module(block, n, method.apply(bprefix + n, block.get_submodule(n)))
                    stats.layers += 1
            # a method that already ran the float block over every batch and keeps the float stream
            # (W8A8 with round-to-nearest weights: SmoothQuant's statistics, as the paper takes them)
            # hands those outputs on; the compressed block then runs on the first batch only, as a check
            given = method.block_outputs() if hasattr(method, "block_outputs") else None
            for j, (h, kw) in enumerate(zip(hidden, kwargs)):
                if given is None or j == 0:
                    out = block_output(block(_to(h, device, work), **_to(kw[i], device, work)))
                    if not torch.isfinite(out).all():
                        raise FloatingPointError(f"block {i} produced NaN/Inf after calibration; check the model and the data")
                hidden[j] = (out if given is None else given[j]).to(offload)
        if float_targets:
            fp_hidden = fp_out
        if work is not None:  # back to the model's own dtype (packed layers keep what they store)
            block = block.to(stored)
        if block_loader is None:
            blocks[i] = block.to(home)
        if block_done is not None:
            block_done(i, blocks[i], hidden)
        stats.per_block_s.append(time.perf_counter() - tb)
        bar.set_postfix(rss=f"{peak_rss_mib():.0f}MiB")
    stats.blocks = len(blocks)
    stats.seconds = time.perf_counter() - t0
    stats.peak_rss_mib = peak_rss_mib()
    if device.type == "cuda":
        stats.peak_device_mib = torch.cuda.max_memory_allocated(device) / 2**20
    return stats
