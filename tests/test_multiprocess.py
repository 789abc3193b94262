"""Two processes on 127.0.0.1 (jax.distributed, gloo) train a few steps and checkpoint."""

import json
import os
import socket
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def test_two_processes_train_and_checkpoint(tmp_path):
  cfg_file = tmp_path / 'two_hosts.py'
  cfg_file.write_text(textwrap.dedent('''
      from tests.helpers import tiny_train_config

      def get_config():
        c = tiny_train_config(num_train_steps=4, checkpoint_every_steps=2, eval_every_steps=4)
        c.mesh.data = -1
        return c
  '''))
  workdir = tmp_path / 'run'
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'train.py'), f'--config={cfg_file}',
       f'--workdir={workdir}', f'--config.distributed.coordinator_address=127.0.0.1:{port}',
       '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=240)
    finally:
      if p.poll() is None:
        p.kill()
    outs.append(out)
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f'process {i} failed:\n{out[-4000:]}'
  assert 'eval perplexity' in outs[0]
  steps = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert steps == [2, 4]
  data_files = sorted(f for f in os.listdir(workdir / 'checkpoints' / '4' / 'data')
                      if f.startswith('process_'))
  assert data_files == ['process_0-of-2.json', 'process_1-of-2.json']
  states = [json.loads((workdir / 'checkpoints' / '4' / 'data' / f).read_text())
            for f in data_files]
  assert states[0]['meta']['process_index'] == 0 and states[1]['meta']['process_index'] == 1
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['finished'] and summary['step'] == 4
  # The host count changes: one process resumes the two-process checkpoint (padded layout).
  one = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'train.py'), f'--config={cfg_file}',
       f'--workdir={workdir}', '--config.num_train_steps=6', '--config.eval_every_steps=6'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-4000:]
  assert 'resumed from  step 4' in one.stdout and 'final step 6' in one.stdout
