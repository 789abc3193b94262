"""Runs a sweep (norm_type x size x seed) one run after another, or prints its commands.

    python -m gpas_jax.sweep --sweep configs/sweeps/cpu_study.py --root runs/cpu_study
    python -m gpas_jax.sweep --sweep configs/sweeps/paper_table.py --root gs://b/runs --print_only

A sweep config's `get_config()` returns a ConfigDict with:
  base_config  the train config file of each size: a mapping size -> file, or one path where
               '{size}' is replaced by the size name (e.g. 'configs/llama_{size}.py')
  norm_types, sizes, seeds   the product to run
  overrides    extra `--config.<key>=<value>` flags for every run (nested dicts give dotted keys;
               empty strings are left out, so a sweep can list the flags a user must fill in)
  run_overrides  optional (size, norm_type, key, value) tuples: flags of single runs
Each run's workdir is ROOT/<size>/<norm_type>/seed<k>; a re-run resumes from its checkpoint.
"""

import dataclasses
import importlib.util
import os
import shlex
import subprocess
import sys
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
from etils import epath
import ml_collections
from ml_collections import config_flags

from gpas_jax import console


@dataclasses.dataclass(frozen=True)
class SweepRun:
  """One run of a sweep: its settings, its train config file and its workdir."""
  size: str
  norm_type: str
  seed: int
  config_file: str
  workdir: str
  overrides: tuple[tuple[str, Any], ...] = ()


# The folder holding the gpas_jax and configs packages: the clone, or site-packages.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve(path: str) -> str:
  """A relative path ('configs/tiny.py', 'train.py') as given when it exists from here, else the
  one in the clone (or installed package) this module belongs to, so tools run from anywhere."""
  if os.path.isabs(path) or os.path.exists(path):
    return path
  candidate = os.path.join(_ROOT, path)
  return candidate if os.path.exists(candidate) else path


def load_config_file(path: str, *args: str) -> ml_collections.ConfigDict:
  """Calls get_config(*args) of a Python config file (found as resolve() finds it)."""
  path = resolve(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist.')
  if _ROOT not in sys.path:  # Config files import `configs.base`; it is there when uninstalled.
    sys.path.insert(0, _ROOT)
  spec = importlib.util.spec_from_file_location(
      f'_sweep_cfg_{abs(hash(os.path.abspath(path)))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> list[tuple[str, Any]]:
  out = []
  for k, v in tree.items():
    if isinstance(v, (Mapping, ml_collections.ConfigDict)):
      out += _flatten(v, f'{prefix}{k}.')
    else:
      out.append((f'{prefix}{k}', v))
  return out


def config_file_for(sweep: ml_collections.ConfigDict, size: str) -> str:
  """The train config file of one size of the sweep."""
  base = sweep.base_config
  if isinstance(base, str):
    return base.format(size=size)
  base = dict(base)
  if size not in base:
    raise KeyError(f'sweep.base_config has no file for size {size!r}; it has {sorted(base)}.')
  return base[size]


def plan(sweep: ml_collections.ConfigDict, root: str) -> list[SweepRun]:
  """Every run of the sweep, seed-major within a size, so partial sweeps compare like with like."""
  overrides = tuple((k, v) for k, v in _flatten(sweep.get('overrides') or {}) if v != '')
  per_run: dict[tuple[str, str], list[tuple[str, Any]]] = {}
  for size, norm_type, key, value in sweep.get('run_overrides') or ():
    per_run.setdefault((size, norm_type), []).append((key, value))
  runs = []
  for size in sweep.sizes:
    for seed in sweep.seeds:
      for norm_type in sweep.norm_types:
        runs.append(SweepRun(size, norm_type, int(seed), config_file_for(sweep, size),
                             os.path.join(root, size, norm_type, f'seed{seed}'),
                             overrides + tuple(per_run.get((size, norm_type), ()))))
  return runs


def _flag_value(v: Any) -> str:
  if isinstance(v, (list, tuple)):
    return ','.join(str(x) for x in v)
  return str(v)


def command(run: SweepRun, python: str = 'python', train_script: str = 'train.py') -> list[str]:
  """The train.py argv of one run."""
  argv = [python, train_script, '--config', run.config_file, '--workdir', run.workdir,
          f'--config.model.norm_type={run.norm_type}', f'--config.seed={run.seed}']
  return argv + [f'--config.{k}={_flag_value(v)}' for k, v in run.overrides]


def is_finished(workdir: str) -> bool:
  """True when the trainer wrote summary.json (it does so once, at the end of a run)."""
  return epath.Path(workdir, 'summary.json').exists()


def run_sweep(runs: Sequence[SweepRun], python: str = sys.executable,
              train_script: str = 'train.py', skip_finished: bool = False) -> list[SweepRun]:
  """Runs each run in turn (failures do not stop the sweep); returns the runs that failed."""
  failed = []
  for k, run in enumerate(runs, 1):
    if skip_finished and is_finished(run.workdir):
      console.say(f'[{k}/{len(runs)}] {run.workdir}: finished, skipped.')
      continue
    argv = command(run, python, train_script)
    console.say(f'[{k}/{len(runs)}] {shlex.join(argv)}')
    rc = subprocess.run(argv, check=False).returncode
    if rc != 0:
      logging.error('[%d/%d] %s exited with %d.', k, len(runs), run.workdir, rc)
      failed.append(run)
  return failed


def define_flags() -> None:
  """Defines this tool's flags (only when run as a program)."""
  config_flags.DEFINE_config_file('sweep', None, 'The sweep config file (fields may be '
                                  'overridden, e.g. --sweep.seeds="(0,)").')
  flags.mark_flag_as_required('sweep')
  flags.DEFINE_string('root', None, 'Folder under which the runs go.', required=True)
  flags.DEFINE_bool('print_only', False, 'Print one command per line instead of running.')
  flags.DEFINE_bool('skip_finished', False, 'Leave out runs that have a summary.json.')
  flags.DEFINE_string('train_script', 'train.py', 'The training entry point; a relative path '
                      "not found here is taken from this package's clone.")
  flags.DEFINE_string('python', None, 'Interpreter; default this one (`python` when printing).')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.quiet_logs()
  f = flags.FLAGS
  runs = plan(f.sweep, f.root)
  for run in runs:
    if not os.path.isfile(resolve(run.config_file)):
      raise app.UsageError(f'{run.config_file} (size {run.size}) does not exist.')
  if f.print_only:  # Paths as the sweep file gives them: a scheduler runs them from the clone.
    for run in runs:
      if not (f.skip_finished and is_finished(run.workdir)):
        print(shlex.join(command(run, f.python or 'python', f.train_script)))
    return
  runs = [dataclasses.replace(r, config_file=resolve(r.config_file)) for r in runs]
  train_script = resolve(f.train_script)
  if not os.path.isfile(train_script):
    raise app.UsageError(f'--train_script={f.train_script!r} does not exist (train.py is in the '
                         'clone, not in an installed package): run from the clone, install it '
                         'with `pip install -e .`, or pass the path of its train.py.')
  failed = run_sweep(runs, f.python or sys.executable, train_script, f.skip_finished)
  if failed:
    logging.error('%d of %d runs failed: %s', len(failed), len(runs),
                  ', '.join(r.workdir for r in failed))
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
