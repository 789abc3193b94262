"""One run per workdir: the lock, finished reruns, refused resumes, torn metrics lines."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import pytest

from gpas_jax.train import faults
from gpas_jax.train import trainer
from gpas_jax.train import lock as lock_lib
from gpas_jax.train import workdir as workdir_lib
from tests.helpers import tiny_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snapshot(path):
  """Every file under path with its bytes: what 'nothing was written' compares."""
  out = {}
  for d, _, files in os.walk(path):
    for f in files:
      if f != lock_lib.LOCK_FILE:
        p = os.path.join(d, f)
        out[os.path.relpath(p, path)] = open(p, 'rb').read()
  return out


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A finished 6-step run (checkpoints 3 and 6); tests copy it before changing anything."""
  workdir = str(tmp_path_factory.mktemp('finished') / 'run')
  trainer.train(tiny_train_config(), workdir, jax.devices()[:1])
  return workdir


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _hold_lock_in_child(workdir):
  """A second process that takes the workdir lock as a run does and keeps it until killed."""
  code = textwrap.dedent(f'''
      import sys, time
      from gpas_jax.train import workdir
      with workdir.lock({workdir!r}):
        print('locked', flush=True)
        time.sleep(600)
  ''')
  proc = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))
  assert proc.stdout.readline().strip() == 'locked'
  return proc


def test_second_run_on_a_locked_workdir_is_refused_and_a_killed_holder_is_taken_over(
    tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  proc = _hold_lock_in_child(workdir)
  try:
    with pytest.raises(faults.WorkdirBusyError,
                       match=rf'in use by another run \(pid {proc.pid} on host '
                       rf'{socket.gethostname()}'):
      trainer.train(tiny_train_config(), workdir, jax.devices()[:1])
    assert sorted(os.listdir(workdir)) == ['lock']  # nothing of the refused run was written
  finally:
    proc.send_signal(signal.SIGKILL)  # dies holding it: its lock file still names it
    proc.wait()
  assert json.load(open(os.path.join(workdir, 'lock')))['pid'] == proc.pid
  with caplog.at_level('WARNING'), workdir_lib.lock(workdir):
    assert json.load(open(os.path.join(workdir, 'lock')))['pid'] == os.getpid()
    # The same process cannot take it twice either (each run opens it anew).
    with pytest.raises(faults.WorkdirBusyError, match=f'pid {os.getpid()}'):
      with workdir_lib.lock(workdir):
        pass
  assert f'Took over the lock of a run that ended without releasing it (pid {proc.pid}' in (
      caplog.text)
  assert open(os.path.join(workdir, 'lock')).read() == ''  # released: names no holder


def test_rerunning_a_finished_run_changes_nothing(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path / 'run')
  before = _snapshot(workdir)
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  result = trainer.train(tiny_train_config(), workdir, jax.devices()[:1])
  assert result['already_finished'] and result['step'] == 6
  assert result['eval_loss'] == summary['eval_loss']
  assert _snapshot(workdir) == before


def test_extending_a_finished_run_says_how_the_schedule_changes(finished_run, tmp_path,
                                                                 capsys, monkeypatch):
  """Issue 22 case 6: 6 -> 8 steps re-stretches the cosine; the start-up block gives the lr of
  the next update under both plans. Case 8: the MFU peak and its source, provisional named."""
  from gpas_jax.train import optim  # pylint: disable=import-outside-toplevel
  from gpas_jax.runtime import cpu_peak  # pylint: disable=import-outside-toplevel
  workdir = _copy(finished_run, tmp_path / 'run')
  cache = tmp_path / 'peak.json'
  monkeypatch.setenv(cpu_peak.CACHE_ENV, str(cache))
  cache.write_text(json.dumps({cpu_peak.machine_key('float32'): {
      'flops': 8.8e10, 'when': '2026-12-01 10:00', 'cpu_share': 0.498, 'final': False}}))
  capsys.readouterr()
  result = trainer.train(tiny_train_config(num_train_steps=8), workdir, jax.devices()[:1])
  assert result['finished'] and result['step'] == 8
  out = capsys.readouterr().out
  old, new = optim.lr_schedule(tiny_train_config())(6), optim.lr_schedule(
      tiny_train_config(num_train_steps=8))(6)
  assert float(new) > 2 * float(old)  # the jump the block must announce
  row = next(l for l in out.splitlines() if l.strip().startswith('lr schedule'))
  assert 'num_train_steps 6 -> 8' in row, row
  assert f'the lr of update 7 is {float(new):.3g}, it was {float(old):.3g}' in row, row
  peak = next(l for l in out.splitlines() if l.strip().startswith('mfu peak'))
  n = jax.local_device_count()  # the host's peak is shared by its CPU devices
  assert f'{88.0 / n:.1f} GFLOP/s per device' in peak and 'provisional' in peak, peak
  assert '88.0 GFLOP/s over' in peak and '50% of them' in peak, peak
  assert 'MFU reads high' in peak, peak


def test_fewer_steps_than_the_latest_checkpoint_are_refused(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path / 'run')
  before = _snapshot(workdir)
  with pytest.raises(faults.ResumeError, match='finished 6 steps, more than the 4'):
    trainer.train(tiny_train_config(num_train_steps=4), workdir, jax.devices()[:1])
  os.remove(os.path.join(workdir, 'summary.json'))  # a run killed before its summary
  before.pop('summary.json')
  with pytest.raises(faults.ResumeError,
                     match='step 6: it is beyond num_train_steps=4.*at least 6'):
    trainer.train(tiny_train_config(num_train_steps=4), workdir, jax.devices()[:1])
  assert _snapshot(workdir) == before


def test_resume_with_another_optimizer_tree_is_refused_before_writing(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path / 'run')
  os.remove(os.path.join(workdir, 'summary.json'))
  before = _snapshot(workdir)
  c = tiny_train_config(num_train_steps=9, **{'optim.grad_clip': 1.0})
  with pytest.raises(faults.ResumeError, match=r'step 6: the saved model or optimizer state does '
                     r'not fit.*opt_state/.*optim.grad_clip: 0.0 -> 1.0.*new --workdir'):
    trainer.train(c, workdir, jax.devices()[:1])
  assert _snapshot(workdir) == before  # config.json included: export and analysis still work


@pytest.mark.parametrize('change', ['tokenizer', 'seed'])
def test_resume_with_another_data_stream_is_refused(finished_run, tmp_path, change):
  workdir = _copy(finished_run, tmp_path / 'run')
  os.remove(os.path.join(workdir, 'summary.json'))
  c = tiny_train_config(num_train_steps=9)
  if change == 'tokenizer':
    # The checkpoint was saved with another tokenizer of the same vocabulary size.
    for step in ('3', '6'):
      path = os.path.join(workdir, 'checkpoints', step, 'data', 'process_0-of-1.json')
      state = json.load(open(path))
      state['meta']['tokenizer'] = '0123456789abcdef'
      json.dump(state, open(path, 'w'))
    match = r"tokenizer: '0123456789abcdef' -> '[0-9a-f]{16}'.*same vocabulary size"
  else:
    c.seed = 1
    match = r'seed: 0 -> 1.*data settings'
  before = _snapshot(workdir)
  with pytest.raises(faults.ResumeError, match=match):
    trainer.train(c, workdir, jax.devices()[:1])
  assert _snapshot(workdir) == before


def test_torn_metrics_line_is_removed_and_a_resumed_last_step_still_gets_its_eval(
    finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path / 'run')
  os.remove(os.path.join(workdir, 'summary.json'))  # killed after its last save
  metrics = os.path.join(workdir, 'metrics.jsonl')
  n = len(open(metrics).readlines())
  with open(metrics, 'a') as f:
    f.write('{"step": 6, "loss": 6.2')  # killed mid-write
  result = trainer.train(tiny_train_config(), workdir, jax.devices()[:1])
  assert result['finished'] and not result.get('already_finished')
  lines = open(metrics).read().splitlines()
  records = [json.loads(l) for l in lines]  # every line parses
  assert len(records) == n + 1 and 'eval_loss' in records[-1]
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  assert summary['eval_loss'] == pytest.approx(records[-1]['eval_loss'])  # not null


def test_repair_jsonl_keeps_a_whole_last_record_and_cuts_a_torn_one(tmp_path):
  path = str(tmp_path / 'm.jsonl')
  open(path, 'w').write('{"step": 1}\n{"step": 2}')
  workdir_lib.repair_jsonl(path)
  assert open(path).read() == '{"step": 1}\n{"step": 2}\n'
  open(path, 'a').write('{"step": 3, "lo')
  workdir_lib.repair_jsonl(path)
  assert open(path).read() == '{"step": 1}\n{"step": 2}\n'
