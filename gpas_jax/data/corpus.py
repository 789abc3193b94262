"""The embedded default corpus: English that ships with Python, written as JSON-lines files.

Two files, each one {"key", "text"} object per line, in a fixed order:
  pydoc_topics.jsonl       the `pydoc_data.topics.topics` help pages, sorted by topic;
  stdlib_docstrings.jsonl  module, class, function and method docstrings of the public standard
                           library, in sorted module order, deduplicated (see _stdlib_docs.py).
The text depends only on the Python build (version and compiled-in extensions), so caches are
keyed by `python_tag()`. The files are then built into a TFDS dataset by builders.GpasTextFolder.
"""

import json
import os
import pathlib
import platform
import subprocess
import sys

from gpas_jax.data.errors import DataError

TOPICS_FILE = 'pydoc_topics.jsonl'
DOCSTRINGS_FILE = 'stdlib_docstrings.jsonl'
_EXTRACTOR = pathlib.Path(__file__).with_name('_stdlib_docs.py')


def python_tag() -> str:
  """Returns this Python build's tag (e.g. 'cpython-3.11.7-linux'); the corpus depends on it."""
  return f'{platform.python_implementation().lower()}-{platform.python_version()}-{sys.platform}'


def _write_topics(path: pathlib.Path) -> None:
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  rows = [json.dumps({'key': f'topics/{k}', 'text': topics.topics[k]}, ensure_ascii=False)
          for k in sorted(topics.topics) if topics.topics[k].strip()]
  tmp = path.with_suffix('.tmp')
  tmp.write_text('\n'.join(rows) + '\n', encoding='utf-8')
  os.replace(tmp, path)


def _write_docstrings(path: pathlib.Path) -> None:
  # A fresh isolated interpreter: importing ~500 modules must not touch this process, and -S keeps
  # site-packages (whose monkey-patches could change docstrings) out of it.
  cmd = [sys.executable, '-I', '-S', str(_EXTRACTOR), str(path)]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
  if result.returncode != 0 or not path.exists():
    raise DataError(f'Extracting the embedded corpus with {" ".join(cmd)} failed '
                    f'(exit {result.returncode}): {result.stderr[-2000:]}')


def write_embedded_corpus(out_dir: str | os.PathLike[str]) -> pathlib.Path:
  """Writes the embedded corpus's two JSON-lines files into out_dir (if missing) and returns it."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if not (out / TOPICS_FILE).exists():
    _write_topics(out / TOPICS_FILE)
  if not (out / DOCSTRINGS_FILE).exists():
    _write_docstrings(out / DOCSTRINGS_FILE)
  return out
