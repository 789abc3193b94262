"""The training loop: resume, train, evaluate, log, checkpoint, and stop cleanly on faults."""

import json
import os
import signal
import time
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpas_jax import checkpoint as ckpt
from gpas_jax import config as config_lib
from gpas_jax import console
from gpas_jax import cpu_peak
from gpas_jax import data as data_lib
from gpas_jax import faults
from gpas_jax import init_from
from gpas_jax import metrics as metrics_lib
from gpas_jax import model as model_lib
from gpas_jax import profiling
from gpas_jax import steps
from gpas_jax import workdir as workdir_lib
from gpas_jax import xla_flags
from gpas_jax.gpas import forward_scale

NonFiniteError = faults.NonFiniteError  # its home is faults.py; kept here for callers


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
      raise faults.ResumeError(f'{workdir} holds a run of another model ({diff}, saved vs now); '
                               'use a new --workdir, or the original model settings to resume.')
  if jax.process_index() == 0:
    _write_json(path, json.loads(config.to_json_best_effort()))


def _peak_flops(config: ml_collections.ConfigDict) -> float | None:
  kind = jax.devices()[0].device_kind
  dtype = config.model.compute_dtype
  peak = metrics_lib.peak_flops(kind, dtype)
  if peak is None and jax.devices()[0].platform == 'cpu':
    # The measured peak is the whole host's (all its cores): share it among the CPU devices of
    # this process (8 with --xla_force_host_platform_device_count=8), so MFU does not shrink 8x.
    peak = cpu_peak.cpu_peak_flops('float32')[0] / jax.local_device_count()
  return peak


def train(config: ml_collections.ConfigDict, workdir: str,
          devices: list | None = None) -> dict[str, Any]:
  """Trains (resuming from the workdir's newest intact checkpoint); returns the final metrics.

  Holds the workdir's lock throughout. A run that already finished returns its summary and
  changes nothing ('already_finished'); a stop by SIGTERM or Ctrl-C returns after its save with
  'preempted' set to the signal's name.
  """
  config_lib.validate(config)
  data_lib.validate_data(config)
  idle = xla_flags.not_in_effect(config)
  if idle:
    logging.warning('config.xla_flags %s are not in XLA_FLAGS, so XLA runs without them: '
                    'train.py adds them before JAX starts; an in-process caller sets XLA_FLAGS '
                    'itself.', ' '.join(idle))
  with workdir_lib.lock(workdir):
    return _train(config, workdir, devices)


def _trace_window(config: ml_collections.ConfigDict, workdir: str) -> profiling.TraceWindow:
  """config.profile's trace window; each process of a multi-process run traces into its own dir."""
  p = config.get('profile') or ml_collections.ConfigDict({'start_step': 0, 'num_steps': 1})
  trace_dir = p.get('dir') or os.path.join(workdir, 'profile')
  if jax.process_count() > 1:
    trace_dir = os.path.join(trace_dir, f'process_{jax.process_index()}')
  return profiling.TraceWindow(p.start_step, p.num_steps, trace_dir)


def _train(config: ml_collections.ConfigDict, workdir: str,
           devices: list | None = None) -> dict[str, Any]:
  t_start = time.time()
  total = config_lib.total_updates(config)
  summary = workdir_lib.finished_summary(workdir, total)
  if summary is not None:
    evals = ', '.join(f'{k} {summary[k]:.4f}' for k in ('eval_loss', 'eval_ppl')
                      if summary.get(k) is not None)
    console.say(f'{workdir} holds a finished run (step {summary["step"]} of {total}): nothing to '
                f'train{" (" + evals + ")" if evals else ""}. Use a new --workdir, or raise '
                'num_train_steps to train on.')
    return {'step': summary['step'], 'finished': True, 'already_finished': True,
            **{k: summary[k] for k in ('eval_loss', 'eval_ppl', 'eval_loss_baseline',
                                       'eval_ppl_baseline') if summary.get(k) is not None}}
  s = steps.setup(config, devices)
  train_iter = data_lib.make_train_iterator(config)
  eval_batches = data_lib.make_eval_batches(config)
  if eval_batches is None:
    logging.info('No eval set (data.source=tokens without data.eval_tokens_path): eval skipped.')
  manager = ckpt.make_manager(workdir, config)
  check = workdir_lib.resume_check(config, workdir, s.abstract_state,
                                   train_iter.get_state().get('meta'), total)
  restored = ckpt.restore_latest_intact(manager, s.abstract_state, train_iter, workdir, check)
  resumed_from = None
  if restored is not None:
    state, latest = restored
    resumed_from = f'step {latest} ({ckpt.checkpoint_dir(workdir)})'
  elif config.get('init_from'):
    params = init_from.load_params(config.init_from, s.model_config)
    state = steps.init_state(s, init_from.place(params, s.state_shardings['params']))
    resumed_from = f'{config.init_from} (its parameters; a fresh optimizer)'
  else:
    state = steps.init_state(s)
  _record_config(config, workdir)  # only now: a refused resume leaves config.json as it was
  if jax.process_index() == 0:
    for name in ('metrics.jsonl', 'analysis.jsonl'):
      workdir_lib.repair_jsonl(os.path.join(workdir, name))
  start = int(jax.device_get(state['step']))
  console.say(console.run_header(config, s.mesh, s.abstract_state['params'], workdir,
                                 resumed_from, total))
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
  saver = ckpt.Saver(manager)

  def last_good() -> str:
    saver.wait()
    latest = manager.latest_step()
    if latest is None:
      return (f'No checkpoint was saved before it (checkpoint_every_steps='
              f'{config.checkpoint_every_steps}).')
    return f'The last good checkpoint is step {latest} in {ckpt.checkpoint_dir(workdir)}.'

  guard = faults.NanGuard(config.nan_policy, config.get('nan_max_consecutive', 10),
                          config.get('nan_max_total', 100), last_good)

  def check(step: int, m: dict) -> None:
    guard.observe(step, bool(jax.device_get(m['finite'])), lambda: float(m['loss']),
                  lambda: float(m['grad_norm']))

  def save(step: int) -> None:
    saver.save(step, state, train_iter, meta)

  window, pending = console.StepWindow(), None
  trace = _trace_window(config, workdir)
  with faults.StopSignals(jax.process_count()) as preemption:
    for step in range(start, total):
      batch = steps.global_batch(s, next(train_iter))
      trace.before(step + 1)
      if step == start:  # the first call compiles: time it apart from the step times
        with console.timed(f'compiling the train step (and running step {start + 1})'):
          state, m = train_step(state, batch)
          jax.block_until_ready(m)
        window.reset()
        window.add(m['loss'], timed=False)
      else:
        state, m = train_step(state, batch)
        window.add(m['loss'])
      if trace.due(step + 1):
        jax.block_until_ready(state)  # the traced steps run to their end inside the trace
        with window.excluded():  # writing the trace is not train time
          trace.close()
        console.say(f'profiler trace of steps {trace.start}..{step + 1}: {trace.trace_dir}')
      saver.poll()  # a failed asynchronous save stops the run here, not one interval later
      if pending is not None:  # one step behind, so the host does not stall the device
        check(*pending)
      pending = (step + 1, m)
      done = step + 1
      if done % config.log_every_steps == 0 or done == total:
        check(*pending)
        # loss: the mean over the steps since the last log line, not the last batch alone.
        scalars = {'loss': window.mean_loss(),
                   **{k: float(jax.device_get(m[k])) for k in ('grad_norm', 'lr')}}
        if window.steps:  # none when the window held only the compiling step
          step_time = window.step_time()
          scalars['tokens_per_s'] = tokens_per_step / step_time
          scalars['step_time_s'] = step_time
          if peak:
            scalars['mfu'] = metrics_lib.mfu(flops, step_time, peak, num_devices)
          scalars['eta_s'] = step_time * (total - done)
        if guard.skipped:
          scalars['skipped_steps'] = guard.skipped
        scalars.update(gate_scalars(s, state['params']))
        writer.write_scalars(done, scalars)
        window.reset()
      every = config.analysis.every_steps
      if every and (done % every == 0 or done == 1):
        jax.block_until_ready(state['params'])  # queued steps count as train time
        with window.excluded():
          analyse(s, grad_step, state['params'], batch, done, workdir)
      if eval_batches is not None and (done % config.eval_every_steps == 0 or done == total):
        jax.block_until_ready(state['params'])
        with window.excluded():
          final = evaluate_and_log(s, eval_step, state['params'], eval_batches, writer, done)
      if done == config.debug.sigterm_at_step:  # test hooks
        os.kill(os.getpid(), signal.SIGTERM)
      if done == config.debug.get('sigint_at_step', -1):
        os.kill(os.getpid(), signal.SIGINT)
      stop = preemption.reached(done)
      if done % config.checkpoint_every_steps == 0 or done == total or stop:
        check(*pending)
        jax.block_until_ready(state['params'])
        with window.excluded():
          save(done)
      if stop:
        saver.wait()
        logging.warning('Stopped by %s: checkpoint saved at step %d; rerun the same command to '
                        'resume.', preemption.requested, done)
        break
  trace.close()
  saver.wait()
  manager.close()
  finished = int(jax.device_get(state['step'])) >= total
  if finished and not final and eval_batches is not None:  # resumed at the last step: eval it
    final = evaluate_and_log(s, eval_step, state['params'], eval_batches, writer, total)
  writer.close()
  if finished and jax.process_index() == 0:
    _write_json(os.path.join(workdir, 'summary.json'), {
        'step': total, 'eval_loss': final.get('eval_loss'), 'eval_ppl': final.get('eval_ppl'),
        'eval_loss_baseline': final.get('eval_loss_baseline'),
        'eval_ppl_baseline': final.get('eval_ppl_baseline'),
        'wall_s': time.time() - t_start, 'finished': True})
  return {'step': int(jax.device_get(state['step'])), 'finished': finished, **final,
          'preempted': None if finished else preemption.requested, 'state': state}


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
  tokens = s.config.data.eval_tokens
  batches = console.progress(iter(eval_batches), f'step {step} eval', total=tokens,
                             count=lambda b: jax.process_count() * int(np.count_nonzero(
                                 b['segment_ids'])), unit='tokens')
  result = steps.evaluate(s, eval_step, params, batches)
  result['eval_time_s'] = time.time() - t
  writer.write_scalars(step, result)
  return result
