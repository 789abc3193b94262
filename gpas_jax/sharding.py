"""The device mesh, the logical-axis rules table, and shardings of state and batches."""

import contextlib
import functools
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


def interleave_hosts(devices: Sequence[jax.Device] | None = None) -> list[jax.Device]:
  """The devices in an order that alternates hosts (each host's first device, then each second,
  ...): a host's devices are then not contiguous along the mesh, as on a TPU torus."""
  devices = list(jax.devices() if devices is None else devices)
  seen, keys = {}, []
  for i, d in enumerate(devices):
    rank = seen[d.process_index] = seen.get(d.process_index, -1) + 1
    keys.append((rank, d.process_index, i))
  return [devices[i] for _, _, i in sorted(keys)]


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


@functools.lru_cache(maxsize=64)
def row_blocks(sharding: jax.sharding.Sharding, process_index: int | None = None
               ) -> tuple[int, int]:
  """(blocks a batch's rows split into, blocks held by one host's devices)."""
  if process_index is None:
    process_index = jax.process_index()
  n = sharding.num_devices
  index = sharding.devices_indices_map((n,))
  every = {i[0].indices(n) for i in index.values()}
  held = {i[0].indices(n) for d, i in index.items() if d.process_index == process_index}
  return len(every), len(held)


@functools.lru_cache(maxsize=64)
def host_rows(sharding: jax.sharding.Sharding, rows: int, process_index: int | None = None
              ) -> np.ndarray:
  """The global rows of a batch of `rows` that land on one host's devices, ascending.

  A host reads exactly these rows of each global batch, so global row r is stream row r on any
  host count and any device order (on a TPU torus a host's chips need not be contiguous along
  the batch axis: v5e:16x16 over 1 x 256 x 1 gives host 0 rows 0-3 and 32-35 of 512).
  """
  if process_index is None:
    process_index = jax.process_index()
  held = set()
  for device, index in sharding.devices_indices_map((rows,)).items():
    if device.process_index == process_index:
      held.update(range(*index[0].indices(rows)))
  out = np.array(sorted(held), dtype=np.int64)
  out.setflags(write=False)  # cached: shared by every caller
  return out


def global_rows_array(sharding: jax.sharding.Sharding, local_NxL: np.ndarray, rows: np.ndarray,
                      total: int) -> jax.Array:
  """A global [total, ...] array from this host's rows (local_NxL[i] is global row rows[i])."""
  local_NxL = np.asarray(local_NxL)
  if len(local_NxL) != len(rows):
    raise ValueError(f'{len(local_NxL)} local rows for the {len(rows)} this host holds.')

  def shard(index: tuple[slice, ...]) -> np.ndarray:
    start, stop, _ = index[0].indices(total)
    at = int(np.searchsorted(rows, start))
    return local_NxL[at:at + stop - start][(slice(None),) + tuple(index[1:])]

  return jax.make_array_from_callback((total,) + local_NxL.shape[1:], sharding, shard)
