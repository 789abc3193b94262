"""Per-layer statistics of the paper's analyses: activation variance, gradient norms, importance.

Shapes: B batch, T sequence, N = B*T tokens, D hidden, L layers, K = L + 1 residual-stream points
(after the embedding and after each layer).
"""

import functools
import re
from typing import Any, Iterable, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gpas_jax.model import gpas as gpas_lib
from gpas_jax.model import transformer as model_lib

Batch = Mapping[str, Any] | np.ndarray | jax.Array


def _unpack(batch: Batch) -> tuple[jax.Array, jax.Array | None]:
  """(input_ids, segment_ids or None) of a batch dict ({'input_ids', 'segment_ids'}) or array."""
  if isinstance(batch, Mapping):
    seg = batch.get('segment_ids')
    return jnp.asarray(batch['input_ids']), None if seg is None else jnp.asarray(seg)
  return jnp.asarray(batch), None


def model_batches(batches: Iterable[Mapping[str, Any]], packed: bool) -> Iterable[dict[str, Any]]:
  """The batches as the train step feeds the model: segment ids only for packed layouts."""
  for b in batches:
    yield {'input_ids': b['input_ids'], 'segment_ids': b['segment_ids']} if packed else {
        'input_ids': b['input_ids']}


def token_mask(input_ids_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None,
               pad_id: int = 0) -> jax.Array:
  """1.0 for real tokens, [B*T]: segment id != 0 when given, else token != pad_id."""
  real_BxT = input_ids_BxT != pad_id if segment_ids_BxT is None else segment_ids_BxT != 0
  return real_BxT.reshape(-1).astype(jnp.float32)


def _masked_variance(hidden_KxNxD: jax.Array, mask_N: jax.Array) -> jax.Array:
  """Per point k: the variance over D of each token's vector, averaged over masked tokens."""
  var_KxN = jnp.var(hidden_KxNxD.astype(jnp.float32), axis=-1)
  return jnp.sum(var_KxN * mask_N, axis=-1) / jnp.maximum(jnp.sum(mask_N), 1.0)


def _layer_grad_norms_tree(grads: Any, cfg: model_lib.ModelConfig) -> jax.Array:
  """L2 norm of each layer's gradients [L], straight from the (scanned or looped) param tree."""
  pure = grads.to_pure_dict() if hasattr(grads, 'to_pure_dict') else grads
  sq = lambda x: jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
  per_stack = []
  for s, (_, _, _, count) in enumerate(model_lib.stack_plan(cfg)):
    layers = pure['stacks'][s]['layers']
    if cfg.scan_layers:  # Every leaf is stacked: axis 0 is the layer within the stack.
      per_stack.append(sum(sq(x) for x in jax.tree.leaves(layers)))
    else:
      per_stack.append(jnp.stack([
          sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(layers[i]))
          for i in range(count)]))
  return jnp.sqrt(jnp.concatenate(per_stack))


def _gates_and_scales(model: model_lib.Transformer) -> tuple[jax.Array | None, jax.Array | None]:
  gates = model_lib.gate_values(model)
  if gates is None:
    return None, None
  return gates, gpas_lib.forward_scale(gates, model.config.gate_act)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _activation_variance_jit(graphdef, state, ids_BxT, seg_BxT, pad_id):
  model = nnx.merge(graphdef, state)
  _, hidden_KxNxD = model(ids_BxT, seg_BxT, return_hidden=True)
  return _masked_variance(hidden_KxNxD, token_mask(ids_BxT, seg_BxT, pad_id))


def activation_variance(model: model_lib.Transformer, input_ids_BxT: Any,
                        segment_ids_BxT: Any = None, pad_id: int = 0) -> np.ndarray:
  """Residual-stream variance [L+1] after the embedding (0) and after each layer (1..L).

  For each token, the (population) variance of its D-dim residual vector; averaged over the real
  tokens (segment id != 0 when given, else token != pad_id). Computed in float32.
  """
  graphdef, state = nnx.split(model)
  seg = None if segment_ids_BxT is None else jnp.asarray(segment_ids_BxT)
  out = _activation_variance_jit(graphdef, state, jnp.asarray(input_ids_BxT), seg, pad_id)
  return np.asarray(jax.device_get(out), np.float64)


def layer_grad_norms(grads_sd: Mapping[str, np.ndarray], num_layers: int) -> np.ndarray:
  """L2 norm of all of layer i's gradients [L], from baseline-named arrays (model.layers.{i}.*)."""
  sq_L = np.zeros(num_layers, np.float64)
  seen_L = np.zeros(num_layers, bool)
  for name, g in grads_sd.items():
    m = re.match(r'model\.layers\.(\d+)\.', name)
    if m is None:
      continue
    i = int(m.group(1))
    if i >= num_layers:
      raise ValueError(f'{name} names layer {i} but num_layers={num_layers}.')
    sq_L[i] += np.sum(np.square(np.asarray(g, np.float64)))
    seen_L[i] = True
  if not seen_L.all():
    raise ValueError(f'no gradients for layers {np.flatnonzero(~seen_L).tolist()}.')
  return np.sqrt(sq_L)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _training_stats_jit(graphdef, state, grads, ids_BxT, seg_BxT, pad_id):
  model = nnx.merge(graphdef, state)
  _, hidden_KxNxD = model(ids_BxT, seg_BxT, return_hidden=True)  # XLA drops the unused head.
  act_var_K = _masked_variance(hidden_KxNxD, token_mask(ids_BxT, seg_BxT, pad_id))
  gates, scales = _gates_and_scales(model)
  return act_var_K, _layer_grad_norms_tree(grads, model.config), gates, scales


def training_stats(model: model_lib.Transformer, grads_params: Any, input_ids_BxT: Any,
                   segment_ids_BxT: Any = None, pad_id: int = 0,
                   step: int | None = None) -> dict[str, Any]:
  """One analysis.jsonl record: act_var [L+1], grad_norm [L], gate and gate_scale (GPAS only).

  grads_params: the gradients as the nnx.State of nnx.Param (or its pure dict), the structure
  of `nnx.split(model, nnx.Param, ...)[1]`. One jitted forward on the given batch; values are
  Python floats (maybe non-finite: write them with storage.append_jsonl). Gates are [L] lists, or
  [L][2] with per-sub-layer gates.
  """
  graphdef, state = nnx.split(model)
  seg = None if segment_ids_BxT is None else jnp.asarray(segment_ids_BxT)
  out = _training_stats_jit(graphdef, state, grads_params, jnp.asarray(input_ids_BxT), seg,
                            pad_id)
  act_var, grad_norm, gates, scales = jax.device_get(out)
  record: dict[str, Any] = {} if step is None else {'step': int(step)}
  record['act_var'] = np.asarray(act_var, np.float64).tolist()
  record['grad_norm'] = np.asarray(grad_norm, np.float64).tolist()
  if gates is not None:
    record['gate'] = np.asarray(gates, np.float64).tolist()
    record['gate_scale'] = np.asarray(scales, np.float64).tolist()
  return record


@functools.partial(jax.jit, static_argnums=(0, 5))
def _loss_jit(graphdef, state, ids_BxT, seg_BxT, keep_L, pad_id):
  logits_BxTxV = nnx.merge(graphdef, state)(ids_BxT, seg_BxT, keep_L=keep_L)
  return model_lib.lm_loss(logits_BxTxV, ids_BxT, seg_BxT, pad_id)


def _batch_losses(model: model_lib.Transformer, batches: Iterable[Batch], pad_id: int,
                  keeps: list[np.ndarray | None]) -> np.ndarray:
  """Mean over batches of per-batch token-mean losses [len(keeps)]; batches with no target skip."""
  graphdef, state = nnx.split(model)
  totals = np.zeros(len(keeps), np.float64)
  n = 0
  for batch in batches:
    ids, seg = _unpack(batch)
    losses = []
    for keep in keeps:
      loss, count = _loss_jit(graphdef, state, ids, seg,
                              None if keep is None else jnp.asarray(keep), pad_id)
      losses.append(loss)
    if float(count) == 0:  # An all-padding batch has no token mean.
      continue
    totals += np.asarray(jax.device_get(losses), np.float64)
    n += 1
  if n == 0:
    raise ValueError('no batch had a counted target token.')
  return totals / n


def eval_loss(model: model_lib.Transformer, batches: Iterable[Batch], pad_id: int = 0) -> float:
  """The eval loss as the trainer reports it: the mean of per-batch token-mean losses."""
  return float(_batch_losses(model, batches, pad_id, [None])[0])


def layer_losses(model: model_lib.Transformer, batches: Iterable[Batch],
                 pad_id: int = 0) -> tuple[float, np.ndarray]:
  """(loss of the whole model, loss with layer i skipped [L]) over the batches, one compile."""
  num_layers = model.config.num_layers
  keeps = [np.ones(num_layers, bool)]
  for i in range(num_layers):
    keep_L = np.ones(num_layers, bool)
    keep_L[i] = False
    keeps.append(keep_L)
  losses = _batch_losses(model, batches, pad_id, keeps)
  return float(losses[0]), losses[1:]


def layer_importance(model: model_lib.Transformer, batches: Iterable[Batch],
                     pad_id: int = 0) -> np.ndarray:
  """The eval-loss increase [L] when layer i alone is skipped (made the identity)."""
  base, skipped_L = layer_losses(model, batches, pad_id)
  return skipped_L - base
