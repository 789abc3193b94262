"""Checksums of every array of the train state, computed on device, verified after a restore.

Orbax's files carry no checksum of the array data (TensorStore checks only the shard index), so
flipped bytes restore silently. Each leaf gets a 64-bit fingerprint: two sums, modulo 2^32, of
a bijective mix of each element's bits with its flat index. Integer sums are exact and order
free, so the fingerprint is the same on any mesh and any number of hosts; changing one element
always changes both sums (the mix is a bijection of the bits for a fixed index).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpas_jax import tree_paths

_SEEDS = (0x9E3779B9, 0x7F4A7C15)


def _bits_u32(x: jax.Array) -> jax.Array:
  """The element bits as uint32 (16- and 8-bit types widened; 64-bit split in two words)."""
  width = jnp.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if width == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if width in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * width}')).astype(jnp.uint32)
  if width == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # a trailing axis of two words
  raise TypeError(f'no checksum for dtype {x.dtype}.')


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Each element's row-major flat index, built from iotas so a sharded array stays sharded."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  return index


def _mix(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a bijection of uint32 with good avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _leaf_sums(x: jax.Array) -> jax.Array:
  bits = _bits_u32(jnp.asarray(x))
  index = _flat_index(bits.shape)
  return jnp.stack([jnp.sum(_mix(bits ^ _mix(index + jnp.uint32(s))), dtype=jnp.uint32)
                    for s in _SEEDS])


# One small program per leaf shape, dtype and sharding (layers share them), not one per tree:
# a whole-tree program takes seconds to compile on CPU.
_leaf_sums_jit = jax.jit(_leaf_sums)


def _leaf_sums_host(a: np.ndarray) -> np.ndarray:
  """_leaf_sums in numpy on a host copy (the same uint32 arithmetic, so the same fingerprint)."""
  width = a.dtype.itemsize
  if a.dtype == np.bool_ or width == 1:
    bits = a.astype(np.uint32) if a.dtype == np.bool_ else a.view(np.uint8).astype(np.uint32)
  elif width == 2:
    bits = a.view(np.uint16).astype(np.uint32)
  else:
    bits = a.view(np.uint32)
  index = np.arange(bits.size, dtype=np.uint32).reshape(bits.shape)

  def mix(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))

  with np.errstate(over='ignore'):
    return np.stack([np.sum(mix(bits ^ mix(index + np.uint32(s))), dtype=np.uint32)
                     for s in _SEEDS])


def _on_host(x: Any) -> bool:
  """CPU arrays held whole by this process: summed on the host, with no device collectives
  (8 fake CPU devices on 2 cores can starve XLA's cross-device rendezvous)."""
  if not isinstance(x, jax.Array):
    return True
  return (x.is_fully_addressable and jnp.dtype(x.dtype).itemsize <= 4
          and all(d.platform == 'cpu' for d in x.sharding.device_set))


def _sums(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: _leaf_sums_host(np.asarray(x)) if _on_host(x) else _leaf_sums_jit(x), tree)


path_str = tree_paths.path_str  # 'opt_state/0/mu/lm_head': the keys of saved fingerprints


def fingerprints(tree: Any) -> dict[str, str]:
  """{'params/lm_head': '0123abcd4567ef89', ...}: one hex fingerprint per array leaf."""
  sums = _sums(tree)
  out = {}
  for path, s in jax.tree_util.tree_leaves_with_path(sums):
    words = np.asarray(s.addressable_data(0) if hasattr(s, 'addressable_data') else s)
    out[path_str(path)] = f'{int(words[0]):08x}{int(words[1]):08x}'
  return out


def mismatches(tree: Any, expected: dict[str, str]) -> list[str]:
  """The leaf paths whose fingerprint differs from `expected` (leaves it lacks are skipped)."""
  got = fingerprints(tree)
  return [p for p, fp in got.items() if p in expected and expected[p] != fp]
