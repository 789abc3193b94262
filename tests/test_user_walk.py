"""A new user's second walk through the README, each case run as a user runs it: the tool's
command line, from a folder outside the clone (tests/test_tools_cli.py holds the first walk).

Batched: one local GCS server and one bucket run serve the bucket, config and resume cases.
"""

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from gpas_jax import config as config_lib
from tests.helpers import free_port
from tests.helpers import tiny_config_file
from tests.test_tools_cli import ROOT, _one_line, _tool


@pytest.fixture(scope='module')
def bucket(tmp_path_factory):
  """The README's recipe: `python -m gpas_jax.testing.gcs_server --port P --bucket walkb`,
  started from outside the clone; yields (folder, the two variables it prints)."""
  where = tmp_path_factory.mktemp('walk')
  port = free_port()
  log = open(where / 'server.log', 'w', encoding='utf-8')  # pylint: disable=consider-using-with
  # The server logs every request: into a file, since a pipe nobody reads fills and stalls it.
  proc = subprocess.Popen(
      [sys.executable, '-m', 'gpas_jax.testing.gcs_server', f'--port={port}', '--bucket=walkb'],
      cwd=where, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
      stderr=log, text=True)
  try:
    first, deadline = proc.stdout.readline(), time.time() + 60
    assert first.startswith('GCS server on'), (first, (where / 'server.log').read_text())
    export = proc.stdout.readline().split('export ', 1)[1].split()
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain the rest
    env = dict(kv.split('=', 1) for kv in export)
    assert set(env) == {'STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL'}
    assert time.time() < deadline
    yield where, env
  finally:
    proc.kill()
    proc.wait()
    log.close()


def _config_file(folder, **overrides) -> str:
  return tiny_config_file(folder / 'walk_cfg.py', **overrides)


def _read_bucket(env, url: str) -> dict:
  code = ('import json, sys; from gpas_jax import storage; '
          'print(json.dumps(storage.read_json(sys.argv[1])))')
  res = _tool(ROOT, '-c', code, url, env=env)
  assert res.returncode == 0, res.stderr[-2000:]
  return json.loads(res.stdout)


def _write_bucket(env, url: str, value: dict) -> None:
  code = ('import json, sys; from gpas_jax import storage; '
          'storage.write_json(sys.argv[1], json.loads(sys.argv[2]))')
  res = _tool(ROOT, '-c', code, url, json.dumps(value), env=env)
  assert res.returncode == 0, res.stderr[-2000:]


def test_a_bucket_run_records_the_resolved_config_and_an_old_config_json_resumes(bucket):
  """Case 1 and the one config: the README's local bucket works (no traceback); config.json records what baseline_faithful resolved to, an explicit value
  beside it kept and named; a config.json from before resolution resumes; a changed schedule is
  said once (the header), not twice."""
  where, env = bucket
  cfg = _config_file(where, num_train_steps=4, checkpoint_every_steps=2, eval_every_steps=4,
                     **{'optim.global_batch_size': 4, 'data.eval_tokens': 512})
  run = ['-m', 'gpas_jax.train.launch', f'--config={cfg}', '--workdir=gs://walkb/run',
         '--config.baseline_faithful=True', '--config.model.excess_precision=True']
  res = _tool(where, *run, env=env)
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'Traceback' not in res.stderr, res.stderr[-3000:]
  assert 'GOOGLE_AUTH_TOKEN_FOR_TESTING' not in res.stderr  # tensorstore's C++ INFO line
  assert 'baseline_faithful: keeping model.excess_precision=True' in res.stderr
  saved = _read_bucket(env, 'gs://walkb/run/config.json')
  assert saved['resolved_faithful'] is True and saved['model']['excess_precision'] is True
  for key, value in config_lib.FAITHFUL.items():
    if key != 'model.excess_precision':
      section, field = key.split('.')
      assert saved[section][field] == value, key
  # A config.json written before resolution: no resolved_faithful, the fields at old defaults.
  del saved['resolved_faithful']
  for key, value in config_lib.DEFAULTS.items():
    section, field = key.split('.')
    saved[section][field] = value
  _write_bucket(env, 'gs://walkb/run/config.json', saved)
  res = _tool(where, *run[:-1], '--config.num_train_steps=6', env=env)
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'resumed from  step 5' in res.stdout, res.stdout  # 4 + the release's extra update
  assert 'lr schedule' in res.stdout and 'lr schedule' not in res.stderr  # said once
  assert _read_bucket(env, 'gs://walkb/run/config.json')['optim']['arithmetic'] == 'torch'


def test_refusals_are_one_line_with_the_fix(bucket, tmp_path):
  """Cases 2, 4 and 5: compare's warmup (nothing written), perf.aot's topology, mesh and chip,
  a flag value absl cannot parse (exit 2, not 1), an export to a missing bucket."""
  where, env = bucket
  out = tmp_path / 'cmp'
  _one_line(_tool(tmp_path, '-m', 'gpas_jax.baseline.compare', '--config', 'configs/tiny.py',
                  '--out', 'cmp', '--updates', '50', '--config.model.norm_type=pre_gpas'),
            '--updates 50', 'optim.warmup_steps=60', '--config.optim.warmup_steps=5')
  assert not out.exists()  # refused before init.safetensors and tokens.npy are written
  aot = ['-m', 'gpas_jax.perf.aot', '--config', 'configs/tiny.py']
  _one_line(_tool(tmp_path, *aot, '--topology', 'v9x-8'), "--topology 'v9x-8'", 'v5e-8')
  _one_line(_tool(tmp_path, *aot, '--mesh', 'abc'), '--mesh=abc', 'three positive integers')
  _one_line(_tool(tmp_path, *aot, '--chip', 'v9'), '--chip=v9', 'v5e')
  if importlib.util.find_spec('libtpu'):  # the tpu extra: the compiler's own refusal
    _one_line(_tool(tmp_path, *aot, '--topology', 'v5e-8', '--chip', 'v5e'), 'drop --chip')
    _one_line(_tool(tmp_path, *aot, '--topology', 'v5e:3x3'), 'v5e:3x3', 'v5e:4x4')
  _one_line(_tool(tmp_path, '-m', 'gpas_jax.train.launch', '--config.num_train_steps=abc'),
            '--config.num_train_steps=abc')
  _fake_run(tmp_path / 'run', 10)
  (tmp_path / 'run' / 'checkpoints' / '10').mkdir(parents=True)  # refused before it is read
  _one_line(_tool(where, '-m', 'gpas_jax.baseline.hf_tools', 'export', '--workdir',
                  str(tmp_path / 'run'), '--out', 'gs://missing-bucket/x', env=env),
            '--out=gs://missing-bucket/x', 'gs://missing-bucket cannot be written')


def test_aot_default_plan_runs_for_the_tiny_config_and_a_misfit_names_the_way_out(tmp_path):
  """Case 5: `perf.aot --config configs/tiny.py` (no --topology) plans on fake devices its
  batch splits over; a plan that does not fit says what to try."""
  res = _tool(tmp_path, '-m', 'gpas_jax.perf.aot', '--config', 'configs/tiny.py')
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'mesh (data 1, fsdp 16, tensor 1) = 16 devices' in res.stdout, res.stdout
  from gpas_jax.perf import aot  # pylint: disable=import-outside-toplevel
  report = {'compiler': 'tpu', 'mesh': {'data': 1, 'fsdp': 8, 'tensor': 1},
            'hbm_bytes_per_chip': 16 * aot.GIB,
            'peak_bytes_per_chip': 16.46 * aot.GIB, 'fits': False, 'num_slices': 1,
            'topology': 'v5e-8', 'devices': 8, 'batch': 512, 'seq': 256, 'micro_batches': 1,
            'remat_policy': 'none', 'scan_layers': True, 'attention_impl': 'xla',
            'param_dtype': 'float32', 'compute_dtype': 'float32', 'compile_s': 1.0}
  text = aot.format_tpu(report)
  assert 'DOES NOT FIT by 0.46 GiB' in text and '--search' in text and 'micro_batches' in text


def _fake_run(path, steps: int, seed: int = 0, norm_type: str = 'pre', gates: int = 0,
              analysis_steps: int = 0) -> None:
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.num_train_steps, c.seed, c.model.norm_type = steps, seed, norm_type
  path.mkdir(parents=True)
  (path / 'config.json').write_text(c.to_json_best_effort())
  (path / 'summary.json').write_text(json.dumps({'finished': True, 'step': steps,
                                                 'eval_loss': 5.0, 'eval_ppl': 148.4}))
  recs = [{'step': s, 'loss': 6.0 - s / steps, **{f'gate/{i}': 0.01 * s for i in range(gates)}}
          for s in (1, steps)]
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
  if analysis_steps:
    recs = [{'step': s, 'act_var': [1.0] * 4, 'gate': [0.02 * s] * 4, 'gate_scale': [1.0] * 4}
            for s in range(1, analysis_steps + 1)]
    (path / 'analysis.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))


def test_table_keeps_another_recipe_apart_and_help_names_the_overrides(tmp_path):
  """Case 3: a run of 120 steps beside one of 100 is another recipe, not a duplicate; case 7:
  --help says the table takes the sweep's overrides."""
  _fake_run(tmp_path / 'runs' / 'run', 100)
  _fake_run(tmp_path / 'runs' / 'run2', 120)
  res = _tool(tmp_path, '-m', 'gpas_jax.analysis.table', '--root', 'runs')
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'same settings' not in res.stdout + res.stderr
  assert 'run2' in res.stdout and 'num_train_steps 120 (expected 100)' in res.stdout, res.stdout
  res = _tool(tmp_path, '-m', 'gpas_jax.analysis.table', '--help')
  assert '--sweep.overrides.<field>=v' in ' '.join(res.stdout.split())


def test_figures_of_a_short_run_mark_points_and_name_what_is_missing(tmp_path):
  """Case 6: two logged steps get markers; gates.png takes analysis.jsonl's denser samples; the
  eval panel says what it shows; gs:// labels keep their slashes. Case 7: a run without gates
  is named in the message, and no empty-legend warning."""
  _fake_run(tmp_path / 'pre', 10)
  res = _tool(tmp_path, '-m', 'gpas_jax.analysis', '--workdir', 'pre', '--noimportance')
  assert res.returncode == 0, res.stderr[-3000:]
  assert f'no gates.png for {tmp_path / "pre"}: pre has no GPAS gates' in res.stdout, res.stdout
  assert 'No artists with labels' not in res.stderr
  from gpas_jax.analysis import cli, compare, plots, runs  # pylint: disable=import-outside-toplevel
  _fake_run(tmp_path / 'gp', 10, norm_type='pre_gpas', gates=4, analysis_steps=10)
  run = runs.load_run(str(tmp_path / 'gp'))
  chosen = cli._denser_gates(run.metrics(), run.analysis())  # pylint: disable=protected-access
  assert chosen and 'gate' in chosen[0] and len(chosen) == 10  # 10 analysis steps beat 2
  import matplotlib  # pylint: disable=import-outside-toplevel
  from matplotlib import figure  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  figs = []
  save = figure.Figure.savefig
  figure.Figure.savefig = lambda self, *a, **k: figs.append(self)
  try:
    plots.gate_plot(run.metrics(), str(tmp_path / 'g.png'))
    plots.loss_curves_plot({'gp': run.metrics()}, str(tmp_path / 'l.png'))
  finally:
    figure.Figure.savefig = save
  gates_fig, loss_fig = figs
  assert all(l.get_marker() == 'o' for l in gates_fig.axes[0].lines if 'layer' in l.get_label())
  assert loss_fig.axes[0].lines[0].get_marker() == 'o'
  assert 'held-out' in loss_fig.axes[1].get_title()
  bucket_runs = [runs.RunDir(f'gs://walkb/{n}', json.loads(
      (tmp_path / 'gp' / 'config.json').read_text()), None) for n in ('run', 'run2')]
  assert compare._labels(bucket_runs) == ['gs://walkb/run', 'gs://walkb/run2']  # pylint: disable=protected-access


def test_a_sweep_ends_with_a_summary_naming_the_table_command(tmp_path):
  """Case 7: the sweep's last line says how many runs finished and how to build the table."""
  fake = tmp_path / 'fake_train.py'
  fake.write_text('import sys; print("trained", sys.argv[sys.argv.index("--workdir") + 1])\n')
  res = _tool(tmp_path, '-m', 'gpas_jax.train.sweep', '--sweep', 'configs/sweeps/cpu_study.py',
              '--root', 'runs', f'--train_script={fake}', '--sweep.seeds=(0,)',
              '--sweep.overrides.num_train_steps=40', '--sweep.overrides.optim.warmup_steps=4')
  assert res.returncode == 0, res.stderr[-3000:]
  last = res.stdout.strip().splitlines()[-1]
  assert last.startswith('sweep done: 6 of 6 runs finished'), last
  assert 'python -m gpas_jax.analysis.table --root' in last
  assert '--sweep.overrides.num_train_steps=40' in last and "'--sweep.seeds=(0,)'" in last
