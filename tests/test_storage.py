"""Runs in a bucket: every path a run reads or writes, against a GCS server on 127.0.0.1.

The server is gcp-storage-emulator (gpas_jax/testing/gcs_server.py adds what real GCS does).
The clients are pointed at it by STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL alone.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

from absl import logging
import numpy as np
import pytest

from gpas_jax import storage
from gpas_jax.train import faults
from gpas_jax.train import lock as lock_lib
from tests import gcs
from tests.helpers import DATA_CACHE
from tests.helpers import tiny_config_file
from tests.helpers import tiny_train_config

ROOT = gcs.ROOT
# The reference run and the bucket runs: 12 steps, a checkpoint every 3, evals at 6 and 12,
# TensorBoard events and a profiler trace of steps 2-3 (each written where a local run writes).
_RUN = {'num_train_steps': 12, 'checkpoint_every_steps': 3, 'eval_every_steps': 6,
        'checkpoint_async': True, 'logging.tensorboard': True, 'profile.start_step': 2,
        'profile.num_steps': 2}


@pytest.fixture(scope='module')
def _module_server():
  s = gcs.Server().start()
  s.create_bucket('bkt')
  yield s
  s.stop()


@pytest.fixture
def server(_module_server):
  """The module's server, with this process's clients pointed at it (a test may re-point)."""
  gcs.point_this_process_at(_module_server)
  return _module_server


@pytest.fixture(scope='module')
def local_data():
  """The embedded corpus and tokenizer of the tiny test config, built locally (once)."""
  from gpas_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  data_lib.make_train_iterator(tiny_train_config())
  tokenizer = glob.glob(os.path.join(DATA_CACHE, 'tokenizers', '*-512.model'))[0]
  tfds_dir = [d for d in glob.glob(os.path.join(DATA_CACHE, 'tfds', 'embedded-*'))
              if os.path.isdir(d)][0]
  return {'data.source': 'tfds', 'data.tfds_name': 'gpas_text_folder',
          'data.data_dir': tfds_dir, 'data.tokenizer': tokenizer}


def _config_file(tmp_path, data: dict, **overrides) -> str:
  return tiny_config_file(tmp_path / 'cfg.py', **{**data, **_RUN, **overrides})


def _train(config_file: str, workdir: str, env: dict, *flags: str, wait: bool = True):
  argv = [sys.executable, os.path.join(ROOT, 'train.py'), f'--config={config_file}',
          f'--workdir={workdir}', *flags]
  if not wait:
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _losses(workdir: str) -> dict[int, float]:
  return {r['step']: r['loss'] for r in storage.read_jsonl(storage.join(workdir, 'metrics.jsonl'))
          if 'loss' in r}


@pytest.fixture(scope='module')
def reference(tmp_path_factory, local_data):
  """An uninterrupted local run of the same config: the losses every bucket run must equal."""
  tmp = tmp_path_factory.mktemp('reference')
  workdir = str(tmp / 'run')
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  r = _train(_config_file(tmp, local_data), workdir, env)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def test_files_json_and_logs_round_trip_through_the_bucket(server, tmp_path):
  base = 'gs://bkt/unit'
  storage.write_json(f'{base}/a.json', {'x': 1.5, 'bad': float('nan'), 'l': [float('inf')]})
  back = storage.read_json(f'{base}/a.json')
  assert back['x'] == 1.5 and np.isnan(back['bad']) and back['l'] == [float('inf')]
  assert storage.read_json(f'{base}/missing.json') is None
  data = bytes(range(256)) * 40
  storage.write_bytes(f'{base}/blob.bin', data)
  assert storage.read_range(f'{base}/blob.bin', 1000, 300) == data[1000:1300]
  assert storage.size(f'{base}/blob.bin') == len(data)
  storage.move_tree(base, 'gs://bkt/moved')
  assert storage.walk('gs://bkt/moved') == ['a.json', 'blob.bin']
  assert not storage.exists(f'{base}/a.json')
  # metrics.jsonl in a bucket: records reach the object at flush() (each checkpoint save).
  log_path = 'gs://bkt/log/metrics.jsonl'
  log = storage.JsonlLog(log_path, keep_through_step=0)
  for step in (1, 2, 3):
    log.write({'step': step, 'loss': float(step)})
  assert storage.read_jsonl(log_path) == []
  log.flush()
  assert [r['step'] for r in storage.read_jsonl(log_path)] == [1, 2, 3]
  log.write({'step': 4, 'loss': 4.0})  # lost with the process: never flushed
  # The resume from step 2 drops steps 3.. (trained again), so no step repeats.
  log = storage.JsonlLog(log_path, keep_through_step=2)
  log.write({'step': 3, 'loss': 30.0})
  log.close()
  assert [(r['step'], r['loss']) for r in storage.read_jsonl(log_path)] == [
      (1, 1.0), (2, 2.0), (3, 30.0)]
  storage.append_jsonl('gs://bkt/log/analysis.jsonl', {'step': 1})
  storage.append_jsonl('gs://bkt/log/analysis.jsonl', {'step': 2, 'v': float('nan')})
  assert [r['step'] for r in storage.read_jsonl('gs://bkt/log/analysis.jsonl')] == [1, 2]


def test_token_rows_tokenizer_and_init_from_read_from_the_bucket(server, tmp_path, local_data,
                                                                 monkeypatch):
  from gpas_jax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from gpas_jax.data import tokens  # pylint: disable=import-outside-toplevel
  from gpas_jax.model import interop  # pylint: disable=import-outside-toplevel
  from gpas_jax.model import transformer  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import init_from  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  c = tiny_train_config()
  rows = np.random.default_rng(0).integers(1, 512, (64, c.data.max_length)).astype(np.int32)
  np.save(tmp_path / 'rows.npy', rows)
  storage.write_bytes('gs://bkt/data/rows.npy', (tmp_path / 'rows.npy').read_bytes())
  remote = tokens.load_rows('gs://bkt/data/rows.npy', c, 'data.tokens_path')
  assert remote.shape == rows.shape and np.array_equal(remote[5:9], rows[5:9])
  # Host 1 of 2 reads only its half of batch 3: one ranged read of those rows.
  reads = []
  real = storage.read_range
  monkeypatch.setattr(storage, 'read_range',
                      lambda p, o, n: reads.append(n) or real(p, o, n))
  part = tokens._HostBatches(remote, c, np.arange(4, 8))[3]  # pylint: disable=protected-access
  b = c.optim.global_batch_size
  np.testing.assert_array_equal(part['input_ids'], rows[3 * b + b // 2:4 * b])
  assert reads == [b // 2 * c.data.max_length * 4]
  monkeypatch.undo()
  bad = rows.copy()
  bad[40, 3] = 9999
  np.save(tmp_path / 'bad.npy', bad)
  storage.write_bytes('gs://bkt/data/bad.npy', (tmp_path / 'bad.npy').read_bytes())
  monkeypatch.setattr(tokens, '_CHECK_ROWS', 16)  # checked at open: rows 0..15 (row 40 later)
  bad_rows = tokens.load_rows('gs://bkt/data/bad.npy', c, 'data.tokens_path')
  with pytest.raises(tokens.DataError, match='row 40 holds token id 9999'):
    bad_rows[32:48]  # pylint: disable=pointless-statement
  # The tokenizer from bytes in the bucket: the same pieces as the local file.
  storage.write_bytes('gs://bkt/tok.model', open(local_data['data.tokenizer'], 'rb').read())
  sp = tokenizer_lib.load_tokenizer('gs://bkt/tok.model')
  local = tokenizer_lib.load_tokenizer(local_data['data.tokenizer'])
  assert sp.encode('Gradient-preserving scaling') == local.encode('Gradient-preserving scaling')
  with pytest.raises(tokens.DataError, match="data.tokenizer='gs://bkt/nope.model' does not"):
    tokenizer_lib.load_tokenizer('gs://bkt/nope.model')
  # init_from a save_pretrained directory in the bucket.
  cfg = transformer.ModelConfig.from_config(c.model)
  model = transformer.Transformer(cfg, nnx.Rngs(params=3))
  interop.save_hf_directory(model, 'gs://bkt/hf')
  assert storage.walk('gs://bkt/hf') == ['config.json', 'model.safetensors']
  params = init_from.load_params('gs://bkt/hf', c.model)
  want = nnx.split(model, nnx.Param, ...)[1].to_pure_dict()
  np.testing.assert_array_equal(params['embed_tokens'], np.asarray(want['embed_tokens']))


def _write_lock(workdir: str, holder: dict) -> None:
  storage.write_text(storage.join(workdir, lock_lib.LOCK_FILE), json.dumps(holder))


def test_the_bucket_lock_refuses_a_second_run_and_takes_over_a_dead_one(server, monkeypatch):
  workdir = 'gs://bkt/locked'
  lock_path = storage.join(workdir, lock_lib.LOCK_FILE)
  with lock_lib.hold_bucket(workdir) as error:
    assert error == ''
    held = json.loads(storage.read_text(lock_path))
    assert held['pid'] == os.getpid() and 'heartbeat' in held
    with lock_lib.hold_bucket(workdir) as second:
      assert f'is in use by another run (pid {os.getpid()} on host' in second
  assert not storage.exists(lock_path)  # released: deleted
  # Another host's run, heartbeat fresh: refused, saying when it would be taken over.
  other = {'pid': 4242, 'host': 'tpu-worker-7', 'started': '2026-12-01T10:00:00',
           'heartbeat': time.time()}
  _write_lock(workdir, other)
  with lock_lib.hold_bucket(workdir) as error:
    assert 'pid 4242 on host tpu-worker-7' in error and 'GPAS_LOCK_STALE_S' in error
  # ... its heartbeat stale: taken over, the dead holder named.
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *a: warnings.append(msg % a))
  _write_lock(workdir, dict(other, heartbeat=time.time() - lock_lib.STALE_S - 1))
  with lock_lib.hold_bucket(workdir) as error:
    assert error == '' and json.loads(storage.read_text(lock_path))['pid'] == os.getpid()
    assert any('pid 4242 on host tpu-worker-7' in w for w in warnings), warnings
  # A holder on this host whose process is gone: taken over at once.
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  import socket  # pylint: disable=import-outside-toplevel
  _write_lock(workdir, dict(other, pid=int(dead.stdout), host=socket.gethostname()))
  with lock_lib.hold_bucket(workdir) as error:
    assert error == ''
    # Someone takes the lock over while we hold it: our release must not delete theirs.
    _write_lock(workdir, other)
  assert json.loads(storage.read_text(lock_path))['host'] == 'tpu-worker-7'
  # The heartbeat thread refreshes the object while the run lives.
  storage.remove(lock_path)
  monkeypatch.setattr(lock_lib, 'HEARTBEAT_S', 0.2)
  with lock_lib.hold_bucket(workdir):
    first = json.loads(storage.read_text(lock_path))['heartbeat']
    time.sleep(1.0)
    assert json.loads(storage.read_text(lock_path))['heartbeat'] > first


def test_a_missing_bucket_is_refused_before_compiling(server, tmp_path):
  env = gcs.child_env(server)
  r = _train(_config_file(tmp_path, {}), 'gs://no-such-bucket/run', env)
  assert r.returncode == faults.EXIT_REFUSED, r.stderr[-3000:]
  line = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert len(line) == 1 and 'gs://no-such-bucket cannot be written' in line[0], r.stderr[-2000:]
  assert 'compiling' not in r.stdout


def test_train_in_a_bucket_killed_after_a_save_resumes_bit_exactly(server, tmp_path, local_data,
                                                                   reference):
  # Data and tokenizer in the bucket too, as on a pod.
  storage.copy_tree(local_data['data.data_dir'], 'gs://bkt/tfds')
  storage.write_bytes('gs://bkt/t5.model', open(local_data['data.tokenizer'], 'rb').read())
  data = dict(local_data, **{'data.data_dir': 'gs://bkt/tfds', 'data.tokenizer': 'gs://bkt/t5.model'})
  config, workdir, env = _config_file(tmp_path, data), 'gs://bkt/runs/tiny/pre_gpas/seed0', \
      gcs.child_env(server)
  r = _train(config, workdir, env, '--config.debug.sigkill_at_step=6')
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  assert sorted(_losses(workdir)) == list(range(1, 7))  # flushed at the save of step 6
  r = _train(config, workdir, env)  # the killed run's lock (this host, pid gone) is taken over
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resumed from  step 6' in r.stdout and 'Took over the lock' in r.stderr
  assert _losses(workdir) == _losses(reference)  # every step once, the same bits
  # The bucket holds what a local run holds (the lock object is released, i.e. deleted).
  ours, theirs = storage.walk(workdir), storage.walk(reference)
  top = lambda names: {n.split('/')[0] for n in names}
  assert top(ours) == top(theirs) - {lock_lib.LOCK_FILE}
  assert {'tensorboard', 'profile', 'checkpoints', 'metrics.jsonl', 'summary.json'} <= top(ours)
  assert any(n.endswith('perfetto_trace.json.gz') for n in ours)
  steps = lambda names: {n.split('/')[1] for n in names if n.startswith('checkpoints/')}
  assert steps(ours) == steps(theirs) == {'6', '9', '12'}  # checkpoint_keep=3
  assert storage.read_json(storage.join(workdir, 'summary.json'))['eval_loss'] == (
      storage.read_json(storage.join(reference, 'summary.json'))['eval_loss'])
  for where in (ROOT, str(tmp_path), os.getcwd()):
    assert not os.path.exists(os.path.join(where, 'gs:')), where
  # The tools on runs in the bucket, their outputs written back to it.
  from gpas_jax.analysis import cli  # pylint: disable=import-outside-toplevel
  from gpas_jax.analysis import study  # pylint: disable=import-outside-toplevel
  from gpas_jax.analysis import table  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import sweep  # pylint: disable=import-outside-toplevel
  written = cli.analyze_run(workdir, importance=False)
  assert written and all(w.startswith(workdir) and storage.is_file(w) for w in written)
  md, csv_path, _ = table.write_table('gs://bkt/runs', 'gs://bkt/tables')
  assert md == 'gs://bkt/tables/table.md' and '| tiny | — |' in storage.read_text(md)
  assert storage.is_file(csv_path)
  written = study.write_study('gs://bkt/runs', 'gs://bkt/study', importance_batches=0)
  assert 'gs://bkt/study/deltas.md' in written and all(storage.is_file(w) for w in written)
  assert sweep.is_finished(workdir) and not sweep.is_finished('gs://bkt/runs/none')


def test_a_parallel_sweep_in_a_bucket_logs_each_run_there(server, tmp_path):
  from gpas_jax.train import sweep  # pylint: disable=import-outside-toplevel
  fake = tmp_path / 'fake_train.py'
  fake.write_text('import sys; print("trained", sys.argv[sys.argv.index("--workdir") + 1])\n')
  runs = [sweep.SweepRun('tiny', n, 0, 'configs/tiny.py', f'gs://bkt/sweep/tiny/{n}/seed0', ())
          for n in ('pre', 'pre_gpas')]
  assert sweep.run_sweep(runs, train_script=str(fake), parallel=2) == []
  for run in runs:
    assert storage.read_text(run.workdir + '.log') == f'trained {run.workdir}\n'


def _stopped(proc) -> bool:
  with open(f'/proc/{proc.pid}/stat', encoding='utf-8') as f:
    return f.read().rsplit(')', 1)[1].split()[0] == 'T'


def test_the_storage_server_gone_mid_run_fails_the_save_then_the_run_resumes(
    tmp_path, local_data, reference):
  """The async save fails (exit 4, one line: step, path, cause); the server back, a rerun
  resumes from the last complete checkpoint bit-exactly."""
  s = gcs.Server(data_dir=str(tmp_path / 'objects')).start()  # objects on disk: survive a restart
  s.create_bucket('gone')
  # No lock heartbeat falls inside the test, and no TensorBoard writer: each would wait out its
  # own client's retries (the GCS client's 120 s for TensorBoard) before the run can exit.
  config = _config_file(tmp_path, local_data, **{'logging.tensorboard': False})
  workdir, env = 'gs://gone/run', gcs.child_env(s, GPAS_LOCK_STALE_S='6000')
  proc = _train(config, workdir, env, '--config.debug.sigstop_at_step=3', wait=False)
  try:
    deadline = time.time() + 240
    while not _stopped(proc):
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
      time.sleep(0.1)
    s.stop()  # the storage server goes away between the save at 3 and the one at 6
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=240)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == faults.EXIT_SAVE_FAILED, err[-3000:]
  errors = [l for l in err.splitlines() if l.startswith('error: saving checkpoint step 6 to '
                                                         f'{workdir}/checkpoints failed')]
  assert len(errors) == 1, err[-3000:]
  assert 'the storage server cannot be reached' in errors[0]
  assert 'The last complete checkpoint is step 3' in errors[0]
  assert 'A storage failure' in errors[0] and 'disk space' not in errors[0]  # a bucket, not a disk
  assert 'Traceback' not in err, err  # the checkpointer's tracebacks: --traceback only
  s.start()
  try:
    r = _train(config, workdir, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resumed from  step 3' in r.stdout
    gcs.point_this_process_at(s)
    assert _losses(workdir) == _losses(reference)
  finally:
    s.stop()


def test_a_cut_move_of_a_damaged_step_in_a_bucket_is_finished_by_the_next_run(server):
  from gpas_jax.train import restore  # pylint: disable=import-outside-toplevel
  run = 'gs://bkt/cutmove/run'
  src, dest = f'{run}/checkpoints/6', f'{run}/checkpoints_damaged/6'
  files = ['commit_success.txt', 'meta/metadata', 'state/d/abc', 'state/manifest.ocdbt']
  for cut in ('copying', 'deleting'):
    for name in files:
      storage.write_bytes(f'{src}/{name}', name.encode())
    # A bucket has no rename: the move copies, then deletes; cut in either half.
    storage.write_json(dest + restore.JOURNAL, {'from': src, 'to': dest})
    storage.write_bytes(f'{dest}/{files[0]}', files[0].encode())
    if cut == 'deleting':
      storage.copy_tree(src, dest)
      storage.remove(f'{src}/{files[0]}')
    restore.finish_moves(run)
    assert storage.walk(dest) == files, cut
    assert all(storage.read_bytes(f'{dest}/{n}') == n.encode() for n in files)
    assert not storage.exists(f'{src}/{files[1]}') and not storage.exists(dest + restore.JOURNAL)
    storage.path(dest).rmtree()
