"""The sharded train state, the train and eval steps (jit with explicit shardings, donation)."""

import dataclasses
import itertools
import math
from typing import Any, Callable, Iterator, Mapping

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gpas_jax import config as config_lib
from gpas_jax.model import transformer as model_lib
from gpas_jax import sharding
from gpas_jax.train import checkpoint as ckpt
from gpas_jax.train import optim
from gpas_jax.train import torch_accum

Batch = dict[str, jax.Array]


@dataclasses.dataclass
class Setup:
  """Everything compiled and laid out for one config on one mesh."""
  config: ml_collections.ConfigDict
  model_config: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  rules: tuple
  graphdef: Any
  rest: Any
  tx: optax.GradientTransformation
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: Any


def chunk_layout(config: ml_collections.ConfigDict, mesh_shape: Mapping[str, int]
                 ) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
  """Under grad_accumulation='torch': (G, the data axes that split a group of G chunks, those
  that split each chunk's rows) on a mesh of `mesh_shape` (axis -> size); MeshError, naming
  what would fit, if the mesh splits neither.

  G chunks run their backwards at once (a vmap), the K / G groups one after another:
  optim.chunk_group, or (0) the fewest the mesh can split, which is also the least memory.
  """
  chunks = config.optim.get('loss_chunks', 1)
  rows = config.optim.global_batch_size // chunks
  axes = [a for a in sharding.rule_axes(sharding.rules_from_config(config), 'batch')
          if mesh_shape[a] > 1]
  splits = {g: _chunk_splits(axes, mesh_shape, g, rows)
            for g in range(1, chunks + 1) if chunks % g == 0}
  ok = [g for g, fits in splits.items() if fits]
  group = config.optim.get('chunk_group', 0) or (ok[0] if ok else chunks)
  if group in ok:
    return (group,) + splits[group][0]
  shards = math.prod(mesh_shape[a] for a in axes)
  fix = (f'set optim.chunk_group to one of {ok} (or 0: the fewest that fit)' if ok else
         f'use a mesh whose data axes split the chunks and their {rows} rows, e.g. '
         f'--config.mesh.data={math.gcd(chunks, shards)} '
         f'--config.mesh.fsdp={shards // math.gcd(chunks, shards)}')
  raise sharding.MeshError(
      f"optim.grad_accumulation='torch' runs one backward per chunk of {rows} sequences "
      f'(optim.global_batch_size / optim.loss_chunks={chunks}), {group} chunks at a time '
      f'(optim.chunk_group); mesh data x fsdp = {mesh_shape["data"]} x {mesh_shape["fsdp"]} = '
      f'{shards} devices splits neither those chunks nor their rows evenly: {fix}.')


def _chunk_splits(axes: list, mesh_shape: Mapping[str, int], group: int, rows: int) -> list:
  """Every (chunk axes, row axes) split of `axes` dividing group and rows; fewest chunk shards
  first, so rows stay split over the most devices (one gradient per device where possible)."""
  out = []
  for mask in itertools.product((False, True), repeat=len(axes)):
    c = tuple(a for a, m in zip(axes, mask) if m)
    r = tuple(a for a, m in zip(axes, mask) if not m)
    nc, nr = (math.prod(mesh_shape[a] for a in x) for x in (c, r))
    if group % nc == 0 and rows % nr == 0:
      out.append((nc, c, r))
  return [(c, r) for _, c, r in sorted(out)]


def check_batch_fits_mesh(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """A batch the data axes cannot split is rejected before compiling, with the numbers."""
  if config.optim.grad_accumulation == 'torch':
    chunk_layout(config, mesh.shape)
    return
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  micro = config.optim.global_batch_size // config.optim.micro_batches
  if micro % shards:
    raise sharding.MeshError(
        f'the micro-batch of {micro} sequences (optim.global_batch_size='
        f'{config.optim.global_batch_size} / optim.micro_batches={config.optim.micro_batches}) '
        f'does not split over mesh data x fsdp = {mesh.shape["data"]} x {mesh.shape["fsdp"]} = '
        f'{shards} devices; make it a multiple of {shards}.')


# Attention implementations without a lowering on a platform (cuDNN is NVIDIA's library).
NO_LOWERING = {'tpu': ('cudnn',), 'cpu': ('cudnn',)}


def check_attention_lowers(impl: str, platform: str) -> None:
  """An attention implementation the devices cannot run is refused before compiling."""
  if impl in NO_LOWERING.get(platform, ()):
    ok = [i for i in config_lib.ATTENTION_IMPLS if i not in NO_LOWERING[platform]]
    raise config_lib.ConfigError(f'model.attention_impl={impl!r} has no {platform.upper()} '
                                 f'lowering; use one of {", ".join(ok)}.')


def eval_rows(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
  """Rows of one global eval batch: the fewest whole data.eval_batch_size batches (the baseline's
  per-GPU batch) that split over mesh data x fsdp, lcm(eval_batch_size, shards); the eval step
  returns one token mean per eval_batch_size rows, so eval_loss keeps the baseline's definition
  on any mesh (1b on 256 chips: 8 batches of 32 rows per global batch of 256)."""
  return math.lcm(config.data.eval_batch_size, mesh.shape['data'] * mesh.shape['fsdp'])


def setup(config: ml_collections.ConfigDict, devices: list | None = None) -> Setup:
  """Validates the config, builds the mesh and the abstract, sharded train state."""
  config_lib.validate(config)
  mcfg = model_lib.ModelConfig.from_config(config.model)
  if config.get('debug') and config.debug.get('interleave_hosts'):
    devices = sharding.interleave_hosts(devices)
  mesh = sharding.make_mesh(config.mesh, devices)
  check_batch_fits_mesh(config, mesh)
  check_attention_lowers(mcfg.attention_impl, mesh.devices.flat[0].platform)
  rules = sharding.rules_from_config(config)
  tx = optim.make_optimizer(config)
  create = lambda: model_lib.Transformer(mcfg, nnx.Rngs(params=config.seed))
  with sharding.use_mesh(mesh, rules):
    graphdef, abs_params, abs_rest = nnx.split(nnx.eval_shape(create), nnx.Param, ...)
    param_shardings = sharding.state_shardings(abs_params, mesh).to_pure_dict()
    batch_sharding = sharding.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abs_pure = abs_params.to_pure_dict()
  abs_opt = jax.eval_shape(tx.init, abs_pure)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abs_opt, param_shardings, transform_non_params=lambda _: replicated)
  state_shardings = {'step': replicated, 'params': param_shardings, 'opt_state': opt_shardings}
  abstract = ckpt.abstract_like({'step': jax.ShapeDtypeStruct((), jnp.int32),
                                 'params': abs_pure, 'opt_state': abs_opt}, state_shardings)
  rest = abs_rest
  if jax.tree.leaves(abs_rest):  # fixed gates, LNS constants: computed, never trained
    rest = jax.jit(lambda: nnx.split(create(), nnx.Param, ...)[2])()
  return Setup(config, mcfg, mesh, rules, graphdef, rest, tx, state_shardings, batch_sharding,
               abstract)


def init_state(s: Setup, params: Any = None) -> dict[str, Any]:
  """Initialises the model and optimizer directly into their shardings.

  params: initial parameters (global arrays laid out as the state's, e.g. from init_from) to
  use instead of the seeded initialisation; the optimizer starts fresh either way.
  """
  cfg, seed = s.model_config, s.config.seed
  if params is not None:
    fresh = lambda p: {'step': jnp.zeros((), jnp.int32), 'params': p, 'opt_state': s.tx.init(p)}
    with sharding.use_mesh(s.mesh, s.rules):
      return jax.jit(fresh, in_shardings=(s.state_shardings['params'],),
                     out_shardings=s.state_shardings)(params)

  def init():
    params = nnx.split(model_lib.Transformer(cfg, nnx.Rngs(params=seed)), nnx.Param, ...)[1]
    params = params.to_pure_dict()
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': s.tx.init(params)}

  with sharding.use_mesh(s.mesh, s.rules):
    return jax.jit(init, out_shardings=s.state_shardings)()


def _loss_fn(s: Setup, weighted: bool, eval_chunks: bool = False) -> Callable:
  """(params, batch) -> (loss, counted targets); weighted: batch['weights'] sums the loss;
  eval_chunks: one mean and count per data.eval_batch_size rows ([chunks] each, if several)."""
  packed = s.config.data.layout == 'packed'
  pad_id = s.config.data.pad_id
  loss_dtype = s.config.model.loss_dtype

  def loss_fn(params, batch):
    model = nnx.merge(s.graphdef, params, s.rest)
    seg = batch['segment_ids'] if packed else None  # the baseline's layout: plain causal
    logits = model(batch['input_ids'], seg)
    rows, size = batch['input_ids'].shape[0], s.config.data.eval_batch_size
    chunks = rows // size if eval_chunks and rows % size == 0 else 1
    return model_lib.lm_loss(logits, batch['input_ids'], seg, pad_id,
                             batch['weights'] if weighted else None, loss_dtype, chunks)

  return loss_fn


def _release_gradient(s: Setup, batch: Batch, params: Any, with_chunks: bool = False) -> tuple:
  """(loss, grads, count) as the release forms them: a backward per chunk (torch_accum.py);
  with_chunks adds each chunk's gradient [M, G, ...] (torch_accum.release_gradient)."""
  c = s.config
  chunks, world = c.optim.get('loss_chunks', 1), c.optim.get('ddp_world_size', 1)
  steps = chunks // world
  packed = c.data.layout == 'packed'
  loss_fn = _loss_fn(s, weighted=True)
  group, chunk_axes, row_axes = chunk_layout(c, s.mesh.shape)
  # [M groups, G chunks, b rows]: chunk k = m * G + g, rows [k*b, (k+1)*b) as in the release.
  spec = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(
      None, chunk_axes or None, row_axes or None, None))
  split = lambda x: jax.lax.with_sharding_constraint(
      x.reshape((chunks // group, group, x.shape[0] // chunks) + x.shape[1:]), spec)
  rows = {k: split(v) for k, v in batch.items() if k in ('input_ids', 'segment_ids')}

  def chunk_grad(p, chunk):
    # The release backpropagates its chunk's token mean / accumulation steps.
    seg = chunk['segment_ids'] if packed else None
    mask_BxT = model_lib.target_weights(chunk['input_ids'], seg, c.data.pad_id)
    count = jnp.sum(mask_BxT)
    weights_BxT = mask_BxT / (jnp.float32(steps) * jnp.maximum(count, 1.0))
    grad_fn = jax.value_and_grad(lambda q: loss_fn(q, dict(chunk, weights=weights_BxT))[0])
    loss, grads = grad_fn(p)
    return (loss, count), grads

  def group_grad(p, chunks_G):
    if group == 1:  # one chunk a group: no vmap, its rows over every data axis
      one = chunk_grad(p, jax.tree.map(lambda x: x[0], chunks_G))
      return jax.tree.map(lambda x: x[None], one)
    # A group's chunks run at once; inside, the rows of one chunk are what the data axes left
    # to them split (the rules without the chunk axes, which vmap's spmd_axis_name holds).
    with nn.logical_axis_rules(sharding.without_axes(s.rules, chunk_axes)):
      return jax.vmap(chunk_grad, in_axes=(None, 0),
                      spmd_axis_name=chunk_axes or None)(p, chunks_G)

  return torch_accum.release_gradient(group_grad, params, rows, world, with_chunks)


def make_train_step(s: Setup) -> Callable:
  """The jitted step: accumulate, clip, update; explicit shardings and a donated state."""
  c = s.config
  loss_fn = _loss_fn(s, weighted=True)
  schedule = optim.lr_schedule(c)
  chunks = c.optim.get('loss_chunks', 1)
  packed = c.data.layout == 'packed'
  skip_bad = c.nan_policy == 'skip'
  inject, inject_count = c.debug.inject_nan_step, c.debug.get('inject_nan_count', 1)
  release_grads = c.optim.grad_accumulation == 'torch'

  def step_fn(state, batch):
    params = state['params']
    # The objective (loss_chunks chunk means) as per-token weights of the global batch, so
    # that the micro-batch split and the mesh leave it unchanged.
    seg = batch['segment_ids'] if packed else None
    batch = dict(batch, weights=model_lib.chunk_weights(batch['input_ids'], seg,
                                                        c.data.pad_id, chunks))
    if release_grads:
      loss, grads, count = _release_gradient(s, batch, params)
    else:
      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
      loss, grads, count = optim.accumulate_gradients(
          grad_fn, params, batch, c.optim.micro_batches, aux_reduce='sum', average=False)
    if inject >= 0:  # a test hook: poison one step's loss and gradients
      hit = (state['step'] >= inject) & (state['step'] < inject + inject_count)
      poison = jnp.where(hit, jnp.nan, 1.0).astype(loss.dtype)
      loss = loss * poison
      grads = jax.tree.map(lambda g: g * poison.astype(g.dtype), grads)
    grad_norm = optim.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = s.tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    if skip_bad:
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      new_params, opt_state = keep(new_params, params), keep(opt_state, state['opt_state'])
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state['step']),
               'finite': finite, 'tokens': count}
    return {'step': state['step'] + 1, 'params': new_params, 'opt_state': opt_state}, metrics

  return _jit_in_mesh(s, step_fn, (s.state_shardings, _batch_shardings(s)),
                      (s.state_shardings, _replicated(s)), donate_argnums=(0,))


def make_eval_step(s: Setup) -> Callable:
  """The jitted eval step: (token-mean loss, counted targets) of one batch; of each of its
  data.eval_batch_size-row batches ([chunks] each) for a global batch of several (eval_rows)."""
  return _jit_in_mesh(s, _loss_fn(s, weighted=False, eval_chunks=True),
                      (s.state_shardings['params'], _batch_shardings(s)), _replicated(s))


def make_grad_step(s: Setup) -> Callable:
  """The jitted gradient of one batch's loss (the per-layer analyses use it)."""
  loss_fn = _loss_fn(s, weighted=False)
  return _jit_in_mesh(s, jax.grad(lambda p, b: loss_fn(p, b)[0]),
                      (s.state_shardings['params'], _batch_shardings(s)),
                      s.state_shardings['params'])


def _replicated(s: Setup) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())


def _batch_shardings(s: Setup) -> dict[str, jax.sharding.NamedSharding]:
  return {'input_ids': s.batch_sharding, 'segment_ids': s.batch_sharding}


def _jit_in_mesh(s: Setup, fn: Callable, in_shardings, out_shardings, **kwargs) -> Callable:
  """jax.jit with explicit shardings, called under the mesh and the logical rules."""
  if not s.config.model.excess_precision:
    kwargs['compiler_options'] = {'xla_allow_excess_precision': False}
  jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, **kwargs)

  def run(*args):
    with sharding.use_mesh(s.mesh, s.rules):
      return jitted(*args)

  run.jitted = jitted
  return run


def global_batch(s: Setup, local: dict[str, np.ndarray]) -> Batch:
  """This host's rows -> global arrays: local row i is global row sharding.host_rows()[i].

  The pipelines read exactly those rows (trainer: make_train_iterator(rows=...)), so a global
  row lands where one host would put it, whatever the device order.
  """
  blocks, held = sharding.row_blocks(s.batch_sharding)
  total = len(local['input_ids']) * blocks // held
  rows = sharding.host_rows(s.batch_sharding, total)
  return {k: sharding.global_rows_array(s.batch_sharding, local[k], rows, total)
          for k in ('input_ids', 'segment_ids')}


def evaluate(s: Setup, eval_step: Callable, params: Any, batches: Iterator) -> dict[str, float]:
  """The mean of per-batch token means over the eval budget, and the value the paper reports.

  eval_loss_baseline is the release's `sum of batch means / (batches + 1)` (biased low by one
  batch in n + 1), over batches of data.eval_batch_size rows (the release: its per-GPU batch),
  also where a global eval batch holds several of them (eval_rows: 256 chips, per-GPU 32).
  """
  losses = []
  for local in batches:
    loss, count = eval_step(params, global_batch(s, local))
    # A global batch of several eval_batch_size batches (eval_rows) gives one mean per batch.
    for l, n in zip(np.atleast_1d(np.asarray(loss)), np.atleast_1d(np.asarray(count))):
      if float(n) > 0:
        losses.append(float(l))
  if not losses:
    raise ValueError('the eval split gave no batch with a counted target; check data.eval_*.')
  eval_loss = float(np.mean(losses))
  baseline = float(np.sum(losses)) / (len(losses) + 1)
  return {'eval_loss': eval_loss, 'eval_ppl': math.exp(min(eval_loss, 700.0)),
          'eval_loss_baseline': baseline, 'eval_ppl_baseline': math.exp(min(baseline, 700.0)),
          'eval_batches': len(losses)}
