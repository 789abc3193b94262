"""Ahead-of-time plan: compile the train step for a mesh without allocating it.

  python -m gpas_jax.perf.aot --config configs/llama_7b.py --mesh 1,64,1 --chip v5p [--remat full]
  python -m gpas_jax.perf.aot --compile_study          # compile time vs depth, scanned vs unscanned
  python -m gpas_jax.perf.aot --topology v5e-256 --config configs/llama_1b.py [--search] [--json]
                                                     # the TPU compiler (tpu_plan.py), docs/TPU.md
  python -m gpas_jax.perf.aot --topology h100:2x8 --config configs/llama_7b.py [--search] [--json]
                                                     # the GPU compiler (gpu_plan.py), docs/GPU.md

The train step of gpas_jax.train.steps is lowered on abstract arrays (`steps.setup(...).abstract_state`
and an abstract batch of `optim.global_batch_size` x `data.max_length` tokens) over a mesh of fake
CPU devices (this command sets `jax_num_cpu_devices` to the mesh size before any backend starts),
compiled, and read back:

- per-device memory: parameters and optimizer state (from the state's shardings), and XLA's
  buffer assignment (`compiled.memory_analysis()`: arguments, outputs, temporaries = activations
  kept for the backward pass at the chosen remat policy plus scratch), with a peak estimate
  arguments + outputs - aliased (donated) + temporaries, against a chip's HBM;
- FLOPs per step and device from XLA's cost analysis, against `metrics.training_flops_per_step`
  (model FLOPs; with remat XLA also counts the recomputed forward, about 4/3 of them, and it
  counts elementwise work the model count leaves out). XLA counts a while loop's body once, so
  for a scanned stack the count is taken on the same step lowered with its layers unrolled.

The CPU backend's buffer assignment is not the TPU's or GPU's: XLA:CPU fuses less, keeps more
fp32 temporaries and has no memory-space assignment or TPU-specific rematerialisation, so the
temporaries reported here are an estimate of the same program on an accelerator, usually on the
high side.
"""

import math
import os
import sys
import time
from typing import Any

import gpas_jax

GIB = 1024.0 ** 3
# HBM per chip in GiB.
HBM_GIB = {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32, 'h100': 80, 'h200': 141, 'a100': 80}


def use_fake_cpu_devices(n: int) -> None:
  """n fake CPU devices; must run before any JAX backend starts."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', n)
  if jax.device_count() != n:
    raise RuntimeError(f'asked for {n} fake CPU devices but JAX has {jax.device_count()}: a '
                       'backend started before use_fake_cpu_devices (run this in a fresh process).')


def parse_mesh(text: str) -> tuple[int, int, int]:
  """'1,64,1' -> (data, fsdp, tensor); a refusal naming the flag otherwise."""
  try:
    parts = [int(p) for p in text.replace('x', ',').split(',') if p.strip()]
  except ValueError:
    parts = []
  if len(parts) != 3 or any(p < 1 for p in parts):
    raise app_usage(f'--mesh={text}: give data,fsdp,tensor as three positive integers, e.g. '
                    '--mesh=1,8,1.')
  return tuple(parts)


def _shard_bytes(tree: Any, shardings: Any) -> float:
  """Bytes one device holds of an abstract tree under its shardings (the largest shard)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  total = 0.0
  for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shape = sh.shard_shape(leaf.shape) if leaf.shape else ()
    total += float(np.prod(shape, dtype=np.float64)) * np.dtype(leaf.dtype).itemsize
  return total


def _cost_flops(stage) -> float | None:
  """The 'flops' of a Lowered or Compiled stage's cost analysis (None where unavailable)."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  return float(cost.get('flops', math.nan))


def plan(config, chip: str | None = None, devices=None, count_flops: bool = True) -> dict[str, Any]:
  """Lowers and compiles config's train step on abstract arrays; returns memory and FLOPs."""
  import jax  # pylint: disable=import-outside-toplevel
  from gpas_jax import sharding  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import metrics  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  s = steps.setup(config, devices)
  b, t = config.optim.global_batch_size, config.data.max_length
  tok = jax.ShapeDtypeStruct((b, t), jax.numpy.int32, sharding=s.batch_sharding)
  batch = {'input_ids': tok, 'segment_ids': tok}
  run = steps.make_train_step(s)
  with sharding.use_mesh(s.mesh, s.rules):
    t1 = time.perf_counter()
    lowered = run.jitted.lower(s.abstract_state, batch)
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
  n = s.mesh.size
  sh = s.state_shardings
  params_b = _shard_bytes(s.abstract_state['params'], sh['params'])
  opt_b = _shard_bytes(s.abstract_state['opt_state'], sh['opt_state'])
  out: dict[str, Any] = {
      'mesh': dict(s.mesh.shape), 'devices': n, 'batch': b, 'seq': t,
      'remat_policy': config.model.remat_policy, 'scan_layers': config.model.scan_layers,
      'param_dtype': config.model.param_dtype, 'compute_dtype': config.model.compute_dtype,
      'micro_batches': config.optim.micro_batches,
      'setup_s': t1 - t0, 'lower_s': t2 - t1, 'compile_s': t3 - t2,
      'params_bytes_per_device': params_b, 'opt_state_bytes_per_device': opt_b,
  }
  from gpas_jax.perf import bench_jax  # pylint: disable=import-outside-toplevel
  mem = bench_jax.memory_analysis(compiled)  # {} where the backend gives none
  if mem:
    out['memory_analysis_bytes'] = mem
  flops = metrics.training_flops_per_step(s.model_config, b, t)
  out['model_flops_per_device'] = flops['total'] / n
  # XLA's cost analysis counts a while loop's body once, so a scanned stack would count one
  # layer: count the FLOPs on the same step lowered with the layers unrolled (lowering only, no
  # compile; the unpartitioned module, divided by the devices).
  out['xla_flops_compiled_per_device'] = _cost_flops(compiled)  # scan body counted once
  if config.model.scan_layers and count_flops:
    c2 = config.copy_and_resolve_references()
    c2.model.scan_layers = False
    s2 = steps.setup(c2, devices)
    with sharding.use_mesh(s2.mesh, s2.rules):
      lowered = steps.make_train_step(s2).jitted.lower(s2.abstract_state, batch)
  xla = _cost_flops(lowered) if count_flops else None
  out['xla_flops_per_device'] = None if xla is None else xla / n
  if xla:
    out['xla_over_model_flops'] = out['xla_flops_per_device'] / out['model_flops_per_device']
  if chip:
    key = chip.lower().replace('tpu_', '').replace('tpu', '')
    if key not in HBM_GIB:
      raise app_usage(f'--chip={chip}: known chips {", ".join(HBM_GIB)}.')
    out['chip'], out['hbm_bytes'] = key, HBM_GIB[key] * GIB
    if 'memory_analysis_bytes' in out:
      out['fits'] = out['memory_analysis_bytes']['peak_estimate'] <= out['hbm_bytes']
  return out


def format_plan(p: dict[str, Any], title: str = '') -> str:
  """Human-readable lines of a plan."""
  mesh = ', '.join(f'{k} {v}' for k, v in p['mesh'].items())
  lines = [f'{title}mesh ({mesh}) = {p["devices"]} devices; batch {p["batch"]} x {p["seq"]} '
           f'(micro-batches {p["micro_batches"]}); remat {p["remat_policy"]}, scan '
           f'{p["scan_layers"]}, {p["param_dtype"]}/{p["compute_dtype"]}',
           f'  lower {p["lower_s"]:.1f} s, compile {p["compile_s"]:.1f} s',
           f'  per device: parameters {p["params_bytes_per_device"] / GIB:.3f} GiB, optimizer state '
           f'{p["opt_state_bytes_per_device"] / GIB:.3f} GiB']
  mem = p.get('memory_analysis_bytes')
  if mem:
    lines.append(f'  XLA memory_analysis per device: arguments {mem["argument"] / GIB:.3f} GiB, '
                 f'outputs {mem["output"] / GIB:.3f} GiB (aliased with arguments '
                 f'{mem["alias"] / GIB:.3f}), temporaries/activations {mem["temp"] / GIB:.3f} GiB, '
                 f'code {mem["generated_code"] / 2**20:.1f} MiB')
    lines.append(f'  peak estimate (arguments + outputs - aliased + temporaries): '
                 f'{mem["peak_estimate"] / GIB:.3f} GiB per device')
  xla = p.get('xla_flops_per_device')
  lines.append(f'  FLOPs per step per device: model (metrics.training_flops_per_step) '
               f'{p["model_flops_per_device"] / 1e12:.3f} TFLOP; XLA cost_analysis '
               + (f'{xla / 1e12:.3f} TFLOP ({p["xla_over_model_flops"]:.2f}x)' if xla else 'n/a'))
  if 'chip' in p:
    if 'fits' in p:
      verdict = 'FITS' if p['fits'] else 'DOES NOT FIT'
      lines.append(f'  {p["chip"]}: {p["hbm_bytes"] / GIB:.0f} GiB HBM per chip -> {verdict} '
                   f'({100 * mem["peak_estimate"] / p["hbm_bytes"]:.0f}% of HBM)')
      if not p['fits']:
        lines.append(FIT_HINT.replace('--search (with --topology)', '--topology T --search'))
  return '\n'.join(lines)


def compile_study(layers_scanned=(12, 24), unscanned: int = 24, hidden: int = 768, ffn: int = 2560,
                  heads: int = 16, vocab: int = 1024, batch: int = 1, seq: int = 256,
                  repeats: int = 2, log=print) -> dict[str, float]:
  """Compile time of the train step (fwd + bwd + Adam) at 250m dims (vocab small): scanned at two
  depths, and scanned vs a Python loop at one depth, on one device.

  Returns {'scan_12': s, 'scan_24': s, 'loop_24': s, ...}: lower + compile seconds, the best of
  `repeats` interleaved rounds (each compile is of a distinct program: no cache hits), and ratios.
  """
  import jax  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, gpas_jax.ROOT)
  from configs import base  # pylint: disable=import-outside-toplevel
  results: dict[str, float] = {}
  runs = [(n, True) for n in layers_scanned] + [(unscanned, False)]
  for r in range(repeats):
    for n, scan in runs:
      c = base.get_config()
      m = c.model
      m.hidden_size, m.intermediate_size, m.num_heads, m.vocab_size = hidden, ffn, heads, vocab
      m.num_layers, m.post_num, m.scan_layers = n, n // 4, scan
      c.optim.global_batch_size, c.data.max_length, c.data.eval_batch_size = batch, seq, batch
      c.mesh.data = 1
      c.optim.lr = 1e-3 * (1 + r)  # a distinct program each round: no compilation-cache hit
      p = plan(c, devices=jax.devices()[:1], count_flops=False)
      key = f'{"scan" if scan else "loop"}_{n}'
      total = p['lower_s'] + p['compile_s']
      results[key] = min(results.get(key, math.inf), total)
      results[key + '_compile_only'] = min(results.get(key + '_compile_only', math.inf),
                                           p['compile_s'])
      log(f'[compile study] {key}: lower {p["lower_s"]:.1f} s + compile {p["compile_s"]:.1f} s')
  a, b = layers_scanned
  results[f'scan_{b}_over_scan_{a}'] = results[f'scan_{b}'] / results[f'scan_{a}']
  if f'scan_{unscanned}' in results:
    results[f'loop_{unscanned}_over_scan_{unscanned}'] = (results[f'loop_{unscanned}']
                                                          / results[f'scan_{unscanned}'])
  return results


def _tpu_main(f, c) -> None:
  """--topology: the TPU compiler (libtpu) or, for GPU nodes (h100:2x8), the GPU compiler
  (gpu_plan) compiles the train and eval steps for them."""
  import json  # pylint: disable=import-outside-toplevel
  from gpas_jax.perf import gpu_plan, tpu_plan, tpu_search, xla_plan  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_platforms', 'cpu')  # the host's own backend: no TPU to attach here
  name = f'{c.get("size_name", "")} {c.model.norm_type}'
  if f.num_slices < 1:
    raise app_usage(f'--num_slices={f.num_slices}: give 1 or more slices.')
  gpu = gpu_plan.is_gpu_topology(f.topology)
  if gpu and f.num_slices != 1:
    raise app_usage(f'--num_slices={f.num_slices} joins TPU slices: give GPU nodes as '
                    '<chip>:<hosts>x<gpus per host>, e.g. h100:4x8.')
  target = gpu_plan.target(f.topology) if gpu else None
  c.mesh.dcn_data = f.num_slices
  if f.mesh:
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = parse_mesh(f.mesh)
  if f.search:
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if f.json else print
    where = f.topology if gpu else f'{f.num_slices} x {f.topology}'
    log(f'{name} on {where}: candidates compiled by the {"GPU" if gpu else "TPU"} compiler '
        '(every figure its estimate)')
    log(tpu_search.HEADER)
    res = tpu_search.search(c, f.topology, f.num_slices, f.max_compiles, log=log, target=target)
    best = res['best']
    if f.json:
      print(json.dumps(best or res['tried'][0] if res['tried'] else {}, default=float))
      return
    if best is None:
      print('no candidate fits: raise micro_batches, use remat full, or a larger slice.')
      return
    print(f'best (estimated {best["estimated_step_s"]:.4f} s/step, MFU '
          f'{100 * best["estimated_mfu"]:.1f}%): {tpu_search.flags(c, best)}')
    return
  r = (xla_plan.compile_steps(c, target) if gpu
       else tpu_plan.compile_steps(c, f.topology, f.num_slices))
  if f.json:
    print(json.dumps(r, default=float))
    return
  print(format_tpu(r, f'{name}: '))


def app_usage(msg: str) -> Exception:
  """A one-line refusal of a command-line value (exit 2)."""
  from gpas_jax.runtime import cli  # pylint: disable=import-outside-toplevel
  return cli.UserError(msg)


# What a plan that does not fit can change (printed under the verdict).
FIT_HINT = ('  to fit: --search (with --topology) compiles meshes, remat and micro-batches and '
            'ranks them; or by hand --remat=full, --config.optim.micro_batches=N, a larger '
            'slice or --mesh with more fsdp')


def _check_topology(f) -> None:
  """--topology as the compiler takes it, before anything compiles; --chip refused beside it."""
  from gpas_jax.perf import gpu_plan, tpu_plan  # pylint: disable=import-outside-toplevel
  if f['chip'].present:
    raise app_usage(f'--chip={f.chip} sets the HBM of the fake-CPU plan; with --topology the '
                    "slice's own chip counts: drop --chip.")
  if gpu_plan.is_gpu_topology(f.topology):
    gpu_plan.resolve_topology(f.topology)  # a one-line UserError naming the form
    return
  try:
    tpu_plan.check_topology(f.topology, max(1, f.num_slices))
  except (ValueError, RuntimeError) as e:
    raise app_usage(str(e)) from None


def format_tpu(r: dict[str, Any], title: str = '') -> str:
  """Human-readable lines of an xla_plan.compile_steps report (TPU or GPU)."""
  mesh = ', '.join(f'{k} {v}' for k, v in r['mesh'].items())
  hbm = r['hbm_bytes_per_chip']
  gpu = r['compiler'] == 'gpu'
  where = (f'XLA:GPU (jax-cuda12-plugin), {r["hosts"]} x {r["gpus_per_host"]} {r["chip"]}'
           if gpu else f'XLA:TPU (libtpu), {r["num_slices"]} x {r["topology"]}')
  lines = [f'{title}compiler: {where} = '
           f'{r["devices"]} chips, mesh ({mesh}); batch {r["batch"]} x {r["seq"]} (micro-batches '
           f'{r["micro_batches"]}); remat {r["remat_policy"]}, scan {r["scan_layers"]}, '
           f'attention {r["attention_impl"]}, {r["param_dtype"]}/{r["compute_dtype"]}',
           f'  train step: compile {r["compile_s"]:.1f} s']
  peak = r['peak_bytes_per_chip']
  verdict = 'FITS' if r['fits'] else f'DOES NOT FIT by {(peak - hbm) / GIB:.2f} GiB'
  limit = (f'{hbm / GIB:.1f} GiB ({r["memory_limit"]}, of {r["hbm_total_bytes_per_chip"] / GIB:.1f}'
           ' GiB)' if gpu else f'{hbm / GIB:.0f} GiB HBM')
  lines.append(f'  per chip (compiler memory_analysis): peak {peak / GIB:.2f} GiB of {limit} '
               f'-> {verdict}')
  if not r['fits'] and 'refusal' in r:
    lines.append(f'  the compiler: {r["refusal"]}')
  if not r['fits']:
    lines.append(FIT_HINT)
  if 'cost' in r:
    cost = r['cost']
    lines.append(f'  per chip (compiler cost_analysis, loop bodies scaled by {r["loop_ratio"]:.1f}'
                 f'): {cost["flops"] / 1e12:.3f} TFLOP ({r["xla_over_model_flops"]:.2f}x the '
                 f'model FLOPs), {cost["bytes accessed"] / GIB:.2f} GiB accessed')
    lines.append(f'  estimated step ({r["step_estimate"]}) {r["estimated_step_s"]:.4f} s: '
                 f'{r["tokens_per_s_per_chip"]:.0f} tokens/s/chip, MFU '
                 f'{100 * r["estimated_mfu"]:.1f}% of {r["peak_flops_per_chip"] / 1e12:.0f} '
                 f'TFLOP/s bf16' + (f'; {r["not_counted"]} not counted' if gpu else ''))
  ev = r.get('eval')
  if ev:
    lines.append(f'  eval step ({ev["rows"]} rows): compile {ev["compile_s"]:.1f} s, '
                 + (f'peak {ev["peak_bytes_per_chip"] / GIB:.2f} GiB, estimated '
                    f'{ev["estimated_s"]:.4f} s' if 'peak_bytes_per_chip' in ev
                    else f'refused: {ev.get("refusal", "")}'))
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  """The command line: --topology (TPU compiler), --search, or the fake-CPU plan."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  if f.compile_study:
    use_fake_cpu_devices(1)
    r = compile_study()
    print(f'compile time (lower + compile, train step, 250m dims, vocab 1024, CPU): scanned 12 '
          f'layers {r["scan_12"]:.1f} s, scanned 24 layers {r["scan_24"]:.1f} s -> '
          f'{r["scan_24_over_scan_12"]:.2f}x (target <= 1.5x); 24 layers unscanned '
          f'{r["loop_24"]:.1f} s -> {r["loop_24_over_scan_24"]:.2f}x the scanned one')
    if f.json:
      print(json.dumps(r))
    return
  c = f.config
  if f.remat:
    c.model.remat_policy = f.remat
  if f.batch:
    c.optim.global_batch_size = f.batch
  from gpas_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  config_lib.resolve(c)
  if f.topology:
    _check_topology(f)
    _tpu_main(f, c)
    return
  if f.search:
    raise app_usage('--search compiles with the TPU compiler: give --topology (e.g. v5e-256).')
  # Default: 64 fake devices, or as many as the config's micro-batch splits over (tiny's 16).
  rows = c.optim.global_batch_size // max(1, c.optim.micro_batches)
  data, fsdp, tensor = parse_mesh(f.mesh or f'1,{math.gcd(rows, 64)},1')
  use_fake_cpu_devices(data * fsdp * tensor)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.dcn_data = data, fsdp, tensor, 1
  p = plan(c, f.chip)
  p['compiler'] = 'cpu'
  p['topology'] = f'{data * fsdp * tensor} fake CPU devices'
  if 'memory_analysis_bytes' in p:
    p['peak_bytes_per_chip'] = p['memory_analysis_bytes']['peak_estimate']
  p['hbm_bytes_per_chip'] = p.get('hbm_bytes')
  p['estimated_step_s'] = p['estimated_mfu'] = None  # XLA:CPU has no TPU step estimate
  if f.json:
    print(json.dumps(p, default=float))
    return
  print('compiler: XLA:CPU on fake devices (install the tpu extra and give --topology for the '
        'TPU compiler)\n' + format_plan(p, f'{c.get("size_name", "")} {c.model.norm_type}: '),
        flush=True)


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from gpas_jax.runtime import cli  # pylint: disable=import-outside-toplevel
  cli.define_config_file('config', os.path.join(gpas_jax.ROOT, 'configs', 'llama_7b.py'),
                         'A config file; override fields with --config.<field>=<value>.')
  flags.DEFINE_string('topology', '', 'A Cloud TPU slice (v5e-256, v5p-128, ...) or topology '
                      '(v5e:16x16): compile with the TPU compiler (needs the tpu extra); or GPU '
                      'nodes <chip>:<hosts>x<gpus per host> (h100:1x8, h200:2x8, a100:1x8): the '
                      'GPU compiler (needs the gpu extra).')
  flags.DEFINE_integer('num_slices', 1, 'Slices of --topology joined over DCN (hybrid mesh).')
  flags.DEFINE_bool('search', False, 'With --topology: compile candidate plans, rank them by the '
                    "compiler's estimated step time, print the best one's --config. flags.")
  flags.DEFINE_integer('max_compiles', 3, '--search: candidates compiled at most.')
  flags.DEFINE_string('mesh', '', 'data,fsdp,tensor (default: 1,64,1 fake CPU devices, fewer '
                      'where the config\'s batch does not split over 64; with --topology the '
                      'config\'s mesh; data counts all slices).')
  flags.DEFINE_string('chip', 'v5p', f'HBM table entry of the fake-CPU plan: {", ".join(HBM_GIB)}.')
  flags.DEFINE_enum('remat', '', ['', 'none', 'full', 'save_dots'],
                    'model.remat_policy (default: the config\'s).')
  flags.DEFINE_integer('batch', 0, 'Global batch in sequences (default: the config\'s).')
  flags.DEFINE_bool('compile_study', False, 'Measure compile time vs depth and scanning instead.')
  flags.DEFINE_bool('json', False, 'Print the report as one JSON object on stdout.')


if __name__ == '__main__':
  from gpas_jax.runtime import cli  # pylint: disable=import-outside-toplevel
  _define_flags()
  cli.run(main)  # config files found anywhere, one-line errors (exit 2), --traceback
