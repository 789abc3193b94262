"""The mesh from the config, the logical-axis rules, and constraints at block boundaries."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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


def test_interleaved_hosts_hold_rows_apart_and_rows_build_the_global_batch():
  devices = [types.SimpleNamespace(id=i, process_index=i // 2) for i in range(8)]
  order = sharding.interleave_hosts(devices)
  assert [d.process_index for d in order] == [0, 1, 2, 3, 0, 1, 2, 3]
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 8, 'fsdp': 1, 'tensor': 1}))
  with sharding.use_mesh(mesh):
    s = sharding.batch_sharding(mesh)
  assert sharding.row_blocks(s) == (8, 8)
  np.testing.assert_array_equal(sharding.host_rows(s, 16), np.arange(16))
  x = np.arange(16 * 3).reshape(16, 3)
  np.testing.assert_array_equal(np.asarray(sharding.global_rows_array(s, x, np.arange(16), 16)), x)


def test_a_tpu_pods_hosts_hold_rows_apart_and_together_hold_each_once():
  """v5e:16x16 (64 hosts of 4 chips) over the 1b mesh 1 x 256 x 1, the topology's own order:
  host 0 holds rows 0-3 and 32-35 of 512, so it must read those, not a block of 8."""
  pytest.importorskip('libtpu', reason='the TPU topology needs the tpu extra')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  devices = topologies.get_topology_desc(platform='tpu', topology_name='v5e:16x16').devices
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 256, 'tensor': 1}),
                            devices)
  with sharding.use_mesh(mesh):
    s = sharding.batch_sharding(mesh)
  rows = [sharding.host_rows(s, 512, p) for p in range(64)]
  assert rows[0].tolist() == [0, 1, 2, 3, 32, 33, 34, 35]
  assert sorted(np.concatenate(rows).tolist()) == list(range(512))
  assert sharding.row_blocks(s, 0) == (256, 4)  # its 4 chips, 2 rows each
