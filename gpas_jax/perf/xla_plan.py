"""One report of a train and eval step compiled by an accelerator's XLA compiler, TPU or GPU.

tpu_plan (libtpu) and gpu_plan (the XLA:GPU compiler of jax-cuda12-plugin) each describe their
target (`Target`: abstract devices, the memory a step may use, the chip's dense bf16 peak and HBM
bandwidth, how the compiler's cost is read); `compile_steps` compiles the steps for it and reads
back what both compilers give: per-device memory (`memory_analysis()`), FLOPs and bytes accessed
(the cost analysis) with one loop correction, a roofline step estimate, tokens/s and MFU. Every
figure is the compiler's estimate of a chip it never ran on.

The loop correction: XLA's cost analysis counts a while loop's body once (measured on both
compilers: a scanned stack of 2 or 4 layers reports the same flops; 2 micro-batches half of 1).
So the step's cost is corrected: the optimizer update (outside every loop) is compiled on its
own, and the rest, the body of the micro-batch loop holding the body of the layer scan, is scaled
by the analytical ratio of the full step's model FLOPs to those of what was counted
(gpas_jax.train.metrics: lm_head + one layer of a scanned stack, all layers unscanned; over the
sequential passes). Under the per-chunk backward the chunk fold is compiled on its own too.
"""

import contextlib
import dataclasses
import math
import os
import re
import time
from typing import Any, Callable, Iterator

GIB = 1024.0 ** 3
# Two forms: "...in memory space hbm. Used 22.4G of 15.75G..." style (requires X ... exceeds Y)
# and "Ran out of memory on HBM, the total memory required for HLO temporaries (22.74G) exceeds
# available HBM (15.75G)".
OOM = re.compile(r'Ran out of memory (?:in memory space|on) (\w+).*?(?:requires|required)\D*?'
                 r'([\d.]+)([KMGT]?)\b.*?exceeds\D*?([\d.]+)([KMGT]?)', re.S)
_UNIT = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
COST_KEYS = ('flops', 'bytes accessed', 'optimal_seconds')


@dataclasses.dataclass
class Target:
  """What a plan is compiled for and how its compiler's figures are read."""
  compiler: str  # 'tpu' | 'gpu'
  topology: str
  num_slices: int
  devices: list
  chip: str  # 'v5e', 'h100', ...
  memory_bytes: float  # per device: what a step may use (the fit's limit)
  peak_flops: float  # per device, dense bf16 (metrics.PEAK_FLOPS)
  hbm_bandwidth: float  # bytes/s
  cost: Callable[[Any], dict[str, float]]  # compiled -> {COST_KEYS}
  notes: dict[str, Any] = dataclasses.field(default_factory=dict)  # copied into the report


@contextlib.contextmanager
def quiet_fd2() -> Iterator[None]:
  """Silences C-level stderr: the compilers' start-up on a host without their chip prints errors
  that are no error here (libtpu: no accelerator type; CUDA: no driver); exceptions still carry
  their text."""
  saved = os.dup(2)
  try:
    with open(os.devnull, 'w', encoding='utf-8') as null:
      os.dup2(null.fileno(), 2)
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def cost_dict(cost) -> dict[str, float]:
  """The COST_KEYS of a cost analysis (a dict, or a list of one)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {k: float((cost or {}).get(k, 0.0)) for k in COST_KEYS}


def memory(compiled) -> dict[str, float]:
  """The compiler's buffer assignment per device, with the peak: arguments + outputs - aliased
  (donated) + temporaries."""
  ma = compiled.memory_analysis()
  mem = {k: float(getattr(ma, f'{k}_size_in_bytes', 0) or 0)
         for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  mem['peak'] = mem['argument'] + mem['output'] - mem['alias'] + mem['temp']
  return mem


def loop_ratio(model_config, passes: int, scanned: bool) -> float:
  """Model FLOPs of the whole step over those the cost analysis counts (loop bodies once)."""
  from gpas_jax.train import metrics  # pylint: disable=import-outside-toplevel
  f = metrics.training_flops_per_step(model_config, 1, 256)
  head = f['lm_head']
  layers = f['total'] - head
  counted = head + (layers / model_config.num_layers if scanned else layers)
  return f['total'] / counted * passes


def sequential_passes(config, mesh) -> int:
  """The backward passes a step runs one after another (a loop the cost analysis counts once):
  micro_batches, or under grad_accumulation='torch' its groups of chunks."""
  from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel
  if config.optim.grad_accumulation == 'torch':
    return config.optim.get('loss_chunks', 1) // steps.chunk_layout(config, mesh.shape)[0]
  return config.optim.micro_batches


def corrected_cost(raw: dict, opt: dict, fold: dict, ratio: float, folds: int) -> dict:
  """The whole step's cost from the compiler's count of it (loop bodies once): the optimizer
  update (outside every loop) once, the chunk fold (in the chunk loops, outside the layer loop)
  once per chunk, the rest (the passes' forward and backward) scaled by loop_ratio."""
  f = {k: fold.get(k, 0.0) if k != 'optimal_seconds' else 0.0 for k in raw}
  return {k: opt[k] + f[k] * folds + max(raw[k] - opt[k] - f[k], 0.0) * ratio for k in raw}


def compile_quietly(jitted, *args) -> tuple[Any, float, str]:
  """(compiled or None, seconds, the compiler's out-of-memory refusal or '')."""
  t0 = time.perf_counter()
  try:
    with quiet_fd2():
      compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0, ''
  except Exception as e:  # pylint: disable=broad-except
    msg = str(e)
    if 'memory' not in msg.lower():
      raise
    return None, time.perf_counter() - t0, msg


def oom_bytes(msg: str) -> tuple[float, float]:
  """(required, available) bytes of an out-of-memory refusal; nan where not parsed."""
  m = OOM.search(msg)
  if not m:
    return math.nan, math.nan
  return (float(m.group(2)) * _UNIT[m.group(3)], float(m.group(4)) * _UNIT[m.group(5)])


def roofline(cost: dict[str, float], target: Target) -> float:
  """flops / bf16 peak + bytes accessed / HBM bandwidth (collectives not counted)."""
  return cost['flops'] / target.peak_flops + cost['bytes accessed'] / target.hbm_bandwidth


def compile_steps(config, target: Target, with_eval: bool = True) -> dict[str, Any]:
  """Compiles config's train (and eval) step for a target; the report (every figure the
  compiler's estimate)."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from gpas_jax import sharding  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import metrics  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel

  if config.mesh.get('dcn_data', 1) != target.num_slices:  # several slices: data over DCN
    config = config.copy_and_resolve_references()
    config.mesh.dcn_data = target.num_slices
  s = steps.setup(config, target.devices)
  n = len(target.devices)
  b, t = config.optim.global_batch_size, config.data.max_length
  tok = jax.ShapeDtypeStruct((b, t), jax.numpy.int32, sharding=s.batch_sharding)
  mc = s.model_config
  out: dict[str, Any] = {
      'compiler': target.compiler, 'topology': target.topology, 'chip': target.chip,
      'num_slices': target.num_slices, 'devices': n,
      'mesh': dict(s.mesh.shape), 'batch': b, 'seq': t, 'micro_batches': config.optim.micro_batches,
      'remat_policy': mc.remat_policy, 'scan_layers': mc.scan_layers,
      'attention_impl': mc.attention_impl, 'param_dtype': config.model.param_dtype,
      'compute_dtype': config.model.compute_dtype, 'hbm_bytes_per_chip': target.memory_bytes,
      'peak_flops_per_chip': target.peak_flops, **target.notes,
  }
  with sharding.use_mesh(s.mesh, s.rules):
    train = steps.make_train_step(s).jitted
    compiled, out['compile_s'], refusal = compile_quietly(train, s.abstract_state,
                                                          {'input_ids': tok, 'segment_ids': tok})
    # The optimizer update on its own: outside every loop, so counted right by the compiler.
    upd = jax.jit(lambda g, o, p: optax.apply_updates(p, s.tx.update(g, o, p)[0]),
                  in_shardings=(s.state_shardings['params'], s.state_shardings['opt_state'],
                                s.state_shardings['params']))
    params, opt = s.abstract_state['params'], s.abstract_state['opt_state']
    with quiet_fd2():
      opt_cost = target.cost(upd.lower(params, opt, params).compile())
  model_flops = metrics.training_flops_per_step(mc, b, t)['total'] / n
  out['model_flops_per_chip'] = model_flops
  if compiled is None:
    req, avail = oom_bytes(refusal)
    out.update(fits=False, peak_bytes_per_chip=req, compiler_hbm_bytes=avail,
               refusal=refusal.strip().splitlines()[0][:300], estimated_step_s=math.nan,
               estimated_mfu=math.nan, tokens_per_s_per_chip=math.nan)
    return out
  mem = memory(compiled)
  raw = target.cost(compiled)
  r = loop_ratio(mc, sequential_passes(config, s.mesh), mc.scan_layers)
  fold, folds = fold_cost(s, target)
  cost = corrected_cost(raw, opt_cost, fold, r, folds)
  # The step estimate is the roofline of the compiler's (corrected) flops and bytes: the TPU's
  # own optimal_seconds is about this sum where it is positive (tiny, v5e: 2.3e-5 s vs 2.1e-5 s),
  # but it comes out negative on most of these programs (-6 s, -13 s: ops it does not model
  # seem to add -1 each), so it is kept in the report only where it is positive.
  cost['roofline_seconds'] = roofline(cost, target)
  if not (raw['optimal_seconds'] > 0 and opt_cost['optimal_seconds'] > 0):
    cost['optimal_seconds'] = math.nan
  step = cost['roofline_seconds']
  out['step_estimate'] = 'flops/peak + bytes/HBM bandwidth'
  out.update(fits=mem['peak'] <= target.memory_bytes, peak_bytes_per_chip=mem['peak'],
             memory_bytes=mem, cost_counted=raw, cost_optimizer=opt_cost, loop_ratio=r,
             cost_fold=fold, folds=folds,
             cost=cost, estimated_step_s=step,
             estimated_mfu=model_flops / step / target.peak_flops if step else math.nan,
             tokens_per_s_per_chip=b * t / step / n if step else math.nan,
             xla_over_model_flops=cost['flops'] / model_flops)
  if with_eval:
    out['eval'] = compile_eval(s, target)
  return out


def fold_cost(s, target: Target) -> tuple[dict, int]:
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
  with sharding.use_mesh(s.mesh, s.rules), quiet_fd2():
    compiled = fn.lower(grads, grads if w > 1 else None, grads, i).compile()
  return target.cost(compiled), c.optim.get('loss_chunks', 1)


def compile_eval(s, target: Target) -> dict[str, Any]:
  """Compiles the eval step on its global batch (steps.eval_rows rows); memory, time, cost."""
  import jax  # pylint: disable=import-outside-toplevel
  from gpas_jax import sharding  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel
  rows = steps.eval_rows(s.config, s.mesh)
  tok = jax.ShapeDtypeStruct((rows, s.config.data.max_length), jax.numpy.int32,
                             sharding=s.batch_sharding)
  with sharding.use_mesh(s.mesh, s.rules):
    compiled, secs, refusal = compile_quietly(steps.make_eval_step(s).jitted,
                                              s.abstract_state['params'],
                                              {'input_ids': tok, 'segment_ids': tok})
  if compiled is None:
    return {'rows': rows, 'compile_s': secs, 'fits': False, 'refusal': refusal.splitlines()[0]}
  mem = memory(compiled)
  est = roofline(target.cost(compiled), target)
  est *= loop_ratio(s.model_config, 1, s.model_config.scan_layers)
  return {'rows': rows, 'compile_s': secs, 'peak_bytes_per_chip': mem['peak'],
          'fits': mem['peak'] <= target.memory_bytes, 'estimated_s': est}
