"""baseline_faithful end to end: train.py's path (init_from + tokens) against the PyTorch port."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.torch import save_file
import torch

from gpas_jax.baseline import compare
from gpas_jax.baseline import torch_model
from gpas_jax.baseline import torch_train
from gpas_jax.data import DataError
from gpas_jax.data import tokens as tokens_lib
from gpas_jax.train import init_from
from gpas_jax.train import steps
from gpas_jax.train import trainer
from tests.helpers import tiny_train_config

torch.set_num_threads(1)
V, D, F, L, H, T, B, K, N = 96, 32, 56, 3, 4, 16, 8, 2, 50
RECIPE = dict(lr=3e-3, warmup_steps=5, grad_clip=0.3, gate_clip=2e-4)


def _rows(n, seed=0):
  """Token rows as the baseline's loader yields them: documents right-padded with 0."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, V, size=(n, T))
  lengths = rng.integers(2, T + 1, size=n)
  ids[np.arange(T)[None, :] >= lengths[:, None]] = 0
  return ids.astype(np.int32)


def _config(tmp_path, norm_type, **overrides):
  values = {
      'model.vocab_size': V, 'model.hidden_size': D, 'model.intermediate_size': F,
      'model.num_layers': L, 'model.num_heads': H, 'model.norm_type': norm_type,
      'model.post_num': 1, 'model.scan_layers': True, 'optim.global_batch_size': B,
      'optim.loss_chunks': K, 'optim.lr': RECIPE['lr'],
      'optim.warmup_steps': RECIPE['warmup_steps'], 'optim.grad_clip': RECIPE['grad_clip'],
      'optim.gate_clip': RECIPE['gate_clip'], 'data.max_length': T, 'data.source': 'tokens',
      'data.tokens_path': str(tmp_path / 'rows.npy'), 'baseline_faithful': True,
      'checkpoint_every_steps': 1000, 'eval_every_steps': 1000}
  values.update(overrides)
  return tiny_train_config(num_train_steps=N, **values)


def _torch_init(tmp_path, norm_type, seed=4):
  ref = torch_model.RefModel(torch_model.RefConfig(V, D, F, L, H, norm_type, post_num=1), seed=seed)
  path = str(tmp_path / 'init.safetensors')
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
  return ref, path


@pytest.mark.parametrize('norm_type', ['pre_gpas', 'sandwich_gpas'])
def test_float32_trajectory_matches_pytorch_with_both_clips_and_two_chunks(tmp_path, norm_type):
  rows = _rows((N + 1) * B)
  np.save(tmp_path / 'rows.npy', rows)
  ref, init = _torch_init(tmp_path, norm_type)
  history = []
  torch_train.ref_train(ref, [torch.from_numpy(rows[u * B:(u + 1) * B].astype(np.int64))
                              for u in range(N + 1)],
                              num_steps=N, micro_batches=K, baseline_last_step=True, history=history,
                              **RECIPE)
  # Both clips engage on most updates (the gate clip after the global one).
  assert sum(h['grad_norm'] > RECIPE['grad_clip'] for h in history) > N // 2
  assert sum(h['gate_norm'] > RECIPE['gate_clip'] for h in history) > N // 2

  # micro_batches=4 (a memory knob) and both chunks' backwards at once (chunk_group=2, not one
  # after the other) must not change the 2-chunk objective.
  c = _config(tmp_path, norm_type, **{'init_from': init, 'optim.micro_batches': 4,
                                      'optim.chunk_group': 2})
  result = trainer.train(c, str(tmp_path / 'run'), jax.devices()[:1])
  assert result['step'] == N + 1 and result['finished']  # N + 1 updates, as the baseline
  ours = compare.read_history(str(tmp_path / 'run'))
  assert len(ours) == N + 1
  np.testing.assert_allclose([h['loss'] for h in ours], [h['loss'] for h in history],
                             rtol=0, atol=1e-5)
  gates_ours = np.array([h['gates'] for h in ours])
  gates_torch = np.array([h['gates'] for h in history])
  assert gates_ours.shape == (N + 1, L) and np.abs(gates_torch[-1]).min() > 1e-3
  np.testing.assert_allclose(gates_ours, gates_torch, rtol=0, atol=1e-5)
  print(f'{norm_type}: max |loss diff| '
        f'{max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, history)):.2e}, '
        f'max |gate diff| {np.abs(gates_ours - gates_torch).max():.2e}')
  np.testing.assert_allclose([h['grad_norm'] for h in ours], [h['grad_norm'] for h in history],
                             rtol=1e-4)
  # The last update ran at 1e-7 * peak: the baseline's end quirk.
  last = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')][-1]
  assert last['step'] == N + 1 and last['lr'] == pytest.approx(1e-7 * RECIPE['lr'])
  summary = json.load(open(tmp_path / 'run' / 'summary.json'))
  assert summary['eval_loss'] is None  # no eval_tokens_path: eval skipped


def test_chunks_are_contiguous_rows_and_independent_of_micro_batches_and_mesh(tmp_path):
  """The objective is the mean of K chunk token means, chunk k = rows [k*b, (k+1)*b)."""
  rows = _rows(B, seed=3)
  rows[:B // 2, T // 2:] = 0  # chunk 0 holds far fewer targets than chunk 1: order matters
  np.save(tmp_path / 'rows.npy', rows)
  batch = {'input_ids': rows, 'segment_ids': (rows != 0).astype(np.int32)}
  losses = []
  for micro, mesh in ((1, 1), (2, 1), (4, 2)):
    c = _config(tmp_path, 'pre_gpas', **{'optim.micro_batches': micro, 'mesh.data': mesh,
                                         'optim.warmup_steps': 0})
    s = steps.setup(c, jax.devices()[:mesh])
    state = steps.init_state(s)
    _, m = steps.make_train_step(s)(state, steps.global_batch(s, batch))
    losses.append(float(m['loss']))
  # Independent: each chunk's token mean from the eval step (one token mean per batch).
  s1 = steps.setup(_config(tmp_path, 'pre_gpas', **{'data.eval_batch_size': B // K}),
                   jax.devices()[:1])
  eval1 = steps.make_eval_step(s1)
  params1 = steps.init_state(s1)['params']
  chunk_means = [float(eval1(params1, steps.global_batch(
      s1, {k: v[i * B // K:(i + 1) * B // K] for k, v in batch.items()}))[0]) for i in range(K)]
  np.testing.assert_allclose(losses, np.mean(chunk_means), rtol=2e-6)
  strided = [float(eval1(params1, steps.global_batch(
      s1, {k: v[i::K] for k, v in batch.items()}))[0]) for i in range(K)]
  # Strided chunks (rows k::K) give another objective, 20x further off than the tolerance.
  assert abs(np.mean(strided) - np.mean(chunk_means)) > 20 * 2e-6 * np.mean(chunk_means)


def test_eval_loss_baseline_is_sum_of_batch_means_over_n_plus_one(tmp_path):
  c = _config(tmp_path, 'pre', **{'data.eval_batch_size': 4})
  s = steps.setup(c, jax.devices()[:1])
  batches = [{'input_ids': np.full((4, T), v, np.int32),
              'segment_ids': np.ones((4, T), np.int32)} for v in (3, 5, 10)]
  batches.append({'input_ids': np.zeros((4, T), np.int32),  # no counted target: left out
                  'segment_ids': np.zeros((4, T), np.int32)})

  def stub(params, batch):
    ids = np.asarray(batch['input_ids'])
    return float(ids[0, 0]) / 2, float(np.count_nonzero(ids))

  r = steps.evaluate(s, stub, None, iter(batches))
  assert r['eval_batches'] == 3
  assert r['eval_loss'] == pytest.approx((1.5 + 2.5 + 5.0) / 3)
  assert r['eval_loss_baseline'] == pytest.approx((1.5 + 2.5 + 5.0) / 4)
  assert r['eval_ppl_baseline'] == pytest.approx(np.exp(9.0 / 4))


def test_tokens_source_resumes_exactly_and_splits_hosts_contiguously(tmp_path):
  rows = _rows(5 * B, seed=1)
  np.save(tmp_path / 'rows.npy', rows)
  c = _config(tmp_path, 'pre')
  from gpas_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  it = data_lib.make_train_iterator(c, 0, 1)
  first = [next(it) for _ in range(3)]
  for u, b in enumerate(first):  # update u trains on rows [u*B, (u+1)*B), in file order
    np.testing.assert_array_equal(b['input_ids'], rows[u * B:(u + 1) * B])
    np.testing.assert_array_equal(b['segment_ids'], rows[u * B:(u + 1) * B] != 0)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  rest = [next(it) for _ in range(4)]  # past the end: the rows start again
  np.testing.assert_array_equal(rest[2]['input_ids'], rows[:B])
  resumed = data_lib.make_train_iterator(c, 0, 1)
  resumed.set_state(state)
  for a, b in zip(rest, [next(resumed) for _ in range(4)]):
    np.testing.assert_array_equal(a['input_ids'], b['input_ids'])
  # Two hosts resume the same state; host h holds rows [h*B/2, (h+1)*B/2) of each batch.
  for h in range(2):
    host = data_lib.make_train_iterator(c, h, 2)
    host.set_state(state)
    np.testing.assert_array_equal(next(host)['input_ids'],
                                  rows[3 * B + h * B // 2:3 * B + (h + 1) * B // 2])


def test_packed_stream_segments_at_eos(tmp_path):
  stream = np.array([5, 6, 1, 7, 8, 9, 1, 4, 3, 1, 2, 2], np.uint16)
  stream.tofile(tmp_path / 'stream.bin')
  c = _config(tmp_path, 'pre', **{'data.layout': 'packed', 'data.max_length': 6,
                                   'data.tokens_path': str(tmp_path / 'stream.bin'),
                                   'optim.global_batch_size': 2, 'optim.loss_chunks': 1})
  rows = tokens_lib.load_rows(c.data.tokens_path, c, 'data.tokens_path')
  b = tokens_lib.row_batch(rows, 'packed', 0, 1)
  np.testing.assert_array_equal(b['input_ids'], stream.reshape(2, 6))
  np.testing.assert_array_equal(b['segment_ids'], [[1, 1, 1, 2, 2, 2], [1, 2, 2, 2, 3, 3]])


@pytest.mark.parametrize('bad, message', [
    ('vocab', 'outside 0..model.vocab_size-1=95'),
    ('length', 'rows of 17 tokens but data.max_length=16'),
    ('float', 'must be an integer array'),
    ('bin_padded', "needs data.layout='packed'"),
])
def test_bad_token_files_are_refused_before_training(tmp_path, bad, message):
  rows = _rows(4 * B)
  path = tmp_path / 'rows.npy'
  if bad == 'vocab':
    rows[13, 2] = V
  if bad == 'length':
    rows = np.pad(rows, ((0, 0), (0, 1)))
  if bad == 'float':
    rows = rows.astype(np.float32)
  if bad == 'bin_padded':
    path = tmp_path / 'rows.bin'
    rows.astype(np.uint16).tofile(path)
  else:
    np.save(path, rows)
  c = _config(tmp_path, 'pre', **{'data.tokens_path': str(path)})
  with pytest.raises(DataError, match=message.replace('(', r'\(').replace('.', r'\.')):
    trainer.train(c, str(tmp_path / 'run'), jax.devices()[:1])
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')
  if bad == 'vocab':
    with pytest.raises(DataError, match='row 13 '):
      tokens_lib.load_rows(str(path), c, 'data.tokens_path')


def test_init_from_errors_name_the_tensor_and_shapes(tmp_path):
  np.save(tmp_path / 'rows.npy', _rows(2 * B))
  _, init = _torch_init(tmp_path, 'pre_gpas')
  wide = _config(tmp_path, 'pre_gpas', **{'init_from': init, 'model.intermediate_size': F + 8})
  with pytest.raises(init_from.InitFromError,
                     match=r'model\.layers\.0\.mlp\.gate_proj\.weight: got \(56, 32\), '
                           r'expected \(64, 32\)'):
    trainer.train(wide, str(tmp_path / 'a'), jax.devices()[:1])
  other = _config(tmp_path, 'sandwich_gpas', **{'init_from': init})
  with pytest.raises(init_from.InitFromError, match='pre_feedforward_layernorm'):
    trainer.train(other, str(tmp_path / 'b'), jax.devices()[:1])
  missing = _config(tmp_path, 'pre_gpas', **{'init_from': str(tmp_path / 'nope.bin')})
  with pytest.raises(init_from.InitFromError, match='does not exist'):
    trainer.train(missing, str(tmp_path / 'c'), jax.devices()[:1])
  for d in ('a', 'b', 'c'):  # refused before any step or checkpoint
    assert not os.path.exists(tmp_path / d / 'metrics.jsonl')


def test_init_from_loads_weights_then_resume_keeps_its_own(tmp_path):
  np.save(tmp_path / 'rows.npy', _rows(4 * B))
  ref, init = _torch_init(tmp_path, 'pre_gpas')
  c = _config(tmp_path, 'pre_gpas', **{'init_from': init, 'optim.lr': 0.0,
                                       'checkpoint_every_steps': 1, 'optim.warmup_steps': 0})
  c.num_train_steps = 2
  c.baseline_faithful = False
  result = trainer.train(c, str(tmp_path / 'run'), jax.devices()[:1])
  np.testing.assert_array_equal(np.asarray(result['state']['params']['lm_head']),
                                ref.lm_head.weight.detach().numpy())
  # A resume continues from its own checkpoint and never reads init_from again.
  c.init_from = str(tmp_path / 'gone.safetensors')
  c.num_train_steps = 3
  assert trainer.train(c, str(tmp_path / 'run'), jax.devices()[:1])['step'] == 3


def test_eval_token_rows_are_read_in_order_up_to_the_budget(tmp_path):
  rows = _rows(5 * 4, seed=2)
  np.save(tmp_path / 'rows.npy', rows)
  np.save(tmp_path / 'val.npy', rows[::-1])
  from gpas_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  c = _config(tmp_path, 'pre')
  assert data_lib.make_eval_batches(c, 0, 1) is None  # no eval_tokens_path: no eval set
  c = _config(tmp_path, 'pre', **{'data.eval_tokens_path': str(tmp_path / 'val.npy'),
                                   'data.eval_batch_size': 4, 'data.eval_tokens': 20})
  val = rows[::-1]
  need = np.searchsorted(np.cumsum([(val[i:i + 4] != 0).sum() for i in range(0, 20, 4)]), 20) + 1
  for _ in range(2):  # re-iterable: the same batches every eval
    batches = list(data_lib.make_eval_batches(c, 0, 1))
    assert len(batches) == need
    for i, b in enumerate(batches):
      np.testing.assert_array_equal(b['input_ids'], val[4 * i:4 * i + 4])
  host1 = list(data_lib.make_eval_batches(c, 1, 2))  # host 1 of 2: the second half of each batch
  np.testing.assert_array_equal(host1[0]['input_ids'], val[2:4])


def test_faithful_rounds_every_op_to_bf16_as_torch_does():
  """model.excess_precision=False (baseline_faithful): a bf16 product is rounded before a float32
  sum, as torch's mul kernel rounds; XLA's default keeps the product in float32 in the fusion.

  a = b = 1 + 2**-7: a * b = 1 + 2**-6 + 2**-14 exactly, 1 + 2**-6 in bf16, so 1024 rounded
  products sum to 1040 and unrounded ones to 1040.0625 (both exact in float32).
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x = jnp.full((1024,), 1 + 2.0 ** -7, jnp.bfloat16)
  fn = lambda a, b: jnp.sum((a * b).astype(jnp.float32))
  sums = {}
  for faithful in (False, True):
    c = tiny_train_config()
    c.baseline_faithful = faithful
    s = steps.setup(c, jax.devices()[:1])
    rep = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
    sums[faithful] = float(steps._jit_in_mesh(s, fn, (rep, rep), rep)(x, x))
  assert sums == {False: 1040.0625, True: 1040.0}
