"""Every tool as train.py (issue 22): run from a folder outside the clone with relative paths,
config files found in the installed package, a user's mistake as one line with exit code 2."""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from tests.helpers import tiny_train_config
from tests.helpers import DATA_CACHE

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / 'train.py')


def _tool(cwd, *argv, timeout=240, env=None):
  """Runs a command in `cwd` (outside the clone) with this tree importable, as CI's install."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
  return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                        env=env, timeout=timeout)


def _one_line(res, *words):
  """Exit code 2 and one error line (plus the --traceback hint) naming `words`; no traceback."""
  lines = [l for l in res.stderr.splitlines() if l.strip()]
  assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
  assert 'Traceback' not in res.stderr, res.stderr[-3000:]
  errors = [l for l in lines if l.startswith('error: ')]
  assert len(errors) == 1 and len(lines) <= 2, lines
  for w in words:
    assert w in errors[0], (w, errors[0])
  return errors[0]


@pytest.fixture()
def outside(tmp_path):
  """A working folder that is not the clone, with a text folder and a run root in it."""
  texts = tmp_path / 'texts'
  texts.mkdir()
  for i in range(30):
    (texts / f'{i}.txt').write_text(f'File {i} holds some words about topic {i % 5}.\n' * 3)
  return tmp_path


def test_relative_text_dir_for_the_tokenizer_and_train_py(outside):
  """Case 1: a relative text_dir resolves against the working directory, in both tools."""
  res = _tool(outside, '-m', 'gpas_jax.data.tokenizer', '--output', 'sp/sp.model',
              '--vocab_size', '350', '--source', 'text_folder', '--text_dir', 'texts',
              '--cache_dir', 'cache')
  assert res.returncode == 0, res.stderr[-3000:]
  assert (outside / 'sp' / 'sp.model').is_file()
  from gpas_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.data.text_dir, c.init_from, c.data.tokens_path = 'texts', 'gs://b/init', ''
  cwd = os.getcwd()
  os.chdir(outside)
  try:
    config_lib.resolve_paths(c)
  finally:
    os.chdir(cwd)
  assert c.data.text_dir == str(outside / 'texts') and c.init_from == 'gs://b/init'
  assert c.data.tokens_path == ''
  # train.py resolves it too (a missing relative folder is named by its absolute path).
  line = _one_line(_tool(outside, TRAIN, '--config', 'configs/tiny.py', '--workdir', 'w',
                         '--config.data.source=text_folder', '--config.data.text_dir=txts',
                         f'--config.data.cache_dir={DATA_CACHE}'),
                   repr(str(outside / 'txts')), 'does not exist')
  assert not (outside / 'w' / 'checkpoints').exists(), line


def test_config_files_resolve_from_any_folder_in_every_tool(outside):
  """Case 2: --config configs/... from outside the clone; compare's own default config; a bad
  --config path beside an override is one line."""
  # The file loads (the override is checked against its fields) in train.py, aot and compare.
  for argv in ([TRAIN, '--config', 'configs/tiny.py'], ['-m', 'gpas_jax.perf.aot', '--config',
               'configs/tiny.py'], ['-m', 'gpas_jax.baseline.compare', '--out', 'x']):
    _one_line(_tool(outside, *argv, '--config.model.num_layer=2'), "no field 'num_layer'",
              'num_layers')
  _one_line(_tool(outside, TRAIN, '--config', 'configs/tiny.py', '--config.optim.warmup_steps=999',
                  '--config.num_train_steps=10'), 'optim.warmup_steps=999')
  _one_line(_tool(outside, TRAIN, '--config', 'nope/tiny.py', '--config.seed=1'),
            '--config=nope/tiny.py cannot be loaded', 'No such file')
  (outside / 'runs').mkdir()
  res = _tool(outside, '-m', 'gpas_jax.analysis.table', '--root', 'runs', '--sweep',
              'configs/sweeps/cpu_study.py', '--out', 'tab')
  assert res.returncode == 0 and 'Missing runs (18)' in res.stdout, res.stderr[-3000:]
  assert (outside / 'tab' / 'table.md').is_file()


def test_user_mistakes_are_one_line_in_every_tool(outside):
  """Case 3: analysis, compare, hf_tools eval, aot, sweep and table report one line, exit 2."""
  _one_line(_tool(outside, '-m', 'gpas_jax.analysis', '--workdir', 'nowhere'),
            str(outside / 'nowhere'), 'is not a run directory')
  _one_line(_tool(outside, '-m', 'gpas_jax.analysis.compare', '--runs', 'a', 'b', '--out', 'o'),
            str(outside / 'a'), 'is not a run directory')
  _one_line(_tool(outside, '-m', 'gpas_jax.baseline.hf_tools', 'eval', '--hf_dir', 'nope',
                  '--norm_type', 'pre'), '--hf_dir=', 'holds no config.json')
  _one_line(_tool(outside, '-m', 'gpas_jax.train.sweep', '--sweep',
                  'configs/sweeps/cpu_study.py', '--root', 'r', '--sweep.norm_type=pre'),
            "no field 'norm_type'", 'norm_types')
  (outside / 'broken.py').write_text('def get_config(:\n')
  _one_line(_tool(outside, '-m', 'gpas_jax.analysis.table', '--root', '.', '--sweep',
                  'broken.py'), 'broken.py cannot be loaded', 'SyntaxError')
  # A stray word beside the flags (a tool that takes none; cli.run(positional=False)).
  _one_line(_tool(outside, '-m', 'gpas_jax.analysis.table', '--root', '.', 'stray'),
            "unexpected arguments: ['stray']")
  for tool in ('gpas_jax.perf.aot', 'gpas_jax.perf.bench'):  # their default config, overridden
    _one_line(_tool(outside, '-m', tool, '--config.model.num_layer=2',
                    env={'GPAS_ALLOCATOR': 'default'}), "no field 'num_layer'")
  # --traceback shows the rest.
  res = _tool(outside, '-m', 'gpas_jax.analysis', '--workdir', 'nowhere', '--traceback')
  assert res.returncode == 2 and 'Traceback' in res.stderr


def test_hf_tools_eval_with_the_wrong_norm_type_is_one_line(outside):
  """Case 3: a baseline directory that does not fit --norm_type, named before any eval."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gpas_jax.model import interop  # pylint: disable=import-outside-toplevel
  from gpas_jax.model import transformer  # pylint: disable=import-outside-toplevel
  cfg = transformer.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                num_layers=2, num_heads=2, norm_type='pre')
  interop.save_hf_directory(transformer.Transformer(cfg, rngs=nnx.Rngs(0)), str(outside / 'hf'))
  # Case 9: the weights file has the mode of the files beside it, not safetensors' 0600.
  modes = {f: (outside / 'hf' / f).stat().st_mode & 0o777 for f in os.listdir(outside / 'hf')}
  assert len(set(modes.values())) == 1 and modes['model.safetensors'] & 0o044, modes
  _one_line(_tool(outside, '-m', 'gpas_jax.baseline.hf_tools', 'eval', '--hf_dir', 'hf',
                  '--norm_type', 'sandwich_gpas'), "norm_type='sandwich_gpas'",
            'missing keys', 'Pass the NORM_TYPE')


def test_sweeps_shorten_override_any_field_and_print_runnable_commands(outside):
  """Case 4: --sweep.overrides.<any field>, a too-long warmup named with its fix, --print_only
  validates every run and prints commands that run from another folder."""
  base = ['-m', 'gpas_jax.train.sweep', '--sweep', 'configs/sweeps/cpu_study.py', '--root',
          'runs', '--print_only']
  _one_line(_tool(outside, *base, '--sweep.overrides.num_train_steps=40'),
            'optim.warmup_steps=60 is outside 0..num_train_steps=40',
            '--sweep.overrides.optim.warmup_steps=4')
  _one_line(_tool(outside, *base, '--sweep.overrides.model.norm_type=pree'),
            "model.norm_type='pree'", str(outside / 'runs' / 'tiny' / 'pre' / 'seed0'))
  _one_line(_tool(outside, *base, "--sweep.norm_types=('pre', 'pree')"),
            "model.norm_type='pree'")
  res = _tool(outside, *base, '--sweep.overrides.num_train_steps=40',
              '--sweep.overrides.optim.warmup_steps=4', '--sweep.seeds=(0,)')
  assert res.returncode == 0, res.stderr[-3000:]
  cmds = [shlex.split(l) for l in res.stdout.splitlines()]
  assert len(cmds) == 6
  for argv in cmds:
    assert argv[:5] == ['python', '-m', 'gpas_jax.train.launch', '--config', 'configs/tiny.py']
    assert os.path.isabs(argv[6]) and argv[6].startswith(str(outside / 'runs'))
    assert '--config.optim.warmup_steps=4' in argv and '--config.num_train_steps=40' in argv
  # A printed command runs from another folder: here it is refused by validation (no training).
  elsewhere = outside / 'elsewhere'
  elsewhere.mkdir()
  _one_line(_tool(elsewhere, *cmds[0][1:], '--config.optim.warmup_steps=41'),
            'optim.warmup_steps=41 is outside 0..num_train_steps=40')
  assert not os.path.exists(cmds[0][6])  # refused before the workdir was made


def _fake_run(root, rel, seed, steps, ppl, norm_type='pre'):
  path = root / rel
  path.mkdir(parents=True)
  (path / 'config.json').write_text(json.dumps({
      'size_name': 'tiny', 'seed': seed, 'num_train_steps': steps,
      'model': {'norm_type': norm_type, 'param_dtype': 'float32', 'compute_dtype': 'float32'},
      'optim': {'lr': 3e-3, 'warmup_steps': 60}}))
  (path / 'summary.json').write_text(json.dumps({'step': steps, 'eval_ppl': ppl,
                                                 'finished': True}))


def test_table_refuses_runs_of_another_recipe(outside):
  """Case 5: 40-step runs under a 300-step study's root are left out and named by field."""
  from gpas_jax.analysis import table  # pylint: disable=import-outside-toplevel
  runs = outside / 'runs'
  _fake_run(runs, 'tiny/pre/seed0', 0, 300, 140.0)
  _fake_run(runs, 'tiny/pre/seed1', 1, 40, 542.73)
  _fake_run(runs, 'tiny/pre_gpas/seed0', 0, 300, 138.0, 'pre_gpas')
  _fake_run(runs, 'tiny/pre_gpas/seed1', 1, 300, 139.0, 'pre_gpas')
  res = _tool(outside, '-m', 'gpas_jax.analysis.table', '--root', 'runs', '--sweep',
              'configs/sweeps/cpu_study.py', '--out', 'tab')
  assert res.returncode == 0, res.stderr[-3000:]
  assert '| tiny | 140.00 (1) | 138.50 ± 0.71 (2) | -1.50 |' in res.stdout, res.stdout
  assert 'Left out: another recipe than the sweep (1):' in res.stdout
  assert (f'- {runs / "tiny/pre/seed1"}: num_train_steps 40 (expected 300)') in res.stdout
  assert '542.73' not in res.stdout
  # Without a sweep: the recipe most runs of the size share is the reference.
  t = table.build_table(table.runs_lib.find_runs(str(runs)))
  assert [(p, d) for p, d in t.mismatched] == [
      (str(runs / 'tiny/pre/seed1'), ['num_train_steps 40 (expected 300)'])]
  assert t.cell('tiny', 'pre').values == [140.0]


def test_study_leaves_out_runs_of_another_recipe(outside, monkeypatch):
  """Case 5: the study's deltas use only the runs of the shared recipe."""
  from gpas_jax.analysis import study  # pylint: disable=import-outside-toplevel
  runs = outside / 'runs'
  _fake_run(runs, 'tiny/pre/seed0', 0, 300, 140.0)
  _fake_run(runs, 'tiny/pre/seed1', 1, 40, 542.73)
  _fake_run(runs, 'tiny/pre/seed2', 2, 300, 141.0)
  for seed in (0, 1, 2):
    _fake_run(runs, f'tiny/pre_gpas/seed{seed}', seed, 300, 138.0 + seed, 'pre_gpas')
  seen = {}
  monkeypatch.setattr(study.compare, 'compare_runs', lambda paths, out: seen.setdefault(
      'paths', paths) and [])
  monkeypatch.setattr(study, 'variance_over_training_plot', lambda *a: 'v.png')
  monkeypatch.setattr(study.cli, 'analyze_run', lambda *a, **k: [])
  study.write_study(str(runs), str(outside / 'out'), importance_batches=0)
  assert str(runs / 'tiny/pre/seed1') not in seen['paths'] and len(seen['paths']) == 5
  deltas = (outside / 'out' / 'deltas.md').read_text()
  assert '| tiny | pre vs pre+GPAS | 0,2 | -2.00, -1.00 |' in deltas, deltas


def test_readme_short_example_decays():
  """Case 6: the README's 60-step example sets a warmup that lets the cosine decay."""
  from gpas_jax.train import optim  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import sweep  # pylint: disable=import-outside-toplevel
  readme = (ROOT / 'README.md').read_text()
  line = next(l for l in readme.splitlines() if '--config.num_train_steps=60' in l)
  warmup = int(line.split('--config.optim.warmup_steps=')[1].split('`')[0].split()[0])
  c = sweep.load_config_file('configs/tiny.py')
  c.num_train_steps, c.optim.warmup_steps = 60, warmup
  lr = optim.lr_schedule(c)
  assert float(lr(59)) < 0.2 * float(lr(warmup)), (warmup, float(lr(59)))


def test_compare_is_quiet_and_starts_through_the_launcher(outside):
  """Case 7: compare prints no third-party INFO lines and runs the launcher's fast malloc."""
  from gpas_jax.runtime import allocator  # pylint: disable=import-outside-toplevel
  small = ['--config.data.cache_dir=' + DATA_CACHE, '--config.data.tokenizer_vocab_size=512',
           '--config.model.vocab_size=512', '--config.model.hidden_size=32',
           '--config.model.intermediate_size=64', '--config.model.num_layers=2',
           '--config.model.num_heads=2', '--config.data.max_length=32',
           '--config.optim.global_batch_size=8', '--config.optim.warmup_steps=1',
           '--config.data.eval_batch_size=8', '--config.checkpoint_async=False']
  res = _tool(outside, '-m', 'gpas_jax.baseline.compare', '--out', 'cmp', '--updates', '1',
              '--precisions', 'float32', *small, timeout=400)
  assert res.returncode == 0, res.stderr[-3000:]
  assert (outside / 'cmp' / 'compare.md').is_file()
  logs = (res.stdout + res.stderr).splitlines()
  info = [l for l in logs if l[:1] == 'I' and l[1:5].isdigit()]  # absl's INFO prefix
  assert not info, info[:5]
  if allocator.available():  # a fast malloc is installed: the launcher preloads it
    header = next(l for l in logs if l.strip().startswith('allocator'))
    assert 'default' not in header, header


def test_small_items(tmp_path, monkeypatch, capsys):
  """Case 9: hf_tools export refuses an existing export unless asked and says what it wrote;
  analysis names the flag that records per-layer data; a one-eval loss figure ticks whole steps."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gpas_jax.analysis import cli as analysis_cli  # pylint: disable=import-outside-toplevel
  from gpas_jax.analysis import plots  # pylint: disable=import-outside-toplevel
  from gpas_jax.baseline import hf_tools  # pylint: disable=import-outside-toplevel
  from gpas_jax.model import transformer  # pylint: disable=import-outside-toplevel
  from gpas_jax.runtime import cli  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import loading  # pylint: disable=import-outside-toplevel
  config = tiny_train_config()  # its tokenizer goes into the export with the model
  cfg = transformer.ModelConfig(vocab_size=config.model.vocab_size, hidden_size=16,
                                intermediate_size=32, num_layers=2, num_heads=2, norm_type='pre')
  model = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  monkeypatch.setattr(loading, 'load_model', lambda workdir, step=None: (config, model))
  out = str(tmp_path / 'hf')
  hf_tools.export_run(str(tmp_path / 'run'), out, step=5)
  before = os.path.getmtime(os.path.join(out, 'model.safetensors'))
  with pytest.raises(cli.UserError, match=r'already holds an export.*--overwrite'):
    hf_tools.export_run(str(tmp_path / 'run'), out, step=6)
  assert os.path.getmtime(os.path.join(out, 'model.safetensors')) == before  # nothing lost
  hf_tools.export_run(str(tmp_path / 'run'), out, step=6, overwrite=True)
  assert json.load(open(os.path.join(out, 'gpas_jax_export.json')))['step'] == 6
  report = hf_tools.export_report(out)
  assert [l.split()[1] for l in report] == [os.path.join(out, f) for f in hf_tools.EXPORT_FILES]
  assert all(l.endswith(' bytes)') for l in report)
  # A run without analysis.jsonl: the message names the flag that records it.
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text(json.dumps({'size_name': 'tiny', 'seed': 0,
                                               'model': {'norm_type': 'pre'}}))
  (run / 'metrics.jsonl').write_text(json.dumps({'step': 60, 'loss': 5.0}) + '\n' +
                                     json.dumps({'step': 60, 'eval_loss': 5.1}) + '\n')
  capsys.readouterr()
  analysis_cli.analyze_run(str(run), str(tmp_path / 'a'), importance=False)
  said = capsys.readouterr().out
  assert 'no activation_variance.png' in said and '--config.analysis.every_steps=N' in said, said
  # One eval point: whole-step ticks on both panels.
  figs = []
  monkeypatch.setattr(plots, '_save', lambda fig, path: figs.append(fig) or path)
  plots.loss_curves_plot({'r': [{'step': 6, 'loss': 5.0}, {'step': 6, 'eval_loss': 5.1}]},
                         str(tmp_path / 'l.png'))  # a 6-step run: matplotlib would tick 5.7
  for ax in figs[0].axes:
    ticks = ax.get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks), ticks
