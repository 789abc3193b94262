"""How train.py fails: one readable line and a documented exit code for each fault."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from gpas_jax import config as config_lib
from gpas_jax.train import faults
from tests.helpers import tiny_config_file
from tests.helpers import tiny_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', GPAS_NO_JEMALLOC='1')


def _train_py(*args, timeout=300, **popen):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=timeout, check=False, **popen)


def _config_file(tmp_path, **overrides):
  return tiny_config_file(tmp_path / 'cfg.py', **overrides)


def test_unknown_config_field_is_one_line_naming_the_flag(tmp_path):
  for config in ([], ['--config', os.path.join(ROOT, 'configs', 'tiny.py')]):
    r = _train_py(*config, '--config.model.hiden_size=3', f'--workdir={tmp_path}')
    assert r.returncode == faults.EXIT_REFUSED
    assert r.stderr.strip() == ('error: --config.model.hiden_size=3: the config has no field '
                                "'hiden_size'. Did you mean \"hidden_size\" instead of "
                                '"hiden_size"?'), r.stderr[-2000:]


def test_missing_config_file_is_named_first(tmp_path):
  r = _train_py('--config=no/such_config.py', f'--workdir={tmp_path}')
  assert r.returncode == faults.EXIT_REFUSED
  assert r.stderr.startswith('error: --config=no/such_config.py cannot be loaded: [Errno 2]')
  assert len(r.stderr.strip().splitlines()) == 1


def test_our_own_error_is_one_line_and_the_traceback_is_behind_a_flag(tmp_path):
  args = [f'--config={_config_file(tmp_path)}', '--config.optim.min_lr_ratio=-1',
          f'--workdir={tmp_path / "run"}']
  r = _train_py(*args)
  assert r.returncode == faults.EXIT_REFUSED
  assert 'Traceback' not in r.stderr
  assert 'error: optim.min_lr_ratio=-1.0 must be a finite number in [0.0, 1.0]' in r.stderr
  r = _train_py(*args, '--traceback')
  assert r.returncode == faults.EXIT_REFUSED and 'Traceback' in r.stderr
  assert not os.path.exists(tmp_path / 'run')  # refused before anything was written


def test_sigterm_exits_75_after_its_save(tmp_path):
  workdir = tmp_path / 'run'
  config = _config_file(tmp_path, checkpoint_every_steps=100, eval_every_steps=100)
  r = _train_py(f'--config={config}',
                f'--workdir={workdir}', '--config.debug.sigterm_at_step=2',
                '--config.checkpoint_async=True')
  assert r.returncode == faults.EXIT_PREEMPTED, r.stderr[-3000:]
  assert 'stopped by SIGTERM at step 2 after saving a checkpoint' in r.stdout
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2']
  assert not os.path.exists(workdir / 'summary.json')


# Runs train.py under a file size limit: a write past it fails with EFBIG, as a full disk fails
# a write with ENOSPC (set in the child itself: no fork of this multithreaded process).
_LIMITED = ('import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
            'resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); '
            'os.execv(sys.executable, [sys.executable] + sys.argv[2:])')


def test_failed_async_save_stops_the_run_at_the_next_step_boundary(tmp_path):
  from gpas_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  data_lib.make_train_iterator(tiny_train_config())  # corpus and tokenizer built, not written
  workdir = tmp_path / 'run'
  # The checkpoint's array file is ~400 kB: a 100 kB file size limit fails it like a full disk,
  # inside the asynchronous save; the small metrics and config files still fit.
  r = subprocess.run(
      [sys.executable, '-c', _LIMITED, '100000', os.path.join(ROOT, 'train.py'),
       f'--config={_config_file(tmp_path, num_train_steps=300, eval_every_steps=1000)}',
       f'--workdir={workdir}', '--config.checkpoint_every_steps=25',
       '--config.checkpoint_async=True'],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == faults.EXIT_SAVE_FAILED, r.stderr[-3000:]
  # One line (C++ threads may write to stderr at the same moment, so search, not split).
  errors = re.findall(r'error: saving checkpoint step (\d+) to (\S+) failed: ([^\n]*)', r.stderr)
  assert len(errors) == 1, r.stderr[-3000:]
  step, where, rest = errors[0]
  assert (step, where) == ('25', f'{workdir}/checkpoints') and 'File too large' in rest, rest
  assert 'The last complete checkpoint is none' in rest
  steps = [json.loads(l)['step'] for l in open(workdir / 'metrics.jsonl')]
  assert 25 <= max(steps) < 50, max(steps)  # before the next save, at step 50


def test_stop_signals_first_ctrl_c_requests_a_save_and_the_second_aborts():
  with faults.StopSignals() as stop:
    assert not stop.reached(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested == 'SIGINT' and stop.reached(2)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  with faults.StopSignals() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested == 'SIGTERM'
  assert signal.getsignal(signal.SIGTERM) is not stop._handle  # pylint: disable=protected-access


def test_nan_guard_counts_each_step_once_and_stops_past_its_limits():
  guard = faults.NanGuard('skip', max_consecutive=2, max_total=3, where=lambda: 'WHERE.')
  nan = lambda: float('nan')
  for step in (1, 1, 1, 2, 2):  # the loop looks at a pending step several times
    guard.observe(step, False, nan, nan)
  assert (guard.skipped, guard.consecutive) == (2, 2)
  guard.observe(3, True, nan, nan)
  assert (guard.skipped, guard.consecutive) == (2, 0)
  guard.observe(4, False, nan, nan)
  with pytest.raises(faults.NonFiniteError, match=r'step 5:.*4 updates were skipped in all '
                     r'\(nan_max_total=3\).*WHERE'):
    guard.observe(5, False, nan, nan)
  guard = faults.NanGuard('skip', max_consecutive=2, max_total=100)
  guard.observe(1, False, nan, nan)
  guard.observe(2, False, nan, nan)
  with pytest.raises(faults.NonFiniteError, match=r'3 updates in a row.*nan_max_consecutive=2'):
    guard.observe(3, False, nan, nan)
  with pytest.raises(faults.NonFiniteError, match='step 1:.*set nan_policy=skip'):
    faults.NanGuard('stop', 2, 3).observe(1, False, nan, nan)


def test_exit_codes_of_our_errors():
  from gpas_jax.data import DataError  # pylint: disable=import-outside-toplevel
  from gpas_jax import sharding  # pylint: disable=import-outside-toplevel
  cases = [(config_lib.ConfigError('x'), 2), (DataError('x'), 2), (sharding.MeshError('x'), 2),
           (faults.ResumeError('x'), 2), (faults.WorkdirBusyError('x'), 2),
           (faults.CheckpointError('x'), 2), (faults.NonFiniteError('x'), 3),
           (faults.CheckpointSaveError('x'), 4), (ValueError('x'), None), (KeyError('x'), None)]
  for exc, code in cases:
    assert faults.exit_code(exc) == code, exc
  codes = {faults.EXIT_OK, faults.EXIT_ERROR, faults.EXIT_REFUSED, faults.EXIT_DIVERGED,
           faults.EXIT_SAVE_FAILED, faults.EXIT_PREEMPTED, faults.EXIT_ABORTED}
  assert len(codes) == 7  # distinct
