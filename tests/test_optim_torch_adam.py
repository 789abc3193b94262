"""optim.arithmetic='torch': clipping and Adam bit for bit as torch computes them in bf16.

torch's vectorised `lerp_` fuses its multiply-add (one rounding); XLA's CPU backend contracts
`a * b + c` the same way at its default optimisation level, which users run. The suite runs at
-O0 (tests/conftest.py), where LLVM does not contract: the trajectories are compared in a
subprocess at the default level.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import torch

from gpas_jax.baseline import torch_model
from gpas_jax.baseline import torch_train
from gpas_jax.train import optim
from gpas_jax.train import torch_optim
from tests.helpers import tiny_train_config

torch.set_num_threads(1)
L, D, F, V, N = 3, 24, 40, 50, 50


def _tree(rng, dtype):
  """A parameter tree shaped like the model's: a scanned stack (leading layer axis) and gates."""
  return {'embed_tokens': rng.normal(0, 0.6, (V, D)),
          'stacks': [{'layers': {'mlp': {'up_proj': rng.normal(0, 0.02, (L, D, F))},
                                 'gpas_block': {'gate': rng.normal(0, 0.3, (L,))}}}],
          'lm_head': rng.normal(0, 0.02, (V, D))}


def _torch_views(tree):
  """One torch tensor per torch parameter: every layer slice of a stacked leaf on its own."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.asarray(leaf)
    slices = list(a) if torch_optim._is_stacked_path(path) else [a]  # pylint: disable=protected-access
    out += [(path, i if len(slices) > 1 else None, s) for i, s in enumerate(slices)]
  return out


def _to_torch(a, dtype):
  return torch.tensor(np.asarray(a, np.float32)).to(dtype)


def _bits(x):
  """bf16 values as signed ulp positions (monotone in the value), for ulp distances."""
  u = np.asarray(x, ml_dtypes.bfloat16).view(np.uint16).astype(np.int32)
  return np.where(u & 0x8000, -(u & 0x7FFF), u)


def _run(arithmetic, dtype_name, grad_clip, gate_clip):
  """N updates of make_optimizer(config) and of torch.optim.Adam on the same gradients."""
  tdtype = {'bfloat16': torch.bfloat16, 'float32': torch.float32}[dtype_name]
  c = tiny_train_config(num_train_steps=N, **{
      'optim.lr': 1e-2, 'optim.warmup_steps': 10, 'optim.grad_clip': grad_clip,
      'optim.gate_clip': gate_clip, 'optim.arithmetic': arithmetic,
      'optim.baseline_last_step': True, 'model.param_dtype': dtype_name})
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype_name), _tree(rng, dtype_name))
  views = _torch_views(params)
  tparams = [torch.nn.Parameter(_to_torch(a, tdtype)) for _, _, a in views]
  gates = [p for (path, _, _), p in zip(views, tparams) if optim.is_gate_path(path)]
  opt = torch.optim.Adam(tparams, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  sched = torch_train.ref_scheduler(opt, warmup_steps=10, num_steps=N, baseline_last_step=True)
  tx = optim.make_optimizer(c)
  state = tx.init(params)

  @jax.jit
  def update(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  same = total = worst = 0
  for step in range(N):
    scale = 10.0 ** rng.uniform(-3, 0)  # some updates clipped, some not
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, scale, p.shape), p.dtype), params)
    for p, (_, g) in zip(tparams, _flat_slices(grads)):
      p.grad = _to_torch(g, tdtype)
    if grad_clip:
      torch.nn.utils.clip_grad_norm_(tparams, grad_clip)
    if gate_clip:
      torch.nn.utils.clip_grad_norm_(gates, gate_clip)
    opt.step()
    sched.step()
    params, state = update(grads, state, params)
    ours = [a for _, a in _flat_slices(params)]
    theirs = [p.detach().float().numpy() for p in tparams]
    for a, b in zip(ours, theirs):
      if dtype_name == 'bfloat16':
        d = np.abs(_bits(a) - _bits(b))
        same += int(np.sum(d == 0))
        worst = max(worst, int(d.max()))
      else:
        same += int(np.sum(np.asarray(a, np.float32) == b))
        worst = max(worst, float(np.max(np.abs(np.asarray(a, np.float32) - b))))
      total += a.size
  return same / total, worst


def _flat_slices(tree):
  """(path, array) of every torch parameter of `tree`, in _torch_views order."""
  for path, _, a in _torch_views(tree):
    yield path, a


RUNS = {'bf16': ('torch', 'bfloat16', 0.0, 0.0), 'bf16_clipped': ('torch', 'bfloat16', 0.7, 0.02),
        'optax_bf16': ('optax', 'bfloat16', 0.0, 0.0), 'f32_clipped': ('torch', 'float32', 1.0, 0.02)}


@pytest.fixture(scope='module')
def trajectories():
  """(identical fraction, worst difference) of each run in RUNS, at XLA's default -O level."""
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_backend_optimization_level')]
  env['XLA_FLAGS'] = ' '.join(flags)
  if not flags:
    del env['XLA_FLAGS']
  code = ('import json, sys; from tests import test_optim_torch_adam as t; '
          'print(json.dumps({k: t._run(*v) for k, v in t.RUNS.items()}))')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=False, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('run', ['bf16', 'bf16_clipped'])
def test_bf16_torch_arithmetic_is_bit_identical_to_torch_adam(trajectories, run):
  """The contract: >= 99.9% of bf16 parameters bit-identical over 50 updates, <= 2 ulps apart."""
  identical, worst_ulp = trajectories[run]
  print(f'{run}: identical {identical:.6f}, worst {worst_ulp} ulp')
  assert identical >= 0.999 and worst_ulp <= 2


def test_optax_bf16_adam_is_not_the_baselines_arithmetic(trajectories):
  """What the torch arithmetic fixes: optax's Adam on bf16 state drifts away from torch's."""
  identical, _ = trajectories['optax_bf16']
  assert identical < 0.99


def test_float32_torch_arithmetic_matches_torch_adam(trajectories):
  """In float32 it is the Adam torch computes: the same ops, scalars within float32 round-off."""
  _, worst_abs = trajectories['f32_clipped']
  assert worst_abs < 1e-6


def test_torch_clip_rounds_like_clip_grad_norm_in_bf16():
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda a: jnp.asarray(a * 40, jnp.bfloat16), _tree(rng, 'bfloat16'))
  views = _torch_views(grads)
  tensors = [torch.nn.Parameter(torch.zeros(np.shape(a), dtype=torch.bfloat16))
             for _, _, a in views]
  for t, (_, _, a) in zip(tensors, views):
    t.grad = _to_torch(a, torch.bfloat16)
  norm = torch.nn.utils.clip_grad_norm_(tensors, 0.7)
  clipped, _ = torch_optim.torch_clip_by_norm(0.7).update(grads, optax.EmptyState())
  for t, (_, a) in zip(tensors, _flat_slices(clipped)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), t.grad.float().numpy())
  assert float(norm) > 0.7  # it clipped


def test_bias_corrections_keep_their_digits():
  t = jnp.arange(1, 6, dtype=jnp.float32)
  exact = 1 - 0.999 ** np.arange(1, 6, dtype=np.float64)
  np.testing.assert_allclose(torch_optim.bias_correction(0.999, t), exact, rtol=5e-7)
  naive = 1 - jnp.float32(0.999) ** t
  assert np.max(np.abs(np.asarray(naive) / exact - 1)) > 1e-6  # what float32 powers lose
