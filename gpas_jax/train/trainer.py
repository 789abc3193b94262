"""The training loop: resume, train, evaluate, log, checkpoint, and stop cleanly on faults."""

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable, Sequence

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpas_jax import config as config_lib
from gpas_jax import data as data_lib
from gpas_jax.model.gpas import forward_scale
from gpas_jax.model import stats
from gpas_jax.model import transformer as model_lib
from gpas_jax.runtime import console
from gpas_jax.runtime import cpu_peak
from gpas_jax.runtime import profiling
from gpas_jax.runtime import xla_flags
from gpas_jax import sharding
from gpas_jax import storage
from gpas_jax.train import checkpoint as ckpt
from gpas_jax.train import faults
from gpas_jax.train import init_from
from gpas_jax.train import metrics as metrics_lib
from gpas_jax.train import restore as restore_lib
from gpas_jax.train import steps
from gpas_jax.train import workdir as workdir_lib

NonFiniteError = faults.NonFiniteError  # its home is faults.py; kept here for callers


@dataclasses.dataclass(frozen=True)
class EvalHook:
  """Side work every `every_steps` steps and after the last: fn(setup, params, step) -> scalars
  to log. Its schedule is the trainer's to check, so steps between never wait for the device."""
  every_steps: int
  fn: Callable[[steps.Setup, Any, int], dict[str, float]]

  def due(self, step: int, total: int) -> bool:
    """Whether it runs after `step`."""
    return step % self.every_steps == 0 or step == total


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


def _record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json; a resumed run must keep the model it was started with."""
  path = storage.join(workdir, 'config.json')
  saved_config = storage.read_json(path)
  if saved_config is not None:
    saved = saved_config.get('model', {})
    now = json.loads(config.model.to_json_best_effort())
    diff = {k: (saved.get(k), now.get(k)) for k in workdir_lib.SHAPE_KEYS
            if saved.get(k) != now.get(k)}
    if diff:
      raise faults.ResumeError(f'{workdir} holds a run of another model ({diff}, saved vs now); '
                               'use a new --workdir, or the original model settings to resume.')
  if jax.process_index() == 0:
    storage.write_json(path, json.loads(config.to_json_best_effort()))


def _peak_flops(config: ml_collections.ConfigDict) -> tuple[float | None, str]:
  """(peak FLOP/s per device for MFU, where it comes from), printed in the start-up block."""
  kind = jax.devices()[0].device_kind
  peak, how = metrics_lib.matmul_peak(kind, config.model.compute_dtype,
                                      jax.config.jax_default_matmul_precision)
  if peak is not None:
    return peak, f'data sheet of {metrics_lib.chip_name(kind) or kind}, {how}'
  if jax.devices()[0].platform == 'cpu':
    # The measured peak is the whole host's (all its cores): share it among the CPU devices of
    # this process (8 with --xla_force_host_platform_device_count=8), so MFU does not shrink 8x.
    host, source = cpu_peak.cpu_peak_flops('float32')
    n = jax.local_device_count()
    shared = f'the host\'s {host / 1e9:,.1f} GFLOP/s over {n} CPU devices; ' if n > 1 else ''
    return host / n, shared + source
  return None, f'no peak known for {kind}: MFU not reported'


def _peak_row(peak: float | None, source: str) -> str:
  """The start-up block's 'mfu peak' row: the number MFU divides by and its source."""
  if peak is None:
    return source
  return f'{peak / 1e9:,.1f} GFLOP/s per device ({source})'


def train(config: ml_collections.ConfigDict, workdir: str,
          devices: list | None = None, eval_hooks: Sequence[EvalHook] = ()) -> dict[str, Any]:
  """Trains (resuming from the workdir's newest intact checkpoint); returns the final metrics.

  eval_hooks: EvalHooks run when due; their scalars go to metrics.jsonl and TensorBoard (e.g.
  gpas_jax.evals.harness.training_hook).

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
    return _train(config, workdir, devices, tuple(eval_hooks))


def _trace_window(config: ml_collections.ConfigDict, workdir: str) -> profiling.TraceWindow:
  """config.profile's trace window; each process of a multi-process run traces into its own dir."""
  p = config.get('profile') or ml_collections.ConfigDict({'start_step': 0, 'num_steps': 1})
  trace_dir = p.get('dir') or storage.join(workdir, 'profile')
  if jax.process_count() > 1:
    trace_dir = storage.join(trace_dir, f'process_{jax.process_index()}')
  return profiling.TraceWindow(p.start_step, p.num_steps, trace_dir)


@dataclasses.dataclass
class _Run:
  """One run's moving parts, from start-up to the end: what the loop reads and updates."""
  config: ml_collections.ConfigDict
  workdir: str
  s: steps.Setup
  total: int
  train_iter: Any
  eval_batches: Any
  manager: Any
  state: Any
  start: int
  t_start: float
  saver: Any = None
  writer: Any = None
  peak: float | None = None
  guard: Any = None
  final: dict = dataclasses.field(default_factory=dict)
  eval_hooks: tuple = ()

  def last_good(self) -> str:
    """Where the last good checkpoint is, for a fault's message."""
    self.saver.wait()
    latest = self.manager.latest_step()
    if latest is None:
      return (f'No checkpoint was saved before it (checkpoint_every_steps='
              f'{self.config.checkpoint_every_steps}).')
    return f'The last good checkpoint is step {latest} in {ckpt.checkpoint_dir(self.workdir)}.'

  def check(self, step: int, m: dict) -> None:
    """The NaN guard on one step's loss and gradient norm."""
    self.guard.observe(step, bool(jax.device_get(m['finite'])), lambda: float(m['loss']),
                       lambda: float(m['grad_norm']))


def _train(config: ml_collections.ConfigDict, workdir: str,
           devices: list | None = None, eval_hooks: tuple[EvalHook, ...] = ()) -> dict[str, Any]:
  t_start = time.time()
  total = config_lib.total_updates(config)
  summary = workdir_lib.finished_summary(workdir, total)
  if summary is not None:
    return _already_finished(workdir, summary, total)
  run = _start(config, workdir, devices, total, t_start)
  run.eval_hooks = eval_hooks
  with faults.StopSignals(jax.process_count()) as preemption:
    _loop(run, preemption)
  return _finish(run, preemption)


def _already_finished(workdir: str, summary: dict, total: int) -> dict[str, Any]:
  """A finished run's rerun: says so with its recorded eval and changes nothing."""
  evals = ', '.join(f'{k} {summary[k]:.4f}' for k in ('eval_loss', 'eval_ppl')
                    if summary.get(k) is not None)
  console.say(f'{workdir} holds a finished run (step {summary["step"]} of {total}): nothing to '
              f'train{" (" + evals + ")" if evals else ""}. Use a new --workdir, or raise '
              'num_train_steps to train on (the cosine then stretches over the new length; '
              'the start-up block shows the lr before and after).')
  return {'step': summary['step'], 'finished': True, 'already_finished': True,
          **{k: summary[k] for k in ('eval_loss', 'eval_ppl', 'eval_loss_baseline',
                                     'eval_ppl_baseline') if summary.get(k) is not None}}


def _restore_or_init(config: ml_collections.ConfigDict, workdir: str, s: steps.Setup,
                     train_iter, manager, total: int) -> tuple[Any, str | None]:
  """The state to start from: the newest intact checkpoint, else init_from, else a fresh init."""
  check = workdir_lib.resume_check(config, workdir, s.abstract_state,
                                   train_iter.get_state().get('meta'), total)
  restored = restore_lib.restore_latest_intact(manager, s.abstract_state, train_iter, workdir, check)
  if restored is not None:
    state, latest = restored
    return state, f'step {latest} ({ckpt.checkpoint_dir(workdir)})'
  if config.get('init_from'):
    params = init_from.load_params(config.init_from, s.model_config)
    state = steps.init_state(s, init_from.place(params, s.state_shardings['params']))
    return state, f'{config.init_from} (its parameters; a fresh optimizer)'
  return steps.init_state(s), None


def _start(config: ml_collections.ConfigDict, workdir: str, devices: list | None, total: int,
           t_start: float) -> _Run:
  """Start-up: mesh and state shardings, data, resume or init; then config.json and the header."""
  s = steps.setup(config, devices)
  # Each host reads the rows its devices hold: global row r is stream row r on any pod.
  train_iter = data_lib.make_train_iterator(
      config, rows=sharding.host_rows(s.batch_sharding, config.optim.global_batch_size))
  eval_rows = steps.eval_rows(config, s.mesh)
  eval_batches = data_lib.make_eval_batches(
      config, rows=eval_rows, host_rows=sharding.host_rows(s.batch_sharding, eval_rows))
  if eval_batches is None:
    logging.info('No eval set (data.source=tokens without data.eval_tokens_path): eval skipped.')
  manager = ckpt.make_manager(workdir, config)
  state, resumed_from = _restore_or_init(config, workdir, s, train_iter, manager, total)
  saved = storage.read_json(os.path.join(workdir, 'config.json')) or {}
  _record_config(config, workdir)  # only now: a refused resume leaves config.json as it was
  if jax.process_index() == 0:
    for name in ('metrics.jsonl', 'analysis.jsonl'):
      workdir_lib.repair_jsonl(storage.join(workdir, name))
  start = int(jax.device_get(state['step']))
  peak, peak_source = _peak_flops(config)
  rows = {'mfu peak': _peak_row(peak, peak_source)}
  if config.data.source != 'tokens':
    rows['data workers'] = data_lib.workers_row(config.data.worker_count)
  change = workdir_lib.schedule_change(config, saved, start) if resumed_from else None
  if change:
    rows['lr schedule'] = change
  console.say(console.run_header(config, s.mesh, s.abstract_state['params'], workdir,
                                 resumed_from, total, rows))
  if change:  # the header's row says it; the log keeps it for --verbosity=0
    logging.info('lr schedule %s.', change)
  run = _Run(config, workdir, s, total, train_iter, eval_batches, manager, state, start, t_start)
  run.peak = peak
  run.saver = ckpt.Saver(manager)
  run.writer = metrics_lib.MetricWriter.from_config(config, workdir, resume_step=start)
  run.writer.total_steps = total
  run.guard = faults.NanGuard(config.nan_policy, config.get('nan_max_consecutive', 10),
                              config.get('nan_max_total', 100), run.last_good)
  return run


def _loop(run: _Run, preemption: faults.StopSignals) -> None:
  """The train steps from run.start to the end, or to a stop signal's step boundary."""
  config, s = run.config, run.s
  train_step, eval_step = steps.make_train_step(s), steps.make_eval_step(s)
  grad_step = steps.make_grad_step(s) if config.analysis.every_steps else None
  logger = _StepLogger(run)
  meta = {'process_count': jax.process_count(), 'mesh': dict(s.mesh.shape)}
  trace = _trace_window(config, run.workdir)
  window, pending = logger.window, None
  for step in range(run.start, run.total):
    batch = steps.global_batch(s, next(run.train_iter))
    trace.before(step + 1)
    if step == run.start:  # the first call compiles: time it apart from the step times
      with console.timed(f'compiling the train step (and running step {run.start + 1})'):
        run.state, m = train_step(run.state, batch)
        jax.block_until_ready(m)
      window.reset()
      window.add(m['loss'], timed=False)
    else:
      run.state, m = train_step(run.state, batch)
      window.add(m['loss'])
    if trace.due(step + 1):
      jax.block_until_ready(run.state)  # the traced steps run to their end inside the trace
      with window.excluded():  # writing the trace is not train time
        trace.close()
      console.say(f'profiler trace of steps {trace.start}..{step + 1}: {trace.trace_dir}')
    run.saver.poll()  # a failed asynchronous save stops the run here, not one interval later
    if pending is not None:  # one step behind, so the host does not stall the device
      run.check(*pending)
    pending = (step + 1, m)
    done = step + 1
    if done % config.log_every_steps == 0 or done == run.total:
      run.check(*pending)
      logger.log(done, m)
    _analysis_and_eval(run, window, grad_step, eval_step, batch, done)
    if _checkpoint_or_stop(run, preemption, window, pending, meta):
      break
  trace.close()


def _analysis_and_eval(run: _Run, window: console.StepWindow, grad_step, eval_step, batch,
                       done: int) -> None:
  """The side work due after step `done`, kept out of the step times."""
  config, params = run.config, run.state['params']
  every = config.analysis.every_steps
  if every and (done % every == 0 or done == 1):
    jax.block_until_ready(params)  # queued steps count as train time
    with window.excluded():
      analyse(run.s, grad_step, params, batch, done, run.workdir)
  if run.eval_batches is not None and (done % config.eval_every_steps == 0 or done == run.total):
    jax.block_until_ready(params)
    with window.excluded():
      run.final = evaluate_and_log(run.s, eval_step, params, run.eval_batches, run.writer, done)
  for hook in run.eval_hooks:
    if not hook.due(done, run.total):
      continue
    jax.block_until_ready(params)  # queued steps count as train time
    with window.excluded():
      scalars = hook.fn(run.s, params, done)
    if scalars:
      run.writer.write_scalars(done, scalars)


def _checkpoint_or_stop(run: _Run, preemption: faults.StopSignals, window: console.StepWindow,
                        pending: tuple[int, dict], meta: dict) -> bool:
  """Saves when due or when a stop signal came; True when the loop must stop here."""
  config, done = run.config, pending[0]
  if done == config.debug.sigterm_at_step and config.debug.get('sigterm_process', -1) in (
      -1, jax.process_index()):  # test hooks
    os.kill(os.getpid(), signal.SIGTERM)
  if done == config.debug.get('sigint_at_step', -1):
    os.kill(os.getpid(), signal.SIGINT)
  stop = preemption.reached(done)
  if done % config.checkpoint_every_steps == 0 or done == run.total or stop:
    run.check(*pending)
    jax.block_until_ready(run.state['params'])
    with window.excluded():
      run.saver.save(done, run.state, run.train_iter, meta)
      run.writer.flush()  # in a bucket: the log is rewritten at each save (no append there)
    for hook in ('sigkill', 'sigstop'):  # test hooks: a kill or a pause after a save
      if done == config.debug.get(f'{hook}_at_step', -1):
        run.saver.wait()
        os.kill(os.getpid(), getattr(signal, hook.upper()))
  if stop:
    run.saver.wait()
    logging.info('Stopped by %s: checkpoint saved at step %d; rerun the same command to '
                 'resume.', preemption.requested, done)  # train.py prints it once
  return stop


class _StepLogger:
  """The log line and metrics of a log window: mean loss, rates, MFU, ETA, gates."""

  def __init__(self, run: _Run):
    c = run.config
    self.run, self.window = run, console.StepWindow()
    self.tokens_per_step = c.optim.global_batch_size * c.data.max_length
    self.flops = metrics_lib.training_flops_per_step(
        run.s.model_config, c.optim.global_batch_size, c.data.max_length)['total']
    self.peak, self.num_devices = run.peak, run.s.mesh.size

  def log(self, done: int, m: dict) -> None:
    """Writes the window ending at step `done` and starts the next one."""
    window, total = self.window, self.run.total
    # loss: the mean over the steps since the last log line, not the last batch alone.
    scalars = {'loss': window.mean_loss(),
               **{k: float(jax.device_get(m[k])) for k in ('grad_norm', 'lr')}}
    if window.steps:  # none when the window held only the compiling step
      step_time = window.step_time()
      scalars['tokens_per_s'] = self.tokens_per_step / step_time
      scalars['step_time_s'] = step_time
      if self.peak:
        scalars['mfu'] = metrics_lib.mfu(self.flops, step_time, self.peak, self.num_devices)
      scalars['eta_s'] = step_time * (total - done)
    if self.run.guard.skipped:
      scalars['skipped_steps'] = self.run.guard.skipped
    scalars.update(gate_scalars(self.run.s, self.run.state['params']))
    self.run.writer.write_scalars(done, scalars)
    window.reset()


def _finish(run: _Run, preemption: faults.StopSignals) -> dict[str, Any]:
  """The end: waits for the saves, evaluates a run resumed at its last step, writes summary.json."""
  run.saver.wait()
  run.manager.close()
  step = int(jax.device_get(run.state['step']))
  finished = step >= run.total
  if finished and not run.final and run.eval_batches is not None:  # resumed at the last step
    run.final = evaluate_and_log(run.s, steps.make_eval_step(run.s), run.state['params'],
                                 run.eval_batches, run.writer, run.total)
  run.writer.close()
  final = run.final
  if finished and jax.process_index() == 0:
    storage.write_json(storage.join(run.workdir, 'summary.json'), {
        'step': run.total, 'eval_loss': final.get('eval_loss'),
        'eval_ppl': final.get('eval_ppl'), 'eval_loss_baseline': final.get('eval_loss_baseline'),
        'eval_ppl_baseline': final.get('eval_ppl_baseline'),
        'wall_s': time.time() - run.t_start, 'finished': True})
  return {'step': step, 'finished': finished, **final,
          'preempted': None if finished else preemption.requested, 'state': run.state}


def analyse(s: steps.Setup, grad_step, params, batch, step: int, workdir: str) -> None:
  """Appends per-layer activation variance, gradient norms and gates to analysis.jsonl."""
  grads = grad_step(params, batch)
  seg = batch['segment_ids'] if s.config.data.layout == 'packed' else None
  model = nnx.merge(s.graphdef, params, s.rest)
  record = stats.training_stats(model, grads, batch['input_ids'], seg, s.config.data.pad_id,
                                step=step)
  if jax.process_index() == 0:
    storage.append_jsonl(storage.join(workdir, 'analysis.jsonl'), record)


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
