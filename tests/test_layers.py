"""The attention implementations compute the same function (where they run here)."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpas_jax.model import layers
from gpas_jax.model import transformer as model_lib


def _qkv(b, t, h, k, dtype, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(b, t, h, k)), dtype) for _ in range(3)]


_attention = jax.jit(layers.causal_attention, static_argnames=('impl', 'blocks'))


@pytest.mark.parametrize('t,packed', [(12, False), (200, True), (256, False)])
def test_attention_implementations_agree_float64(t, packed):
  with jax.enable_x64(True):
    q, k, v = _qkv(2, t, 3, 8, jnp.float64)
    seg = None
    if packed:  # two documents, then padding (segment 0)
      seg = jnp.asarray(np.repeat([[1, 2, 0], [1, 1, 2]], [t // 3, t // 3, t - 2 * (t // 3)],
                                  axis=1), jnp.int32)
    ref = _attention(q, k, v, seg, 'einsum')
    outs = {'xla': _attention(q, k, v, seg, 'xla')}
    for blocks in (3, 8):
      outs[f'xla/{blocks}'] = _attention(q, k, v, seg, 'xla', blocks=blocks)
    for name, out in outs.items():
      assert out.shape == ref.shape
      np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12, err_msg=name)
    # jax.nn.dot_product_attention always takes its softmax in float32, even for float64 inputs.
    dpa = _attention(q, k, v, seg, 'dot_product')
    np.testing.assert_allclose(dpa, ref, rtol=1e-5, atol=1e-5)
    # Causality: the first position sees only itself.
    np.testing.assert_allclose(ref[:, 0], v[:, 0], rtol=1e-12)


def test_default_blocking():
  assert [layers.attention_blocks(t) for t in (12, 64, 127, 128, 200, 256, 2048)] == \
      [1, 1, 1, 2, 3, 4, 4]


def test_model_gradients_agree_across_attention_implementations():
  cfg = model_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                              num_heads=2, norm_type='pre_gpas', scan_layers=False,
                              param_dtype='float64', compute_dtype='float64')
  ids = jnp.asarray(np.random.default_rng(1).integers(2, 63, size=(2, 192)), jnp.int32)  # 3 query blocks
  with jax.enable_x64(True):
    results = {}
    for impl in ('einsum', 'xla'):
      model = model_lib.create_model(dataclasses.replace(cfg, attention_impl=impl), seed=0)
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)

      def loss_fn(p, graphdef=graphdef, rest=rest):
        return model_lib.lm_loss(nnx.merge(graphdef, p, rest)(ids), ids)[0]

      results[impl] = jax.jit(jax.value_and_grad(loss_fn))(params)
    loss_ref, grads_ref = results['einsum']
    for impl, (loss, grads) in results.items():
      tol = 1e-10
      np.testing.assert_allclose(loss, loss_ref, rtol=tol, err_msg=impl)
      for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        scale = np.abs(b).max()
        assert np.abs(a - b).max() <= tol * max(scale, 1e-30), impl


def test_unknown_attention_impl_is_rejected():
  q, k, v = _qkv(1, 4, 1, 2, jnp.float32)
  with pytest.raises(ValueError, match='allowed'):
    layers.causal_attention(q, k, v, None, 'flash')
