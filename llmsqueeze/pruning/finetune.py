"""Recovery fine-tuning of a pruned causal LM: the kept weights train on text, the pruned ones stay
exactly zero (MaskGuard), optionally distilling the dense model's next-token distribution.

    loss = (1 - a) * CE(student, next token) + a * T^2 * KL(softmax(teacher / T) || softmax(student / T))

a = `distill_weight` when a teacher is given (0 without one). Batches are `batch_size` windows of
`seq_len` tokens drawn at random (seeded) from the token ids of the training text, each led by the BOS
token where the tokenizer puts one first (`bos_token_id`, data.bos_token_id: Gemma, Llama 2/3), as
calibration samples are (data.random_windows). AdamW (betas 0.9,
0.95, no weight decay: decay would shrink the kept weights towards the pruned ones), a linear warm-up
over the first 5 % of the steps then a cosine decay to 10 % of `lr`, gradients clipped at norm 1.
The input embeddings (tied to the output head in many models) are not trained; everything else is.

The same loop prunes while it trains when given a pruner from pruning/schedule.py (or learned.py)
instead of masks to hold.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import LlmsqueezeError
from ..data import random_windows
from .training import MaskGuard


@dataclass
class FinetuneOptions:
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    seq_len: int = 512
    distill_weight: float = 1.0  # with a teacher: the share of the loss that is distillation
    temperature: float = 1.0
    warmup: float = 0.05
    min_lr: float = 0.1  # the cosine ends at min_lr * lr
    grad_clip: float = 1.0
    seed: int = 0
    bos_token_id: int | None = None  # data.bos_token_id(tokenizer): BOS + seq_len - 1 text tokens per window

    def check(self) -> "FinetuneOptions":
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise LlmsqueezeError(f"steps={self.steps}, batch_size={self.batch_size}, seq_len={self.seq_len}: "
                                  "need steps >= 1, batch size >= 1, seq len >= 2")
        if not self.lr > 0 or not 0 <= self.distill_weight <= 1 or not self.temperature > 0:
            raise LlmsqueezeError(f"lr={self.lr}, distill_weight={self.distill_weight}, temperature={self.temperature}: "
                                  "need lr > 0, 0 <= distill weight <= 1, temperature > 0")
        return self


def check_text_length(ids: torch.Tensor, batch_size: int, seq_len: int) -> None:
    if ids.numel() < batch_size * seq_len + 1:
        raise LlmsqueezeError(f"the training text has {ids.numel()} tokens, fewer than one batch of {batch_size} x "
                              f"{seq_len}: use a longer text, or lower --batch-size / --seq-len")


def lr_at(step: int, steps: int, warmup: float, min_lr: float) -> float:
    """The learning-rate factor at `step` of `steps`: linear warm-up, then cosine to `min_lr`."""
    w = max(1, round(warmup * steps))
    if step < w:
        return (step + 1) / w
    frac = (step - w) / max(1, steps - w)
    return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * frac))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """student, teacher [tokens, V] logits -> T^2 * KL(teacher || student), mean over tokens."""
    t = temperature
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    log_q = F.log_softmax(student.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t


def batches(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator, bos_token_id: int | None = None):
    """An endless stream of [batch_size, seq_len] windows of ids [T] at random starts, led by
    `bos_token_id` when given (data.random_windows)."""
    while True:
        yield random_windows(ids, batch_size, seq_len, bos_token_id, generator)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter but the input embeddings (and what is tied to them)."""
    emb = model.get_input_embeddings()
    skip = {id(emb.weight)} if emb is not None else set()
    return [p for p in model.parameters() if id(p) not in skip]


def finetune(model: nn.Module, ids: torch.Tensor, options: FinetuneOptions, *,
             masks: dict[str, torch.Tensor] | None = None, pruner=None, teacher: nn.Module | None = None,
             progress: bool = True, callback=None) -> list[dict]:
    """Train `model` (a causal LM) on windows of ids [T]. `masks` {param name: keep, shaped like the
    parameter} are held exactly; a `pruner` (GradualPruner, LearnedSparsity) is attached to the
    optimizer instead and prunes as training goes. `callback(step, model)` may return a dict that is
    added to that step's record. -> per-step records: step, loss (and ce/kl with a teacher), lr, seconds."""
    options.check()
    check_text_length(ids, options.batch_size, options.seq_len)
    device = next(model.parameters()).device
    train = trainable_parameters(model)
    frozen = [p for p in model.parameters() if all(p is not q for q in train)]
    for p in frozen:
        p.requires_grad_(False)
    for p in train:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(train, lr=options.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, options.steps, options.warmup, options.min_lr))
    guard = None
    if masks is not None:
        params = dict(model.named_parameters())
        guard = MaskGuard({n: params[n] for n in masks})
        guard.set_masks(masks, opt)
    if pruner is not None:
        pruner.attach(opt)
    g = torch.Generator().manual_seed(options.seed)
    stream = batches(ids, options.batch_size, options.seq_len, g, options.bos_token_id)
    a = options.distill_weight if teacher is not None else 0.0
    history, t0 = [], time.time()
    model.train()
    bar = tqdm(range(options.steps), desc="fine-tune", disable=not progress, unit="step")
    try:
        for step in bar:
            x = next(stream).to(device)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1]  # [B, T-1, V]
            flat = logits.reshape(-1, logits.shape[-1])
            ce = F.cross_entropy(flat.float(), x[:, 1:].reshape(-1))
            rec = {"step": step + 1, "ce": ce.item()}
            loss = ce
            if a > 0:
                with torch.no_grad():
                    t_logits = teacher(input_ids=x, use_cache=False).logits[:, :-1]
                kl = distill_loss(flat, t_logits.reshape(-1, t_logits.shape[-1]), options.temperature)
                loss = (1 - a) * ce + a * kl
                rec["kl"] = kl.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if options.grad_clip:
                torch.nn.utils.clip_grad_norm_(train, options.grad_clip)
            rec["lr"] = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            rec.update(loss=loss.item(), seconds=round(time.time() - t0, 2))
            if callback is not None:
                rec.update(callback(step + 1, model) or {})
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if not math.isfinite(rec["loss"]):
                raise LlmsqueezeError(f"the loss became {rec['loss']} at step {step + 1}: lower --lr")
    finally:
        if guard is not None:
            guard.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return history
