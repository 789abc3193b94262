"""The train and eval steps compiled by the XLA:TPU compiler (libtpu) for a Cloud TPU slice.

With libtpu installed, `jax.experimental.topologies.get_topology_desc` gives abstract TPU devices
on any host, CPU-only included; `jit(...).lower(...).compile()` over a mesh of them runs the TPU
compiler, whose `memory_analysis()` (per chip) and `cost_analysis()` (per chip: flops, bytes
accessed, `optimal_seconds`, its roofline estimate of the step) are read back here. Every figure
is the compiler's estimate of a chip it never ran on; the step time is the roofline of its
counted FLOPs and bytes (flops / bf16 peak + bytes accessed / HBM bandwidth): its own
`optimal_seconds` is negative on most programs here, and reported only where positive.

A while loop's body is counted once by the TPU's cost analysis (measured: a scanned stack of 2
or 4 layers reports the same flops; 2 micro-batches half of 1). So the step's cost is corrected:
the optimizer update (outside every loop) is compiled on its own, and the rest, the body of the
micro-batch loop holding the body of the layer scan, is scaled by the analytical ratio of the
full step's model FLOPs to those of what was counted (gpas_jax.train.metrics: lm_head + one
layer of a scanned stack, all layers unscanned; over micro_batches).
"""

import contextlib
import importlib.util
import math
import os
import re
import time
from typing import Any, Iterator

GIB = 1024.0 ** 3

# Cloud TPU accelerator types -> (topology, chip config). v5e/v6e count chips; v4/v5p count
# TensorCores, two per chip, as Google's names do (v5p-128 = 64 chips, 4x4x4).
SLICES = {
    'v5e-8': 'v5e:2x4', 'v5e-64': 'v5e:8x8', 'v5e-256': 'v5e:16x16',
    'v5p-8': 'v5p:2x2x1', 'v5p-32': 'v5p:2x2x4', 'v5p-128': 'v5p:4x4x4',
    'v6e-8': 'v6e:2x4', 'v6e-256': 'v6e:16x16', 'v4-32': 'v4:2x2x4',
}
# HBM per chip (GiB), the metrics.PEAK_FLOPS key and HBM bandwidth (bytes/s) of each generation.
CHIPS = {'v4': (32, 'tpu_v4', 1.2e12), 'v5e': (16, 'tpu_v5e', 8.19e11),
         'v5p': (95, 'tpu_v5p', 2.765e12), 'v6e': (32, 'tpu_v6e', 1.64e12)}
# Two forms: "...in memory space hbm. Used 22.4G of 15.75G..." style (requires X ... exceeds Y)
# and "Ran out of memory on HBM, the total memory required for HLO temporaries (22.74G) exceeds
# available HBM (15.75G)".
OOM = re.compile(r'Ran out of memory (?:in memory space|on) (\w+).*?(?:requires|required)\D*?'
                 r'([\d.]+)([KMGT]?)\b.*?exceeds\D*?([\d.]+)([KMGT]?)', re.S)
_UNIT = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def libtpu_available() -> bool:
  """Whether libtpu (the `tpu` extra) is installed: the TPU compiler can run here."""
  return importlib.util.find_spec('libtpu') is not None


def resolve_topology(name: str) -> tuple[str, str]:
  """'v5e-256' or 'v5e:16x16' -> ('v5e:16x16', 'v5e'); raises ValueError naming the fix."""
  topo = SLICES.get(name.lower(), name.lower())
  gen = topo.split(':')[0]
  if ':' not in topo or gen not in CHIPS:
    raise ValueError(f'--topology {name!r}: give a slice ({", ".join(SLICES)}) or '
                     f'<generation>:<shape> with a generation of {", ".join(CHIPS)}, e.g. v5e:16x16.')
  return topo, gen


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
  """Silences C-level stderr: libtpu's start-up on a host without a TPU prints errors that are
  no error here (no accelerator type, no worker hostnames); exceptions still carry their text."""
  saved = os.dup(2)
  try:
    with open(os.devnull, 'w', encoding='utf-8') as null:
      os.dup2(null.fileno(), 2)
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def tpu_devices(topology: str, num_slices: int = 1) -> list:
  """The abstract devices of num_slices slices of a topology (libtpu's compiler targets them)."""
  if not libtpu_available():
    raise RuntimeError("the TPU compiler needs libtpu: pip install -e '.[tpu]' (the fake-CPU "
                       'plan runs without it: drop --topology).')
  # libtpu locks /tmp/libtpu_lockfile for the one process that may drive the host's TPU; a
  # compile-only process drives none, so several (test workers, a table run) may load it.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  topo, gen = resolve_topology(topology)
  kwargs: dict[str, Any] = {'num_slices': num_slices} if num_slices > 1 else {}
  if gen in ('v4', 'v5p'):
    kwargs['chip_config_name'] = 'megacore'  # one device per chip, as on the TPU VM
  with _quiet_fd2():
    return list(topologies.get_topology_desc(topology_name=topo, platform='tpu', **kwargs).devices)


def check_topology(topology: str, num_slices: int = 1) -> None:
  """Raises ValueError naming the fix where the TPU compiler refuses the topology (v5e:3x3)."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_platforms', 'cpu')  # the host's own backend: no TPU to attach here
  topo, _ = resolve_topology(topology)
  if not libtpu_available():
    return  # tpu_devices names the missing extra
  try:
    tpu_devices(topology, num_slices)
  except Exception as e:  # pylint: disable=broad-except  # the compiler's own refusal
    raise ValueError(f'--topology {topology} ({topo}) is not a shape the TPU compiler knows: '
                     f'{str(e).split(": ", 1)[-1].strip()}. Use a slice name (v5e-8, v5p-128, '
                     '...) or a shape whose sides are multiples of a host\'s chips (v5e:4x4).'
                     ) from None


def hbm_bytes(gen: str) -> float:
  """A chip's HBM in bytes."""
  return CHIPS[gen][0] * GIB


def peak_flops(gen: str) -> float:
  """A chip's dense bf16 peak FLOP/s (metrics.PEAK_FLOPS)."""
  from gpas_jax.train import metrics  # pylint: disable=import-outside-toplevel
  return metrics.PEAK_FLOPS[CHIPS[gen][1]]['bfloat16']


def _cost(stage) -> dict[str, float]:
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {k: float(cost.get(k, 0.0)) for k in ('flops', 'bytes accessed', 'optimal_seconds')}


def _memory(compiled) -> dict[str, float]:
  ma = compiled.memory_analysis()
  mem = {k: float(getattr(ma, f'{k}_size_in_bytes', 0) or 0)
         for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  mem['peak'] = mem['argument'] + mem['output'] - mem['alias'] + mem['temp']
  return mem


def loop_ratio(model_config, micro_batches: int, scanned: bool) -> float:
  """Model FLOPs of the whole step over those the cost analysis counts (loop bodies once)."""
  from gpas_jax.train import metrics  # pylint: disable=import-outside-toplevel
  f = metrics.training_flops_per_step(model_config, 1, 256)
  head = f['lm_head']
  layers = f['total'] - head
  counted = head + (layers / model_config.num_layers if scanned else layers)
  return f['total'] / counted * micro_batches


def sequential_passes(config, mesh) -> int:
  """The backward passes a step runs one after another (a loop the cost analysis counts once):
  micro_batches, or under grad_accumulation='torch' its groups of chunks."""
  from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel
  if config.optim.grad_accumulation == 'torch':
    return config.optim.get('loss_chunks', 1) // steps.chunk_layout(config, mesh.shape)[0]
  return config.optim.micro_batches


def _compile(jitted, *args) -> tuple[Any, float, str]:
  """(compiled or None, seconds, the compiler's refusal or '')."""
  t0 = time.perf_counter()
  try:
    with _quiet_fd2():
      compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0, ''
  except Exception as e:  # pylint: disable=broad-except
    msg = str(e)
    if 'memory' not in msg.lower():
      raise
    return None, time.perf_counter() - t0, msg


def _oom_bytes(msg: str) -> tuple[float, float]:
  """(required, available) bytes of an out-of-memory refusal; nan where not parsed."""
  m = OOM.search(msg)
  if not m:
    return math.nan, math.nan
  return (float(m.group(2)) * _UNIT[m.group(3)], float(m.group(4)) * _UNIT[m.group(5)])


def compile_steps(config, topology: str, num_slices: int = 1, with_eval: bool = True,
                  devices: list | None = None) -> dict[str, Any]:
  """Compiles config's train (and eval) step for a slice with the TPU compiler; the report."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from gpas_jax import sharding  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import metrics  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel

  topo, gen = resolve_topology(topology)
  devices = devices or tpu_devices(topo, num_slices)
  if config.mesh.get('dcn_data', 1) != num_slices:  # several slices: data parallel over DCN
    config = config.copy_and_resolve_references()
    config.mesh.dcn_data = num_slices
  s = steps.setup(config, devices)
  n = len(devices)
  b, t = config.optim.global_batch_size, config.data.max_length
  tok = jax.ShapeDtypeStruct((b, t), jax.numpy.int32, sharding=s.batch_sharding)
  mc = s.model_config
  out: dict[str, Any] = {
      'compiler': 'tpu', 'topology': topo, 'num_slices': num_slices, 'devices': n,
      'mesh': dict(s.mesh.shape), 'batch': b, 'seq': t, 'micro_batches': config.optim.micro_batches,
      'remat_policy': mc.remat_policy, 'scan_layers': mc.scan_layers,
      'attention_impl': mc.attention_impl, 'param_dtype': config.model.param_dtype,
      'compute_dtype': config.model.compute_dtype, 'hbm_bytes_per_chip': hbm_bytes(gen),
      'peak_flops_per_chip': peak_flops(gen),
  }
  with sharding.use_mesh(s.mesh, s.rules):
    train = steps.make_train_step(s).jitted
    compiled, out['compile_s'], refusal = _compile(train, s.abstract_state,
                                                   {'input_ids': tok, 'segment_ids': tok})
    # The optimizer update on its own: outside every loop, so counted right by the compiler.
    upd = jax.jit(lambda g, o, p: optax.apply_updates(p, s.tx.update(g, o, p)[0]),
                  in_shardings=(s.state_shardings['params'], s.state_shardings['opt_state'],
                                s.state_shardings['params']))
    params, opt = s.abstract_state['params'], s.abstract_state['opt_state']
    opt_cost = _cost(upd.lower(params, opt, params).compile())
  model_flops = metrics.training_flops_per_step(mc, b, t)['total'] / n
  out['model_flops_per_chip'] = model_flops
  if compiled is None:
    req, avail = _oom_bytes(refusal)
    out.update(fits=False, peak_bytes_per_chip=req, compiler_hbm_bytes=avail,
               refusal=refusal.strip().splitlines()[0][:300], estimated_step_s=math.nan,
               estimated_mfu=math.nan, tokens_per_s_per_chip=math.nan)
    return out
  mem = _memory(compiled)
  raw = _cost(compiled)
  r = loop_ratio(mc, sequential_passes(config, s.mesh), mc.scan_layers)
  fold, folds = fold_cost(s)
  cost = corrected_cost(raw, opt_cost, fold, r, folds)
  # The step estimate is the roofline of the compiler's (corrected) flops and bytes: its own
  # optimal_seconds is about this sum where it is positive (tiny, v5e: 2.3e-5 s vs 2.1e-5 s),
  # but it comes out negative on most of these programs (-6 s, -13 s: ops it does not model
  # seem to add -1 each), so it is kept in the report only where it is positive.
  cost['roofline_seconds'] = (cost['flops'] / out['peak_flops_per_chip']
                              + cost['bytes accessed'] / CHIPS[gen][2])
  if not (raw['optimal_seconds'] > 0 and opt_cost['optimal_seconds'] > 0):
    cost['optimal_seconds'] = math.nan
  step = cost['roofline_seconds']
  out['step_estimate'] = 'flops/peak + bytes/HBM bandwidth'
  out.update(fits=mem['peak'] <= out['hbm_bytes_per_chip'], peak_bytes_per_chip=mem['peak'],
             memory_bytes=mem, cost_counted=raw, cost_optimizer=opt_cost, loop_ratio=r,
             cost_fold=fold, folds=folds,
             cost=cost, estimated_step_s=step,
             estimated_mfu=model_flops / step / out['peak_flops_per_chip'] if step else math.nan,
             tokens_per_s_per_chip=b * t / step / n if step else math.nan,
             xla_over_model_flops=cost['flops'] / model_flops)
  if with_eval:
    out['eval'] = compile_eval(s, gen)
  return out


def corrected_cost(raw: dict, opt: dict, fold: dict, ratio: float, folds: int) -> dict:
  """The whole step's cost from the compiler's count of it (loop bodies once): the optimizer
  update (outside every loop) once, the chunk fold (in the chunk loops, outside the layer loop)
  once per chunk, the rest (the passes' forward and backward) scaled by loop_ratio."""
  f = {k: fold.get(k, 0.0) if k != 'optimal_seconds' else 0.0 for k in raw}
  return {k: opt[k] + f[k] * folds + max(raw[k] - opt[k] - f[k], 0.0) * ratio for k in raw}


def fold_cost(s) -> tuple[dict, int]:
  """Under grad_accumulation='torch': the compiler's cost of folding one chunk's gradient into
  the accumulators (torch_accum.fold_step, compiled on its own) and the chunks folded; else
  ({}, 0)."""
  import jax  # pylint: disable=import-outside-toplevel
  from gpas_jax import sharding  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import torch_accum  # pylint: disable=import-outside-toplevel
  c = s.config
  if c.optim.grad_accumulation != 'torch':
    return {}, 0
  w = c.optim.get('ddp_world_size', 1)
  grads = s.abstract_state['params']
  shard = s.state_shardings['params']
  fn = jax.jit(lambda acc, red, g, i: torch_accum.fold_step((acc, red), g, i, w),
               in_shardings=(shard, shard if w > 1 else None, shard, None))
  i = jax.ShapeDtypeStruct((), jax.numpy.int32)
  with sharding.use_mesh(s.mesh, s.rules):
    compiled = fn.lower(grads, grads if w > 1 else None, grads, i).compile()
  return _cost(compiled), c.optim.get('loss_chunks', 1)


def compile_eval(s, gen: str) -> dict[str, Any]:
  """Compiles the eval step on its global batch (steps.eval_rows rows); memory, time, cost."""
  import jax  # pylint: disable=import-outside-toplevel
  from gpas_jax import sharding  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel
  rows = steps.eval_rows(s.config, s.mesh)
  tok = jax.ShapeDtypeStruct((rows, s.config.data.max_length), jax.numpy.int32,
                             sharding=s.batch_sharding)
  with sharding.use_mesh(s.mesh, s.rules):
    compiled, secs, refusal = _compile(steps.make_eval_step(s).jitted,
                                       s.abstract_state['params'],
                                       {'input_ids': tok, 'segment_ids': tok})
  if compiled is None:
    return {'rows': rows, 'compile_s': secs, 'fits': False, 'refusal': refusal.splitlines()[0]}
  mem = _memory(compiled)
  cost = _cost(compiled)
  est = cost['flops'] / peak_flops(gen) + cost['bytes accessed'] / CHIPS[gen][2]
  est *= loop_ratio(s.model_config, 1, s.model_config.scan_layers)
  return {'rows': rows, 'compile_s': secs, 'peak_bytes_per_chip': mem['peak'],
          'fits': mem['peak'] <= hbm_bytes(gen), 'estimated_s': est}
