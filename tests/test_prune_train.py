"""Pruning during training: schedules, mask updates (shadow and zero), scores, learned per-layer
sparsity, early-bird tickets, recovery fine-tuning and its CLI, on tiny models."""
import json

import pytest
import torch
from conftest import TEXT, tiny_llama
from torch import nn

import llmsqueeze
from llmsqueeze.cli import main
from llmsqueeze.config import LlmsqueezeError
from llmsqueeze.pruning.early_bird import EarlyBird, early_bird_ticket, mask_distance
from llmsqueeze.pruning.finetune import distill_loss, lr_at
from llmsqueeze.pruning.iterative import prunable_params
from llmsqueeze.pruning.learned import LearnedSparsity
from llmsqueeze.pruning.masks import is_nm, n_pruned
from llmsqueeze.pruning.saliency import random_scores
from llmsqueeze.pruning.schedule import GradualPruner, layer_masks, nm_keep_at, sparsity_at, update_steps


# ------------------------------------------------------------------------------------ schedules
def test_cubic_and_linear_schedules():
    assert sparsity_at(0, 0.8, 10, 110) == 0 and sparsity_at(10, 0.8, 10, 110) == 0
    assert sparsity_at(110, 0.8, 10, 110) == 0.8 and sparsity_at(500, 0.8, 10, 110) == 0.8
    # Zhu & Gupta: s_f + (s_0 - s_f)(1 - frac)^3; half way: 0.8 * (1 - 0.125)
    assert sparsity_at(60, 0.8, 10, 110) == pytest.approx(0.8 * 0.875)
    assert sparsity_at(60, 0.8, 10, 110, kind="linear") == pytest.approx(0.4)
    assert sparsity_at(60, 0.8, 10, 110, initial=0.2, kind="linear") == pytest.approx(0.5)
    cubic = [sparsity_at(t, 0.9, 0, 100) for t in range(101)]
    assert all(b >= a for a, b in zip(cubic, cubic[1:]))  # monotone, fastest early
    assert cubic[10] - cubic[0] > cubic[100] - cubic[90]
    assert update_steps(0, 100, 30) == [0, 30, 60, 90, 100]
    with pytest.raises(LlmsqueezeError, match="schedule"):
        sparsity_at(5, 0.5, 0, 10, kind="exp")


def test_nm_schedule_goes_through_the_group_counts():
    assert [nm_keep_at(sparsity_at(t, 0.5, 0, 90), 0.5, 2, 4) for t in (0, 10, 60, 90)] == [4, 3, 2, 2]
    assert nm_keep_at(0.75, 0.75, 1, 4) == 1


def test_layer_masks_uniform_global_nm():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(8, 16, generator=g), "b": torch.rand(4, 16, generator=g) * 10}
    uni = layer_masks(scores, 0.5)
    assert all(int((~m).sum()) == m.numel() // 2 for m in uni.values())
    glob = layer_masks(scores, 0.5, "global")
    assert sum(int((~m).sum()) for m in glob.values()) == 96
    assert int((~glob["a"]).sum()) > int((~glob["b"]).sum())  # b's scores are larger: fewer pruned
    nm = layer_masks(scores, 0.5, nm=(2, 4))
    assert all(is_nm(m, 2, 4) and int(m.sum()) == m.numel() // 2 for m in nm.values())
    three = layer_masks(scores, 0.25, nm=(2, 4), keep_per_group=3)
    assert all(is_nm(m, 3, 4) and int(m.sum()) == m.numel() * 3 // 4 for m in three.values())


# --------------------------------------------------------------------------------- the pruner
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=g)
        loss = (model(x) - x[:, :8].sin()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("regrow", ["shadow", "zero"])
@pytest.mark.parametrize("score", ["magnitude", "movement", "wanda", "random"])
def test_gradual_pruner_reaches_the_schedule_and_holds_the_mask(regrow, score):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = GradualPruner(model, 0.75, start=5, end=45, every=10, score=score, regrow=regrow).attach(opt)
    _train(model, opt, 5)
    assert not pruner.masks  # dense before `start`
    _train(model, opt, 20)
    mid = pruner.history[-1]
    assert mid["step"] == 25 and mid["sparsity"] == pytest.approx(mid["target"], abs=1e-2) and 0 < mid["target"] < 0.75
    for n, keep in pruner.masks.items():  # the forward pass sees exactly the masked weights
        assert (pruner.params[n].detach()[~keep] == 0).all()
    _train(model, opt, 40)
    masks = pruner.finish()
    assert pruner.frozen and [h["step"] for h in pruner.history] == [15, 25, 35, 45]
    for n, keep in masks.items():
        w = pruner.params[n].detach()
        assert int((~keep).sum()) == n_pruned(keep.numel(), 0.75)  # uniform: each layer exactly
        assert (w[~keep] == 0).all() and (w[keep] != 0).float().mean() > 0.9
        state = opt.state[pruner.params[n]]
        assert (state["exp_avg"][~keep] == 0).all()  # frozen at `end`: pruned weights get no update


def test_shadow_weights_keep_learning_and_can_come_back():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, 1.0, 1.0, 1.0]]))
    model = nn.Sequential(lin)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = GradualPruner(model, 0.25, initial=0.25, start=0, end=6, every=2, regrow="shadow").attach(opt)
    assert pruner.masks["0.weight"].tolist() == [[False, True, True, True]]
    for i in range(2):  # the gradient taken at the pruned point grows weight 0 and shrinks weight 3
        opt.zero_grad()
        (lin.weight * torch.tensor([[-10.0, 0, 0, 1]])).sum().backward()
        opt.step()
        if i == 0:  # pruned in the forward pass, learning in the shadow
            assert lin.weight[0, 0] == 0 and pruner.shadow["0.weight"][0, 0] == pytest.approx(1.1)
    assert pruner.masks["0.weight"].tolist() == [[True, True, True, False]]  # it came back with its own value
    assert float(lin.weight.detach()[0, 0]) == pytest.approx(2.1) and lin.weight[0, 3] == 0


def test_zero_regrowth_keeps_pruned_weights_at_zero_between_updates():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = GradualPruner(model, 0.5, start=0, end=40, every=10, regrow="zero").attach(opt)
    _train(model, opt, 12)
    keep = {n: m.clone() for n, m in pruner.masks.items()}
    _train(model, opt, 5, seed=3)
    for n, m in keep.items():
        assert (pruner.params[n].detach()[~m] == 0).all()
        assert (opt.state[pruner.params[n]]["exp_avg"][~m] == 0).all()
    assert not pruner.shadow


def test_movement_prunes_weights_moving_towards_zero():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0, -1.0, -1.0]]))
    model = nn.Sequential(lin)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    pruner = GradualPruner(model, 0.5, start=0, end=3, every=3, score="movement").attach(opt)
    for _ in range(3):  # the loss pulls weights 0 and 2 towards zero, pushes 1 and 3 away from it
        opt.zero_grad()
        (lin.weight * torch.tensor([[1.0, -1.0, -1.0, 1.0]])).sum().backward()
        opt.step()
    assert pruner.finish()["0.weight"].tolist() == [[False, True, False, True]]


def test_wanda_score_follows_the_input_norms():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    model = nn.Sequential(lin)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = GradualPruner(model, 0.5, start=0, end=1, every=1, score="wanda").attach(opt)
    x = torch.randn(64, 8) * torch.tensor([10.0, 1, 10, 1, 10, 1, 10, 1])
    model(x).sum().backward()
    opt.step()
    assert pruner.finish()["0.weight"][0].tolist() == [True, False] * 4


def test_gradual_nm_ends_exactly_nm():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = GradualPruner(model, pattern="2:4", start=0, end=6, every=2).attach(opt)
    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    masks = pruner.finish()
    assert [h["keep_per_group"] for h in pruner.history] == [3, 2, 2]
    params = prunable_params(model)
    assert set(masks) == set(params) and all(is_nm(params[n].detach(), 2, 4) for n in params)


def test_gradual_pruner_bad_input():
    model = _mlp()
    with pytest.raises(LlmsqueezeError, match="exactly one"):
        GradualPruner(model, 0.5, pattern="2:4", end=10)
    with pytest.raises(LlmsqueezeError, match="score"):
        GradualPruner(model, 0.5, end=10, score="snap")
    with pytest.raises(LlmsqueezeError, match="divisible by 64"):
        GradualPruner(model, pattern="2:64", end=10)
    with pytest.raises(LlmsqueezeError, match="N:M pattern"):
        GradualPruner(model, pattern="2:4", end=10, allocation="global")
    with pytest.raises(LlmsqueezeError, match="start"):
        GradualPruner(model, 0.5, start=20, end=10)


# ------------------------------------------------------------------------------------ learned
def test_learned_sparsity_meets_the_budget_and_spares_the_layer_that_matters():
    torch.manual_seed(0)

    class Two(nn.Module):  # the target depends on `a` only; `b` is noise the model should drop
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)

        def forward(self, x):
            return self.a(x) + self.b(x)

    teacher = torch.randn(16, 16)
    model = Two()
    with torch.no_grad():
        model.a.weight.copy_(teacher)
        model.b.weight.copy_(teacher * 0.5)  # same scale: magnitude alone cannot tell them apart
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    learned = LearnedSparsity(model, 0.5, start=0, end=150, lr=0.02).attach(opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = torch.randn(64, 16, generator=g)
        loss = (model(x) - x @ teacher.t()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    masks = learned.finish()
    assert sum(int((~m).sum()) for m in masks.values()) == 256  # exactly half of all weights
    assert 1 - masks["b.weight"].float().mean() > 0.8 > 1 - masks["a.weight"].float().mean()
    assert learned.frozen and learned.history[-1]["sparsity"] == 0.5
    assert (model.b.weight.detach()[~masks["b.weight"]] == 0).all()


# --------------------------------------------------------------------------------- early bird
def test_mask_distance_and_early_bird_settles():
    a = {"x": torch.tensor([True, True, False, False])}
    assert mask_distance(a, {"x": torch.tensor([True, False, True, False])}) == 0.5
    lin = nn.Linear(8, 8)
    bird = EarlyBird({"w": lin.weight}, 0.5, every=2, threshold=0.01, window=2)
    assert not bird.check(0) and not bird.check(1) and not bird.check(2)
    assert bird.check(4) and bird.found_at == 4  # the weights did not move: distances 0, 0


def test_early_bird_ticket_prunes_and_trains_the_ticket():
    model = _mlp()
    calls = []

    def step(m, opt, i):
        calls.append(i)
        x = torch.randn(16, 16, generator=torch.Generator().manual_seed(i))
        loss = (m(x) - x[:, :8]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    def make_opt(params):  # decaying steps: the mask settles
        opt = torch.optim.SGD(params, lr=0.05)
        opt.register_step_post_hook(lambda o, *a: [g.update(lr=g["lr"] * 0.8) for g in o.param_groups])
        return opt

    res = early_bird_ticket(model, step, make_opt, 0.6, max_steps=200, ticket_steps=7, every=5, threshold=0.01, window=2)
    assert res.found_at is not None and res.found_at < 200 and res.steps == res.found_at + 7 == len(calls)
    params = prunable_params(model)
    assert sum(int((~m).sum()) for m in res.masks.values()) == n_pruned(sum(p.numel() for p in params.values()), 0.6)
    for n, m in res.masks.items():
        assert (params[n].detach()[~m] == 0).all()


# ---------------------------------------------------------------------------------- fine-tune
def test_lr_schedule_and_distill_loss():
    assert lr_at(0, 100, 0.1, 0.1) == pytest.approx(0.1) and lr_at(9, 100, 0.1, 0.1) == 1.0
    assert lr_at(99, 100, 0.1, 0.1) == pytest.approx(0.1, abs=1e-3)
    x = torch.randn(5, 11)
    assert float(distill_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(x, x + torch.randn(5, 11))) > 0


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text(TEXT)
    return p


def _ft(args, out, text):
    return main(["finetune", *args, "--data", str(text), "--batch-size", "2", "--seq-len", "32", "--quiet",
                 "--out", str(out)])


@pytest.mark.parametrize("prune_args", [["--pattern", "2:4"], ["--sparsity", "0.6"]])
def test_finetune_cli_holds_the_pattern_and_trains(tiny_model_dir, text, tmp_path, capsys, prune_args):
    pruned, tuned = tmp_path / "p", tmp_path / "f"
    assert main(["prune", str(tiny_model_dir), "--method", "magnitude", *prune_args, "--quiet", "--out", str(pruned)]) == 0
    assert _ft([str(pruned), "--steps", "6", "--lr", "1e-3", "--distill", str(tiny_model_dir)], tuned, text) == 0
    before, after = llmsqueeze.from_pretrained(pruned), llmsqueeze.from_pretrained(tuned)  # pattern verified on load
    qc = json.loads((tuned / "config.json").read_text())["quantization_config"]
    assert qc["sparsity"]["nm_pattern"] == ("2:4" if "--pattern" in prune_args else None)
    assert qc["method_args"]["finetune"]["steps"] == 6 and qc["method_args"]["finetune"]["distill_weight"] == 1.0
    b, a = dict(before.named_modules()), dict(after.named_modules())
    changed = 0
    for name in qc["sparsity"]["layers"]:
        wb, wa = b[name].to_dense(torch.float32), a[name].to_dense(torch.float32)
        assert ((wa != 0) <= (wb != 0)).all()  # no pruned weight came back
        if "--pattern" in prune_args:
            assert is_nm(wa, 2, 4)
        changed += int((wa != wb).sum())
    assert changed > 0


def test_finetune_api_lowers_the_training_loss(tiny_model_dir, tmp_path):
    model = llmsqueeze.load_dense(str(tiny_model_dir))
    llmsqueeze.prune(model, "magnitude", sparsity=0.5, progress=False)
    llmsqueeze.save_quantized(model, tmp_path / "p")
    model = llmsqueeze.from_pretrained(tmp_path / "p", dtype=torch.float32)
    ids = torch.tensor([3 + (i * 7 + i // 3) % 20 for i in range(2000)])  # the TEXT pattern as ids
    hist = llmsqueeze.finetune(model, ids, 30, lr=3e-3, batch_size=4, seq_len=32, progress=False)
    assert sum(r["ce"] for r in hist[-5:]) < sum(r["ce"] for r in hist[:5])


@pytest.mark.parametrize("method, extra", [("wanda", ["--sparsity", "0.5"]), ("movement", ["--pattern", "2:4"]),
                                           ("random", ["--sparsity", "0.7"])])
def test_prune_gradual_cli(tiny_model_dir, text, tmp_path, capsys, method, extra):
    out = tmp_path / "g"
    assert main(["prune", str(tiny_model_dir), "--method", method, *extra, "--schedule", "gradual", "--data", str(text),
                 "--steps", "10", "--every", "2", "--batch-size", "2", "--seq-len", "32", "--quiet", "--out", str(out)]) == 0
    model = llmsqueeze.from_pretrained(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == f"gradual-{method}" and qc["method_args"]["schedule"]["end_step"] == 6
    for name in qc["sparsity"]["layers"]:
        w = model.get_submodule(name).to_dense(torch.float32)
        if "--pattern" in extra:
            assert is_nm(w, 2, 4)
        else:
            assert (w == 0).sum() >= n_pruned(w.numel(), float(extra[1]))


def _one_line(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmsqueeze: error:") and "\n" not in err and needle in err, err


def test_finetune_bad_input(tiny_model_dir, text, tmp_path, capsys):
    pruned, q = tmp_path / "p", tmp_path / "q"
    assert main(["prune", str(tiny_model_dir), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
                 "--out", str(pruned)]) == 0
    assert main(["prune", str(tiny_model_dir), "--method", "magnitude", "--pattern", "2:4", "--bits", "4",
                 "--group-size", "32", "--quiet", "--out", str(q)]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    short = tmp_path / "short.txt"
    short.write_text("the of and")
    for args, needle in [
        ([str(tiny_model_dir), "--steps", "3"], "no mask to hold"),
        ([str(q), "--steps", "3"], "pruned and quantized"),
        ([str(pruned), "--steps", "3", "--pattern", "2:4"], "not 2:4"),
        ([str(pruned)], "--steps N"),
        ([str(pruned), "--steps", "0"], "steps >= 1"),
        ([str(pruned), "--steps", "3", "--lr", "-1"], "lr > 0"),
    ]:
        assert _ft(args, out, text) == 2
        _one_line(capsys, needle)
    assert main(["finetune", str(pruned), "--steps", "3", "--data", str(short), "--out", str(out)]) == 2
    _one_line(capsys, "fewer than one batch")
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--method", "sparsegpt", "--sparsity", "0.5"], "scores weights by"),
    (["--sparsity", "0.5", "--bits", "4"], "drop --structured, --bits"),
    (["--sparsity", "0.5", "--steps", "3"], "--data FILE --steps N"),
    (["--pattern", "2:64", "--steps", "3", "--data", "TEXT"], "divisible by 64"),
])
def test_prune_gradual_bad_input(tiny_model_dir, text, tmp_path, capsys, args, needle):
    out = tmp_path / "g"
    args = [str(text) if a == "TEXT" else a for a in args]
    if "--method" not in args:
        args = ["--method", "magnitude", *args]
    assert main(["prune", str(tiny_model_dir), *args, "--schedule", "gradual", "--out", str(out)]) == 2
    _one_line(capsys, needle)
    assert not out.exists()


def test_oneshot_prune_refuses_training_flags(tiny_model_dir, text, tmp_path, capsys):
    assert main(["prune", str(tiny_model_dir), "--method", "magnitude", "--sparsity", "0.5", "--steps", "3",
                 "--out", str(tmp_path / "x")]) == 2
    _one_line(capsys, "--schedule gradual")


def test_random_pruning_is_seeded(tiny_model_dir, tmp_path):
    outs = []
    for i, seed in enumerate((0, 0, 1)):
        out = tmp_path / f"r{i}"
        assert main(["prune", str(tiny_model_dir), "--method", "random", "--sparsity", "0.5", "--seed", str(seed),
                     "--quiet", "--out", str(out)]) == 0
        outs.append(llmsqueeze.from_pretrained(out).model.layers[0].mlp.up_proj.to_dense(torch.float32))
    assert (outs[0] == 0).float().mean() == 0.5
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0] != 0, outs[2] != 0)
    scores = random_scores({"a": (2, 3)}, torch.Generator().manual_seed(0))
    assert scores["a"].shape == (2, 3)
