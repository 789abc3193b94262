"""The mesh from the config, the logical-axis rules, and constraints at block boundaries."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from gpas_jax.model import transformer as model_lib
from gpas_jax import sharding


def test_mesh_shape_resolves_the_rest_and_rejects_bad_products():
  assert sharding.mesh_shape(-1, 2, 1, 8) == (4, 2, 1)
  assert sharding.mesh_shape(2, 2, 2, 8) == (2, 2, 2)
  with pytest.raises(sharding.MeshError, match='multiplies to 6, but there are 8 devices'):
    sharding.mesh_shape(3, 2, 1, 8)
  with pytest.raises(sharding.MeshError, match='at most one axis may be -1'):
    sharding.mesh_shape(-1, -1, 1, 8)
  with pytest.raises(sharding.MeshError, match='8 devices are not divisible by the fixed axes'):
    sharding.mesh_shape(-1, 3, 1, 8)


def test_make_mesh_and_rules():
  cfg = ml_collections.ConfigDict({'data': 2, 'fsdp': -1, 'tensor': 2, 'dcn_data': 1})
  mesh = sharding.make_mesh(cfg)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  with sharding.use_mesh(mesh):
    assert sharding.logical_to_spec(('layers', 'embed', 'mlp')) == P(None, 'fsdp', 'tensor')
    assert sharding.logical_to_spec(('batch', None)) == P(('data', 'fsdp'), None)
    assert sharding.logical_to_spec(('vocab', 'embed')) == P('tensor', 'fsdp')


def test_constraints_are_identity_without_a_mesh_and_present_with_one():
  x = jnp.ones((8, 4))
  assert sharding.constrain(x, ('act_tokens', 'act_embed')) is x
  cfg = model_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                              num_heads=2, scan_layers=False)
  model = model_lib.create_model(cfg)
  ids = jnp.ones((8, 8), jnp.int32)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 2, 'fsdp': 2, 'tensor': 2}))
  plain = str(jax.make_jaxpr(lambda i: model(i))(ids))
  with sharding.use_mesh(mesh):
    sharded = str(jax.make_jaxpr(lambda i: model(i))(ids))
  assert 'sharding_constraint' not in plain
  # the embedding, each layer's output and MLP hidden (and attention heads), the logits
  assert sharded.count('sharding_constraint') >= 2 + 2 * cfg.num_layers
