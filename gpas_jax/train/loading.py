"""Loading a run's trained model for analysis and export (checkpoint -> steps -> here, one way)."""

from typing import Any

from absl import logging
from flax import nnx
import jax
import ml_collections
import orbax.checkpoint as ocp

from gpas_jax import config as config_lib
from gpas_jax import storage
from gpas_jax.train import checkpoint as ckpt
from gpas_jax.train import restore as restore_lib
from gpas_jax.train.faults import CheckpointError
from gpas_jax.train import steps


def _read_config(workdir: str) -> ml_collections.ConfigDict:
  path = storage.join(workdir, 'config.json')
  saved = storage.read_json(path)
  if saved is None:
    raise FileNotFoundError(f'{path} does not exist: {workdir} is not a run directory.')
  return config_lib.from_saved(saved)


def _restore_params(manager: ocp.CheckpointManager, step: int, abstract_params: Any) -> Any:
  """Only the parameters (so optimizer changes cannot matter), verified by their checksums."""
  item = {'params': abstract_params}
  restored = manager.restore(step, args=ocp.args.Composite(**{ckpt.STATE: ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)}))[ckpt.STATE]
  meta = ckpt.read_meta(manager, step)
  ckpt.verify({'params': restored['params']}, meta, step, str(ckpt.step_dir(manager, step)))
  return restored['params']


def load_model(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, Any]:
  """The config and the model of a run's checkpoint, on one device (load_model_step's first two).

  `step=None` takes the newest intact checkpoint (a damaged newer one is named in the log and
  skipped, never moved); an explicit damaged step raises CheckpointError.
  """
  config, model, _ = load_model_step(workdir, step)
  return config, model


def load_model_step(workdir: str, step: int | None = None
                    ) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, model, the step loaded): load_model, saying which step `step=None` found."""
  config = _read_config(workdir)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.dcn_data = 1, 1, 1, 1
  config.optim.micro_batches = 1
  s = steps.setup(config, jax.devices()[:1])
  abstract_params = s.abstract_state['params']
  manager = ocp.CheckpointManager(ckpt.checkpoint_dir(workdir),
                                  item_handlers={ckpt.STATE: ocp.PyTreeCheckpointHandler(),
                                                 ckpt.META: ocp.JsonCheckpointHandler()})
  try:
    candidates = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not candidates:
      raise FileNotFoundError(f'no checkpoint under {ckpt.checkpoint_dir(workdir)}.')
    for k in candidates:
      try:
        params = _restore_params(manager, k, abstract_params)
      except Exception as e:  # pylint: disable=broad-except
        if not restore_lib.is_damage(e) or isinstance(e, CheckpointError) and step is not None:
          raise
        if step is not None:
          raise CheckpointError(f'checkpoint step {k} at {ckpt.step_dir(manager, k)} is damaged: '
                                f'{ckpt.cause(e)}.') from e
        logging.error('Checkpoint step %d at %s is damaged (%s); trying the previous one.', k,
                      ckpt.step_dir(manager, k), ckpt.cause(e))
        continue
      if k != candidates[0]:
        logging.warning('Loaded step %d, the newest intact checkpoint.', k)
      return config, nnx.merge(s.graphdef, params, s.rest), k
    raise CheckpointError(f'every checkpoint under {ckpt.checkpoint_dir(workdir)} is damaged.')
  finally:
    manager.close()
