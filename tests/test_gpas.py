"""The GPAS op: forward scale, gradient to x, gradient to the gate, and the ablation without it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpas_jax.model import gpas as gpas_lib


@pytest.mark.parametrize('act', sorted(gpas_lib.GATE_ACTIVATIONS))
def test_forward_scales_by_one_minus_act(act):
  x = jax.random.normal(jax.random.key(0), (3, 5))
  g = jnp.float32(0.7)
  scale = gpas_lib.GATE_ACTIVATIONS[act](g)
  np.testing.assert_allclose(gpas_lib.gpas(x, g, act), (1 - scale) * x, rtol=1e-6, atol=1e-7)


def _torch_acts():
  """The baseline's activations, written from torch.nn.functional (not from our table)."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  return {'silu': F.silu, 'identity': lambda g: g, 'relu': F.relu, 'tanh': torch.tanh,
          'leaky_relu': lambda g: F.leaky_relu(g, negative_slope=0.01),
          'scale_silu': lambda g: torch.sigmoid(8 * g) * g,  # GPAS.md: sigmoid(8x) * x
          'sigmoid': torch.sigmoid, 'gelu': F.gelu}  # torch's default gelu: the exact (erf) one


@pytest.mark.parametrize('act', sorted(gpas_lib.GATE_ACTIVATIONS))
def test_gate_activations_and_their_derivatives_match_torch(act):
  import torch  # pylint: disable=import-outside-toplevel
  assert set(_torch_acts()) == set(gpas_lib.GATE_ACTIVATIONS)
  # Gates live in about [-3, 3]; avoid 0 exactly, where relu-like derivatives are a convention.
  g = np.linspace(-3.0, 3.0, 241) + 1e-3
  g_t = torch.tensor(g, dtype=torch.float64, requires_grad=True)
  want = _torch_acts()[act](g_t)
  (want_grad,) = torch.autograd.grad(want.sum(), g_t)
  with jax.enable_x64(True):
    fn = gpas_lib.GATE_ACTIVATIONS[act]
    got = np.asarray(fn(jnp.asarray(g)))
    got_grad = np.asarray(jax.vmap(jax.grad(fn))(jnp.asarray(g)))
  assert got.dtype == np.float64
  # float64 on both sides: round-off of 1e-16; gelu's tanh approximation is off by up to 5e-4.
  np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(got_grad, want_grad.numpy(), rtol=1e-12, atol=1e-14)


def test_silu_reference_points():
  silu = gpas_lib.GATE_ACTIVATIONS['silu']
  assert float(silu(0.0)) == 0.0  # identity block at init
  assert float(jax.grad(silu)(0.0)) == 0.5
  np.testing.assert_allclose(silu(1.2785), 1.0, atol=1e-3)  # scale 1 - silu(g) hits 0 here
  np.testing.assert_allclose(gpas_lib.GATE_ACTIVATIONS['scale_silu'](0.5),
                             0.5 / (1 + np.exp(-4.0)), rtol=1e-6)


def test_gradient_to_x_is_upstream_gradient_exactly():
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (4, 8))
  w = jax.random.normal(kw, (4, 8))
  for g in (0.0, 0.5, -1.3, 3.0):
    dx = jax.grad(lambda x: jnp.sum(w * gpas_lib.gpas(x, jnp.float32(g))))(x)
    np.testing.assert_array_equal(dx, w)


@pytest.mark.parametrize('act', ['silu', 'tanh', 'gelu', 'scale_silu'])
def test_gate_gradient_is_minus_act_prime_times_inner_product(act):
  kx, kw = jax.random.split(jax.random.key(2))
  x = jax.random.normal(kx, (6, 7), jnp.float32)
  dy = jax.random.normal(kw, (6, 7), jnp.float32)
  g = jnp.float32(0.3)
  dg = jax.grad(lambda g: jnp.sum(dy * gpas_lib.gpas(x, g, act)))(g)
  act_prime = jax.grad(gpas_lib.GATE_ACTIVATIONS[act])(g)
  np.testing.assert_allclose(dg, -act_prime * jnp.sum(dy * x), rtol=1e-5)


def test_without_stop_gradient_the_x_gradient_is_scaled():
  x = jnp.ones((2, 3))
  w = jnp.full((2, 3), 2.0)
  g = jnp.float32(0.5)
  f = lambda x, sg: jnp.sum(w * gpas_lib.gpas(x, g, stop_gradient=sg))
  with_sg, without = jax.grad(f)(x, True), jax.grad(f)(x, False)
  np.testing.assert_array_equal(with_sg, w)
  np.testing.assert_allclose(without, (1 - jax.nn.silu(g)) * w, rtol=1e-6)
  assert not np.allclose(with_sg, without)


def test_module_gates_init_learnable_and_per_sublayer():
  from flax import nnx
  m = gpas_lib.GPAS(init=0.25, per_sublayer=True)
  assert isinstance(m.gate, nnx.Param) and m.gate.shape == (2,)
  x = jnp.ones((2, 2))
  m.gate[...] = jnp.array([0.0, 1.0])
  np.testing.assert_allclose(m(x, 0), x)
  np.testing.assert_allclose(m(x, 1), (1 - jax.nn.silu(1.0)) * x, rtol=1e-6)
  fixed = gpas_lib.GPAS(init=0.5, learnable=False)
  assert not isinstance(fixed.gate, nnx.Param)
  np.testing.assert_allclose(fixed.scale(), 1 - jax.nn.silu(0.5), rtol=1e-6)
