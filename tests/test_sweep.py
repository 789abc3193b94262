"""The sweep runner: the commands it prints, skipping finished runs, running them in turn."""

import json
import os
import shlex
import subprocess
import sys

from gpas_jax.train import sweep


def _print_only(*args):
  out = subprocess.run([sys.executable, '-m', 'gpas_jax.train.sweep', '--print_only', *args],
                       capture_output=True, text=True, check=True).stdout
  return [shlex.split(line) for line in out.splitlines()]


def _flags(argv):
  return {a.split('=')[0]: a.split('=', 1)[1] for a in argv if a.startswith('--config.')}


def test_cpu_study_commands(tmp_path):
  root = str(tmp_path / 'runs')
  cmds = _print_only('--sweep', 'configs/sweeps/cpu_study.py', '--root', root)
  assert len(cmds) == 1 * 6 * 3
  seen = set()
  for argv in cmds:
    # The launcher runs from any folder; the package's config file by its package path.
    assert argv[:5] == ['python', '-m', 'gpas_jax.train.launch', '--config', 'configs/tiny.py']
    assert argv[5] == '--workdir'
    f = _flags(argv)
    nt, seed = f['--config.model.norm_type'], int(f['--config.seed'])
    assert argv[6] == os.path.join(root, 'tiny', nt, f'seed{seed}')
    assert f['--config.num_train_steps'] == '300' and f['--config.analysis.every_steps'] == '50'
    assert len(f) == 6  # norm_type, seed, and the sweep's four overrides
    seen.add((nt, seed))
  assert seen == {(n, s) for n in ('pre', 'pre_gpas', 'sandwich', 'sandwich_gpas', 'lns',
                                   'lns_gpas') for s in (0, 1, 2)}
  # A finished run (summary.json) is left out with --skip_finished.
  os.makedirs(os.path.join(root, 'tiny', 'lns', 'seed1'))
  with open(os.path.join(root, 'tiny', 'lns', 'seed1', 'summary.json'), 'w') as f:
    f.write('{}')
  cmds = _print_only('--sweep', 'configs/sweeps/cpu_study.py', '--root', root, '--skip_finished')
  assert len(cmds) == 17
  assert os.path.join(root, 'tiny', 'lns', 'seed1') not in [c[6] for c in cmds]


def test_paper_table_commands():
  cmds = _print_only('--sweep', 'configs/sweeps/paper_table.py', '--root', 'R',
                     '--sweep.seeds=(0,1)')
  assert len(cmds) == 5 * 8 * 2
  sizes = {c[4] for c in cmds}
  assert sizes == {f'configs/llama_{s}.py' for s in ('71m', '130m', '250m', '350m', '1b')}
  assert all(os.path.isfile(sweep.resolve(s)) for s in sizes)
  assert {_flags(c)['--config.model.norm_type'] for c in cmds} == {
      'pre', 'pre_gpas', 'sandwich', 'sandwich_gpas', 'lns', 'lns_gpas', 'post_pre',
      'post_pre_gpas'}
  assert cmds[0][6] == os.path.join(os.getcwd(), 'R', '71m', 'pre', 'seed0')  # to the cwd
  # The authors' experiment: baseline_faithful in pure bf16; the gate clip for 1b Sandwich+GPAS.
  for argv in cmds:
    f = _flags(argv)
    assert f['--config.baseline_faithful'] == 'True'
    assert f['--config.model.param_dtype'] == f['--config.model.compute_dtype'] == 'bfloat16'
    clipped = argv[4].endswith('1b.py') and f['--config.model.norm_type'] == 'sandwich_gpas'
    assert f.get('--config.optim.gate_clip') == ('0.01' if clipped else None)
    assert '--config.data.data_dir' not in f  # left for the user to fill in


def test_paper_sizes_carry_the_release_chunks_and_refuse_the_embedded_corpus():
  from gpas_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from gpas_jax.data import DataError, validate_data  # pylint: disable=import-outside-toplevel
  for size, chunks, per_gpu in (('71m', 2, 256), ('250m', 4, 128), ('1b', 16, 32)):
    c = sweep.load_config_file(f'configs/llama_{size}.py')
    assert c.optim.loss_chunks == chunks and c.data.eval_batch_size == per_gpu
    assert c.data.source == 'tfds'
  c.data.source = 'embedded'
  try:
    config_lib.validate(c)
    raise AssertionError('a paper size trained on the embedded corpus without a word')
  except config_lib.ConfigError as e:
    assert "paper_recipe=''" in str(e) and 'data.source=tfds' in str(e)
  c.data.source = 'tfds'
  c.data.data_dir = '/nonexistent'
  try:
    validate_data(c, 1)
    raise AssertionError('no tokenizer accepted')
  except DataError as e:
    assert 'data.tokenizer' in str(e) and 'T5' in str(e)


def test_run_sweep_runs_each_command(tmp_path):
  # A stand-in train.py that records its arguments; the second run fails.
  script = tmp_path / 'fake_train.py'
  script.write_text(
      'import json, os, sys\n'
      "wd = sys.argv[sys.argv.index('--workdir') + 1]\n"
      'os.makedirs(wd, exist_ok=True)\n'
      "json.dump(sys.argv[1:], open(os.path.join(wd, 'argv.json'), 'w'))\n"
      "sys.exit(3 if 'seed1' in wd else 0)\n")
  cfg = sweep.load_config_file('configs/sweeps/cpu_study.py')
  cfg.norm_types = ('pre',)
  cfg.seeds = (0, 1)
  cfg.overrides.optim = {'lr': 0.01}
  runs = sweep.plan(cfg, str(tmp_path / 'r'))
  failed = sweep.run_sweep(runs, sys.executable, str(script))
  assert [r.seed for r in failed] == [1]
  argv = json.loads((tmp_path / 'r' / 'tiny' / 'pre' / 'seed0' / 'argv.json').read_text())
  assert argv[-7:] == ['--config.model.norm_type=pre', '--config.seed=0',
                       '--config.analysis.every_steps=50', '--config.checkpoint_every_steps=300',
                       '--config.eval_every_steps=100', '--config.num_train_steps=300',
                       '--config.optim.lr=0.01']
