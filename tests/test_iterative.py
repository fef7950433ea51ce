"""Gradient saliency (SNIP, Taylor), iterative magnitude pruning with fixed masks, and lottery-ticket
rewinding on tiny models."""
import pytest
import torch
from conftest import tiny_llama
from torch import nn

import llmsqueeze
from llmsqueeze.pruning.iterative import MaskGuard, iterative_prune, prunable_params
from llmsqueeze.pruning.masks import is_nm, sparsity_of
from llmsqueeze.pruning.saliency import gradient_saliency


def batches(n=3, t=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 64, (2, t), generator=g) for _ in range(n)]


def test_snip_and_taylor_match_their_definitions():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    xs = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    params = {"0.weight": model[0].weight}

    def loss_fn(m, x):
        return m(x).pow(2).mean()

    grads = []
    for x in xs:
        model.zero_grad()
        loss_fn(model, x).backward()
        grads.append(model[0].weight.grad.clone())
    w = model[0].weight.detach()
    snip = gradient_saliency(model, xs, params, "snip", loss_fn)["0.weight"]
    taylor = gradient_saliency(model, xs, params, "taylor", loss_fn)["0.weight"]
    torch.testing.assert_close(snip, (w * (grads[0] + grads[1])).abs())
    torch.testing.assert_close(taylor, (w * grads[0]) ** 2 + (w * grads[1]) ** 2)
    assert model[0].weight.grad is None and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["snip", "taylor"])
def test_prune_with_saliency(method):
    model = tiny_llama()
    ids = torch.cat(batches())
    llmsqueeze.prune(model, method, sparsity=0.5, data=ids, progress=False)
    w = model.model.layers[0].mlp.up_proj.weight
    assert ((w == 0).sum(1) == w.shape[1] // 2).all()  # per row by default
    model2 = tiny_llama()
    llmsqueeze.prune(model2, method, pattern="2:4", data=ids, progress=False)
    assert is_nm(model2.model.layers[1].self_attn.q_proj.weight, 2, 4)


def lm_step(data):
    def step(model, opt, i):
        opt.zero_grad()
        ids = data[i % len(data)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.item()

    return step


def test_mask_guard_keeps_zeros_through_adamw():
    model = tiny_llama(layers=1)
    params = prunable_params(model)
    assert "lm_head.weight" not in params and "model.layers.0.mlp.up_proj.weight" in params
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    step = lm_step(batches())
    for i in range(3):  # optimizer state exists before the masks are set
        step(model, opt, i)
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) > 0.5 for n, p in params.items()}
    guard = MaskGuard(params)
    guard.set_masks(masks, opt)
    for n, p in params.items():
        assert (opt.state[p]["exp_avg"][~masks[n]] == 0).all() and (opt.state[p]["exp_avg_sq"][~masks[n]] == 0).all()
    for i in range(5):
        step(model, opt, i)
    for n, p in params.items():
        assert (p[~masks[n]] == 0).all() and (p[masks[n]] != 0).all()
        assert (opt.state[p]["exp_avg"][~masks[n]] == 0).all()  # no momentum builds up on pruned weights
    guard.remove()


@pytest.mark.parametrize("rewind", [None, "init", 2])
def test_iterative_pruning_schedule_and_rewinding(rewind):
    model = tiny_llama(layers=1)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    params = prunable_params(model)
    zeros_after_step = []

    def step(model, opt, i):
        loss = lm_step(batches())(model, opt, i)
        zeros_after_step.append({n: p == 0 for n, p in params.items()})
        return loss

    def make_opt(ps):
        return torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01)

    res = iterative_prune(model, step, make_opt, final_sparsity=0.75, rounds=2, steps=3, pretrain_steps=3,
                          rewind=rewind, eval_fn=lambda m: 0.0)
    # every step of the last round (steps 7..9) keeps the final mask's zeros
    for z in zeros_after_step[6:]:
        assert all(z[n][~res.masks[n]].all() for n in params)
    # and round 1 (steps 4..6) keeps half the weights at zero
    assert all(sum(int(z[n].sum()) for n in params) >= sum(p.numel() for p in params.values()) // 2
               for z in zeros_after_step[3:6])
    total = sum(p.numel() for p in params.values())
    pruned = sum(int((~m).sum()) for m in res.masks.values())
    assert pruned == int(0.75 * total + 1e-9)
    assert [round(h["sparsity"], 4) for h in res.history] == [0.5, 0.75]
    for n, p in params.items():
        assert (p[~res.masks[n]] == 0).all()
    if rewind == "init":  # kept weights were reset to init before the last round, then trained 3 steps
        n = "model.layers.0.mlp.up_proj.weight"
        moved = (params[n] - init[n]).abs()[res.masks[n]].mean()
        assert moved < (init[n].abs()[res.masks[n]].mean())
    assert sparsity_of(torch.cat([m.reshape(-1) for m in res.masks.values()])) == pytest.approx(0.75, abs=1e-3)


def test_iterative_masks_nest():
    """Weights pruned in round r stay pruned in round r+1."""
    model = tiny_llama(layers=1)
    rounds = []
    orig = iterative_prune.__globals__["magnitude_masks"]

    def spy(*a, **k):
        m = orig(*a, **k)
        rounds.append(m)
        return m

    iterative_prune.__globals__["magnitude_masks"] = spy
    try:
        iterative_prune(model, lm_step(batches()), lambda ps: torch.optim.SGD(ps, lr=0.05), 0.8, rounds=3, steps=2)
    finally:
        iterative_prune.__globals__["magnitude_masks"] = orig
    for a, b in zip(rounds, rounds[1:]):
        assert all((b[n] <= a[n]).all() for n in a)
