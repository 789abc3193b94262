"""Reading a run directory: config.json, metrics.jsonl, analysis.jsonl and summary.json.

Kept free of JAX so that the table and plotting tools start fast on a login node. Paths go
through etils.epath, so run roots may be local or gs:// (as the trainer's workdirs may be).
"""

import dataclasses
import json
import math
import os
from typing import Any, Iterator, Mapping

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
  """Appends one record as a JSON line (local paths), non-finite floats as 'nan' / 'inf'."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'a', encoding='utf-8') as f:
    f.write(json.dumps(_encode(dict(record))) + '\n')


def last_per_step(records: list[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
  """The records that have `key`, the last one of each step (a resumed run repeats steps)."""
  by_step: dict[int, Mapping[str, Any]] = {}
  for r in records:
    if key in r and 'step' in r:
      by_step[int(r['step'])] = r
  return [by_step[s] for s in sorted(by_step)]


def series(records: list[Mapping[str, Any]], key: str) -> tuple[list[int], list[Any]]:
  """(steps, values) of one metric, the last record of each step, in step order."""
  kept = last_per_step(records, key)
  return [int(r['step']) for r in kept], [r[key] for r in kept]


@dataclasses.dataclass
class RunDir:
  """One run directory as the trainer lays it out."""
  path: str
  config: dict[str, Any]
  summary: dict[str, Any] | None

  @property
  def size_name(self) -> str:
    return str(self.config.get('size_name', '?'))

  @property
  def norm_type(self) -> str:
    return str(self.config.get('model', {}).get('norm_type', '?'))

  @property
  def seed(self) -> int:
    return int(self.config.get('seed', 0))

  @property
  def finished(self) -> bool:
    return self.summary is not None and bool(self.summary.get('finished', True))

  @property
  def label(self) -> str:
    return f'{self.size_name}/{self.norm_type}/seed{self.seed}'

  def metrics(self) -> list[dict[str, Any]]:
    """The records of metrics.jsonl (train and eval)."""
    return read_jsonl(os.path.join(self.path, 'metrics.jsonl'))

  def analysis(self) -> list[dict[str, Any]]:
    """The records of analysis.jsonl, the last of each step."""
    return list(last_per_step(read_jsonl(os.path.join(self.path, 'analysis.jsonl')), 'act_var'))

  @property
  def importance_path(self) -> str:
    """Where `python -m gpas_jax.analysis` (and the study) keep the run's layer importance."""
    return os.path.join(self.path, 'analysis', 'importance.json')

  def last_step(self) -> int | None:
    """The highest step logged in metrics.jsonl, or None before the first log."""
    steps = [int(r['step']) for r in self.metrics() if 'step' in r]
    return max(steps) if steps else None

  def final_eval_ppl(self) -> float | None:
    """The finished run's eval perplexity (exp of eval_loss when only that was written)."""
    if not self.finished:
      return None
    ppl = self.summary.get('eval_ppl')
    if ppl is None and self.summary.get('eval_loss') is not None:
      loss = float(self.summary['eval_loss'])
      ppl = math.exp(loss) if loss < 700 else math.inf
    return None if ppl is None else float(ppl)


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps saved under WORKDIR/checkpoints (Orbax names each step's folder by its number)."""
  ckpt = epath.Path(workdir) / 'checkpoints'
  if not ckpt.is_dir():
    return []
  return sorted(int(c.name) for c in ckpt.iterdir() if c.name.isdigit() and c.is_dir())


def is_run_dir(path: str) -> bool:
  """True for a directory whose config.json is one of our run configs (not an HF config)."""
  try:
    cfg = read_json(os.path.join(path, 'config.json'))
  except (OSError, json.JSONDecodeError, UnicodeDecodeError):
    return False
  return isinstance(cfg, dict) and isinstance(cfg.get('model'), dict) and (
      'norm_type' in cfg['model'])


def load_run(path: str) -> RunDir:
  """Reads a run directory's config.json and summary.json."""
  if not is_run_dir(path):
    raise FileNotFoundError(f'{path} is not a run directory (no config.json with model.norm_type).')
  return RunDir(path=path, config=read_json(os.path.join(path, 'config.json')),
                summary=read_json(os.path.join(path, 'summary.json')))


def find_runs(root: str) -> Iterator[RunDir]:
  """Every run directory under root, at any depth, in sorted path order."""
  path = epath.Path(root)
  if is_run_dir(os.fspath(path)):
    yield load_run(os.fspath(path))
    return  # Checkpoints and exports inside a run are not runs.
  if path.is_dir():
    for child in sorted(path.iterdir(), key=lambda c: c.name):
      if child.is_dir():
        yield from find_runs(os.fspath(child))
