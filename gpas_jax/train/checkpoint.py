"""Orbax checkpoints: async saves, keep-last-K, resume, restore onto any mesh, data-iterator state.

Every save records a checksum of each array (integrity.py) in its meta item; a restore verifies
them. Which step a run resumes from, and what counts as damage, is decided for all hosts at once
in restore.py. A failed asynchronous save is raised at the next step boundary (Saver.poll) as
CheckpointSaveError.
"""

import errno
import json
import os
import re
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from gpas_jax import storage
from gpas_jax.train.faults import CheckpointDamageError, CheckpointSaveError
from gpas_jax.train import integrity

STATE, DATA, META = 'state', 'data', 'meta'
CHECKSUMS = 'checksums'
DAMAGED_DIR = 'checkpoints_damaged'


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
  return storage.join(storage.absolute(workdir), 'checkpoints')  # a URL stays a URL for Orbax


# tensorstore retries a failing GCS request up to 32 times by default (minutes with the server
# gone); bounded as gcsfs bounds its own (6 tries, waits doubling from 1 s to 16 s: ~31 s).
GCS_RETRIES = {'max_retries': 6, 'initial_delay': '1s', 'max_delay': '16s'}


def _bound_gcs_retries() -> None:
  """Adds GCS_RETRIES to the tensorstore context that Orbax builds for every save and restore."""
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils  # pylint: disable=import-outside-toplevel
  for context in (ts_utils._BASE_TS_CONTEXT, ts_utils._DEFAULT_OCDBT_TS_CONTEXT):  # pylint: disable=protected-access
    context.setdefault('gcs_request_retries', dict(GCS_RETRIES))


def _handlers() -> dict[str, Any]:
  return {STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
          META: ocp.JsonCheckpointHandler()}


def make_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """A manager that keeps the last `checkpoint_keep` steps and saves asynchronously."""
  if storage.is_url(workdir):
    _bound_gcs_retries()
    storage.quiet_tensorstore_auth(workdir)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.checkpoint_keep, create=True,
      enable_async_checkpointing=config.checkpoint_async)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=_handlers())


def _reader() -> ocp.Checkpointer:
  """Reads a step on this host alone, with none of Orbax's barriers between hosts.

  Orbax ends every restore with a device-collective barrier that has no timeout: a host whose
  read failed never reaches it and the others would wait forever. The hosts compare their
  outcomes through distributed.exchange instead (restore.py), which has a bound.
  """
  me = jax.process_index()
  return ocp.Checkpointer(
      ocp.CompositeCheckpointHandler(**_handlers()),
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=me, active_processes={me}))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         meta: dict[str, Any], force: bool = True) -> bool:
  """Starts a save of the train state, the data iterator and run metadata at `step`."""
  meta = {**meta, CHECKSUMS: integrity.fingerprints(state)}
  args = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
  if data_iterator is not None:
    args[DATA] = grain.checkpoint.CheckpointSave(
        _DataState(data_iterator, data_iterator.get_state()))
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def step_dir(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """The folder of one checkpoint step."""
  return epath.Path(manager.directory) / str(step)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The run metadata saved with `step` (process count, mesh, checksums)."""
  meta = _reader().restore(step_dir(manager, step),
                           args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  if not isinstance(meta, dict):
    raise ValueError(f'the meta item of step {step} is {type(meta).__name__}, not a JSON object.')
  return meta


def read_data_state(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  """The data iterator state saved with `step` (this host's, else host 0's), None if absent."""
  path = step_dir(manager, step) / DATA
  mine = list(path.glob(f'process_{jax.process_index()}-of-*.json')) if path.exists() else []
  files = mine or (list(path.glob('process_0-of-*.json')) if path.exists() else [])
  return json.loads(files[0].read_text()) if files else None


def saved_shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple[int, ...]]:
  """{leaf path: shape} of the train state saved at `step`, from its metadata alone."""
  state_dir = step_dir(manager, step) / STATE
  for path in (state_dir, state_dir / '_METADATA'):
    if not path.exists():
      raise FileNotFoundError(f'{path} is missing (an incomplete or damaged save)')
  tree = manager.item_metadata(step)[STATE]
  if tree is None:
    raise FileNotFoundError(f'{state_dir}/_METADATA is unreadable')
  return {integrity.path_str(p): tuple(m.shape)
          for p, m in jax.tree_util.tree_leaves_with_path(tree)}


def verify(state: Any, meta: dict[str, Any], step: int, where: str) -> None:
  """Raises CheckpointDamageError when a restored array differs from the checksum saved with it."""
  expected = meta.get(CHECKSUMS)
  if expected is None:
    logging.warning('Checkpoint step %d (%s) has no checksums (saved by an older version); '
                    'not verified.', step, where)
    return
  bad = integrity.mismatches(state, expected)
  if bad:
    reason = (f'{len(bad)} array(s) differ from their saved checksums ({", ".join(bad[:4])}'
              f'{", ..." if len(bad) > 4 else ""})')
    error = CheckpointDamageError(f'checkpoint step {step} at {where} is damaged: {reason}.')
    error.reason = reason
    raise error


def read(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
         data_iterator: Any = None) -> tuple[Any, dict[str, Any]]:
  """Reads the state onto the shardings of `abstract_state` (any mesh) and sets the iterator.

  This host's reads only, no collective: verify() the result once every host has read it.
  """
  meta = read_meta(manager, step)
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
  restored = _reader().restore(step_dir(manager, step), args=ocp.args.Composite(**args))
  return restored[STATE], meta


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: Any = None) -> tuple[Any, dict[str, Any]]:
  """read() then verify(): the arrays checked against their saved checksums (CheckpointError)."""
  state, meta = read(manager, step, abstract_state, data_iterator)
  verify(state, meta, step, str(step_dir(manager, step)))
  return state, meta


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: what a restore lays the arrays out as."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def cause(e: BaseException) -> str:
  """The root cause of an error in words, as 'Type: reason (first part of its message)'.

  Storage errors carry the reason as a code (tensorstore's os_error_code='27', an errno, an
  HTTP status) after a long path: the reason comes first here, so a cut message keeps it.
  """
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = ' '.join(str(e).split())
  words = []
  code = re.search(r"os_error_code='?(\d+)", text)
  number = int(code.group(1)) if code else getattr(e, 'errno', None)
  if isinstance(number, int) and number > 0:
    words.append(f'{os.strerror(number)} (errno {errno.errorcode.get(number, number)})')
  if isinstance(e, ConnectionError) or re.search(
      r'Connection refused|Cannot connect|Connect call failed|[Ff]ailed to connect|'
      r'Couldn\'t connect|CURL error', text):
    words.append('the storage server cannot be reached')
  if len(text) > 300:  # storage errors put the path first and the details last: keep both ends
    text = f'{text[:160]} ... {text[-120:]}'
  reason = '; '.join(words)
  return f'{type(e).__name__}: ' + (f'{reason} ({text})' if reason else text)


def tree_mismatch(shapes: dict[str, tuple[int, ...]], abstract_state: Any) -> list[str]:
  """How a saved state's leaves differ from the state this config builds, one line each."""
  want = {integrity.path_str(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
  out = [f'{p}: saved, not in this config' for p in sorted(set(shapes) - set(want))]
  out += [f'{p}: in this config, not saved' for p in sorted(set(want) - set(shapes))]
  out += [f'{p}: saved shape {shapes[p]}, this config {want[p]}'
          for p in sorted(set(want) & set(shapes)) if shapes[p] != want[p]]
  return out


class Saver:
  """Starts checkpoint saves; a failed one (asynchronous too) raises at the next step boundary."""

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager = manager
    self._pending: int | None = None

  def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any]) -> None:
    """Waits for the previous save (raising its error), then starts this one."""
    self.wait()
    try:
      save(self.manager, step, state, data_iterator, meta)
    except Exception as e:  # pylint: disable=broad-except
      raise self._error(step, e) from e
    self._pending = step

  def poll(self) -> None:
    """Cheap, at every step boundary: raises CheckpointSaveError if the last save failed."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until the pending save is committed; raises CheckpointSaveError if it failed."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._error(step, e) from e

  def _error(self, step: int | None, e: BaseException) -> CheckpointSaveError:
    latest = self.manager.latest_step()
    hint = storage.write_failure_hint(str(self.manager.directory), str(e))
    return CheckpointSaveError(
        f'saving checkpoint step {step} to {self.manager.directory} failed: {cause(e)}. The last '
        f'complete checkpoint is {"step " + str(latest) if latest is not None else "none"}. '
        f'{hint}, then rerun the same command to resume.')
