"""One way to touch storage: run files as JSON and JSON lines, local or gs:// alike.

Paths go through etils.epath (what Orbax and TFDS use), so a workdir, a run root or an output
folder may be a local path or a bucket URL. Non-finite floats are written as the strings 'nan' /
'inf' / '-inf' (strict JSON has no NaN) and read back as floats.
"""

import json
import math
import os
from typing import Any, Mapping

from absl import logging
from etils import epath

_NONFINITE = {'nan': math.nan, 'inf': math.inf, '-inf': -math.inf,
              'infinity': math.inf, '-infinity': -math.inf}


def _decode(value: Any) -> Any:
  """Turns the strings 'nan' / 'inf' / '-inf' back into floats, in lists and dicts too."""
  if isinstance(value, str):
    return _NONFINITE.get(value.lower(), value)
  if isinstance(value, list):
    return [_decode(v) for v in value]
  if isinstance(value, dict):
    return {k: _decode(v) for k, v in value.items()}
  return value


def _encode(value: Any) -> Any:
  """Writes non-finite floats as strings, since strict JSON has no NaN or Infinity."""
  if isinstance(value, float) and not math.isfinite(value):
    return 'nan' if math.isnan(value) else ('inf' if value > 0 else '-inf')
  if isinstance(value, (list, tuple)):
    return [_encode(v) for v in value]
  if isinstance(value, dict):
    return {k: _encode(v) for k, v in value.items()}
  return value


def read_json(path: str) -> dict[str, Any] | None:
  """The decoded JSON object in `path`, or None when the file does not exist."""
  p = epath.Path(path)
  if not p.exists():
    return None
  return _decode(json.loads(p.read_text(encoding='utf-8')))


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Every record of a .jsonl file in file order ([] if absent); skips a torn last line."""
  p = epath.Path(path)
  if not p.exists():
    return []
  out = []
  for n, line in enumerate(p.read_text(encoding='utf-8').splitlines(), 1):
    line = line.strip()
    if not line:
      continue
    try:
      out.append(_decode(json.loads(line)))
    except json.JSONDecodeError:
      # A run killed mid-write leaves half a line; the rest of the file is still good.
      logging.warning('%s:%d is not valid JSON; skipped.', path, n)
  return out


def append_jsonl(path: str, record: Mapping[str, Any]) -> None:
  """Appends one record as a JSON line, non-finite floats as 'nan' / 'inf'."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'a', encoding='utf-8') as f:
    f.write(json.dumps(_encode(dict(record))) + '\n')




def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON through a temporary file, so the file is whole or absent."""
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / (p.name + '.tmp')
  tmp.write_text(json.dumps(_encode(obj), indent=2), encoding='utf-8')
  tmp.replace(p)
