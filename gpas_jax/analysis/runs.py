"""Reading a run directory: config.json, metrics.jsonl, analysis.jsonl and summary.json.

Kept free of JAX so that the table and plotting tools start fast on a login node. Paths go
through etils.epath, so run roots may be local or gs:// (as the trainer's workdirs may be).
"""

import dataclasses
import json
import math
import os
from typing import Any, Iterator, Mapping

from etils import epath

from gpas_jax import storage
from gpas_jax.runtime import cli

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
    return storage.read_jsonl(os.path.join(self.path, 'metrics.jsonl'))

  def analysis(self) -> list[dict[str, Any]]:
    """The records of analysis.jsonl, the last of each step."""
    return list(last_per_step(storage.read_jsonl(os.path.join(self.path, 'analysis.jsonl')), 'act_var'))

  @property
  def importance_path(self) -> str:
    """Where `python -m gpas_jax.analysis` (and the study) keep the run's layer importance."""
    return os.path.join(self.path, 'analysis', 'importance.json')

  def downstream(self) -> dict[str, float]:
    """'task/metric' -> value of the run's last harness evaluation (gpas_jax.evals.harness
    writes downstream.json), or {} if it has none."""
    record = storage.read_json(os.path.join(self.path, 'downstream.json'))
    return {k: float(v) for k, v in (record or {}).get('scores', {}).items()}

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
    cfg = storage.read_json(os.path.join(path, 'config.json'))
  except (OSError, json.JSONDecodeError, UnicodeDecodeError):
    return False
  return isinstance(cfg, dict) and isinstance(cfg.get('model'), dict) and (
      'norm_type' in cfg['model'])


def load_run(path: str) -> RunDir:
  """Reads a run directory's config.json and summary.json."""
  if not is_run_dir(path):
    raise cli.InputNotFound(f'{path} is not a run directory (no config.json with '
                            'model.norm_type); give a folder that train.py wrote (its --workdir).')
  return RunDir(path=path, config=storage.read_json(os.path.join(path, 'config.json')),
                summary=storage.read_json(os.path.join(path, 'summary.json')))


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
