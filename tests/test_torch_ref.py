"""Sanity tests of the PyTorch reference itself (parity against JAX lives elsewhere)."""

import math

import numpy as np
import pytest
import torch

from gpas_jax import torch_ref as ref

# Tiny tensors under `pytest -n 2` on 2 cores: intra-op threads only oversubscribe.
torch.set_num_threads(1)

V, D, FF, H, T = 64, 32, 64, 2, 16

_LAYER_NORMS = {
    'pre': ('input_layernorm', 'post_attention_layernorm'),
    'post': ('post_attention_layernorm', 'post_feedforward_layernorm'),
    'sandwich': ('input_layernorm', 'post_attention_layernorm', 'pre_feedforward_layernorm',
                 'post_feedforward_layernorm'),
}
# Layer skeletons for a 2-layer model with post_num = 1.
_FORMS = {
    'pre': ('pre', 'pre'), 'pre_gpas': ('pre', 'pre'), 'lns': ('pre', 'pre'),
    'lns_gpas': ('pre', 'pre'), 'post': ('post', 'post'), 'deeppost': ('post', 'post'),
    'deeppost_gpas': ('post', 'post'), 'sandwich': ('sandwich', 'sandwich'),
    'sandwich_gpas': ('sandwich', 'sandwich'), 'post_pre': ('post', 'pre'),
    'post_pre_gpas': ('post', 'pre'),
}


def _cfg(norm_type: str, layers: int = 2, post_num: int = 1, **kw) -> ref.RefConfig:
  return ref.RefConfig(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=layers,
                       num_attention_heads=H, norm_type=norm_type, post_num=post_num, **kw)


def _ids(batch: int = 2, seed: int = 0) -> torch.Tensor:
  return torch.randint(1, V, (batch, T), generator=torch.Generator().manual_seed(seed))


def test_all_norm_types_covered():
  assert set(_FORMS) == set(ref.NORM_TYPES)


@pytest.mark.parametrize('norm_type', ref.NORM_TYPES)
def test_parameter_names(norm_type):
  expected = {'model.embed_tokens.weight', 'model.norm.weight', 'lm_head.weight'}
  for i, form in enumerate(_FORMS[norm_type]):
    p = f'model.layers.{i}.'
    expected |= {f'{p}self_attn.{n}_proj.weight' for n in 'qkvo'}
    expected |= {f'{p}mlp.{n}_proj.weight' for n in ('gate', 'up', 'down')}
    expected |= {f'{p}{n}.weight' for n in _LAYER_NORMS[form]}
    if norm_type.endswith('_gpas'):
      expected.add(f'{p}gpas_block.gate')
  sd = ref.RefModel(_cfg(norm_type)).state_dict()
  assert set(sd) == expected
  assert sd['model.embed_tokens.weight'].shape == (V, D)
  assert sd['lm_head.weight'].shape == (V, D)
  assert sd['model.layers.0.mlp.gate_proj.weight'].shape == (FF, D)
  if norm_type.endswith('_gpas'):
    assert sd['model.layers.0.gpas_block.gate'].shape == ()


def test_gate_per_sublayer_shape_and_use():
  model = ref.RefModel(_cfg('pre_gpas', gate_per_sublayer=True))
  gate = model.model.layers[0].gpas_block.gate
  assert gate.shape == (2,)
  ref.loss_fn(model(_ids()), _ids()).backward()
  assert torch.all(gate.grad != 0)


@pytest.mark.parametrize('act', sorted(ref.GATE_ACTS))
def test_gpas_gradient_passes_unchanged(act):
  block = ref.GPASBlock(act).double()
  with torch.no_grad():
    block.gate.fill_(0.7)
  x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
  w = torch.randn(3, 5, dtype=torch.float64)
  y = block(x)
  (w * y).sum().backward()
  assert torch.equal(x.grad, w)
  g = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
  s = ref.GATE_ACTS[act](g)
  s.backward()
  torch.testing.assert_close(y, (1 - s.detach()) * x.detach())
  torch.testing.assert_close(block.gate.grad, -g.grad * (w * x.detach()).sum())


@pytest.mark.parametrize('plain,gpas,post_num', [
    ('pre', 'pre_gpas', 1), ('sandwich', 'sandwich_gpas', 1), ('lns', 'lns_gpas', 1),
    ('post_pre', 'post_pre_gpas', 0), ('post_pre', 'post_pre_gpas', 1),
    ('deeppost', 'deeppost_gpas', 1),
])
def test_gpas_twin_identical_at_init(plain, gpas, post_num):
  a = ref.RefModel(_cfg(plain, post_num=post_num), seed=3)
  b = ref.RefModel(_cfg(gpas, post_num=post_num), seed=3)
  sd_a, sd_b = a.state_dict(), b.state_dict()
  if plain != 'deeppost':  # The plain init draws in the same order with or without gates.
    for k, v in sd_a.items():
      assert torch.equal(v, sd_b[k]), k
  sd = dict(sd_a)
  sd.update({k: v for k, v in sd_b.items() if k.endswith('gate')})
  b.load_state_dict(sd, strict=True)
  ids = _ids()
  assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize('post_num,twin', [(0, 'pre'), (2, 'post')])
def test_mix_ln_extremes(post_num, twin):
  ids = _ids()
  mix = ref.RefModel(_cfg('post_pre', post_num=post_num), seed=1)
  other = ref.RefModel(_cfg(twin), seed=1)
  assert torch.equal(mix(ids), other(ids))


def test_lns_gain_init_and_fixed_mode():
  init = ref.RefModel(_cfg('lns', layers=3), seed=2)
  fixed = ref.RefModel(_cfg('lns', layers=3, lns_mode='fixed'), seed=2)
  for i in range(3):
    layer = init.model.layers[i]
    for n in (layer.input_layernorm, layer.post_attention_layernorm):
      torch.testing.assert_close(n.weight, torch.full((D,), 1 / math.sqrt(i + 1)))
    assert torch.all(fixed.model.layers[i].input_layernorm.weight == 1)
  assert torch.all(init.model.norm.weight == 1)
  # At init, a gain c and a fixed factor c give the same function.
  ids = _ids()
  torch.testing.assert_close(init(ids), fixed(ids), rtol=1e-6, atol=1e-6)


def test_loss_ignores_pad_targets():
  ids = _ids()
  ids[0, 10:] = 0
  ids[1, 14:] = 0
  logits = torch.randn(2, T, V)
  loss = ref.loss_fn(logits, ids)
  bumped = logits.clone()
  bumped[0, 9:] += 5 * torch.randn(T - 9, V)  # Positions whose targets are pads.
  bumped[1, 13:] += 5 * torch.randn(T - 13, V)
  torch.testing.assert_close(ref.loss_fn(bumped, ids), loss)
  logp = torch.log_softmax(logits, -1)
  terms = [-logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(T - 1) if ids[b, t + 1] != 0]
  torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_embedding_last_row_zero_and_no_gradient():
  model = ref.RefModel(_cfg('pre'))
  emb = model.model.embed_tokens.weight
  assert torch.all(emb[V - 1] == 0)
  ids = _ids()
  ids[:, 3] = V - 1
  ref.loss_fn(model(ids), ids).backward()
  assert torch.all(emb.grad[V - 1] == 0)
  assert emb.grad[ids[0, 0]].abs().sum() > 0


def test_schedule_values():
  kw = dict(lr=1e-3, warmup_steps=10, num_steps=100)
  assert ref.ref_lr(0, **kw) == 0.0
  assert ref.ref_lr(5, **kw) == pytest.approx(5e-4)
  assert ref.ref_lr(10, **kw) == pytest.approx(1e-3, rel=1e-15)
  assert ref.ref_lr(55, **kw) == pytest.approx(1e-3 * 0.55)
  assert ref.ref_lr(100, **kw) == pytest.approx(1e-4, rel=1e-15)
  assert ref.ref_lr(150, **kw) == pytest.approx(1e-4, rel=1e-15)
  for s in range(100):
    assert ref.ref_lr(s, baseline_last_step=True, **kw) == ref.ref_lr(s, **kw)
  assert ref.ref_lr(100, baseline_last_step=True, **kw) == pytest.approx(1e-10, rel=1e-12)


@pytest.mark.parametrize('baseline_last_step', [False, True])
def test_scheduler_matches_ref_lr(baseline_last_step):
  kw = dict(warmup_steps=3, num_steps=12, min_lr_ratio=0.1, baseline_last_step=baseline_last_step)
  opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
  sched = ref.ref_scheduler(opt, **kw)
  for s in range(14):
    assert opt.param_groups[0]['lr'] == ref.ref_lr(s, lr=2e-3, **kw)
    opt.step()
    sched.step()


def _pooled_std(model, name):
  return torch.cat([l.self_attn.v_proj.weight.flatten() if name == 'v_proj'
                    else l.self_attn.q_proj.weight.flatten() for l in model.model.layers]).std()


def test_deepnorm_init_std():
  layers, d = 3, 64
  cfg = ref.RefConfig(vocab_size=V, hidden_size=d, intermediate_size=FF, num_hidden_layers=layers,
                      num_attention_heads=H, norm_type='deeppost')
  model = ref.RefModel(cfg, seed=0)
  n = layers * d * d
  tol = 5 / math.sqrt(2 * n)  # Five standard errors of a sample std.
  want_v = (8 * layers) ** -0.25 * math.sqrt(2 / (d + d))
  assert abs(_pooled_std(model, 'v_proj') / want_v - 1) < tol
  assert abs(_pooled_std(model, 'q_proj') / math.sqrt(2 / (d + d)) - 1) < tol
  down = torch.cat([l.mlp.down_proj.weight.flatten() for l in model.model.layers]).std()
  want_down = (8 * layers) ** -0.25 * math.sqrt(2 / (d + FF))
  assert abs(down / want_down - 1) < 5 / math.sqrt(2 * layers * d * FF)
  assert abs(model.lm_head.weight.std() / 0.02 - 1) < 5 / math.sqrt(2 * V * d)
  emb = model.model.embed_tokens.weight[:-1]
  assert abs(emb.std() / math.sqrt(0.4) - 1) < 5 / math.sqrt(2 * emb.numel())


def test_deeppost_gpas_uses_plain_init():
  cfg = ref.RefConfig(vocab_size=V, hidden_size=64, intermediate_size=FF, num_hidden_layers=3,
                      num_attention_heads=H, norm_type='deeppost_gpas')
  model = ref.RefModel(cfg, seed=0)
  n = 3 * 64 * 64
  for name in ('v_proj', 'q_proj'):
    assert abs(_pooled_std(model, name) / 0.02 - 1) < 5 / math.sqrt(2 * n)
  assert all(float(g.detach()) == 0 for g in ref.gate_params(model))


def test_rope_rotate_half_convention():
  cos, sin = ref.rope_cos_sin(3, 4, 10000.0, torch.float64)
  q = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
  out = ref.apply_rope(q, cos[2], sin[2])
  t0, t1 = 2.0, 2.0 / 100.0  # Position 2 times inv_freq = (1, 10000^-0.5).
  want = [1 * math.cos(t0) - 3 * math.sin(t0), 2 * math.cos(t1) - 4 * math.sin(t1),
          3 * math.cos(t0) + 1 * math.sin(t0), 4 * math.cos(t1) + 2 * math.sin(t1)]
  torch.testing.assert_close(out, torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize('norm_type', ['pre_gpas', 'post', 'sandwich_gpas'])
def test_causal(norm_type):
  model = ref.RefModel(_cfg(norm_type))
  ids = _ids()
  other = ids.clone()
  other[:, 9:] = (other[:, 9:] + 7) % (V - 1) + 1
  torch.testing.assert_close(model(ids)[:, :9], model(other)[:, :9], rtol=0, atol=1e-6)


def test_float64_matches_float32():
  model = ref.RefModel(_cfg('post_pre_gpas'))
  ids = _ids()
  logits32 = model(ids)
  logits64 = model.double()(ids)
  assert logits64.dtype == torch.float64
  torch.testing.assert_close(logits64.float(), logits32, rtol=1e-4, atol=1e-4)
  assert ref.loss_fn(logits64, ids).dtype == torch.float64


def test_numpy_state_dict_roundtrip():
  a = ref.RefModel(_cfg('sandwich_gpas'), seed=0)
  b = ref.RefModel(_cfg('sandwich_gpas'), seed=1)
  sd = ref.state_dict_numpy(a)
  assert all(isinstance(v, np.ndarray) for v in sd.values())
  ref.load_numpy_state_dict(b, sd)
  ids = _ids()
  assert torch.equal(a(ids), b(ids))
  with pytest.raises(RuntimeError):
    ref.load_numpy_state_dict(b, {k: v for k, v in sd.items() if not k.endswith('gate')})


def test_ref_train_micro_batches_and_clipping():
  batches = [_ids(batch=4, seed=s) for s in range(4)]
  kw = dict(lr=1e-2, warmup_steps=1, num_steps=3, baseline_last_step=True)
  runs = []
  for mb in (1, 2):
    model = ref.RefModel(_cfg('pre_gpas'), seed=0).double()
    runs.append((ref.ref_train(model, batches, micro_batches=mb, **kw), model))
  (l1, m1), (l2, m2) = runs
  # No pads and equal micro-batches: the mean of token means is the token mean.
  np.testing.assert_allclose(l1, l2, rtol=1e-12)
  for p1, p2 in zip(m1.parameters(), m2.parameters()):
    torch.testing.assert_close(p1, p2, rtol=1e-9, atol=1e-12)
  assert any(float(g.detach()) != 0 for g in ref.gate_params(m1))
  model = ref.RefModel(_cfg('pre_gpas'), seed=0)
  before = ref.state_dict_numpy(model)
  losses = ref.ref_train(model, batches[:1] * 6, lr=1e-2, warmup_steps=1, num_steps=5,
                         grad_clip=1.0, gate_clip=0.01)
  assert losses[-1] < losses[0]
  # Update 0 runs at lr 0: with one step nothing moves.
  frozen = ref.RefModel(_cfg('pre_gpas'), seed=0)
  ref.ref_train(frozen, batches[:1], lr=1e-2, warmup_steps=1, num_steps=5)
  for k, v in ref.state_dict_numpy(frozen).items():
    np.testing.assert_array_equal(v, before[k])
