"""The path users run by default, end to end: the scanned stack sharded on a 2x2x2 mesh,
asynchronous checkpoints with the data-iterator state restored onto another mesh, the packed
loss, the baseline's last step, and TensorBoard values read back from the event file.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from gpas_jax import data as data_lib
from gpas_jax.train import checkpoint as ckpt
from gpas_jax.train import steps
from gpas_jax.train import trainer
from tests.helpers import read_tensorboard_scalars
from tests.helpers import tiny_train_config


def _records(workdir) -> dict[int, dict]:
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      r = json.loads(line)
      if 'loss' in r:
        out[r['step']] = r
  return out


def _params(state) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state['params']))]


def _mesh(data, fsdp, tensor):
  return {'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.tensor': tensor}


# Logical names -> mesh axes under the default rules, per parameter of the scanned stack:
# the leading 'layers' axis is never sharded; embed -> fsdp, heads/mlp/vocab -> tensor.
SCANNED_SPECS = {
    'embed_tokens': ('tensor', 'fsdp'), 'lm_head': ('tensor', 'fsdp'), 'norm/weight': (None,),
    'self_attn/q_proj': (None, 'fsdp', 'tensor', None),
    'self_attn/k_proj': (None, 'fsdp', 'tensor', None),
    'self_attn/v_proj': (None, 'fsdp', 'tensor', None),
    'self_attn/o_proj': (None, 'tensor', None, 'fsdp'),
    'mlp/gate_proj': (None, 'fsdp', 'tensor'), 'mlp/up_proj': (None, 'fsdp', 'tensor'),
    'mlp/down_proj': (None, 'tensor', 'fsdp'),
    'input_layernorm/weight': (None, None), 'post_attention_layernorm/weight': (None, None),
    'gpas_block/gate': (None,),
}


def _check_scanned_shardings(params, mesh_shape: dict[str, int]) -> None:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  seen = set()
  for path, leaf in flat:
    keys = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
    name = '/'.join(keys[-2:]) if len(keys) > 1 else keys[0]
    want = SCANNED_SPECS[name]
    spec = tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))
    assert spec == want, (name, spec, want)
    shard = tuple(n // (mesh_shape[a] if a else 1) for n, a in zip(leaf.shape, want))
    assert leaf.addressable_shards[0].data.shape == shard, (name, leaf.shape, shard)
    seen.add(name)
  assert seen == set(SCANNED_SPECS)


def test_scanned_2x2x2_mesh_matches_one_device_past_sign_like_adam(tmp_path):
  n = 14
  kw = dict(num_train_steps=n, checkpoint_every_steps=n - 1, eval_every_steps=n,
            **{'model.scan_layers': True, 'optim.warmup_steps': 3, 'optim.lr': 1e-2})
  one_dir, eight_dir = str(tmp_path / 'one'), str(tmp_path / 'eight')
  one = trainer.train(tiny_train_config(**kw, **{'logging.tensorboard': True}), one_dir,
                      jax.devices()[:1])
  c8 = tiny_train_config(**kw, **_mesh(2, 2, 2))
  eight = trainer.train(c8, eight_dir, jax.devices())
  _check_scanned_shardings(eight['state']['params'], {'data': 2, 'fsdp': 2, 'tensor': 2})
  r1, r8 = _records(one_dir), _records(eight_dir)
  assert sorted(r1) == sorted(r8) == list(range(1, n + 1))
  # fp32 sums in another order (sharded matmuls and reductions), amplified by 14 Adam steps:
  # measured 6e-7 (loss) and 3e-7 (grad_norm); a 2x gradient on one side is far outside.
  np.testing.assert_allclose([r8[s]['loss'] for s in r1], [r1[s]['loss'] for s in r1], rtol=1e-5)
  np.testing.assert_allclose([r8[s]['grad_norm'] for s in r1], [r1[s]['grad_norm'] for s in r1],
                             rtol=1e-5)
  rel = lambda k: max(abs(r8[s][k] / r1[s][k] - 1) for s in r1)
  print(f'2x2x2 vs one device over {n} steps: loss {rel("loss"):.1e}, '
        f'grad_norm {rel("grad_norm"):.1e} (largest relative differences)')
  for a, b in zip(_params(one['state']), _params(eight['state'])):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=2e-5)
  # Past sign-like steps: the last update moved weights by well under lr each (Adam's first
  # updates move every weight by ~lr, which hides any scale error in the gradients).
  s = steps.setup(tiny_train_config(**kw), jax.devices()[:1])
  before, _ = ckpt.restore(ckpt.make_manager(one_dir, tiny_train_config(**kw)), n - 1,
                           s.abstract_state)
  lr = r1[n]['lr']
  ratio = np.concatenate([np.abs(a - b).ravel() / lr for a, b in
                          zip(_params(one['state']), _params(before))])
  # (sign-like: ~1 everywhere; measured median 0.55.)
  assert np.median(ratio) < 0.7 and ratio.max() < 10, (np.median(ratio), ratio.max())
  # TensorBoard holds the values metrics.jsonl holds (float32 there).
  tb = read_tensorboard_scalars(os.path.join(one_dir, 'tensorboard'))
  for tag in ('loss', 'grad_norm', 'lr'):
    assert sorted(tb[tag]) == list(range(1, n + 1)), tag
    np.testing.assert_allclose([tb[tag][k] for k in r1], [r1[k][tag] for k in r1], rtol=1e-6)
  assert tb['eval_loss'][n] == pytest.approx(one['eval_loss'], rel=1e-6)


def test_async_checkpoint_restores_onto_another_mesh_and_continues_bitwise(tmp_path):
  # Run A: 6 steps on 2x2x2, asynchronous saves at 3 and 6 (the run goes on while 3 is saved).
  kw = dict(num_train_steps=6, checkpoint_every_steps=3, eval_every_steps=100,
            checkpoint_async=True, **{'model.scan_layers': True, 'optim.lr': 1e-2})
  c_a, c_b = tiny_train_config(**kw, **_mesh(2, 2, 2)), tiny_train_config(**kw, **_mesh(1, 4, 2))
  run_a = str(tmp_path / 'a')
  trainer.train(c_a, run_a, jax.devices())
  # Run B resumes from A's step 3 on a (1, 4, 2) mesh: its workdir holds only that checkpoint.
  run_b = tmp_path / 'b'
  shutil.copytree(os.path.join(run_a, 'checkpoints', '3'), run_b / 'checkpoints' / '3')
  shutil.copy(os.path.join(run_a, 'config.json'), run_b / 'config.json')
  resumed = trainer.train(c_b, str(run_b), jax.devices())
  assert sorted(_records(str(run_b))) == [4, 5, 6]
  # The reference, in memory: steps 1-3 on 2x2x2, the state moved to (1, 4, 2), steps 4-6 there,
  # one data iterator throughout.
  it = data_lib.make_train_iterator(c_a)
  s_a, s_b = steps.setup(c_a, jax.devices()), steps.setup(c_b, jax.devices())
  state, losses = steps.init_state(s_a), {}
  for step in range(1, 7):
    s = s_a if step <= 3 else s_b
    if step == 4:
      state = jax.device_put(state, s_b.state_shardings)
    state, m = steps.make_train_step(s)(state, steps.global_batch(s, next(it)))
    losses[step] = float(m['loss'])
  got = {**{k: r['loss'] for k, r in _records(run_a).items() if k <= 3},
         **{k: r['loss'] for k, r in _records(str(run_b)).items()}}
  assert got == losses  # bit for bit
  for a, b in zip(_params(resumed['state']), _params(state)):
    np.testing.assert_array_equal(a, b)
  _check_scanned_shardings(resumed['state']['params'], {'data': 1, 'fsdp': 4, 'tensor': 2})


def test_packed_loss_counts_targets_within_each_document_only(tmp_path):
  c = tiny_train_config(**{'data.layout': 'packed', 'model.scan_layers': True})
  s = steps.setup(c, jax.devices()[:1])
  state = steps.init_state(s)
  local = next(data_lib.make_train_iterator(c))
  ids, seg = np.asarray(local['input_ids']), np.asarray(local['segment_ids'])
  docs = sum(len(np.unique(row[row > 0])) for row in seg)
  assert docs > seg.shape[0]  # rows hold several documents
  # The reference: per document (a run of one segment id), predict tokens 1.. from 0..,
  # with the logits of the packed rows (attention within documents is checked elsewhere).
  from flax import nnx  # pylint: disable=import-outside-toplevel
  forward = jax.jit(lambda p: nnx.merge(s.graphdef, p, s.rest)(ids, seg))
  logits = np.asarray(forward(state['params']), np.float64)
  _, m = steps.make_train_step(s)(state, steps.global_batch(s, local))
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  total, count = 0.0, 0
  for b in range(ids.shape[0]):
    start = 0
    while start < ids.shape[1]:
      end = start
      while end < ids.shape[1] and seg[b, end] == seg[b, start]:
        end += 1
      if seg[b, start] != 0:  # a document occupies [start, end)
        for t in range(start, end - 1):
          total -= logp[b, t, ids[b, t + 1]]
          count += 1
      start = end
  assert float(m['tokens']) == count
  np.testing.assert_allclose(float(m['loss']), total / count, rtol=1e-5)
  # Counting across document boundaries (the padded rule) would count more targets.
  assert count < int(np.sum(ids[:, 1:] != 0))


def test_baseline_last_step_runs_n_plus_one_updates_the_last_at_1e_7_peak(tmp_path):
  n, peak = 4, 1e-2
  c = tiny_train_config(num_train_steps=n, checkpoint_every_steps=n, eval_every_steps=100,
                        **{'optim.baseline_last_step': True, 'optim.lr': peak,
                           'optim.warmup_steps': 1, 'model.scan_layers': True})
  result = trainer.train(c, str(tmp_path), jax.devices()[:1])
  records = _records(str(tmp_path))
  assert sorted(records) == list(range(1, n + 2)) and result['step'] == n + 1
  assert records[1]['lr'] == 0.0  # the first update at lr 0
  assert records[n + 1]['lr'] == pytest.approx(1e-7 * peak, rel=1e-6)
  summary = json.load(open(tmp_path / 'summary.json', encoding='utf-8'))
  assert summary['finished'] and summary['step'] == n + 1
  # The last update happened, at 1e-7 * peak (an Adam step moves a weight by <~ lr).
  s = steps.setup(c, jax.devices()[:1])
  before, _ = ckpt.restore(ckpt.make_manager(str(tmp_path), c), n, s.abstract_state)
  moved = max(np.abs(a - b).max() for a, b in zip(_params(result['state']), _params(before)))
  assert 0 < moved < 5e-7 * peak, moved
