"""The baseline's training loop in PyTorch: its LambdaLR schedule, Adam, clipping and accumulation.

Runs the port (torch_model.py) or the authors' own model as the release trains it: one backward
per chunk into the parameters' `.grad`, clip_grad_norm_, then the gates' joint clip. An optional
part of the package: it needs `pip install torch==2.13.0` (the `torch` extra).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from gpas_jax.baseline.torch_model import RefModel, gate_params, loss_fn


def ref_lr_factor(step: int, *, warmup_steps: int, num_steps: int, min_lr_ratio: float = 0.1,
                  baseline_last_step: bool = False) -> float:
  """LambdaLR multiplier at scheduler step `step` (see ref_lr)."""
  w, n = warmup_steps, num_steps
  if baseline_last_step:
    # The baseline's cyclical cosine with cycle_length = N, verbatim.
    if n < 1:
      raise ValueError('num_steps must be >= 1')
    cycle_step = step % n
    if cycle_step < w:
      if step != cycle_step and cycle_step < 2:
        return 1e-7
      return float(cycle_step) / float(max(1, w))
    progress = float(cycle_step - w) / float(max(1, n - w))
  else:
    if step < w:
      return float(step) / float(max(1, w))
    progress = min(1.0, float(step - w) / float(max(1, n - w)))
  cosine_decay = 0.5 * (1.0 + math.cos(math.pi * progress))
  return min_lr_ratio + (1.0 - min_lr_ratio) * cosine_decay


def ref_lr(step: int, *, lr: float, warmup_steps: int, num_steps: int, min_lr_ratio: float = 0.1,
           baseline_last_step: bool = False) -> float:
  """Learning rate of update `step` (0-based), computed as LambdaLR does: lr * factor.

  s < W: lr * s / W (update 0 runs at lr 0). W <= s <= N: cosine from lr down to
  min_lr_ratio * lr at s = N; beyond N it stays there. With baseline_last_step the baseline's
  cyclical lambda is used verbatim: identical for s < N, but s = N gives 1e-7 * lr (when W >= 1;
  with W = 0 it restarts at lr), and s > N starts a new cycle.
  """
  return lr * ref_lr_factor(step, warmup_steps=warmup_steps, num_steps=num_steps,
                            min_lr_ratio=min_lr_ratio, baseline_last_step=baseline_last_step)


def ref_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, num_steps: int,
                  min_lr_ratio: float = 0.1,
                  baseline_last_step: bool = False) -> torch.optim.lr_scheduler.LambdaLR:
  """The LambdaLR used by ref_train."""
  return torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda s: ref_lr_factor(s, warmup_steps=warmup_steps, num_steps=num_steps,
                                         min_lr_ratio=min_lr_ratio,
                                         baseline_last_step=baseline_last_step))


def ref_train(model: RefModel, batches: Sequence[torch.Tensor], *, lr: float, warmup_steps: int,
              num_steps: int, min_lr_ratio: float = 0.1, micro_batches: int = 1,
              grad_clip: float = 0.0, gate_clip: float = 0.0, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 0.0, baseline_last_step: bool = False,
              pad_id: int = 0, history: list | None = None,
              loss_of: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
              gate_norms: list[float] | None = None) -> list[float]:
  """Runs one update per batch (update k at ref_lr(k)); returns the per-update losses.

  The baseline does N + 1 updates (k = 0..N): pass N + 1 batches to reproduce it. Each batch is
  split into `micro_batches` contiguous chunks whose token-mean losses are averaged (the
  baseline's GPUs x accumulation). Build Adam after `model.to(torch.bfloat16)` to train as the
  baseline does: parameters, gradients and moments in bf16. `history`, if given, receives per
  update: loss, grad_norm (before clipping), gate_norm (after the global clip; clip_grad_norm_'s
  value), gates (list). `gate_norms`, if given, receives each update's joint gate-gradient norm
  after the global clip when the gate clip is on. `loss_of(model, ids)`: the loss of another
  model implementation.
  """
  loss_of = loss_of or (lambda m, ids: loss_fn(m(ids), ids, pad_id))
  params = [p for p in model.parameters() if p.requires_grad]
  gates = gate_params(model)
  if weight_decay > 0:
    opt = torch.optim.AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay,
                            foreach=False)
  else:
    opt = torch.optim.Adam(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0, foreach=False)
  sched = ref_scheduler(opt, warmup_steps=warmup_steps, num_steps=num_steps,
                        min_lr_ratio=min_lr_ratio, baseline_last_step=baseline_last_step)
  losses = []
  for batch in batches:
    if batch.shape[0] % micro_batches:
      raise ValueError(f'batch {batch.shape[0]} not divisible into {micro_batches} micro-batches')
    total = 0.0
    for mb in torch.split(batch, batch.shape[0] // micro_batches):
      loss = loss_of(model, mb)
      (loss / micro_batches).backward()
      total += loss.item()
    grads = [p for p in params if p.grad is not None]
    if grad_clip > 0:
      grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
      grad_norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
    gate_norm = torch.nn.utils.get_total_norm([g.grad for g in gates]) if gates else None
    if gate_clip > 0 and gates:
      gate_norm = torch.nn.utils.clip_grad_norm_(gates, gate_clip)  # One joint norm over all gates.
      if gate_norms is not None:
        gate_norms.append(float(gate_norm))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    losses.append(total / micro_batches)
    if history is not None:
      history.append({'loss': losses[-1], 'grad_norm': float(grad_norm),
                      'gate_norm': None if gate_norm is None else float(gate_norm),
                      'gates': [float(x) for g in gates for x in g.detach().float().reshape(-1)]})
  return losses
