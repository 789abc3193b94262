"""Runs a sweep (norm_type x size x seed), one run after another or N at once, or prints it.

    python -m gpas_jax.train.sweep --sweep configs/sweeps/cpu_study.py --root runs/cpu_study
    python -m gpas_jax.train.sweep --sweep configs/sweeps/deep_cpu_study.py --root runs/deep --parallel 2
    python -m gpas_jax.train.sweep --sweep configs/sweeps/paper_table.py --root gs://b/runs --print_only

A sweep config's `get_config()` returns a ConfigDict with:
  base_config  the train config file of each size: a mapping size -> file, or one path where
               '{size}' is replaced by the size name (e.g. 'configs/llama_{size}.py'); a file
               may carry its get_config argument ('configs/deep_cpu.py:bfloat16')
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
import tempfile
import time
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

import gpas_jax
from gpas_jax import storage
from gpas_jax.runtime import cli
from gpas_jax.runtime import console


@dataclasses.dataclass(frozen=True)
class SweepRun:
  """One run of a sweep: its settings, its train config file and its workdir."""
  size: str
  norm_type: str
  seed: int
  config_file: str
  workdir: str
  overrides: tuple[tuple[str, Any], ...] = ()


split_config_arg = cli.split_config_arg


def resolve(path: str) -> str:
  """A config file (or train.py) as every tool finds it: from the working directory when it
  exists there, else from the installed package (cli.resolve_config); ':argument' kept."""
  return cli.resolve_config(path)


def load_config_file(path: str, *args: str) -> ml_collections.ConfigDict:
  """Calls get_config(*args) of a Python config file (found as resolve() finds it); a
  'file.py:argument' spec passes its argument first."""
  path, arg = split_config_arg(resolve(path))
  args = ((arg[1:],) if arg else ()) + args
  if not os.path.isfile(path):
    raise cli.InputNotFound(f'config file {path!r} does not exist (a relative path is looked up '
                            'in the working directory, then in the installed configs package).')
  if gpas_jax.ROOT not in sys.path:  # Config files import `configs.base`; it is there when uninstalled.
    sys.path.insert(0, gpas_jax.ROOT)
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


def plan(sweep: ml_collections.ConfigDict, root: str,
         extra: Sequence[tuple[str, Any]] = ()) -> list[SweepRun]:
  """Every run of the sweep, seed-major within a size, so partial sweeps compare like with like.

  `extra`: (dotted config key, value) overrides of every run, any config field (the command
  line's --sweep.overrides.<key>=<value>); they replace the sweep file's entry of the same key.
  """
  merged = dict(_flatten(sweep.get('overrides') or {}))
  merged.update(dict(extra))
  overrides = tuple((k, v) for k, v in merged.items() if v != '')
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


LAUNCHER = ('-m', 'gpas_jax.train.launch')  # train.py's program, importable from any folder


def config_flags_of(run: SweepRun) -> list[str]:
  """The --config.<field>=<value> flags of one run (norm_type, seed, then the overrides)."""
  return ([f'--config.model.norm_type={run.norm_type}', f'--config.seed={run.seed}'] +
          [f'--config.{k}={_flag_value(v)}' for k, v in run.overrides])


def command(run: SweepRun, python: str = 'python', train_script: str = '') -> list[str]:
  """The training argv of one run: `python -m gpas_jax.train.launch` (runs from any folder
  where gpas_jax is installed), or `python TRAIN_SCRIPT` when one is given."""
  entry = [train_script] if train_script else list(LAUNCHER)
  return ([python, *entry, '--config', run.config_file, '--workdir', run.workdir] +
          config_flags_of(run))


def portable_config(spec: str) -> str:
  """A config spec for a printed command: a file of the installed configs package as its
  package path ('configs/tiny.py', found by every tool on any machine with gpas_jax
  installed), any other file absolute."""
  resolved = resolve(spec)
  path, arg = split_config_arg(resolved)
  rel = os.path.relpath(path, gpas_jax.ROOT) if not storage.is_url(path) else path
  if rel.startswith('configs' + os.sep) and cli.installed(rel) == path:
    return rel + arg
  return resolved


def run_config(run: SweepRun) -> ml_collections.ConfigDict:
  """The config one run trains with, built as its command builds it (absl's parser on the same
  --config.<field>=<value> flags), without starting it."""
  fv = flags.FlagValues()
  argv = ['sweep', '--config', resolve(run.config_file)] + config_flags_of(run)
  # config_flags registers the --config.<field> overrides it finds in sys_argv at definition.
  config_flags.DEFINE_config_file('config', None, flag_values=fv, sys_argv=argv)
  try:
    fv(argv)
    fv.config.keys()  # loaded lazily: a broken file shows here
  except (AttributeError, KeyError) as e:
    line = cli.override_error(e, argv).removeprefix('error: ')
    if any(line.startswith(f'--config.{k}=') for k, _ in run.overrides):  # the sweep's flag
      line = line.replace('--config.', '--sweep.overrides.', 1)
    raise cli.UserError(f'{run.workdir}: {line}') from None
  except (OSError, ValueError) as e:
    raise cli.UserError(f'{run.workdir}: {run.config_file} with its flags cannot be loaded: '
                        f'{str(e).strip().splitlines()[-1]}') from None
  return fv.config


def _warmup_hint(run: SweepRun, config: ml_collections.ConfigDict) -> str:
  """The override that fixes a warmup longer than a shortened run."""
  steps = config.num_train_steps
  return (f' The sweep shortens the run to {steps} steps but keeps its warmup of '
          f'{config.optim.warmup_steps}: add --sweep.overrides.optim.warmup_steps='
          f'{max(1, steps // 10)} (10% of the steps), or another value <= {steps}.')


def validate_runs(runs: Sequence[SweepRun]) -> list[ml_collections.ConfigDict]:
  """Every run's config, validated as train.py validates it; the first bad one raises a
  UserError naming its workdir, the field and the override that fixes it."""
  from gpas_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  configs = []
  for run in runs:
    config = run_config(run)
    try:
      config_lib.validate(config)
    except config_lib.ConfigError as e:
      hint = _warmup_hint(run, config) if 'warmup_steps' in str(e) else ''
      what = str(e).split(': set --config.')[0] + '.' if hint else str(e)  # the sweep's own fix
      raise cli.UserError(f'{run.workdir}: {what}{hint}') from None
    configs.append(config)
  return configs


_OVERRIDE_PREFIX = '--sweep.overrides.'
_EXTRA: list[tuple[str, str]] = []


def take_overrides(argv: Sequence[str]) -> list[str]:
  """argv without its --sweep.overrides.<key>=<value> flags, kept for plan(): they may name any
  config field (the sweep file's overrides hold only a few), and train.py parses the value."""
  rest = []
  for a in argv:
    if a.startswith(_OVERRIDE_PREFIX):
      key, sep, value = a[len(_OVERRIDE_PREFIX):].partition('=')
      if not sep or not key:
        raise cli.UserError(f'{a}: give the field and its value, as '
                            f'{_OVERRIDE_PREFIX}optim.warmup_steps=4.')
      _EXTRA.append((key, value))
    else:
      rest.append(a)
  return rest


def extra_overrides() -> tuple[tuple[str, str], ...]:
  """The --sweep.overrides.<key>=<value> flags that take_overrides() took out of argv."""
  return tuple(_EXTRA)


def is_finished(workdir: str) -> bool:
  """True when the trainer wrote summary.json (it does so once, at the end of a run)."""
  return storage.exists(storage.join(workdir, 'summary.json'))


def core_groups(parallel: int, cores: Sequence[int] | None = None) -> list[list[int]]:
  """The CPU cores of each of `parallel` concurrent runs: disjoint, as even as the cores allow."""
  cores = sorted(os.sched_getaffinity(0)) if cores is None else list(cores)
  if not 1 <= parallel <= len(cores):
    raise ValueError(f'--parallel={parallel}: this machine gives {len(cores)} cores; use '
                     f'1..{len(cores)} concurrent runs.')
  return [cores[k::parallel] for k in range(parallel)]


def _child_env(cores: Sequence[int] | None) -> dict[str, str]:
  env = dict(os.environ)
  if cores is not None and len(cores) == 1:
    # One core: XLA:CPU's Eigen pool would only add thread hand-offs.
    flags_ = env.get('XLA_FLAGS', '')
    env['XLA_FLAGS'] = (flags_ + ' --xla_cpu_multi_thread_eigen=false '
                        'intra_op_parallelism_threads=1').strip()
  return env


def _log_path(workdir: str) -> str:
  return workdir.rstrip('/') + '.log'


def _open_log(workdir: str) -> Any:
  """The file a parallel run's output goes to: WORKDIR.log, or a local file for a bucket's."""
  if storage.is_url(workdir):  # a child's stdout needs a local file; stored at the end
    return tempfile.NamedTemporaryFile('w+', prefix='gpas_jax_sweep_', suffix='.log')
  storage.makedirs(os.path.dirname(storage.absolute(workdir)))
  return open(_log_path(workdir), 'a', encoding='utf-8')  # pylint: disable=consider-using-with


def _close_log(log: Any, workdir: str) -> None:
  """Closes a run's log; a bucket's WORKDIR.log gets this output after what it held."""
  if storage.is_url(workdir):
    log.seek(0)
    target = _log_path(workdir)
    storage.write_text(target, (storage.read_text(target) if storage.exists(target) else '')
                       + log.read())
  log.close()


def run_sweep(runs: Sequence[SweepRun], python: str = sys.executable,
              train_script: str = '', skip_finished: bool = False,
              parallel: int = 1) -> list[SweepRun]:
  """Runs the runs (failures do not stop the sweep); returns the runs that failed.

  parallel=1 runs one after another with their output on this console. parallel=N>1 (CPU hosts)
  runs N at once, each pinned to its own cores (core_groups) with its output in WORKDIR.log.
  """
  groups = core_groups(parallel) if parallel > 1 else [None]
  todo = []
  for k, run in enumerate(runs, 1):
    if skip_finished and is_finished(run.workdir):
      console.say(f'[{k}/{len(runs)}] {run.workdir}: finished, skipped.')
    else:
      todo.append((k, run))
  failed, running = [], {}  # slot -> (k, run, process, log file)
  while todo or running:
    for slot in range(len(groups)):
      if slot in running or not todo:
        continue
      k, run = todo.pop(0)
      argv = command(run, python, train_script)
      cores = groups[slot]
      log = _open_log(run.workdir) if cores is not None else None
      console.say(f'[{k}/{len(runs)}]' + (f' cores {cores}:' if cores else '') +
                  f' {shlex.join(argv)}')
      # The child inherits this thread's affinity (no preexec_fn: it forces a fork).
      own = os.sched_getaffinity(0)
      if cores:
        os.sched_setaffinity(0, cores)
      try:
        proc = subprocess.Popen(  # pylint: disable=consider-using-with
            argv, env=_child_env(cores), stdout=log, stderr=subprocess.STDOUT if log else None)
      finally:
        os.sched_setaffinity(0, own)
      running[slot] = (k, run, proc, log)
    done = [s for s, (_, _, p, _) in running.items() if p.poll() is not None]
    if not done:
      time.sleep(0.5)
    for slot in done:
      k, run, proc, log = running.pop(slot)
      if log is not None:
        _close_log(log, run.workdir)
      if proc.returncode != 0:
        logging.error('[%d/%d] %s exited with %d%s.', k, len(runs), run.workdir,
                      proc.returncode, f' (output in {_log_path(run.workdir)})' if log else '')
        failed.append(run)
  return failed


def define_flags() -> None:
  """Defines this tool's flags (only when run as a program)."""
  config_flags.DEFINE_config_file('sweep', None, 'The sweep config file (fields may be '
                                  'overridden, e.g. --sweep.seeds="(0,)"; '
                                  '--sweep.overrides.<field>=<value> sets any config field of '
                                  'every run).')
  flags.mark_flag_as_required('sweep')
  flags.DEFINE_string('root', None, 'Folder under which the runs go (relative: to the working '
                      'directory; gs:// as it is).', required=True)
  flags.DEFINE_bool('print_only', False, 'Validate every run\'s config and print one command per '
                    'line instead of running.')
  flags.DEFINE_bool('skip_finished', False, 'Leave out runs that have a summary.json.')
  flags.DEFINE_string('train_script', '', 'The training entry point; default `python -m '
                      'gpas_jax.train.launch` (train.py\'s program, from any folder).')
  flags.DEFINE_string('python', None, 'Interpreter; default this one (`python` when printing).')
  flags.DEFINE_integer('parallel', 1, 'Runs at once on this host, each pinned to its share of '
                       'the CPU cores (its output in WORKDIR.log); for CPU-only studies.')


def main(argv: Sequence[str]) -> None:
  console.quiet_logs()
  f = flags.FLAGS
  runs = plan(f.sweep, cli.resolve_path(f.root), extra_overrides())
  try:
    core_groups(f.parallel)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  # Config files as every tool finds them: a package file portable, any other absolute.
  runs = [dataclasses.replace(r, config_file=portable_config(r.config_file)) for r in runs]
  validate_runs(runs)  # each run's config, before anything runs or is printed
  train_script = cli.resolve_config(f.train_script) if f.train_script else ''
  if train_script and not os.path.isfile(train_script):
    raise app.UsageError(f'--train_script={f.train_script!r} does not exist; leave it out to '
                         'run `python -m gpas_jax.train.launch`.')
  if f.print_only:  # for a scheduler: commands that run from any folder
    for run in runs:
      if not (f.skip_finished and is_finished(run.workdir)):
        print(shlex.join(command(run, f.python or 'python', train_script)))
    return
  failed = run_sweep(runs, f.python or sys.executable, train_script, f.skip_finished,
                     f.parallel)
  console.say(f'sweep done: {len(runs) - len(failed)} of {len(runs)} runs finished'
              + (f', {len(failed)} failed (each run\'s log: WORKDIR.log)' if failed else '')
              + '. The results table: python -m gpas_jax.analysis.table --root '
              + shlex.quote(cli.resolve_path(f.root)) + ' --sweep '
              + ' '.join(shlex.quote(a) for a in _table_args()))
  if failed:
    logging.error('%d of %d runs failed: %s', len(failed), len(runs),
                  ', '.join(r.workdir for r in failed))
    sys.exit(1)


def _table_args() -> list[str]:
  """The sweep file and its overrides as this command got them, for the table's command."""
  return ([config_flags.get_config_filename(flags.FLAGS['sweep'])]
          + [a for a in sys.argv[1:] if a.startswith('--sweep.')]
          + [f'{_OVERRIDE_PREFIX}{k}={v}' for k, v in _EXTRA])


if __name__ == '__main__':
  with cli.readable_errors():
    sys.argv = take_overrides(sys.argv)  # before config_flags reads sys.argv at definition
  define_flags()
  cli.run(main, file_flags=('sweep',), positional=False)
