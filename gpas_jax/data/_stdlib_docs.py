"""Writes the standard library's docstrings as JSON lines; run as a script in a clean interpreter.

This file imports only the standard library, so it can run under `python -I -S`: importing
hundreds of modules has side effects (warnings, stray prints, registered codecs) that should not
leak into the calling process. Usage: python -I -S _stdlib_docs.py OUTPUT.jsonl
"""

import contextlib
import inspect
import io
import json
import os
import pkgutil
import sys
import types
import warnings

# Modules whose import opens windows or a browser, prints, needs a display, or only exists to be
# run, plus test suites: their text is not prose worth training on.
_SKIP_TOP = frozenset({
    'antigravity', 'this', 'idlelib', 'tkinter', 'turtle', 'turtledemo', 'test', 'lib2to3',
    'ensurepip', 'venv', 'pydoc_data', 'msilib', 'winreg', 'winsound', 'msvcrt', '_winapi',
    'nturl2path', 'xxlimited', 'xxsubtype', 'xxlimited_35', 'sitecustomize', 'usercustomize',
    '__main__', '__hello__', '__phello__', '_pyrepl', 'ctypes.macholib',
})
_SKIP_PARTS = frozenset({'test', 'tests', 'idle_test', '__main__'})
_MIN_CHARS = 16


def _module_names() -> list[str]:
  """Returns the public stdlib modules and submodules, sorted."""
  names = set()
  for top in sorted(sys.stdlib_module_names):
    if top.startswith('_') or top in _SKIP_TOP:
      continue
    names.add(top)
    with contextlib.suppress(Exception), _quiet():
      mod = __import__(top)
      path = getattr(mod, '__path__', None)
      if path:
        for info in pkgutil.walk_packages(path, prefix=top + '.', onerror=lambda _: None):
          names.add(info.name)
  out = []
  for name in sorted(names):
    parts = name.split('.')
    if any(p in _SKIP_PARTS or p.startswith('_') or p.startswith('test_') for p in parts):
      continue
    if any('.'.join(parts[:i]) in _SKIP_TOP for i in range(1, len(parts) + 1)):
      continue
    out.append(name)
  return out


@contextlib.contextmanager
def _quiet():
  with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
      contextlib.redirect_stderr(io.StringIO()):
    warnings.simplefilter('ignore')
    yield


def _docs_of(mod: types.ModuleType) -> list[tuple[str, str]]:
  """Returns (key, docstring) for a module, its classes, functions and methods, in name order."""
  name = mod.__name__
  found = [(name, mod.__doc__)]
  for attr in sorted(vars(mod)):
    obj = vars(mod)[attr]
    if attr.startswith('_') or getattr(obj, '__module__', None) != name:
      continue
    if inspect.isclass(obj):
      found.append((f'{name}.{attr}', obj.__doc__))
      for meth in sorted(vars(obj)):
        fn = vars(obj)[meth]
        if meth.startswith('_') or not callable(fn) or isinstance(fn, type):
          continue
        found.append((f'{name}.{attr}.{meth}', getattr(fn, '__doc__', None)))
    elif inspect.isroutine(obj):
      found.append((f'{name}.{attr}', obj.__doc__))
  return found


def main(output: str) -> None:
  """Writes one {"key", "text"} JSON line per distinct docstring."""
  seen = set()
  rows = []
  for name in _module_names():
    try:
      with _quiet():
        found = _docs_of(__import__(name, fromlist=['_']))
    except BaseException:  # pylint: disable=broad-except
      continue  # Missing optional extensions (e.g. _curses) differ between builds: skip.
    for key, doc in found:
      if not isinstance(doc, str):
        continue
      text = inspect.cleandoc(doc)
      if len(text) < _MIN_CHARS or text in seen:
        continue
      seen.add(text)
      rows.append(json.dumps({'key': key, 'text': text}, ensure_ascii=False))
  with open(output + '.tmp', 'w', encoding='utf-8') as f:
    f.write('\n'.join(rows) + '\n')
  os.replace(output + '.tmp', output)


if __name__ == '__main__':
  main(sys.argv[1])
