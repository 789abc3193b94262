"""Two processes on 127.0.0.1 (jax.distributed, gloo) train as one process does, and checkpoint."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(workdir) -> dict[int, dict]:
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8')]
  return {r['step']: r for r in records if 'loss' in r}


def _train_one_process(workdir: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import trainer  # pylint: disable=import-outside-toplevel
  from tests.helpers import tiny_train_config  # pylint: disable=import-outside-toplevel
  c = tiny_train_config(num_train_steps=4, checkpoint_every_steps=2, eval_every_steps=4,
                        **{'mesh.data': 2, 'model.scan_layers': True})
  trainer.train(c, workdir, jax.devices()[:2])


def test_two_processes_train_and_checkpoint(tmp_path):
  cfg_file = tmp_path / 'two_hosts.py'
  cfg_file.write_text(textwrap.dedent('''
      from tests.helpers import tiny_train_config

      def get_config():
        c = tiny_train_config(num_train_steps=4, checkpoint_every_steps=2, eval_every_steps=4)
        c.mesh.data = -1
        c.model.scan_layers = True  # the default stack
        return c
  '''))
  workdir = tmp_path / 'run'
  port = free_port()
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
  # The same global batch on one process (2 devices, same mesh): the same losses. The hosts'
  # rows interleave (host h holds stream rows h::2), so the token sums run in another order;
  # this process also compiles at optimisation level 0 (conftest): fp32 rounding, ~1e-7.
  two = _metrics(workdir)
  one_dir = tmp_path / 'one_process'
  _train_one_process(str(one_dir))
  one = _metrics(one_dir)
  assert sorted(two) == sorted(one) == [1, 2, 3, 4]
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose([two[s][key] for s in one], [one[s][key] for s in one],
                               rtol=1e-5, err_msg=key)
  assert summary['eval_loss'] == pytest.approx(
      json.loads((one_dir / 'summary.json').read_text())['eval_loss'], rel=1e-5)
  # The host count changes: one process resumes the two-process checkpoint (padded layout).
  one = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'train.py'), f'--config={cfg_file}',
       f'--workdir={workdir}', '--config.num_train_steps=6', '--config.eval_every_steps=6'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-4000:]
  assert 'resumed from  step 4' in one.stdout and 'final step 6' in one.stdout
