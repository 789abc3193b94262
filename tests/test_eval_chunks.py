"""Eval on a mesh wider than the baseline's per-GPU eval batch: global batches of whole
data.eval_batch_size batches (steps.eval_rows), one token mean per batch, as the baseline."""

import jax
import numpy as np
import pytest

from gpas_jax.train import steps
from tests.helpers import tiny_train_config


def test_eval_rows_are_whole_per_gpu_batches_that_split_over_the_mesh():
  c = tiny_train_config(**{'data.eval_batch_size': 32})
  c.mesh.data, c.mesh.fsdp = 1, 8
  s = steps.setup(c, jax.devices()[:8])  # 32 splits over 8: one batch per global batch
  assert steps.eval_rows(c, s.mesh) == 32
  c.data.eval_batch_size = 4  # 4 rows do not split over 8 chips: 2 batches of 4 per global batch
  assert steps.eval_rows(c, steps.setup(c, jax.devices()[:8]).mesh) == 8
  c.data.eval_batch_size, c.optim.global_batch_size = 3, 24
  assert steps.eval_rows(c, steps.setup(c, jax.devices()[:8]).mesh) == 24


def test_a_global_eval_batch_gives_each_per_gpu_batch_its_own_mean():
  c = tiny_train_config(**{'data.eval_batch_size': 4})
  c.mesh.data, c.mesh.fsdp = 1, 8
  s = steps.setup(c, jax.devices()[:8])
  params = steps.init_state(s)['params']
  rng = np.random.default_rng(0)
  ids = rng.integers(2, c.model.vocab_size, (8, c.data.max_length)).astype(np.int32)
  ids[4:, 10:] = 0  # the second batch is mostly padding: its mean differs from the pooled one
  batch = {'input_ids': ids, 'segment_ids': (ids != 0).astype(np.int32)}
  losses, counts = steps.make_eval_step(s)(params, steps.global_batch(s, batch))
  assert losses.shape == (2,) and counts.shape == (2,)
  c1 = c.copy_and_resolve_references()
  c1.mesh.fsdp = 1
  one = steps.setup(c1, jax.devices()[:1])
  host = jax.device_get(params)
  each = [steps.make_eval_step(one)(host, {k: v[i * 4:(i + 1) * 4] for k, v in batch.items()})
          for i in range(2)]
  np.testing.assert_allclose(np.asarray(losses), [float(l) for l, _ in each], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(counts), [float(n) for _, n in each])
  r = steps.evaluate(s, steps.make_eval_step(s), params, iter([batch]))
  assert r['eval_batches'] == 2
  assert r['eval_loss'] == pytest.approx(np.mean([float(l) for l, _ in each]), rel=1e-5)
  assert r['eval_loss_baseline'] == pytest.approx(sum(float(l) for l, _ in each) / 3, rel=1e-5)
