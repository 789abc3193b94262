"""The training loop: resume, train, evaluate, log, checkpoint, and stop cleanly on faults."""

import json
import os
import signal
import time
from typing import Any

from absl import logging
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpas_jax import checkpoint as ckpt
from gpas_jax import config as config_lib
from gpas_jax import cpu_peak
from gpas_jax import data as data_lib
from gpas_jax import metrics as metrics_lib
from gpas_jax import model as model_lib
from gpas_jax import steps
from gpas_jax.gpas import forward_scale


class NonFiniteError(FloatingPointError):
  """The loss or a gradient was NaN or Inf; the message names the step."""


class _Preemption:
  """Turns SIGTERM into a flag checked at step boundaries: save, then exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> '_Preemption':
    # Multi-host runs use jax.distributed's preemption notifier, which agrees on one step.
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    logging.warning('SIGTERM: saving a checkpoint at the next step boundary, then stopping.')
    self.requested = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def gate_scalars(s: steps.Setup, params: Any) -> dict[str, float]:
  """Every layer's gate value and forward scale 1 - act(g), for the logs."""
  gates = model_lib.gate_values(nnx.merge(s.graphdef, params, s.rest))
  if gates is None:
    return {}
  g_L = np.asarray(jax.device_get(gates), np.float32).reshape(gates.shape[0], -1)
  scale_L = np.asarray(forward_scale(jnp.asarray(g_L), s.model_config.gate_act))
  out = {}
  for i in range(g_L.shape[0]):
    for j in range(g_L.shape[1]):
      key = f'{i}' if g_L.shape[1] == 1 else f'{i}.{j}'
      out[f'gate/{key}'], out[f'gate_scale/{key}'] = float(g_L[i, j]), float(scale_L[i, j])
  return out


def _write_json(path: str, obj: Any) -> None:
  """Writes through a temporary file, so a kill mid-write leaves the old file intact."""
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json; a resumed run must keep the model it was started with."""
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      saved = json.load(f).get('model', {})
    now = json.loads(config.model.to_json_best_effort())
    shape_keys = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads',
                  'norm_type', 'post_num', 'gate_per_sublayer', 'scan_layers')
    diff = {k: (saved.get(k), now.get(k)) for k in shape_keys if saved.get(k) != now.get(k)}
    if diff:
      raise ValueError(f'{workdir} holds a run of another model ({diff}, saved vs now); use a new '
                       '--workdir, or the original model settings to resume.')
  if jax.process_index() == 0:
    _write_json(path, json.loads(config.to_json_best_effort()))


def _peak_flops(config: ml_collections.ConfigDict) -> float | None:
  kind = jax.devices()[0].device_kind
  dtype = config.model.compute_dtype
  peak = metrics_lib.peak_flops(kind, dtype)
  if peak is None and jax.devices()[0].platform == 'cpu':
    peak = cpu_peak.cpu_peak_flops('float32')[0]  # the bench's number, cached per machine
  return peak


def train(config: ml_collections.ConfigDict, workdir: str,
          devices: list | None = None) -> dict[str, Any]:
  """Trains (resuming from the workdir's latest checkpoint) and returns the final metrics."""
  t_start = time.time()
  config_lib.validate(config)
  data_lib.validate_data(config)
  s = steps.setup(config, devices)
  os.makedirs(workdir, exist_ok=True)
  _record_config(config, workdir)
  total = config.num_train_steps + (1 if config.optim.baseline_last_step else 0)
  train_iter = data_lib.make_train_iterator(config)
  eval_batches = data_lib.make_eval_batches(config)
  manager = ckpt.make_manager(workdir, config)
  latest = manager.latest_step()
  if latest is not None:
    state, _ = ckpt.restore(manager, latest, s.abstract_state, train_iter)
    logging.info('Resumed from %s at step %d.', ckpt.checkpoint_dir(workdir), latest)
  else:
    state = steps.init_state(s)
  start = int(jax.device_get(state['step']))
  train_step, eval_step = steps.make_train_step(s), steps.make_eval_step(s)
  grad_step = steps.make_grad_step(s) if config.analysis.every_steps else None
  writer = metrics_lib.MetricWriter.from_config(config, workdir)
  writer.total_steps = total
  tokens_per_step = config.optim.global_batch_size * config.data.max_length
  flops = metrics_lib.training_flops_per_step(s.model_config, config.optim.global_batch_size,
                                              config.data.max_length)['total']
  peak, num_devices = _peak_flops(config), s.mesh.size
  meta = {'process_count': jax.process_count(), 'mesh': dict(s.mesh.shape)}
  final: dict[str, Any] = {}
  skipped = 0

  def check(step: int, m: dict) -> None:
    nonlocal skipped
    if bool(jax.device_get(m['finite'])):
      return
    if config.nan_policy == 'skip':
      skipped += 1
      logging.warning('Step %d: non-finite loss or gradient; the update was skipped.', step)
      return
    manager.wait_until_finished()
    raise NonFiniteError(
        f'step {step}: the loss ({float(m["loss"])}) or the gradient norm '
        f'({float(m["grad_norm"])}) is not finite. The last good checkpoint is step '
        f'{manager.latest_step()} in {ckpt.checkpoint_dir(workdir)}. Lower optim.lr, add '
        'optim.grad_clip, or set nan_policy=skip to skip such updates.')

  def save(step: int) -> None:
    ckpt.save(manager, step, state, train_iter, meta)

  t_log, steps_since_log, pending = time.time(), 0, None
  with _Preemption() as preemption:
    for step in range(start, total):
      batch = steps.global_batch(s, next(train_iter))
      state, m = train_step(state, batch)
      if pending is not None:  # one step behind, so the host does not stall the device
        check(*pending)
      pending = (step + 1, m)
      done = step + 1
      steps_since_log += 1
      if done % config.log_every_steps == 0 or done == total:
        check(*pending)
        dt = time.time() - t_log
        step_time = dt / steps_since_log
        scalars = {k: float(jax.device_get(m[k])) for k in ('loss', 'grad_norm', 'lr')}
        scalars['tokens_per_s'] = tokens_per_step / step_time
        scalars['step_time_s'] = step_time
        if peak:
          scalars['mfu'] = metrics_lib.mfu(flops, step_time, peak, num_devices)
        scalars['eta_s'] = step_time * (total - done)
        if skipped:
          scalars['skipped_steps'] = skipped
        scalars.update(gate_scalars(s, state['params']))
        writer.write_scalars(done, scalars)
        t_log, steps_since_log = time.time(), 0
      every = config.analysis.every_steps
      if every and (done % every == 0 or done == 1):
        analyse(s, grad_step, state['params'], batch, done, workdir)
      if done % config.eval_every_steps == 0 or done == total:
        final = evaluate_and_log(s, eval_step, state['params'], eval_batches, writer, done)
      if done == config.debug.sigterm_at_step:  # a test hook
        os.kill(os.getpid(), signal.SIGTERM)
      stop = preemption.reached(done)
      if done % config.checkpoint_every_steps == 0 or done == total or stop:
        check(*pending)
        save(done)
      if stop:
        logging.warning('Preempted: checkpoint saved at step %d; rerun the same command to resume.',
                        done)
        break
  manager.wait_until_finished()
  manager.close()
  writer.close()
  finished = int(jax.device_get(state['step'])) >= total
  if finished and jax.process_index() == 0:
    _write_json(os.path.join(workdir, 'summary.json'), {
        'step': total, 'eval_loss': final.get('eval_loss'), 'eval_ppl': final.get('eval_ppl'),
        'wall_s': time.time() - t_start, 'finished': True})
  return {'step': int(jax.device_get(state['step'])), 'finished': finished, **final,
          'state': state}


def analyse(s: steps.Setup, grad_step, params, batch, step: int, workdir: str) -> None:
  """Appends per-layer activation variance, gradient norms and gates to analysis.jsonl."""
  from gpas_jax.analysis import runs, stats  # pylint: disable=import-outside-toplevel
  grads = grad_step(params, batch)
  seg = batch['segment_ids'] if s.config.data.layout == 'packed' else None
  model = nnx.merge(s.graphdef, params, s.rest)
  record = stats.training_stats(model, grads, batch['input_ids'], seg, s.config.data.pad_id,
                                step=step)
  if jax.process_index() == 0:
    runs.append_jsonl(os.path.join(workdir, 'analysis.jsonl'), record)


def evaluate_and_log(s: steps.Setup, eval_step, params, eval_batches, writer, step: int) -> dict:
  """Runs the eval budget and writes eval_loss and eval_ppl."""
  t = time.time()
  result = steps.evaluate(s, eval_step, params, iter(eval_batches))
  result['eval_time_s'] = time.time() - t
  writer.write_scalars(step, result)
  return result
