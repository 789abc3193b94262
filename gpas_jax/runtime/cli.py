"""What every command-line tool shares: one path rule and one way to report a user's mistake.

The path rule: a relative path resolves against the working directory (text folders, token rows,
init_from, workdirs, output folders alike) and a URL (`gs://...`) passes through untouched; a
`--config` / `--sweep` file that is not found from the working directory is taken from the
installed `configs` package (`configs/tiny.py` works from any folder).

The error rule (train.py's): a mistake in the input is one line on stderr naming the value and
the fix, exit code 2, before anything is compiled or written; `--traceback` adds the traceback.
Every tool gets both through `run(main)`. Imports no jax, so `--help` stays fast.
"""

import contextlib
import os
import sys
import traceback
from typing import Any, Callable, Iterator, Sequence

from absl import app
from absl import flags

import gpas_jax
from gpas_jax import storage

EXIT_REFUSED = 2
FILE_FLAGS = ('config', 'sweep')  # config-file flags: found in the installed package too


class UserError(Exception):
  """A mistake in a tool's input; the message names the value and the fix (one line, exit 2)."""
  exit_code = EXIT_REFUSED


class InputNotFound(UserError, FileNotFoundError):
  """A file or folder the user named does not exist or is not what the tool reads."""


def resolve_path(path: str | None) -> str | None:
  """A path as the tools use it: relative -> absolute against the working directory, '~'
  expanded; empty and URLs as they are (a gs:// path must reach storage untouched)."""
  return storage.absolute(path) if path else path


def split_config_arg(spec: str) -> tuple[str, str]:
  """('configs/deep_cpu.py', ':bfloat16') of a config spec; the argument part may be empty."""
  path, sep, arg = spec.partition('.py:')
  return (path + '.py', ':' + arg) if sep else (spec, '')


def installed(path: str) -> str | None:
  """The file a relative path names in the installed gpas_jax/configs tree, if it is there."""
  if os.path.isabs(path) or storage.is_url(path):
    return None
  candidate = os.path.join(gpas_jax.ROOT, path)
  return candidate if os.path.exists(candidate) else None


def resolve_config(spec: str) -> str:
  """A config file spec made absolute: from the working directory when it exists there, else
  from the installed package (configs/tiny.py, train.py); ':argument' kept. A spec found
  nowhere comes back as given, so the error names what the user typed."""
  path, arg = split_config_arg(spec)
  if not path or storage.is_url(path):
    return spec
  path = os.path.expanduser(path)
  if os.path.isabs(path) or os.path.exists(path):
    return os.path.abspath(path) + arg
  found = installed(path)
  return (found if found else path) + arg


def rewrite_file_flags(argv: Sequence[str], names: Sequence[str] = FILE_FLAGS) -> list[str]:
  """argv with each `--NAME FILE` / `--NAME=FILE` config file resolved by resolve_config."""
  out, argv = [], list(argv)
  i = 0
  while i < len(argv):
    a = argv[i]
    for name in names:
      if a == f'--{name}' and i + 1 < len(argv):
        out += [a, resolve_config(argv[i + 1])]
        i += 2
        break
      if a.startswith(f'--{name}='):
        out.append(f'--{name}={resolve_config(a.split("=", 1)[1])}')
        i += 1
        break
    else:
      out.append(a)
      i += 1
  return out


def _innermost_message(exc: BaseException) -> str:
  arg: Any = exc
  while isinstance(arg, BaseException) and arg.args:
    arg = arg.args[0]
  return str(arg)


def override_error(exc: BaseException, argv: Sequence[str], name: str = 'config') -> str:
  """One line for an unknown --config.<field> override (ml_collections' 'Did you mean')."""
  msg = _innermost_message(exc).strip()
  lines = [l.strip() for l in msg.splitlines() if l.strip()]
  key = lines[0].strip('\'"') if lines else '?'
  flag = next((a for a in argv if a.startswith(f'--{name}.') and
               f'.{key}' in a.split('=', 1)[0]), f'--{name}.<field>')
  hint = ' '.join(lines[1:])
  return f'error: {flag}: the {name} has no field {key!r}.' + (f' {hint}' if hint else '')


def config_file_error(exc: BaseException, path: str, name: str = 'config') -> str:
  """One line for a --config / --sweep file that cannot be loaded, naming the path first."""
  lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
  cause = lines[-1] if lines else str(exc)
  if not isinstance(exc, OSError):  # the file itself fails: a SyntaxError, get_config raising
    cause = f'{type(exc).__name__}: {cause}'.rstrip(': ')
  where = ''
  if 'No such file' in cause:
    where = (' (a relative path is looked up in the working directory, then in the installed '
             'configs package)')
  return f'error: --{name}={path} cannot be loaded: {cause}{where}'


def _file_flag_given(argv: Sequence[str], name: str) -> str | None:
  for i, a in enumerate(argv):
    if a == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith(f'--{name}='):
      return a.split('=', 1)[1]
  return None


def _refuse(line: str) -> None:
  print(line, file=sys.stderr, flush=True)
  sys.exit(EXIT_REFUSED)


def parse_flags(argv: Sequence[str], file_flags: Sequence[str] = FILE_FLAGS) -> list[str]:
  """absl's parser with config files resolved and one line instead of a traceback for an
  unknown override or a config file that cannot be loaded."""
  argv = rewrite_file_flags(argv, file_flags)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:  # a bad value or an unknown flag: the user's mistake, exit 2
    _refuse(f'error: {" ".join(str(e).split())} (--helpshort lists the flags)')
  except (AttributeError, KeyError) as e:
    name = next((n for n in file_flags if any(a.startswith(f'--{n}.') for a in argv)), 'config')
    _refuse(override_error(e, argv, name))
  except Exception as e:  # pylint: disable=broad-except
    # A config file that does not load: missing, a SyntaxError, its get_config raising.
    name = next((n for n in file_flags if _file_flag_given(argv, n)), None)
    if name is None:
      raise
    _refuse(config_file_error(e, _file_flag_given(argv, name), name))
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  for name in file_flags:  # loaded lazily: a bad file shows only when first read
    if name in flags.FLAGS and flags.FLAGS[name].value is not None:
      try:
        flags.FLAGS[name].value.keys()
      except Exception as e:  # pylint: disable=broad-except
        _refuse(config_file_error(e, config_flags.get_config_filename(flags.FLAGS[name]), name))
  return rest


def exit_code(exc: BaseException) -> int | None:
  """The exit code of a user's mistake (UserError: ConfigError, RunError ...), None for a bug."""
  if isinstance(exc, UserError):
    return exc.exit_code
  if isinstance(exc, app.UsageError):
    return EXIT_REFUSED
  mesh = sys.modules.get('gpas_jax.sharding')  # below this layer: only a loaded one can raise
  if mesh is not None and isinstance(exc, mesh.MeshError):
    return EXIT_REFUSED
  return None


@contextlib.contextmanager
def readable_errors(show_traceback: bool = False) -> Iterator[None]:
  """Turns a user's mistake into one line on stderr and its exit code (traceback on request)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    code = exit_code(e)
    if code is None:
      raise
    if show_traceback:
      traceback.print_exc()
    print(f'error: {e}', file=sys.stderr, flush=True)
    if not show_traceback:
      print('(--traceback prints the full traceback)', file=sys.stderr, flush=True)
    sys.exit(code)


def define_config_file(name: str, default: str | None, help_string: str) -> Any:
  """config_flags.DEFINE_config_file, with one line for an unknown --NAME.<field> override
  (config_flags applies the overrides to a default file when it is defined)."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  try:
    return config_flags.DEFINE_config_file(name, default, help_string)
  except (AttributeError, KeyError) as e:
    _refuse(override_error(e, sys.argv, name))


def define_traceback_flag() -> None:
  """--traceback, once per program."""
  if 'traceback' not in flags.FLAGS:
    flags.DEFINE_bool('traceback', False, 'On an error of our own, print the full traceback too.')


def run(main: Callable[[list[str]], Any], file_flags: Sequence[str] = FILE_FLAGS,
        positional: bool = True) -> None:
  """app.run(main) as every tool runs it: config files found anywhere, one-line errors (exit 2),
  --traceback for the rest; positional=False refuses arguments that are not flags."""
  define_traceback_flag()

  def wrapped(argv: list[str]) -> Any:
    with readable_errors(flags.FLAGS.traceback):
      if not positional and len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
      return main(argv)

  app.run(wrapped, flags_parser=lambda argv: parse_flags(argv, file_flags))
