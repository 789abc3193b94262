"""docs/GPU.md's table: every paper size's plan on NVIDIA GPU nodes, from the XLA:GPU compiler.

  python -m gpas_jax.perf.gpu_table [--rows priority|defaults|variants|cudnn|all|
                                            [default:]size@h100:1x8[:f32master|:faithful|:cudnn],...]
                                    [--out F.jsonl]

Each row is a paper size (configs/llama_<size>.py, its own precision: pure bf16) at the paper's
global batch on GPU nodes, searched by tpu_search.search with the GPU compiler's target
(first_fit: the analytically cheapest candidate that fits; up to 3 compiles). ':f32master' keeps
float32 parameters and Adam state with bf16 compute (MaxText's choice); ':faithful' sets
baseline_faithful; ':cudnn' uses cuDNN's fused attention (nvidia-cudnn-cu12 installed; the others
XLA's). Rows are appended to --out as JSON lines as they finish; the markdown table
is printed from that file (--markdown FILE.jsonl prints it alone). 'default:' rows compile the
config's own plan (mesh, micro-batches, remat) with its eval step. Needs the gpu extra.
"""

import sys
import time
from typing import Any

import gpas_jax
from gpas_jax import storage
from gpas_jax.perf import tpu_table

SIZES = tpu_table.SIZES
# The rows run first on a busy machine: each size on one H100 node (smallest first), then 7b
# on 2 and 4 nodes and on an H200 node; the other precision and baseline_faithful after.
PRIORITY = tuple(f'{s}@h100:1x8' for s in SIZES) + (
    '7b@h100:2x8', '7b@h100:4x8', '7b@h200:1x8')
# The configs' own plans (their mesh, micro-batches and remat) with their eval steps: the sizes
# the configs say fit one node of 8 H100.
DEFAULTS = tuple(f'default:{s}@h100:1x8' for s in SIZES if s != '7b')
CUDNN = ('1b@h100:1x8:cudnn', '7b@h100:1x8:cudnn', '71m@h100:1x8:cudnn')
VARIANTS = tuple(f'{s}@h100:1x8:{v}' for v in ('f32master', 'faithful') for s in SIZES) + tuple(
    f'7b@{t}:{v}' for v in ('f32master', 'faithful') for t in ('h100:2x8', 'h100:4x8', 'h200:1x8'))


def rows_for(groups: list[str]) -> list[str]:
  """The row specs of the groups asked for: 'priority', 'defaults', 'variants', 'cudnn', 'all'
  (the four), or [default:]size@chip:HxG[:f32master|:faithful|:cudnn]."""
  named = {'priority': PRIORITY, 'defaults': DEFAULTS, 'variants': VARIANTS, 'cudnn': CUDNN,
           'all': PRIORITY + DEFAULTS + VARIANTS + CUDNN}
  out: list[str] = []
  for g in groups:
    out += list(named.get(g, (g,)))
  return out


def row_config(spec: str):
  """(config, topology) of a row spec."""
  size, _, rest = spec.removeprefix('default:').partition('@')
  parts = rest.split(':')
  topology, flags = ':'.join(parts[:2]), set(parts[2:])
  sys.path.insert(0, gpas_jax.ROOT)
  import importlib  # pylint: disable=import-outside-toplevel
  c = importlib.import_module(f'configs.llama_{size}').get_config()
  if 'f32master' in flags:
    c.model.param_dtype, c.model.compute_dtype = 'float32', 'bfloat16'
  c.baseline_faithful = 'faithful' in flags
  from gpas_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.resolve(c), topology


def run_row(spec: str, first_fit: bool = True) -> dict[str, Any]:
  """One row: the config's own plan compiled ('default:'), or the plan searched with the GPU
  compiler; the report (the best, or the last tried)."""
  from gpas_jax.perf import gpu_plan, tpu_search, xla_plan  # pylint: disable=import-outside-toplevel
  c, topology = row_config(spec)
  target = gpu_plan.target(topology)
  # One attention a row: XLA's, or cuDNN's fused kernel (':cudnn', needs nvidia-cudnn-cu12).
  target.notes['attention_impls'] = ('cudnn',) if spec.endswith(':cudnn') else ('xla',)
  t0 = time.perf_counter()
  if spec.startswith('default:'):
    r = xla_plan.compile_steps(c, target)
  else:
    res = tpu_search.search(c, topology, max_compiles=3, first_fit=first_fit, with_eval=False,
                            log=lambda line: print(f'  {spec}: {line}', flush=True),
                            target=target)
    r = res['best'] or (res['tried'][-1] if res['tried'] else {'fits': False})
    r['compiles'] = len(res['tried'])
  if 'mesh' in r:
    r.update(tpu_table.accumulation(c, r))
  variant = 'default' if spec.startswith('default:') else (spec.split(':')[2:] or ['bf16'])[0]
  r.update(kind={'bf16': 'pure bf16', 'f32master': 'f32 master, bf16 compute',
                 'faithful': 'pure bf16, faithful', 'cudnn': 'pure bf16, cuDNN attention',
                 'default': "the config's own"}[variant],
           size=c.size_name, slice=topology, wall_s=time.perf_counter() - t0,
           num_train_steps=c.num_train_steps,
           tokens_per_step=c.optim.global_batch_size * c.data.max_length)
  return r


def main(argv: list[str]) -> None:
  """Runs the rows asked for, appending each to --out; prints the markdown table."""
  import argparse  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--rows', default='priority', help='comma-separated: priority, defaults, '
                 'variants, cudnn, all, or [default:]size@chip:HxG[:f32master|:faithful|:cudnn]')
  p.add_argument('--out', default='gpu_table.jsonl')
  p.add_argument('--markdown', default='', help='print the table of this JSON-lines file only')
  p.add_argument('--best_of_3', action='store_true',
                 help='compile 3 candidates a row and keep the fastest that fits (default: the '
                      'first that fits)')
  a = p.parse_args(argv)
  if a.markdown:
    print(tpu_table.markdown(storage.read_jsonl(a.markdown), chip='GPU'))
    return
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_platforms', 'cpu')
  t0 = time.perf_counter()

  def run(spec: str) -> dict[str, Any]:
    r = run_row(spec, first_fit=not a.best_of_3)
    if a.best_of_3 and not spec.startswith('default:'):
      r['kind'] += ', best of 3'
    return r

  jobs = []
  for spec in rows_for(a.rows.split(',')):
    size, _, topo = spec.partition('@')
    jobs.append((spec, {'kind': spec, 'size': size, 'slice': topo}, lambda spec=spec: run(spec)))
  done = tpu_table.run_rows(jobs, a.out)
  print(tpu_table.markdown(done, chip='GPU'))
  print(f'total {time.perf_counter() - t0:.0f} s')


if __name__ == '__main__':
  main(sys.argv[1:])
