"""The device mesh, the logical-axis rules table, and shardings of state and batches."""

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
from flax import nnx
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axes. Parameters: vocab, embed, heads, kv, mlp, norm, layers, sublayer.
# Activations: batch, act_* (the act_ names let activations and weights shard differently).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('kv', None),
    ('norm', None),
    ('layers', None),
    ('sublayer', None),
    ('act_length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv', None),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('act_tokens', ('data', 'fsdp')),
)


class MeshError(ValueError):
  """A mesh shape that does not fit the devices or the batch; the message carries the numbers."""


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Resolves one -1 axis to the rest of the devices and checks the product."""
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise MeshError(f'mesh data={data} fsdp={fsdp} tensor={tensor}: at most one axis may be -1.')
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f'mesh data={data} fsdp={fsdp} tensor={tensor}: sizes must be >= 1 or -1.')
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if num_devices % known:
      raise MeshError(f'mesh data={data} fsdp={fsdp} tensor={tensor}: {num_devices} devices are '
                      f'not divisible by the fixed axes ({known}).')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise MeshError(f'mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} multiplies to '
                    f'{int(np.prod(sizes))}, but there are {num_devices} devices; make the product '
                    f'equal {num_devices} (or set one axis to -1).')
  return tuple(sizes)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; several slices (dcn_data > 1) get a hybrid ICI/DCN mesh."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, len(devices))
  dcn = mesh_config.get('dcn_data', 1)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if dcn > 1:
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
    if shape[0] % dcn:
      raise MeshError(f'mesh.data={shape[0]} is not divisible by mesh.dcn_data={dcn}.')
    ici = (shape[0] // dcn, shape[1], shape[2])
    arr = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices)
    return Mesh(arr, MESH_AXES, axis_types=axis_types)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  except (ValueError, NotImplementedError):
    # A TPU torus maps each mesh axis onto a product of its physical axes; a shape that needs
    # one split (4 x 64 on 16 x 16) is still a valid, if less local, device order.
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
    arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(arr, MESH_AXES, axis_types=axis_types)


def rules_from_config(config: Any) -> tuple[tuple[str, Any], ...]:
  """The rules table: the config's `mesh.rules` if set, else DEFAULT_RULES."""
  rules = config.mesh.get('rules', None) if hasattr(config, 'mesh') else None
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in (rules or DEFAULT_RULES))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Iterator[None]:
  """Activates a mesh and the logical rules for constraints and partition specs."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_to_spec(names: Sequence[str | None]) -> P:
  """The PartitionSpec of logical names under the active rules."""
  return nn.logical_to_mesh_axes(tuple(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """A sharding constraint by logical names when a mesh is active; the identity otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not nn.get_logical_axis_rules():
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def without_axes(rules: Sequence[tuple[str, Any]], axes: Sequence[str]
                 ) -> tuple[tuple[str, Any], ...]:
  """The rules table with `axes` taken out of every entry (a vmap's spmd_axis_name holds them)."""
  def drop(v):
    kept = tuple(a for a in ((v,) if isinstance(v, str) else v or ()) if a not in axes)
    return kept if len(kept) > 1 else (kept[0] if kept else None)
  return tuple((k, drop(v)) for k, v in rules)


def rule_axes(rules: Sequence[tuple[str, Any]], name: str) -> tuple[str, ...]:
  """The mesh axes a logical name maps to in a rules table (() if unsharded)."""
  v = dict(rules).get(name)
  return (v,) if isinstance(v, str) else tuple(v or ())


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """NamedShardings of an nnx.State (or abstract state) from each Variable's logical names."""
  specs = nnx.get_partition_spec(state)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches split their leading axis over the data axes."""
  return NamedSharding(mesh, logical_to_spec(('batch', None)))
