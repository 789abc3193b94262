"""A plan search for a TPU slice or GPU nodes: the settings a user would choose, ranked by the
compiler (XLA:TPU, or XLA:GPU through gpu_plan.target).

Candidates: the mesh split of a slice (all data, all fsdp, fsdp x tensor 4; under the per-chunk
backward also the release's chunks over data and their rows over fsdp), the remat policy
('none', 'save_dots', 'full'), on GPUs the attention (gpu_plan.ATTENTION) and, for each, the
fewest micro-batches an analytical memory model says fit. They are ordered by an analytical cost
(recompute, micro-batch and tensor overheads) and the first `max_compiles` that the model does
not rule out are compiled (xla_plan.compile_steps); the best is the fitting one with the least estimated step time. The
memory model only orders and prunes: every reported figure is the compiler's.
"""

import math
from typing import Any, Callable

from gpas_jax import sharding
from gpas_jax.perf import tpu_plan
from gpas_jax.perf import xla_plan

REMAT_COST = {'none': 1.0, 'save_dots': 1.12, 'full': 1.36}  # forward recomputed: ~1 + 1/3


def _bytes(dtype: str) -> int:
  return {'float32': 4, 'bfloat16': 2, 'float16': 2, 'float64': 8}[dtype]


def estimate_bytes(config, data: int, fsdp: int, tensor: int, micro: int, remat: str,
                   chunk_grads: float = 0.0) -> float:
  """An analytical per-chip peak (state + activations of one micro-batch, plus `chunk_grads`
  per-chunk gradients held at once, each sharded as the state); for pruning only."""
  m = config.model
  d, f, layers, heads, vocab = (m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads,
                                m.vocab_size)
  t = config.data.max_length
  params = layers * (4 * d * d + 3 * d * f) + 2 * vocab * d
  pb = _bytes(m.param_dtype)
  sb = _bytes(config.optim.state_dtype or m.param_dtype)
  state = params * (2 * pb + 2 * sb) / (fsdp * tensor)  # parameters, gradients, two moments
  cb = _bytes(m.compute_dtype)
  tokens = config.optim.global_batch_size * t / (micro * data * fsdp)
  probs = 6 * heads * t * 5 / 8 / tensor  # attention logits (f32) and probabilities
  full_layer = cb * (12 * d + 5 * f / tensor) + probs
  saved = {'none': full_layer, 'save_dots': cb * (6 * d + 3 * f / tensor) + probs,
           'full': cb * d}[remat]
  logits = 10 * vocab / tensor  # f32 logits, their bf16 copy and gradient
  return (state + chunk_grads * params * cb / (fsdp * tensor)
          + tokens * (layers * saved + full_layer + logits))


def _torch_chunks(config, data: int, fsdp: int, tensor: int) -> tuple[int, float] | None:
  """Under grad_accumulation='torch': (micro-batches equivalent, per-chunk gradients per chip) of
  the mesh's chunk layout (steps.chunk_layout), or None if the mesh cannot split the chunks."""
  from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel
  shape = {'data': data, 'fsdp': fsdp, 'tensor': tensor}
  try:
    group, chunk_axes, _ = steps.chunk_layout(config, shape)
  except sharding.MeshError:
    return None
  shards = math.prod(shape[a] for a in chunk_axes)
  # A chunk on devices of its own holds a whole gradient there, not fsdp's share of one.
  unsharded = fsdp if 'fsdp' in chunk_axes else 1
  return config.optim.loss_chunks // group, group / shards * unsharded


def candidates(config, chips: int, hbm: float,
               attention: tuple[str, ...] = ()) -> list[dict[str, Any]]:
  """Plans for a slice of `chips` (per slice), cheapest first, each {'mesh', 'micro', 'remat',
  'attention', 'score', 'estimate'}; the analytical model's clear misfits (> 1.5 x HBM) left out.
  `attention`: the attention_impl values to try (default: the config's)."""
  b = config.optim.global_batch_size
  slices = config.mesh.get('dcn_data', 1)
  heads = config.model.num_heads
  meshes = [(chips, 1, 1), (1, chips, 1)]
  if chips >= 8 and heads % 4 == 0:
    meshes.append((1, chips // 4, 4))
  torch_form = config.optim.grad_accumulation == 'torch'
  if torch_form:  # chunks over data, their rows over fsdp: the release's GPUs on a slice
    split = math.gcd(config.optim.get('loss_chunks', 1), chips)
    if 1 < split < chips:
      meshes.append((split, chips // split, 1))
  out = []
  for data, fsdp, tensor in meshes:
    if torch_form:  # micro_batches has no effect: the chunk layout sets what runs at once
      layout = _torch_chunks(config, data * slices, fsdp, tensor)
      micros, grads = ([layout[0]], layout[1]) if layout else ([], 0.0)
    else:
      shards = data * slices * fsdp
      micros = [k for k in (1, 2, 4, 8, 16, 32, 64) if b % k == 0 and (b // k) % shards == 0]
      grads = 0.0
    if not micros:
      continue
    for remat in ('none', 'save_dots', 'full'):
      fits = [k for k in micros if estimate_bytes(
          config, data * slices, fsdp, tensor, k, remat, grads) <= 0.9 * hbm]
      k = fits[0] if fits else micros[-1]
      est = estimate_bytes(config, data * slices, fsdp, tensor, k, remat, grads)
      if est > 1.5 * hbm:
        continue
      score = REMAT_COST[remat] * (1 + 0.04 * (k - 1)) * (1.15 if tensor > 1 else 1.0)
      for attn in attention or (config.model.attention_impl,):
        out.append({'mesh': (data * slices, fsdp, tensor), 'micro': 1 if torch_form else k,
                    'remat': remat, 'attention': attn, 'score': score, 'estimate': est})
  # Plans the analytical model says fit come first: a compile of a clear misfit (7b's whole
  # per-chunk gradient on one v5e chip) can take longer than the plan that fits.
  return sorted(out, key=lambda c: (c['estimate'] > 0.9 * hbm, c['score']))


def apply(config, plan: dict[str, Any]):
  """A copy of config with a candidate's settings."""
  c = config.copy_and_resolve_references()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = plan['mesh']
  c.optim.micro_batches = plan['micro']
  c.model.remat_policy = plan['remat']
  c.model.attention_impl = plan.get('attention', c.model.attention_impl)
  return c


def flags(config, report: dict[str, Any]) -> str:
  """The --config. flags that select a compiled plan."""
  m = report['mesh']
  return (f'--config.mesh.data={m["data"]} --config.mesh.fsdp={m["fsdp"]} '
          f'--config.mesh.tensor={m["tensor"]} --config.mesh.dcn_data={report["num_slices"]} '
          f'--config.optim.micro_batches={report["micro_batches"]} '
          f'--config.model.remat_policy={report["remat_policy"]} '
          f'--config.model.attention_impl={report["attention_impl"]}')


def search(config, topology: str, num_slices: int = 1, max_compiles: int = 3,
           log: Callable[[str], None] = print, first_fit: bool = False,
           with_eval: bool = True, target: xla_plan.Target | None = None) -> dict[str, Any]:
  """Compiles up to max_compiles candidates (first_fit: stop at the first that fits) for a TPU
  slice, or for `target` (gpu_plan.target: GPU nodes); {'best': report or None, 'tried': [...]}."""
  target = target or tpu_plan.target(topology, num_slices)
  chips = len(target.devices) // target.num_slices
  base = config.copy_and_resolve_references()
  base.mesh.dcn_data = target.num_slices
  tried = []
  attention = target.notes.get('attention_impls', (base.model.attention_impl,))
  for plan in candidates(base, chips, target.memory_bytes, attention)[:max_compiles]:
    try:
      r = xla_plan.compile_steps(apply(base, plan), target, with_eval=False)
    except (RuntimeError, NotImplementedError) as e:  # e.g. cuDNN attention where JAX refuses it
      log(f'  {plan["mesh"]} {plan["remat"]} {plan["attention"]}: refused: {str(e).splitlines()[0]}')
      continue
    r['analytical_bytes'] = plan['estimate']
    log(format_row(r))
    tried.append(r)
    if first_fit and r['fits']:
      break
  fitting = [r for r in tried if r['fits']]
  best = min(fitting, key=lambda r: r['estimated_step_s']) if fitting else None
  if best is not None and with_eval:  # the chosen plan's eval step too
    from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel
    s = steps.setup(apply(base, {'mesh': tuple(best['mesh'].values()),
                                 'micro': best['micro_batches'], 'remat': best['remat_policy'],
                                 'attention': best['attention_impl']}), target.devices)
    best['eval'] = xla_plan.compile_eval(s, target)
  return {'best': best, 'tried': tried}


HEADER = (f'{"mesh d/f/t":>12} {"micro":>5} {"remat":>9} {"attention":>9} {"peak GiB":>9} '
          f'{"fits":>5} {"step s":>8} {"tok/s/chip":>10} {"MFU":>6} {"compile s":>9}')


def format_row(r: dict[str, Any]) -> str:
  """One table line of a compiled plan (every figure the compiler's estimate)."""
  m = r['mesh']
  mesh = f'{m["data"]}/{m["fsdp"]}/{m["tensor"]}'
  peak = r['peak_bytes_per_chip'] / tpu_plan.GIB
  step = r['estimated_step_s']
  mfu = r['estimated_mfu']
  return (f'{mesh:>12} {r["micro_batches"]:>5} {r["remat_policy"]:>9} '
          f'{r["attention_impl"]:>9} {peak:>9.2f} '
          f'{"yes" if r["fits"] else "NO":>5} {step:>8.4f} {r["tokens_per_s_per_chip"]:>10.0f} '
          f'{"n/a" if math.isnan(mfu) else f"{100 * mfu:.1f}%":>6} {r["compile_s"]:>9.1f}')
