"""Tests for gpas_jax.train.optim: schedule, clipping, Adam against torch's formula, accumulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import base
from gpas_jax.train import optim


def _config(**optim_overrides):
  c = base.get_config()
  for k, v in optim_overrides.items():
    if k == 'num_train_steps':
      c.num_train_steps = v
    elif k.startswith('model_'):
      c.model[k[len('model_'):]] = v
    else:
      c.optim[k] = v
  return c


def _baseline_lr(s, peak, warmup, total, min_ratio, last_step_quirk):
  """The baseline's LambdaLR (cyclical cosine with one cycle of length N), in float64."""
  if last_step_quirk and s == total:
    return 1e-7 * peak
  if s < warmup:
    return peak * s / max(1, warmup)
  progress = min(1.0, (s - warmup) / max(1, total - warmup))
  return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------- schedule


def _torch_lrs(peak, warmup, total, min_ratio, quirk, count):
  """The lr of updates 0..count-1, tabulated from torch's LambdaLR as the baseline drives it.

  The lambda is the release's cyclical form (cycle length N: update N restarts the cycle and
  gets 1e-7), written out again here with the cosine as cos^2(pi p / 2) = (1 + cos(pi p)) / 2.
  Without the quirk, updates past N hold the floor.
  """
  import torch  # pylint: disable=import-outside-toplevel

  def factor(step):
    if quirk:
      cycle = step % total
      if cycle < warmup:
        return 1e-7 if step >= total and cycle < 2 else cycle / max(1, warmup)
    else:
      cycle = min(step, total)
      if cycle < warmup:
        return cycle / max(1, warmup)
    p = (cycle - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * math.cos(math.pi * p / 2) ** 2

  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
  lrs = []
  for _ in range(count):
    lrs.append(opt.param_groups[0]['lr'])  # the lr this update runs at
    opt.step()
    sched.step()
  return np.array(lrs)


@pytest.mark.parametrize('quirk', [False, True])
@pytest.mark.parametrize('peak,warmup,total', [(1e-3, 1000, 10_000), (3e-3, 7, 40)])
def test_schedule_matches_torch_lambdalr(quirk, peak, warmup, total):
  c = _config(lr=peak, warmup_steps=warmup, min_lr_ratio=0.1, baseline_last_step=quirk,
              num_train_steps=total)
  count = total + 1 if quirk else total + 3  # the quirk's schedule ends with update N
  want = _torch_lrs(peak, warmup, total, 0.1, quirk, count)
  got = np.asarray(jax.jit(optim.lr_schedule(c))(jnp.arange(count)), np.float64)
  # float32 against torch's doubles: a few float32 ulps (6e-8 each).
  np.testing.assert_allclose(got, want, rtol=5e-7, atol=0)
  assert got[0] == 0.0 and got[warmup] == pytest.approx(peak, rel=1e-7)
  assert got[total] == pytest.approx(1e-7 * peak if quirk else 0.1 * peak, rel=1e-6)


def test_schedule_edge_cases_do_not_divide_by_zero():
  no_warmup = optim.lr_schedule(_config(lr=2.0, warmup_steps=0, num_train_steps=10))
  assert float(no_warmup(0)) == pytest.approx(2.0)
  assert float(no_warmup(10)) == pytest.approx(0.2)
  flat = optim.lr_schedule(_config(lr=1.0, warmup_steps=5, num_train_steps=5))
  vals = [float(flat(s)) for s in range(7)]
  assert all(math.isfinite(v) for v in vals)
  assert vals[:6] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
  assert vals[6] == pytest.approx(0.1)


# ---------------------------------------------------------------- gate paths and clipping


class _Gpas(nnx.Module):

  def __init__(self, n):
    self.gate = nnx.Param(jnp.zeros((n,)))


class _Layer(nnx.Module):

  def __init__(self, rngs):
    self.mlp = nnx.Linear(3, 4, use_bias=False, rngs=rngs)
    self.gpas = _Gpas(2)


def test_is_gate_path_on_dicts_lists_and_nnx_state():
  tree = {'layers': {'gpas': {'gate': jnp.zeros(3)}, 'mlp': {'gate': {'kernel': jnp.zeros(2)}}},
          'blocks': [{'gpas': {'gate': jnp.zeros(())}}], 'gate_proj': jnp.zeros(1)}
  assert sorted(optim.gate_leaves(tree)) == ['blocks/0/gpas/gate', 'layers/gpas/gate']
  state = nnx.state(_Layer(nnx.Rngs(0)), nnx.Param)
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert [optim.is_gate_path(p) for p in paths].count(True) == 1
  assert list(optim.gate_leaves(state)) == ['gpas/gate']
  assert optim.count_params(state) == 3 * 4 + 2
  assert not optim.is_gate_path(())


def _grads():
  return {'layers': {'gpas': {'gate': jnp.array([3.0, 4.0])},  # joint norm 5 with the next
                     'attn': {'w': jnp.full((2, 3), 7.0)}},
          'extra': {'gate': jnp.array(0.0)},
          'head': jnp.array([1.0, -2.0])}


def test_gate_clip_rescales_only_gates_to_joint_norm():
  grads = _grads()
  tx = optim.clip_gates_by_joint_norm(0.5)
  out, _ = jax.jit(tx.update)(grads, tx.init(grads))
  gates = [out['layers']['gpas']['gate'], out['extra']['gate']]
  assert float(optim.global_norm(gates)) == pytest.approx(0.5, rel=1e-6)
  np.testing.assert_allclose(out['layers']['gpas']['gate'], [0.3, 0.4], rtol=1e-6)
  for a, b in [(out['layers']['attn']['w'], grads['layers']['attn']['w']),
               (out['head'], grads['head'])]:
    assert np.array_equal(np.asarray(a), np.asarray(b))
  # Below the threshold nothing changes, bit for bit.
  same, _ = jax.jit(optim.clip_gates_by_joint_norm(10.0).update)(grads, ())
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), same, grads)


def _first_update_gradient(config, grads):
  """The gradient Adam saw in its first update, read back from the update itself.

  Update 1 is -lr * g / (|g| + eps) whatever the Adam's arithmetic (m_hat = g, sqrt(v_hat) =
  |g|), so with lr = 1 it inverts exactly: g = -u * eps / (1 - |u|). A large eps keeps |u|
  well below 1 (no sign-like step hiding the clipping).
  """
  tx = optim.make_optimizer(config)
  params = jax.tree.map(jnp.zeros_like, grads)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  eps = config.optim.eps
  return jax.tree.map(lambda u: -np.asarray(u, np.float64) * eps / (1 - np.abs(u)), updates)


def test_gate_clip_engages_after_the_global_clip():
  # Gates of joint norm 5 against a rest of norm ~2.6: after the global clip to 1 the gates'
  # norm is still ~0.89, above the gate clip of 0.5, so the gate clip changes the update.
  grads = {'layers': {'gpas': {'gate': jnp.array([3.0, 4.0])},
                      'attn': {'w': jnp.full((2, 3), 0.5)}},
           'extra': {'gate': jnp.array(0.0)},
           'head': jnp.array([1.0, -2.0])}
  c = _config(grad_clip=1.0, gate_clip=0.5, lr=1.0, warmup_steps=0, num_train_steps=10,
              eps=10.0)
  seen = _first_update_gradient(c, grads)
  # The baseline's clipping, done by torch: global clip_grad_norm_, then one over the gates.
  import torch  # pylint: disable=import-outside-toplevel
  t = {k: torch.tensor(np.asarray(v), dtype=torch.float64)
       for k, v in (('gate', grads['layers']['gpas']['gate']), ('w', grads['layers']['attn']['w']),
                    ('extra', grads['extra']['gate']), ('head', grads['head']))}
  for v in t.values():
    v.grad = v.clone()
  total = float(torch.nn.utils.clip_grad_norm_(list(t.values()), 1.0))
  gate_norm = float(torch.nn.utils.clip_grad_norm_([t['gate'], t['extra']], 0.5))
  assert total > 1.0 and gate_norm > 0.5 * 1.5  # both clips engaged, the gate one by a lot
  want = {'gate': seen['layers']['gpas']['gate'], 'w': seen['layers']['attn']['w'],
          'extra': seen['extra']['gate'], 'head': seen['head']}
  # torch divides by norm + 1e-6, optax by the norm: 1e-6 relative; fp32 updates: 1e-6.
  for k, v in t.items():
    np.testing.assert_allclose(want[k], v.grad.numpy(), rtol=1e-5, atol=1e-7, err_msg=k)
  gates = np.concatenate([want['gate'], want['extra'][None]])
  assert np.linalg.norm(gates) == pytest.approx(0.5, rel=1e-5)
  # Without the gate clip, or with it before the global clip, the gates come out otherwise.
  no_gate_clip = np.array([3.0, 4.0]) / total
  gate_first = np.array([0.3, 0.4]) / np.sqrt(0.25 + 6 * 0.25 + 5)
  for wrong in (no_gate_clip, gate_first):
    assert np.abs(wrong - want['gate']).max() > 0.1
  # The rest is clipped by the global clip only (after a gate-first clip it would be larger).
  np.testing.assert_allclose(want['head'], np.array([1.0, -2.0]) / total, rtol=1e-5)


# ---------------------------------------------------------------- Adam vs torch's formula


@pytest.mark.parametrize('name,wd', [('adam', 0.0), ('adamw', 0.1), ('adam', 0.1)])
def test_adam_matches_torch_formula(name, wd):
  c = _config(name=name, weight_decay=wd, lr=1e-2, warmup_steps=2, num_train_steps=6,
              b1=0.9, b2=0.99, eps=1e-8)
  tx = optim.make_optimizer(c)
  rng = np.random.default_rng(0)
  p = rng.normal(size=(5,)).astype(np.float32)
  params = {'w': jnp.asarray(p)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  ref_p, m, v = p.astype(np.float64), np.zeros(5), np.zeros(5)
  for t in range(1, 6):
    g = rng.normal(size=(5,)).astype(np.float32)
    updates, state = update({'w': jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
    # torch.optim.Adam / AdamW (single tensor, no amsgrad), step t, lr of update index t - 1.
    lr = _baseline_lr(t - 1, 1e-2, 2, 6, 0.1, False)
    gg = g.astype(np.float64)
    if name == 'adamw':
      ref_p = ref_p * (1 - lr * wd)
    elif wd:
      gg = gg + wd * ref_p
    m = 0.9 * m + 0.1 * gg
    v = 0.99 * v + 0.01 * gg * gg
    denom = np.sqrt(v) / math.sqrt(1 - 0.99**t) + 1e-8
    ref_p = ref_p - lr / (1 - 0.9**t) * m / denom
    # fp32 params of size ~1 with updates ~1e-2: a few ulps (1.2e-7 each) of accumulated rounding.
    np.testing.assert_allclose(np.asarray(params['w']), ref_p, rtol=0, atol=2e-6)
  assert float(jnp.abs(params['w'] - p).max()) > 1e-3  # it did move


@pytest.mark.parametrize('param_dtype,state_dtype,want', [
    ('bfloat16', '', jnp.bfloat16), ('bfloat16', 'float32', jnp.float32),
    ('float32', 'bfloat16', jnp.bfloat16), ('float32', '', jnp.float32)])
def test_optimizer_state_dtype(param_dtype, state_dtype, want):
  c = _config(state_dtype=state_dtype, model_param_dtype=param_dtype, grad_clip=1.0,
              gate_clip=0.01)
  tx = optim.make_optimizer(c)
  params = {'w': jnp.ones((4, 4), param_dtype), 'gpas': {'gate': jnp.zeros((2,), param_dtype)}}
  state = tx.init(params)
  init_floats = [x for x in jax.tree_util.tree_leaves(state)
                 if jnp.issubdtype(x.dtype, jnp.floating)]
  assert all(x.dtype == want for x in init_floats), [x.dtype for x in init_floats]
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  for _ in range(2):
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
  floats = [x for x in jax.tree_util.tree_leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert len(floats) == 4  # mu and nu for both leaves
  assert all(x.dtype == want for x in floats), [x.dtype for x in floats]
  assert params['w'].dtype == jnp.dtype(param_dtype)


# ---------------------------------------------------------------- gradient accumulation


def _linear_problem(batch, tokens=6, d=5, o=3, seed=0):
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(size=(d, o)), jnp.float32)
  data = {'x': jnp.asarray(rng.normal(size=(batch, tokens, d)), jnp.float32),
          'y': jnp.asarray(rng.normal(size=(batch, tokens, o)), jnp.float32),
          'mask': jnp.ones((batch, tokens), jnp.float32)}

  def loss_fn(params, b):
    err = jnp.sum(jnp.square(b['x'] @ params['w'] - b['y']), -1)
    n = jnp.sum(b['mask'])
    return jnp.sum(err * b['mask']) / n, {'tokens': n}

  return {'w': w}, data, jax.value_and_grad(loss_fn, has_aux=True)


@pytest.mark.parametrize('split', ['contiguous', 'strided'])
def test_accumulation_equals_full_batch_for_equal_token_counts(split):
  params, batch, lg = _linear_problem(16)
  (loss_full, aux_full), g_full = lg(params, batch)
  loss, grads, aux = jax.jit(
      lambda p, b: optim.accumulate_gradients(lg, p, b, 4, split=split))(params, batch)
  # Same math, different fp32 summation order (4 partial sums of 4 rows then / 4 and summed):
  # a few ulps relative, far below 1e-5.
  np.testing.assert_allclose(loss, loss_full, rtol=1e-5)
  np.testing.assert_allclose(grads['w'], g_full['w'], rtol=1e-5, atol=1e-6)
  assert float(aux['tokens']) == pytest.approx(float(aux_full['tokens']) / 4)  # mean of 4


def test_accumulation_weighs_micro_batches_equally_like_the_baseline():
  params, batch, lg = _linear_problem(8)
  mask = np.ones((8, 6), np.float32)
  mask[:4, 3:] = 0.0  # the first micro-batch (contiguous split) has half the tokens
  batch['mask'] = jnp.asarray(mask)
  loss, grads, aux = jax.jit(lambda p, b: optim.accumulate_gradients(
      lg, p, b, 2, split='contiguous', aux_reduce='stack'))(params, batch)
  lg = jax.jit(lg)
  parts = [lg(params, jax.tree.map(lambda x, i=i: x[4 * i:4 * i + 4], batch)) for i in range(2)]
  np.testing.assert_allclose(loss, (parts[0][0][0] + parts[1][0][0]) / 2, rtol=1e-6)
  np.testing.assert_allclose(grads['w'], (parts[0][1]['w'] + parts[1][1]['w']) / 2, rtol=1e-5)
  np.testing.assert_array_equal(aux['tokens'], [12.0, 24.0])
  full_loss = lg(params, batch)[0][0]
  assert abs(float(loss) - float(full_loss)) > 1e-3  # a token mean over the batch would differ


def test_micro_batches_one_is_a_plain_call_and_more_use_scan():
  params, batch, lg = _linear_problem(4)
  jaxpr_1 = str(jax.make_jaxpr(lambda p, b: optim.accumulate_gradients(lg, p, b, 1))(
      params, batch))
  jaxpr_4 = str(jax.make_jaxpr(lambda p, b: optim.accumulate_gradients(lg, p, b, 4))(
      params, batch))
  assert 'scan' not in jaxpr_1 and 'scan' in jaxpr_4
  (want_loss, want_aux), want_g = lg(params, batch)
  loss, grads, aux = optim.accumulate_gradients(lg, params, batch, 1)
  assert float(loss) == float(want_loss) and float(aux['tokens']) == float(want_aux['tokens'])
  np.testing.assert_array_equal(grads['w'], want_g['w'])
  with pytest.raises(ValueError, match='not divisible'):
    optim.accumulate_gradients(lg, params, batch, 3)


def test_accumulation_in_float32_for_bf16_grads():
  params, batch, lg = _linear_problem(8)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  shapes = jax.eval_shape(
      lambda p, b: optim.accumulate_gradients(lg, p, b, 4, accum_dtype=jnp.float32),
      params, batch)
  assert shapes[1]['w'].dtype == jnp.float32
  _, grads_bf16, _ = jax.jit(lambda p, b: optim.accumulate_gradients(lg, p, b, 4))(params, batch)
  assert np.isfinite(np.asarray(grads_bf16['w'], np.float32)).all()
  assert grads_bf16['w'].dtype == jnp.bfloat16
