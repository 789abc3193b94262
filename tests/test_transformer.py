"""The model: scanned vs looped stacks, remat, initialisation, logical axes, masking."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpas_jax.model import interop
from gpas_jax.model import transformer as model_lib

TINY = model_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                             num_heads=2, norm_type='pre_gpas', post_num=1)
IDS = jnp.array([[5, 6, 7, 0, 63, 2, 9, 11], [1, 2, 3, 4, 5, 0, 0, 0]], jnp.int32)


def _loss_and_grads(model, ids=IDS):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p):
    return model_lib.lm_loss(nnx.merge(graphdef, p, rest)(ids), ids)[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  return loss, grads


def _perturbed(cfg, seed=0):
  """A model with nonzero gates and perturbed gains, so every path matters."""
  m = model_lib.create_model(cfg, seed)
  sd = interop.to_torch_state_dict(m)
  rng = np.random.default_rng(seed)
  for k, v in sd.items():
    if k.endswith('gate') or 'norm' in k:
      sd[k] = (v + rng.normal(0, 0.3, v.shape)).astype(v.dtype)
  return interop.from_torch_state_dict(sd, cfg)


@pytest.mark.parametrize('norm_type', ['post_pre_gpas', 'sandwich_gpas'])
def test_scanned_and_looped_stacks_agree(norm_type):
  scanned = _perturbed(dataclasses.replace(TINY, norm_type=norm_type, scan_layers=True))
  looped = interop.from_torch_state_dict(
      interop.to_torch_state_dict(scanned),
      dataclasses.replace(TINY, norm_type=norm_type, scan_layers=False))
  # Different structures really are compared: stacked [L, ...] arrays against per-layer ones.
  assert nnx.state(scanned, nnx.Param)['stacks'][0]['layers']['self_attn']['q_proj'].ndim == 4
  np.testing.assert_allclose(scanned(IDS), looped(IDS), rtol=1e-5, atol=1e-5)
  l1, g1 = _loss_and_grads(scanned)
  l2, g2 = _loss_and_grads(looped)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  sd1 = interop.to_torch_state_dict(nnx.merge(*nnx.split(scanned, nnx.Param, ...)[:1], g1,
                                              nnx.split(scanned, nnx.Param, ...)[2]))
  sd2 = interop.to_torch_state_dict(nnx.merge(*nnx.split(looped, nnx.Param, ...)[:1], g2,
                                              nnx.split(looped, nnx.Param, ...)[2]))
  gates = [k for k in sd1 if k.endswith('gate')]
  for k in sd1:
    if k not in gates:
      assert np.abs(sd1[k] - sd2[k]).max() / np.abs(sd2[k]).max() < 1e-5, k
  # Gate gradients are sums over every activation with heavy cancellation: compare jointly.
  g1v, g2v = (np.array([sd[k] for k in gates]) for sd in (sd1, sd2))
  assert np.abs(g1v - g2v).max() / np.abs(g2v).max() < 1e-3


@pytest.mark.parametrize('policy', ['full', 'save_dots'])
def test_remat_gives_the_same_gradients_with_a_different_program(policy):
  cfg = dataclasses.replace(TINY, norm_type='sandwich_gpas')
  base = _perturbed(cfg)
  remat = interop.from_torch_state_dict(interop.to_torch_state_dict(base),
                                        dataclasses.replace(cfg, remat_policy=policy))
  l1, g1 = _loss_and_grads(base)
  l2, g2 = _loss_and_grads(remat)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  def hlo(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    f = lambda p: model_lib.lm_loss(nnx.merge(graphdef, p, rest)(IDS), IDS)[0]
    return jax.jit(jax.grad(f)).lower(params).as_text()

  plain, rematted = hlo(base), hlo(remat)
  assert 'optimization_barrier' not in plain and 'optimization_barrier' in rematted
  if policy == 'full':  # the forward matmuls are recomputed in the backward pass
    assert rematted.count('dot_general') > plain.count('dot_general')


def test_every_parameter_has_logical_axes_of_its_rank():
  for scan in (True, False):
    m = model_lib.create_model(dataclasses.replace(TINY, scan_layers=scan))
    for path, var in jax.tree_util.tree_flatten_with_path(
        nnx.state(m, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
      names = var.get_metadata()['out_sharding']
      assert len(names) == var.ndim, (path, names, var.shape)
      if scan and 'stacks' in str(path):
        assert names[0] == 'layers'


def test_baseline_initialisation():
  cfg = model_lib.ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                              num_layers=4, num_heads=4, norm_type='lns_gpas')
  m = model_lib.create_model(cfg, seed=3)
  sd = interop.to_torch_state_dict(m)
  emb = sd['model.embed_tokens.weight']
  np.testing.assert_array_equal(emb[-1], 0)
  np.testing.assert_allclose(emb[:-1].std(), np.sqrt(0.4), rtol=0.02)
  np.testing.assert_allclose(sd['model.layers.1.mlp.up_proj.weight'].std(), 0.02, rtol=0.03)
  np.testing.assert_allclose(sd['lm_head.weight'].std(), 0.02, rtol=0.03)
  for layer in range(4):
    np.testing.assert_allclose(sd[f'model.layers.{layer}.input_layernorm.weight'],
                               1 / np.sqrt(layer + 1), rtol=1e-6)
    assert sd[f'model.layers.{layer}.gpas_block.gate'] == 0
  np.testing.assert_array_equal(sd['model.norm.weight'], 1)


def test_deepnorm_initialisation_only_for_deeppost():
  d, f, nl = 128, 384, 4
  cfg = model_lib.ModelConfig(vocab_size=64, hidden_size=d, intermediate_size=f, num_layers=nl,
                              num_heads=4, norm_type='deeppost')
  sd = interop.to_torch_state_dict(model_lib.create_model(cfg))
  beta = (8 * nl) ** -0.25
  np.testing.assert_allclose(sd['model.layers.0.self_attn.v_proj.weight'].std(),
                             beta * np.sqrt(2 / (2 * d)), rtol=0.03)
  np.testing.assert_allclose(sd['model.layers.0.mlp.down_proj.weight'].std(),
                             beta * np.sqrt(2 / (d + f)), rtol=0.03)
  np.testing.assert_allclose(sd['model.layers.0.self_attn.q_proj.weight'].std(),
                             np.sqrt(2 / (2 * d)), rtol=0.03)
  sd_gpas = interop.to_torch_state_dict(
      model_lib.create_model(dataclasses.replace(cfg, norm_type='deeppost_gpas')))
  np.testing.assert_allclose(sd_gpas['model.layers.0.self_attn.v_proj.weight'].std(), 0.02,
                             rtol=0.03)


def test_frozen_last_embedding_row_gets_no_gradient():
  m = _perturbed(TINY)
  _, grads = _loss_and_grads(m)
  g = grads['embed_tokens'][...]
  assert np.all(g[-1] == 0) and np.any(g[5] != 0)
  free = interop.from_torch_state_dict(interop.to_torch_state_dict(m),
                                       dataclasses.replace(TINY, frozen_last_embed_row=False))
  _, grads_free = _loss_and_grads(free)
  assert np.any(grads_free['embed_tokens'][...][-1] != 0)


def test_loss_ignores_pad_targets_and_segments_isolate_documents():
  m = model_lib.create_model(TINY)
  logits = m(IDS)
  weights = model_lib.target_weights(IDS)
  np.testing.assert_array_equal(weights[1], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(weights[0], [1, 1, 0, 1, 1, 1, 1, 0])
  # Two documents packed in one row behave as if each were alone.
  a, b = jnp.array([[3, 4, 5, 1]]), jnp.array([[7, 8, 1, 9]])
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2]])
  out = m(packed, seg)
  np.testing.assert_allclose(out[:, :4], m(a), rtol=1e-5, atol=1e-6)
  # RoPE is relative, so the second document matches up to position offset effects only in
  # attention scores; its logits depend on its own tokens alone:
  changed = m(packed.at[0, 0].set(9), seg)
  np.testing.assert_allclose(out[:, 4:], changed[:, 4:], rtol=1e-5, atol=1e-6)
  assert logits.shape == (2, 8, 64)


def test_mixed_precision_and_pure_bf16_run():
  for pd, cd in (('float32', 'bfloat16'), ('bfloat16', 'bfloat16')):
    m = model_lib.create_model(dataclasses.replace(TINY, param_dtype=pd, compute_dtype=cd))
    assert nnx.state(m, nnx.Param)['lm_head'][...].dtype == jnp.dtype(pd)
    logits = m(IDS)
    assert logits.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(logits)))
