"""The GPAS op, x - act(g) * stop_gradient(x), and its gate activations."""

import functools
from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp

from gpas_jax.model import layers


def _scale_silu(x: jax.Array) -> jax.Array:
  return jax.nn.sigmoid(8 * x) * x


GATE_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'silu': jax.nn.silu,
    'identity': lambda x: x,
    'relu': jax.nn.relu,
    'tanh': jnp.tanh,
    'leaky_relu': functools.partial(jax.nn.leaky_relu, negative_slope=0.01),
    'scale_silu': _scale_silu,
    'sigmoid': jax.nn.sigmoid,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),  # torch's default (erf) GELU.
}


def forward_scale(g: jax.Array, act: str = 'silu') -> jax.Array:
  """The factor 1 - act(g) by which the forward pass scales the stream."""
  return 1 - GATE_ACTIVATIONS[act](g)


def gpas(x: jax.Array, g: jax.Array, act: str = 'silu', stop_gradient: bool = True) -> jax.Array:
  """Scales x by 1 - act(g) in the forward pass; the gradient to x passes unchanged."""
  scale = GATE_ACTIVATIONS[act](g).astype(x.dtype)
  # The stop-gradient is the method: without it the backward pass is scaled too (an ablation).
  if stop_gradient:  # the gate's gradient sums over every element in float32, as torch's
    return x - layers.broadcast_mul(scale, jax.lax.stop_gradient(x))
  return x - scale * x


class GPAS(nnx.Module):
  """The gates of one decoder layer: one scalar (baseline, used twice) or one per sub-layer."""

  def __init__(self, act: str = 'silu', init: float = 0.0, learnable: bool = True,
               per_sublayer: bool = False, param_dtype: jnp.dtype = jnp.float32):
    self.act = act
    self.per_sublayer = per_sublayer
    shape = (2,) if per_sublayer else ()
    value = jnp.full(shape, init, param_dtype)
    names = ('sublayer',) if per_sublayer else ()
    if learnable:
      self.gate = nnx.Param(value, out_sharding=names, eager_sharding=False)
    else:
      self.gate = nnx.Variable(value, out_sharding=names, eager_sharding=False)

  def __call__(self, x: jax.Array, sublayer: int) -> jax.Array:
    """Applies the gate of sublayer 0 (after attention) or 1 (after the MLP)."""
    g = self.gate[...]
    return gpas(x, g[sublayer] if self.per_sublayer else g, self.act)

  def scale(self) -> jax.Array:
    """The forward scale 1 - act(g) of each gate."""
    return forward_scale(self.gate[...], self.act)
