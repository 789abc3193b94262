"""The paper's results table from run directories: `python -m gpas_jax.analysis.table --root DIR`.

Rows are sizes (smallest first); for each architecture base the columns are "X", "X+GPAS" and
"delta" (GPAS mean minus base mean: negative is better), each cell the final eval perplexity as
"mean ± std (n)" over seeds (sample std; "mean (1)" for a single seed). Diverged runs (non-finite
perplexity) are left out of the mean and counted in the cell. Then the missing runs (with
`--sweep`: its norm_type x size x seed product) and the unfinished ones. Runs evaluated by
gpas_jax.evals.harness add a downstream table (each task metric, mean ± std over seeds). Writes
table.md and table.csv (the same layout, numbers in separate _mean/_std/_n columns) into --out.
"""

import collections
import csv
import dataclasses
import json
import io
import math
import re
import statistics
import sys
from typing import Any, Iterable, Mapping, Sequence

from absl import flags
import ml_collections

from gpas_jax import storage
from gpas_jax.analysis import runs as runs_lib
from gpas_jax.runtime import cli
from gpas_jax.runtime import console

# Architecture bases in the paper's order; post has no GPAS twin in the baseline.
BASES = ('pre', 'post', 'post_pre', 'sandwich', 'lns', 'deeppost')
NO_GPAS = ('post',)
# What a table cell holds fixed besides the size: steps, recipe, data and precision. A run whose
# recorded config differs in one of them is another experiment and never joins the mean.
RECIPE_FIELDS = (
    'num_train_steps', 'optim.name', 'optim.lr', 'optim.warmup_steps', 'optim.min_lr_ratio',
    'optim.global_batch_size', 'optim.grad_clip', 'optim.gate_clip', 'optim.loss_chunks',
    'baseline_faithful', 'data.source', 'data.tfds_name', 'data.text_dir', 'data.tokens_path',
    'data.tokenizer', 'data.max_length', 'data.layout', 'model.param_dtype',
    'model.compute_dtype', 'model.num_layers', 'model.hidden_size')


def recipe(config: Mapping[str, Any]) -> dict[str, Any]:
  """The RECIPE_FIELDS of a config (a run's config.json, or a ConfigDict as a dict)."""
  out = {}
  missing = object()
  for key in RECIPE_FIELDS:
    value: Any = config
    for part in key.split('.'):
      value = value.get(part, missing) if isinstance(value, Mapping) else missing
    if value is not missing:  # an older config.json may predate a field: not a difference
      out[key] = list(value) if isinstance(value, tuple) else value
  return out


def recipe_diffs(recorded: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
  """'field recorded (expected X)' for each recipe field where two recipes differ."""
  return [f'{k} {recorded[k]!r} (expected {expected[k]!r})' for k in RECIPE_FIELDS
          if k in recorded and k in expected and recorded[k] != expected[k]]


def size_key(name: str) -> tuple[float, str]:
  """Sort key: 'tiny' first, then by parameter count read from the name ('9m' < '71m' < '1b')."""
  m = re.fullmatch(r'(?:llama_)?(\d+(?:\.\d+)?)([kmbt])', name.lower())
  if m:
    return float(m.group(1)) * {'k': 1e3, 'm': 1e6, 'b': 1e9, 't': 1e12}[m.group(2)], name
  return (0.0 if name == 'tiny' else math.inf), name


@dataclasses.dataclass
class Cell:
  """The perplexities of one (size, norm_type) over seeds."""
  values: list[float] = dataclasses.field(default_factory=list)
  diverged: int = 0

  @property
  def n(self) -> int:
    return len(self.values)

  @property
  def mean(self) -> float | None:
    return statistics.fmean(self.values) if self.values else None

  @property
  def std(self) -> float | None:
    return statistics.stdev(self.values) if len(self.values) > 1 else None

  def text(self) -> str:
    if not self.values:
      out = '—'
    elif self.std is None:
      out = f'{self.mean:.2f} ({self.n})'
    else:
      out = f'{self.mean:.2f} ± {self.std:.2f} ({self.n})'
    return out + (f' [{self.diverged} diverged]' if self.diverged else '')


@dataclasses.dataclass
class Table:
  """Everything the report shows."""
  sizes: list[str]
  bases: list[str]
  cells: dict[tuple[str, str], Cell]
  missing: list[tuple[str, str, int]]
  unfinished: list[tuple[str, str, int, int | None, str]]
  duplicates: list[str]
  mismatched: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)
  reference: str = ''  # what the recipes were checked against
  # (size, norm_type) -> 'task/metric' -> values over seeds (runs.RunDir.downstream)
  downstream: dict[tuple[str, str], dict[str, list[float]]] = dataclasses.field(
      default_factory=dict)

  @property
  def left_out(self) -> set[str]:
    """Paths of the runs left out for another recipe."""
    return {path for path, _ in self.mismatched}

  def cell(self, size: str, norm_type: str) -> Cell:
    return self.cells.get((size, norm_type), Cell())

  def delta(self, size: str, base: str) -> float | None:
    a, b = self.cell(size, base).mean, self.cell(size, f'{base}_gpas').mean
    return None if a is None or b is None else b - a


def _base_of(norm_type: str) -> str:
  return norm_type.removesuffix('_gpas')


def expected_runs(sweep: ml_collections.ConfigDict | None) -> set[tuple[str, str, int]]:
  """(size, norm_type, seed) of every run of a sweep config (empty without one)."""
  if sweep is None:
    return set()
  return {(s, n, int(k)) for s in sweep.sizes for n in sweep.norm_types for k in sweep.seeds}


def _majority_recipes(runs: Iterable[runs_lib.RunDir]) -> dict[str, dict[str, Any]]:
  """Per size, the recipe most of its finished runs share (ties: the first in path order)."""
  counts: dict[str, collections.Counter] = {}
  for run in runs:
    if run.finished:
      key = json.dumps(recipe(run.config), sort_keys=True, default=str)
      counts.setdefault(run.size_name, collections.Counter())[key] += 1
  return {size: json.loads(c.most_common(1)[0][0]) for size, c in counts.items()}


def build_table(runs: Iterable[runs_lib.RunDir],
                expected: set[tuple[str, str, int]] | None = None,
                recipes: Mapping[tuple[str, str, int], Mapping[str, Any]] | None = None) -> Table:
  """Groups runs by (size, norm_type); finished runs fill cells, the rest are listed.

  Each run's recorded recipe (RECIPE_FIELDS) must match `recipes[(size, norm_type, seed)]` (the
  sweep's) or, without one, the recipe most runs of its size share; a run that differs is left
  out of the cells and listed with each differing field.
  """
  expected = expected or set()
  runs = list(runs)
  majority = _majority_recipes(runs) if recipes is None else {}
  chosen: dict[tuple[str, str, int], runs_lib.RunDir] = {}
  duplicates, mismatched = [], []
  for run in runs:
    key = (run.size_name, run.norm_type, run.seed)
    # The recipe first: a run of another recipe is another experiment, never a duplicate.
    want = (recipes or {}).get(key) if recipes is not None else majority.get(key[0])
    diffs = recipe_diffs(recipe(run.config), want) if want is not None else []
    if diffs:
      mismatched.append((run.path, diffs))
    elif key in chosen:
      # Keep a finished run over an unfinished one; otherwise the first in path order.
      keep, drop = chosen[key], run
      if run.finished and not keep.finished:
        keep, drop = run, keep
      chosen[key] = keep
      duplicates.append(f'{drop.path} (same settings and recipe as {keep.path}; ignored)')
    else:
      chosen[key] = run
  cells: dict[tuple[str, str], Cell] = {}
  unfinished = []
  downstream: dict[tuple[str, str], dict[str, list[float]]] = {}
  for (size, norm_type, seed), run in sorted(chosen.items()):
    if not run.finished:
      unfinished.append((size, norm_type, seed, run.last_step(), run.path))
      continue
    for metric, value in run.downstream().items():
      if not metric.endswith('_stderr'):
        downstream.setdefault((size, norm_type), {}).setdefault(metric, []).append(value)
    cell = cells.setdefault((size, norm_type), Cell())
    ppl = run.final_eval_ppl()
    if ppl is None or not math.isfinite(ppl):
      cell.diverged += 1
    else:
      cell.values.append(ppl)
  seen = {(r.size_name, r.norm_type, r.seed) for r in runs}
  keys = seen | expected
  sizes = sorted({k[0] for k in keys}, key=size_key)
  present = {_base_of(k[1]) for k in keys}
  bases = [b for b in BASES if b in present] + sorted(present - set(BASES))
  missing = sorted(expected - seen, key=lambda k: (size_key(k[0]), k[1], k[2]))
  reference = ('the sweep' if recipes is not None else
               'the recipe most runs of the size share')
  return Table(sizes, bases, cells, missing, unfinished, duplicates, mismatched, reference,
               downstream)


def downstream_markdown(table: Table) -> list[str]:
  """The downstream scores (mean ± std (n seeds)) per size and norm type; [] if none."""
  metrics = sorted({m for scores in table.downstream.values() for m in scores})
  if not metrics:
    return []
  lines = ['', 'Downstream tasks (gpas_jax.evals.harness, each run\'s last evaluation): '
           'mean ± std (n seeds).', '', '| size | architecture | ' + ' | '.join(metrics) + ' |',
           '|' + '---|' * (len(metrics) + 2)]
  for size, norm_type in sorted(table.downstream, key=lambda k: (size_key(k[0]), k[1])):
    scores = table.downstream[(size, norm_type)]
    lines.append(f'| {size} | {_header(norm_type)} | ' + ' | '.join(
        _spread(scores.get(m, [])) for m in metrics) + ' |')
  return lines


def _spread(values: list[float]) -> str:
  if not values:
    return '—'
  if len(values) == 1:
    return f'{values[0]:.4g} (1)'
  return f'{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g} ({len(values)})'


def _columns(base: str) -> list[str]:
  return [base] if base in NO_GPAS else [base, f'{base}_gpas']


def _header(norm_type: str) -> str:
  return norm_type.replace('_gpas', '+GPAS')


def to_markdown(table: Table) -> str:
  """The table, then the missing, unfinished and duplicate runs, as Markdown."""
  head = ['size']
  for b in table.bases:
    head += [_header(c) for c in _columns(b)] + ([] if b in NO_GPAS else ['delta'])
  lines = ['Final eval perplexity: mean ± std (n seeds); delta = GPAS minus base (negative is '
           'better).', '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for size in table.sizes:
    row = [size]
    for b in table.bases:
      row += [table.cell(size, c).text() for c in _columns(b)]
      if b not in NO_GPAS:
        d = table.delta(size, b)
        row.append('—' if d is None else f'{d:+.2f}')
    lines.append('| ' + ' | '.join(row) + ' |')
  lines += downstream_markdown(table)
  lines += ['', f'Missing runs ({len(table.missing)}):']
  lines += [f'- {s} / {n} / seed {k}' for s, n, k in table.missing] or ['- none']
  lines += ['', f'Unfinished runs ({len(table.unfinished)}):']
  lines += [f'- {s} / {n} / seed {k}: last step {"none" if st is None else st} ({p})'
            for s, n, k, st, p in table.unfinished] or ['- none']
  if table.mismatched:
    lines += ['', f'Left out: another recipe than {table.reference} ({len(table.mismatched)}):']
    lines += [f'- {p}: {"; ".join(d)}' for p, d in table.mismatched]
  if table.duplicates:
    lines += ['', f'Duplicate runs ({len(table.duplicates)}):']
    lines += [f'- {d}' for d in table.duplicates]
  return '\n'.join(lines) + '\n'


def _num(x: float | None) -> str:
  return '' if x is None else repr(float(x))


def to_csv(table: Table) -> str:
  """The table as CSV: one row per size, <norm_type>_mean/_std/_n and <base>_delta columns."""
  head = ['size']
  for b in table.bases:
    for c in _columns(b):
      head += [f'{c}_mean', f'{c}_std', f'{c}_n', f'{c}_diverged']
    if b not in NO_GPAS:
      head.append(f'{b}_delta')
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(head)
  for size in table.sizes:
    row: list[Any] = [size]
    for b in table.bases:
      for c in _columns(b):
        cell = table.cell(size, c)
        row += [_num(cell.mean), _num(cell.std), cell.n, cell.diverged]
      if b not in NO_GPAS:
        row.append(_num(table.delta(size, b)))
    writer.writerow(row)
  return buf.getvalue()


def sweep_recipes(sweep: ml_collections.ConfigDict, root: str,
                  extra: Sequence[tuple[str, Any]] = ()) -> dict[tuple[str, str, int], dict]:
  """The recipe each run of a sweep trains with, built as the sweep builds its config."""
  from gpas_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import sweep as sweep_lib  # pylint: disable=import-outside-toplevel
  out = {}
  for run in sweep_lib.plan(sweep, root, extra):
    config = config_lib.resolve_paths(sweep_lib.run_config(run))  # as train.py records them
    out[(run.size, run.norm_type, run.seed)] = recipe(json.loads(config.to_json_best_effort()))
  return out


def write_table(root: str, out_dir: str | None = None,
                sweep: ml_collections.ConfigDict | None = None,
                extra: Sequence[tuple[str, Any]] = ()) -> tuple[str, str, Table]:
  """Collects the runs under root and writes table.md and table.csv; returns (md, csv, table).

  With a sweep, each run's recipe is checked against the sweep's (with `extra` overrides).
  """
  recipes = sweep_recipes(sweep, root, extra) if sweep is not None else None
  table = build_table(runs_lib.find_runs(root), expected_runs(sweep), recipes)
  out = out_dir or root
  storage.makedirs(out)
  md, csv_path = storage.join(out, 'table.md'), storage.join(out, 'table.csv')
  storage.write_text(md, to_markdown(table))
  storage.write_text(csv_path, to_csv(table))
  return md, csv_path, table


def define_flags() -> None:
  """Defines this tool's flags (only when run as a program)."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('root', None, 'Folder searched (at any depth) for runs.', required=True)
  flags.DEFINE_string('out', None, 'Where table.md and table.csv go; default --root.')
  config_flags.DEFINE_config_file('sweep', None, 'A sweep config: lists the runs it expects '
                                  'that are missing, and checks each run\'s recipe against it. '
                                  'Give the same --sweep.<field>=v and '
                                  '--sweep.overrides.<field>=v flags the sweep ran with.')


def main(argv: Sequence[str]) -> None:
  console.quiet_logs()
  f = flags.FLAGS
  from gpas_jax.train import sweep as sweep_lib  # pylint: disable=import-outside-toplevel
  if not storage.is_dir(cli.resolve_path(f.root)):
    raise cli.InputNotFound(f'--root={f.root} is not a folder; give the --root the runs were '
                            'trained under.')
  md_path, csv_path, table = write_table(cli.resolve_path(f.root), cli.resolve_path(f.out),
                                         f.sweep, sweep_lib.extra_overrides())
  print(to_markdown(table))
  if table.mismatched:
    console.say(f'{len(table.mismatched)} run(s) left out of the table: their recorded recipe '
                f'is not {table.reference}\'s (listed under "Left out").')
  print(f'Wrote {md_path} and {csv_path}.')


if __name__ == '__main__':
  from gpas_jax.train import sweep as _sweep  # pylint: disable=g-import-not-at-top
  with cli.readable_errors():
    sys.argv = _sweep.take_overrides(sys.argv)  # --sweep.overrides.<field>=v, as the sweep's
  define_flags()
  cli.run(main, file_flags=('sweep',), positional=False)
