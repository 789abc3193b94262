"""The paper's results table from run directories: `python -m gpas_jax.analysis.table --root DIR`.

Rows are sizes (smallest first); for each architecture base the columns are "X", "X+GPAS" and
"delta" (GPAS mean minus base mean: negative is better), each cell the final eval perplexity as
"mean ± std (n)" over seeds (sample std; "mean (1)" for a single seed). Diverged runs (non-finite
perplexity) are left out of the mean and counted in the cell. Then the missing runs (with
`--sweep`: its norm_type x size x seed product) and the unfinished ones. Writes table.md and
table.csv (the same layout, numbers in separate _mean/_std/_n columns) into --out.
"""

import csv
import dataclasses
import io
import math
import re
import statistics
from typing import Any, Iterable, Sequence

from absl import app
from absl import flags
import ml_collections

from gpas_jax import storage
from gpas_jax.analysis import runs as runs_lib
from gpas_jax.runtime import console

# Architecture bases in the paper's order; post has no GPAS twin in the baseline.
BASES = ('pre', 'post', 'post_pre', 'sandwich', 'lns', 'deeppost')
NO_GPAS = ('post',)


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


def build_table(runs: Iterable[runs_lib.RunDir],
                expected: set[tuple[str, str, int]] | None = None) -> Table:
  """Groups runs by (size, norm_type); finished runs fill cells, the rest are listed."""
  expected = expected or set()
  chosen: dict[tuple[str, str, int], runs_lib.RunDir] = {}
  duplicates = []
  for run in runs:
    key = (run.size_name, run.norm_type, run.seed)
    if key in chosen:
      # Keep a finished run over an unfinished one; otherwise the first in path order.
      keep, drop = chosen[key], run
      if run.finished and not keep.finished:
        keep, drop = run, keep
      chosen[key] = keep
      duplicates.append(f'{drop.path} (same settings as {keep.path}; ignored)')
    else:
      chosen[key] = run
  cells: dict[tuple[str, str], Cell] = {}
  unfinished = []
  for (size, norm_type, seed), run in sorted(chosen.items()):
    if not run.finished:
      unfinished.append((size, norm_type, seed, run.last_step(), run.path))
      continue
    cell = cells.setdefault((size, norm_type), Cell())
    ppl = run.final_eval_ppl()
    if ppl is None or not math.isfinite(ppl):
      cell.diverged += 1
    else:
      cell.values.append(ppl)
  keys = set(chosen) | expected
  sizes = sorted({k[0] for k in keys}, key=size_key)
  present = {_base_of(k[1]) for k in keys}
  bases = [b for b in BASES if b in present] + sorted(present - set(BASES))
  missing = sorted(expected - set(chosen), key=lambda k: (size_key(k[0]), k[1], k[2]))
  return Table(sizes, bases, cells, missing, unfinished, duplicates)


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
  lines += ['', f'Missing runs ({len(table.missing)}):']
  lines += [f'- {s} / {n} / seed {k}' for s, n, k in table.missing] or ['- none']
  lines += ['', f'Unfinished runs ({len(table.unfinished)}):']
  lines += [f'- {s} / {n} / seed {k}: last step {"none" if st is None else st} ({p})'
            for s, n, k, st, p in table.unfinished] or ['- none']
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


def write_table(root: str, out_dir: str | None = None,
                sweep: ml_collections.ConfigDict | None = None) -> tuple[str, str, Table]:
  """Collects the runs under root and writes table.md and table.csv; returns (md, csv, table)."""
  table = build_table(runs_lib.find_runs(root), expected_runs(sweep))
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
                                  'that are missing.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.quiet_logs()
  f = flags.FLAGS
  md_path, csv_path, table = write_table(f.root, f.out, f.sweep)
  print(to_markdown(table))
  print(f'Wrote {md_path} and {csv_path}.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
