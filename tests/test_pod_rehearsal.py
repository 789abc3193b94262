"""A pod in rehearsal: 4 hosts x 2 CPU devices on 127.0.0.1, workdir and token rows in a bucket.

One story, chained: the hosts train with a mesh whose order alternates hosts (a host's devices
are not contiguous along the batch axis, as on a TPU torus) and loss_chunks=4, so a row placed
in host order would land in another chunk and change the loss; SIGTERM reaches one host only,
and every host saves the same step and exits 75; a resume on 2 hosts x 4 devices where one host
may not read the step's array files (a proxy answers 403): every host stops with exit 5 and
nothing is moved; the same resume with the storage healthy finishes the run. Its losses, step by
step, equal one process over a mesh of the same 8 devices in plain order.
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from gpas_jax import storage
from gpas_jax.train import faults
from tests import gcs
from tests.helpers import free_port
from tests.helpers import tiny_config_file

ROOT = gcs.ROOT
_ROWS, _LENGTH, _VOCAB = 256, 32, 512
_STEPS = 6


def _token_rows(seed: int, rows: int) -> np.ndarray:
  """Documents of 3..31 random tokens + eos, right-padded: every row a different length."""
  rng = np.random.default_rng(seed)
  out = np.zeros((rows, _LENGTH), np.int32)  # pad_id 0
  for i in range(rows):
    n = int(rng.integers(3, _LENGTH))
    out[i, :n] = rng.integers(2, _VOCAB, n)
    out[i, n] = 1  # eos_id
  return out


def _config(tmp_path, data: str, **extra) -> str:
  fields = {'data.source': 'tokens', 'data.tokens_path': f'{data}/train.npy',
            'data.eval_tokens_path': f'{data}/eval.npy', 'data.eval_tokens': 512,
            'optim.global_batch_size': 16, 'optim.loss_chunks': 4, 'mesh.data': -1,
            'model.scan_layers': True, 'num_train_steps': _STEPS, 'checkpoint_every_steps': 2,
            'eval_every_steps': 3, 'checkpoint_async': True, **extra}
  return tiny_config_file(tmp_path / f'cfg_{len(list(tmp_path.glob("cfg_*")))}.py', **fields)


def _hosts(config: str, workdir: str, hosts: int, envs: list[dict], *flags: str) -> list:
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'train.py'), f'--config={config}',
       f'--workdir={workdir}', f'--config.distributed.coordinator_address=127.0.0.1:{port}',
       f'--config.distributed.num_processes={hosts}', f'--config.distributed.process_id={i}',
       *flags], cwd=ROOT, env=envs[i], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(hosts)]


def _finish(procs: list, timeout: float = 300) -> tuple[list[int], list[str], float]:
  """Every host's exit code and output, and the seconds between the first and last exit."""
  outs, ends, deadline = [None] * len(procs), [None] * len(procs), time.time() + timeout
  while any(e is None for e in ends):
    for i, p in enumerate(procs):
      if ends[i] is None and p.poll() is not None:
        ends[i] = time.time()
    if time.time() > deadline:
      for p in procs:
        p.kill()
      raise AssertionError('hosts still running after the bound: '
                           + '\n'.join(p.communicate()[0][-3000:] for p in procs))
    time.sleep(0.05)
  for i, p in enumerate(procs):
    outs[i] = p.communicate()[0]
  return [p.returncode for p in procs], outs, max(ends) - min(ends)


def _losses(workdir: str) -> dict[int, float]:
  return {r['step']: r['loss'] for r in storage.read_jsonl(storage.join(workdir, 'metrics.jsonl'))
          if 'loss' in r}


@pytest.fixture(scope='module')
def server():
  s = gcs.Server().start()
  s.create_bucket('pod')
  gcs.point_this_process_at(s)
  yield s
  s.stop()


def test_pod_rehearsal_preempted_host_refused_read_and_resume_equal_one_process(server, tmp_path):
  data = 'gs://pod/data'
  for name, seed, rows in (('train', 0, _ROWS), ('eval', 1, 32)):
    local = tmp_path / f'{name}.npy'
    np.save(local, _token_rows(seed, rows))
    storage.write_bytes(f'{data}/{name}.npy', local.read_bytes())
  workdir = 'gs://pod/run'
  pod = _config(tmp_path, data, **{'debug.interleave_hosts': True})

  def env(devices: int, via=server, **extra) -> dict:
    e = gcs.child_env(server, JAX_NUM_CPU_DEVICES=str(devices), GPAS_HOST_TIMEOUT_S='120',
                      **extra)
    e.update(via.env())
    e.pop('XLA_FLAGS', None)
    return e

  # 1. Four hosts; SIGTERM reaches host 1 alone after step 3: all save one step and exit 75.
  t = time.time()
  codes, outs, _ = _finish(_hosts(pod, workdir, 4, [env(2)] * 4, '--config.debug.sigterm_at_step=3',
                                  '--config.debug.sigterm_process=1'))
  preempted_s = time.time() - t
  assert codes == [faults.EXIT_PREEMPTED] * 4, '\n'.join(o[-2500:] for o in outs)
  stops = {o.split('stopped by SIGTERM at step ')[1].split()[0] for o in outs}
  assert len(stops) == 1, stops  # the same step on every host
  saved = int(stops.pop())
  assert saved >= 3 and storage.is_file(f'{workdir}/checkpoints/{saved}/commit_success.txt')
  assert sorted(storage.walk(f'{workdir}/checkpoints/{saved}/data')) == [
      'commit_success.txt'] + [f'process_{i}-of-4.json' for i in range(4)]

  # 2. Two hosts resume; host 1 may not read the step's array files: both stop with exit 5 and
  # one line naming host 1 and the refusal; nothing moved.
  proxy = gcs.RefusingProxy(server, rf'run/checkpoints/{saved}/state/(.*/)?d/')
  try:
    t = time.time()
    codes, outs, spread = _finish(_hosts(pod, workdir, 2, [env(4), env(4, via=proxy)]))
    refused_s = time.time() - t
  finally:
    proxy.stop()
  assert proxy.refused > 0
  assert codes == [faults.EXIT_RESTORE_FAILED] * 2, '\n'.join(o[-2500:] for o in outs)
  for out in outs:
    lines = [l for l in out.splitlines() if l.startswith('error: ')]
    assert len(lines) == 1 and f'checkpoint step {saved} at' in lines[0], out[-2500:]
    assert 'on host 1 of 2' in lines[0] and 'PERMISSION_DENIED' in lines[0], lines[0]
    assert 'nothing was moved' in lines[0]
  assert spread < 60, spread  # they stop together, well inside the hosts' bound
  assert not storage.exists(f'{workdir}/checkpoints_damaged')
  assert storage.is_file(f'{workdir}/checkpoints/{saved}/commit_success.txt')

  # 3. The same two hosts with the storage healthy resume from that step and finish.
  t = time.time()
  codes, outs, _ = _finish(_hosts(pod, workdir, 2, [env(4)] * 2))
  resumed_s = time.time() - t
  assert codes == [0, 0], '\n'.join(o[-2500:] for o in outs)
  assert f'resumed from  step {saved}' in outs[0]

  # 4. One process over a mesh of the same 8 devices in plain order: the same losses. The mesh
  # and programs are the same; the hosts' collectives (gloo) sum partial results in another
  # order than one process's, so float32 losses may differ in the last bits: measured 7.7e-8
  # relative at most over the 6 steps, so 2e-6. Rows placed in host order instead (host 0's
  # block at its devices' rows 0, 1, 8, 9) moved every loss by 4e-5 to 4e-4.
  one = str(tmp_path / 'one')
  t = time.time()
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'),
                      f'--config={_config(tmp_path, data)}', f'--workdir={one}'], cwd=ROOT,
                     env=env(8), capture_output=True, text=True, timeout=300)
  one_s = time.time() - t
  assert r.returncode == 0, r.stderr[-3000:]
  pod_losses, one_losses = _losses(workdir), _losses(one)
  assert sorted(pod_losses) == sorted(one_losses) == list(range(1, _STEPS + 1))
  np.testing.assert_allclose([pod_losses[k] for k in one_losses], list(one_losses.values()),
                             rtol=2e-6)
  pod_eval = storage.read_json(f'{workdir}/summary.json')['eval_loss']
  assert pod_eval == pytest.approx(storage.read_json(f'{one}/summary.json')['eval_loss'],
                                   rel=2e-6)
  gap = max(abs(pod_losses[k] / v - 1) for k, v in one_losses.items())
  print(f'rehearsal: 4 hosts preempted {preempted_s:.0f} s, refused restore {refused_s:.0f} s '
        f'(exits {spread:.1f} s apart), resume {resumed_s:.0f} s, one process {one_s:.0f} s; '
        f'largest relative loss gap {gap:.1e}')
