"""MoEExperts: a mixture of experts as one small MLP per expert, each with its own gate/up/down Linear,
in place of transformers 5's fused experts module (3-D `gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I]; llmsqueeze.models.split_fused_experts builds it from one, MOE_LAYOUTS says where each
family keeps them).

Same call as the fused module: (hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H].
Only the experts some token is routed to compute: the (token, slot) pairs are sorted by expert, each
active expert runs once on its tokens, its outputs are scaled by the router weights and summed back
per token. The per-expert Linears are ordinary modules, so every method sees them as Linears (the
engine's hooks get exactly the tokens routed to each expert), they become QuantLinears (run through
QuantLinear's CPU kernels / Triton paths like any other layer), and they save and load under
per-expert names: `<experts>.<e>.gate_proj.qweight`, ...

Calibration hooks (llmsqueeze.engine): `routed_tokens` (a list of E counts, or None) accumulates how
many tokens each expert received; `calibrate_all` (a set of expert ids) runs those experts on every
token reaching the block (their outputs still enter the block output only for the routed tokens),
the engine's policy for experts that calibration barely reaches.
"""
from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = ("glu", "clamped_swiglu")


# ------------------------------------------------------------------------------- pure math
def glu(gate: torch.Tensor, up: torch.Tensor, act_fn) -> torch.Tensor:
    """act(gate) * up; gate, up [T, I] (Mixtral, Qwen-MoE, DeepSeek: act_fn is SiLU)."""
    return act_fn(gate) * up


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss: gate clamped above at `limit`, up to [-limit, limit], (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def group_by_expert(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """top_k_index [T, k] -> (token [T*k] of each (token, slot) pair sorted by expert, the pairs' flat
    positions [T*k] in that order (to read top_k_weights), counts [E] per expert). Indices >= E (a
    padding id some routers emit) are counted past E and never run."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # [T*k]; stable: tokens ascending within an expert
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order // k, order, counts


# --------------------------------------------------------------------------------- modules
class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)), up(x)) with its own Linears (or the QuantLinears replacing them)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj


class MoEExperts(nn.Module):
    """The experts of one MoE layer, one ExpertMLP per expert as children "0" .. "E-1"."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "glu",
                 act_fn: nn.Module | None = None, alpha: float | None = None, limit: float | None = None,
                 bias: bool = False, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.activation, self.act_fn, self.alpha, self.limit = activation, act_fn, alpha, limit
        kw = dict(bias=bias, dtype=dtype, device=device)
        for e in range(num_experts):
            self.add_module(str(e), ExpertMLP(nn.Linear(hidden_size, intermediate_size, **kw),
                                              nn.Linear(hidden_size, intermediate_size, **kw),
                                              nn.Linear(intermediate_size, hidden_size, **kw)))
        self.routed_tokens: list[int] | None = None  # calibration: tokens routed to each expert
        self.calibrate_all: frozenset[int] = frozenset()  # calibration: experts that see every token

    def expert(self, e: int) -> ExpertMLP:
        return self._modules[str(e)]

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x [n, H] -> [n, H]."""
        m = self.expert(e)
        gate, up = m.gate_proj(x), m.up_proj(x)
        if self.activation == "glu":
            h = glu(gate, up, self.act_fn)
        else:
            h = clamped_swiglu(gate, up, self.alpha, self.limit)
        return m.down_proj(h)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states [T, H]; top_k_index, top_k_weights [T, k]
        tokens, pairs, counts = group_by_expert(top_k_index, self.num_experts)
        weights = top_k_weights.reshape(-1)[pairs]  # [T*k], in expert order
        if self.routed_tokens is not None:
            self.routed_tokens = [a + b for a, b in zip(self.routed_tokens, counts)]
        out = torch.zeros_like(hidden_states)
        start = 0
        for e in range(self.num_experts):
            c = counts[e]
            rows, w = tokens[start:start + c], weights[start:start + c]
            start += c
            if e in self.calibrate_all:  # every token through the expert; only the routed ones count
                # a view of its own per expert: hooks that share statistics between Linears fed the very
                # same tensor (gate/up) must not share them between experts
                y = self.expert_forward(e, hidden_states.view(hidden_states.shape))[rows]
            elif c == 0:
                continue
            else:
                y = self.expert_forward(e, hidden_states[rows])
            out.index_add_(0, rows, (y * w[:, None]).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, activation={self.activation}")


def expert_linear_names(model: nn.Module) -> list[str]:
    """Every per-expert matrix of every MoEExperts in `model` ("...experts.3.down_proj"), in model order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, MoEExperts):
            out += [f"{name}.{e}.{p}" for e in range(m.num_experts) for p in ("gate_proj", "up_proj", "down_proj")]
    return out


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool = False) -> nn.Linear:
    """An nn.Linear holding weight [out, in] (and bias [out]) as its parameters, without initialising."""
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return layer
