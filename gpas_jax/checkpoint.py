"""Orbax checkpoints: async saves, keep-last-K, resume, restore onto any mesh, data-iterator state."""

import json
import os
from typing import Any

from etils import epath
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

STATE, DATA, META = 'state', 'data', 'meta'


class _DataState:
  """A snapshot of the data iterator's state, for grain's per-process checkpoint handler.

  The snapshot is taken when the save starts, so an asynchronous save cannot see batches the
  loop draws afterwards.
  """

  def __init__(self, iterator: Any, snapshot: dict | None = None):
    self.iterator = iterator
    self.snapshot = snapshot

  def get_state(self) -> bytes:
    return json.dumps(self.snapshot).encode()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    pass


def checkpoint_dir(workdir: str) -> str:
  """Where a run's checkpoints live."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """A manager that keeps the last `checkpoint_keep` steps and saves asynchronously."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.checkpoint_keep, create=True,
      enable_async_checkpointing=config.checkpoint_async)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_handlers={STATE: ocp.StandardCheckpointHandler(),
                     DATA: grain.checkpoint.CheckpointHandler(),
                     META: ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         meta: dict[str, Any], force: bool = True) -> bool:
  """Starts a save of the train state, the data iterator and run metadata at `step`."""
  args = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
  if data_iterator is not None:
    args[DATA] = grain.checkpoint.CheckpointSave(
        _DataState(data_iterator, data_iterator.get_state()))
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: Any = None) -> tuple[Any, dict[str, Any]]:
  """Restores the state onto the shardings of `abstract_state` (any mesh) and the iterator."""
  meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  args = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    saved_count, count = meta.get('process_count'), jax.process_count()
    path = epath.Path(manager.directory) / str(step) / DATA
    if (path / f'process_{jax.process_index()}-of-{count}.json').exists():
      args[DATA] = grain.checkpoint.CheckpointRestore(_DataState(data_iterator))
    else:
      # Another host count: the padded layout's state is one global position, the same on
      # every host, so any host's file resumes it; the packed layout refuses with both counts.
      first = path / f'process_0-of-{saved_count}.json'
      if not first.exists():
        raise RuntimeError(f'checkpoint step {step} has no data iterator state in {path}.')
      data_iterator.set_state(json.loads(first.read_text()))
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  return restored[STATE], meta


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: what a restore lays the arrays out as."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def load_model(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, Any]:
  """The config and the model of a run's checkpoint (latest if step is None), on one device."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gpas_jax import steps  # pylint: disable=import-outside-toplevel
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.dcn_data = 1, 1, 1, 1
  config.optim.micro_batches = 1
  s = steps.setup(config, jax.devices()[:1])
  manager = ocp.CheckpointManager(checkpoint_dir(workdir),
                                  item_handlers={STATE: ocp.StandardCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint under {checkpoint_dir(workdir)}.')
  state = manager.restore(step, args=ocp.args.Composite(
      **{STATE: ocp.args.StandardRestore(s.abstract_state)}))[STATE]
  manager.close()
  return config, nnx.merge(s.graphdef, state['params'], s.rest)
