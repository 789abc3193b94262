"""Sanity tests of the PyTorch port of the baseline's model (parity against JAX lives elsewhere)."""

import math

import numpy as np
import pytest
import torch

from gpas_jax.baseline import torch_model

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


def _cfg(norm_type: str, layers: int = 2, post_num: int = 1, **kw) -> torch_model.RefConfig:
  return torch_model.RefConfig(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=layers,
                               num_attention_heads=H, norm_type=norm_type, post_num=post_num, **kw)


def _ids(batch: int = 2, seed: int = 0) -> torch.Tensor:
  return torch.randint(1, V, (batch, T), generator=torch.Generator().manual_seed(seed))


def test_all_norm_types_covered():
  assert set(_FORMS) == set(torch_model.NORM_TYPES)


@pytest.mark.parametrize('norm_type', torch_model.NORM_TYPES)
def test_parameter_names(norm_type):
  expected = {'model.embed_tokens.weight', 'model.norm.weight', 'lm_head.weight'}
  for i, form in enumerate(_FORMS[norm_type]):
    p = f'model.layers.{i}.'
    expected |= {f'{p}self_attn.{n}_proj.weight' for n in 'qkvo'}
    expected |= {f'{p}mlp.{n}_proj.weight' for n in ('gate', 'up', 'down')}
    expected |= {f'{p}{n}.weight' for n in _LAYER_NORMS[form]}
    if norm_type.endswith('_gpas'):
      expected.add(f'{p}gpas_block.gate')
  sd = torch_model.RefModel(_cfg(norm_type)).state_dict()
  assert set(sd) == expected
  assert sd['model.embed_tokens.weight'].shape == (V, D)
  assert sd['lm_head.weight'].shape == (V, D)
  assert sd['model.layers.0.mlp.gate_proj.weight'].shape == (FF, D)
  if norm_type.endswith('_gpas'):
    assert sd['model.layers.0.gpas_block.gate'].shape == ()


def test_gate_per_sublayer_shape_and_use():
  model = torch_model.RefModel(_cfg('pre_gpas', gate_per_sublayer=True))
  gate = model.model.layers[0].gpas_block.gate
  assert gate.shape == (2,)
  torch_model.loss_fn(model(_ids()), _ids()).backward()
  assert torch.all(gate.grad != 0)


@pytest.mark.parametrize('act', sorted(torch_model.GATE_ACTS))
def test_gpas_gradient_passes_unchanged(act):
  block = torch_model.GPASBlock(act).double()
  with torch.no_grad():
    block.gate.fill_(0.7)
  x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
  w = torch.randn(3, 5, dtype=torch.float64)
  y = block(x)
  (w * y).sum().backward()
  assert torch.equal(x.grad, w)
  g = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
  s = torch_model.GATE_ACTS[act](g)
  s.backward()
  torch.testing.assert_close(y, (1 - s.detach()) * x.detach())
  torch.testing.assert_close(block.gate.grad, -g.grad * (w * x.detach()).sum())


@pytest.mark.parametrize('plain,gpas,post_num', [
    ('pre', 'pre_gpas', 1), ('sandwich', 'sandwich_gpas', 1), ('lns', 'lns_gpas', 1),
    ('post_pre', 'post_pre_gpas', 0), ('post_pre', 'post_pre_gpas', 1),
    ('deeppost', 'deeppost_gpas', 1),
])
def test_gpas_twin_identical_at_init(plain, gpas, post_num):
  a = torch_model.RefModel(_cfg(plain, post_num=post_num), seed=3)
  b = torch_model.RefModel(_cfg(gpas, post_num=post_num), seed=3)
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
  mix = torch_model.RefModel(_cfg('post_pre', post_num=post_num), seed=1)
  other = torch_model.RefModel(_cfg(twin), seed=1)
  assert torch.equal(mix(ids), other(ids))


def test_lns_gain_init_and_fixed_mode():
  init = torch_model.RefModel(_cfg('lns', layers=3), seed=2)
  fixed = torch_model.RefModel(_cfg('lns', layers=3, lns_mode='fixed'), seed=2)
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
  loss = torch_model.loss_fn(logits, ids)
  bumped = logits.clone()
  bumped[0, 9:] += 5 * torch.randn(T - 9, V)  # Positions whose targets are pads.
  bumped[1, 13:] += 5 * torch.randn(T - 13, V)
  torch.testing.assert_close(torch_model.loss_fn(bumped, ids), loss)
  logp = torch.log_softmax(logits, -1)
  terms = [-logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(T - 1) if ids[b, t + 1] != 0]
  torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_embedding_last_row_zero_and_no_gradient():
  model = torch_model.RefModel(_cfg('pre'))
  emb = model.model.embed_tokens.weight
  assert torch.all(emb[V - 1] == 0)
  ids = _ids()
  ids[:, 3] = V - 1
  torch_model.loss_fn(model(ids), ids).backward()
  assert torch.all(emb.grad[V - 1] == 0)
  assert emb.grad[ids[0, 0]].abs().sum() > 0


def _pooled_std(model, name):
  return torch.cat([l.self_attn.v_proj.weight.flatten() if name == 'v_proj'
                    else l.self_attn.q_proj.weight.flatten() for l in model.model.layers]).std()


def test_deepnorm_init_std():
  layers, d = 3, 64
  cfg = torch_model.RefConfig(vocab_size=V, hidden_size=d, intermediate_size=FF, num_hidden_layers=layers,
                              num_attention_heads=H, norm_type='deeppost')
  model = torch_model.RefModel(cfg, seed=0)
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
  cfg = torch_model.RefConfig(vocab_size=V, hidden_size=64, intermediate_size=FF, num_hidden_layers=3,
                              num_attention_heads=H, norm_type='deeppost_gpas')
  model = torch_model.RefModel(cfg, seed=0)
  n = 3 * 64 * 64
  for name in ('v_proj', 'q_proj'):
    assert abs(_pooled_std(model, name) / 0.02 - 1) < 5 / math.sqrt(2 * n)
  assert all(float(g.detach()) == 0 for g in torch_model.gate_params(model))


def test_rope_rotate_half_convention():
  cos, sin = torch_model.rope_cos_sin(3, 4, 10000.0, torch.float64)
  q = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
  out = torch_model.apply_rope(q, cos[2], sin[2])
  t0, t1 = 2.0, 2.0 / 100.0  # Position 2 times inv_freq = (1, 10000^-0.5).
  want = [1 * math.cos(t0) - 3 * math.sin(t0), 2 * math.cos(t1) - 4 * math.sin(t1),
          3 * math.cos(t0) + 1 * math.sin(t0), 4 * math.cos(t1) + 2 * math.sin(t1)]
  torch.testing.assert_close(out, torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize('norm_type', ['pre_gpas', 'post', 'sandwich_gpas'])
def test_causal(norm_type):
  model = torch_model.RefModel(_cfg(norm_type))
  ids = _ids()
  other = ids.clone()
  other[:, 9:] = (other[:, 9:] + 7) % (V - 1) + 1
  torch.testing.assert_close(model(ids)[:, :9], model(other)[:, :9], rtol=0, atol=1e-6)


def test_float64_matches_float32():
  model = torch_model.RefModel(_cfg('post_pre_gpas'))
  ids = _ids()
  logits32 = model(ids)
  logits64 = model.double()(ids)
  assert logits64.dtype == torch.float64
  torch.testing.assert_close(logits64.float(), logits32, rtol=1e-4, atol=1e-4)
  assert torch_model.loss_fn(logits64, ids).dtype == torch.float64


def test_numpy_state_dict_roundtrip():
  a = torch_model.RefModel(_cfg('sandwich_gpas'), seed=0)
  b = torch_model.RefModel(_cfg('sandwich_gpas'), seed=1)
  sd = torch_model.state_dict_numpy(a)
  assert all(isinstance(v, np.ndarray) for v in sd.values())
  torch_model.load_numpy_state_dict(b, sd)
  ids = _ids()
  assert torch.equal(a(ids), b(ids))
  with pytest.raises(RuntimeError):
    torch_model.load_numpy_state_dict(b, {k: v for k, v in sd.items() if not k.endswith('gate')})
