"""docs/TPU.md's table: every paper size's plan on Cloud TPU slices, from the TPU compiler.

  python -m gpas_jax.perf.tpu_table [--rows priority|default|v5e-256|1b@v5e-8,...] [--out F.jsonl]

Each row is a paper size (configs/llama_<size>.py) at the paper's global batch, pure bf16 and
baseline_faithful, on one slice. 'default' rows compile the config's own plan (mesh over all
chips, its micro_batches: 71m..350m on v5e-8, 1b on v5e-256, 7b on v5p-128) with its eval step;
slice rows run tpu_search.search with first_fit (the analytically cheapest candidate the
compiler accepts; up to 3 compiles). Rows are appended to --out as JSON lines as they finish,
and the markdown table is printed from that file (--markdown FILE.jsonl prints it alone).
"""

import json
import math
import sys
import time
from typing import Any, Callable

import gpas_jax
from gpas_jax import storage

SIZES = ('71m', '130m', '250m', '350m', '1b', '7b')
DEFAULTS = (('71m', 'v5e-8'), ('130m', 'v5e-8'), ('250m', 'v5e-8'), ('350m', 'v5e-8'),
            ('1b', 'v5e-256'), ('7b', 'v5p-128'))
SLICE_ORDER = ('v5e-256', 'v5p-128', 'v5e-8', 'v5e-64', 'v5p-8', 'v5p-32', 'v6e-8', 'v6e-256',
               'v4-32')


def paper_config(size: str):
  """configs/llama_<size>.py in pure bf16 with baseline_faithful (the table's setting)."""
  sys.path.insert(0, gpas_jax.ROOT)
  import importlib  # pylint: disable=import-outside-toplevel
  c = importlib.import_module(f'configs.llama_{size}').get_config()
  c.model.param_dtype = c.model.compute_dtype = 'bfloat16'
  c.baseline_faithful = True
  from gpas_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.resolve(c)


# The rows run first on a busy machine: the closing note's (each size on v5e-256 and v5p-128,
# the defaults' claims), cheapest to compile first within a slice.
PRIORITY = ('1b@v5e-256', 'default:7b@v5p-128', '7b@v5p-128', '71m@v5e-256', '350m@v5e-256',
            '71m@v5p-128', '350m@v5p-128', '7b@v5e-256', '1b@v5p-128', '130m@v5e-256',
            '250m@v5e-256', '130m@v5p-128', '250m@v5p-128', 'default:71m@v5e-8',
            'default:130m@v5e-8', 'default:250m@v5e-8', 'default:350m@v5e-8')


def rows_for(groups: list[str]) -> list[tuple[str, str, str]]:
  """(kind, size, slice) of the groups asked for, in order: 'priority' (PRIORITY), 'default'
  (the configs' own plans), a slice name (every size on it), or [default:]size@slice."""
  out = []
  for g in groups:
    if g == 'priority':
      out += rows_for(list(PRIORITY))
    elif g == 'default':
      out += [('default', size, sl) for size, sl in DEFAULTS]
    elif '@' in g:
      kind, _, spec = g.rpartition(':')
      size, _, sl = spec.partition('@')
      out.append((kind or 'best', size, sl))
    else:
      out += [('best', size, g) for size in SIZES]
  return out


def run_row(kind: str, size: str, slice_name: str) -> dict[str, Any]:
  """Compiles one row; the report with the row's kind, size, slice and wall seconds."""
  from gpas_jax.perf import tpu_plan, tpu_search  # pylint: disable=import-outside-toplevel
  c = paper_config(size)
  t0 = time.perf_counter()
  if kind == 'default':
    r = tpu_plan.compile_steps(c, slice_name)
  else:
    res = tpu_search.search(c, slice_name, max_compiles=3, first_fit=True, with_eval=False,
                            log=lambda line: print(f'  {size} {slice_name}: {line}', flush=True))
    r = res['best'] or (res['tried'][-1] if res['tried'] else {'fits': False})
    r['compiles'] = len(res['tried'])
  if 'mesh' in r:
    r.update(accumulation(c, r))
  r.update(kind=kind, size=size, slice=slice_name, wall_s=time.perf_counter() - t0,
           num_train_steps=c.num_train_steps, tokens_per_step=c.optim.global_batch_size
           * c.data.max_length)
  return r


def accumulation(config, report: dict[str, Any]) -> dict[str, Any]:
  """How a row's gradient is formed: the release's chunks, how many run at once, and where."""
  from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel
  form = config.optim.grad_accumulation
  out = {'grad_accumulation': form, 'loss_chunks': config.optim.loss_chunks}
  if form == 'torch':
    group, chunk_axes, row_axes = steps.chunk_layout(config, report['mesh'])
    out.update(chunk_group=group, chunk_axes=list(chunk_axes), row_axes=list(row_axes))
  return out


def _micro(r: dict[str, Any]) -> str:
  if r.get('grad_accumulation') == 'torch':  # micro_batches has no effect there
    return f'{r["chunk_group"]} of {r["loss_chunks"]} chunks at once'
  return str(r['micro_batches'])


def _attention(r: dict[str, Any], chip: str) -> str:
  return '' if chip == 'chip' else f', {r["attention_impl"]} attention'


def markdown(rows: list[dict[str, Any]], chip: str = 'chip') -> str:
  """The table of finished rows (every figure the compiler's estimate); chip='GPU' for GPU
  rows (their memory limit is the allocator's share of HBM; the remat cell names the
  attention)."""
  gib = 1024.0 ** 3
  of = 'of HBM' if chip == 'chip' else 'of the usable'
  lines = [f'| size | {"slice" if chip == "chip" else "nodes"} | plan | mesh d/f/t | micro | remat '
           f'| peak GiB/{chip} ({of}) | fits | est. step s | tokens/s/{chip} | est. MFU | est. '
           f'wall (paper tokens) | {chip}-hours | compile s |', '|' + '---|' * 14]
  for r in rows:
    if 'mesh' not in r:
      lines.append(f'| {r["size"]} | {r["slice"]} | {r["kind"]} | refused: '
                   f'{r.get("error", "")} |' + ' |' * 10)
      continue
    m, step = r['mesh'], r['estimated_step_s']
    ok = r['fits'] and not math.isnan(step)
    wall = step * r['num_train_steps'] if ok else math.nan
    hours = wall * r['devices'] / 3600 if ok else math.nan
    lines.append(
        f'| {r["size"]} | {r["slice"]} | {r["kind"]} | {m["data"]}/{m["fsdp"]}/{m["tensor"]} | '
        f'{_micro(r)} | {r["remat_policy"]}{_attention(r, chip)} | '
        f'{r["peak_bytes_per_chip"] / gib:.2f} '
        f'({r["hbm_bytes_per_chip"] / gib:.0f}) | {"yes" if r["fits"] else "NO"} | '
        + (f'{step:.3f} | {r["tokens_per_s_per_chip"]:,.0f} | {100 * r["estimated_mfu"]:.1f}% | '
           f'{wall / 3600:.2f} h | {hours:,.1f} |' if ok else ' | | | | |')
        + f' {r["compile_s"]:.0f} |')
  return '\n'.join(lines)


def run_rows(jobs: list[tuple[str, dict[str, Any], Callable[[], dict[str, Any]]]], out: str
             ) -> list[dict[str, Any]]:
  """Each job (label, the row's fields should it fail, its run) in turn: each row appended to
  `out` as it lands (a long table survives a stop), its progress printed; the rows."""
  t0 = time.perf_counter()
  done = []
  for label, fields, run in jobs:
    try:
      r = run()
    except Exception as e:  # pylint: disable=broad-except
      r = {**fields, 'error': str(e).splitlines()[0][:200]}
    print(f'[{time.perf_counter() - t0:.0f} s] {label}: '
          f'{"fits" if r.get("fits") else "does not fit / refused"}', flush=True)
    done.append(r)
    storage.append_jsonl(out, json.loads(json.dumps(r, default=float)))
  return done


def main(argv: list[str]) -> None:
  """Runs the rows asked for, appending each to --out; prints the markdown table."""
  import argparse  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--rows', default='priority',
                 help='comma-separated: priority, default, a slice '
                      f'({", ".join(SLICE_ORDER)}), or [default:]size@slice')
  p.add_argument('--sizes', default=','.join(SIZES))
  p.add_argument('--out', default='tpu_table.jsonl')
  p.add_argument('--markdown', default='', help='print the table of this JSON-lines file only')
  a = p.parse_args(argv)
  if a.markdown:
    print(markdown(storage.read_jsonl(a.markdown)))
    return
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_platforms', 'cpu')
  sizes = set(a.sizes.split(','))
  t0 = time.perf_counter()
  done = run_rows([(f'{kind} {size} {sl}', {'kind': kind, 'size': size, 'slice': sl},
                    lambda kind=kind, size=size, sl=sl: run_row(kind, size, sl))
                   for kind, size, sl in rows_for(a.rows.split(',')) if size in sizes], a.out)
  print(markdown(done))
  print(f'total {time.perf_counter() - t0:.0f} s')


if __name__ == '__main__':
  main(sys.argv[1:])
