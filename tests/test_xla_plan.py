"""The report TPU and GPU plans share (gpas_jax.perf.xla_plan): the loop correction's arithmetic
and the roofline, without a compiler (the compilers' own checks: test_tpu_aot, test_gpu_aot)."""

import pytest

from gpas_jax.perf import xla_plan
from gpas_jax.train import metrics
from tests.helpers import tiny_train_config


def test_loop_ratio_counts_one_layer_of_a_scan_and_every_pass():
  m = tiny_train_config(**{'model.num_layers': 4}).model
  f = metrics.training_flops_per_step(m, 1, 256)
  layer = (f['total'] - f['lm_head']) / 4
  assert xla_plan.loop_ratio(m, 1, False) == 1.0  # unrolled, one pass: all counted
  assert xla_plan.loop_ratio(m, 1, True) == pytest.approx(f['total'] / (f['lm_head'] + layer))
  assert xla_plan.loop_ratio(m, 3, True) == pytest.approx(3 * xla_plan.loop_ratio(m, 1, True))


def test_corrected_cost_counts_the_update_once_the_folds_per_chunk_and_scales_the_rest():
  raw = {'flops': 100.0, 'bytes accessed': 50.0, 'optimal_seconds': 1.0}
  opt = {'flops': 10.0, 'bytes accessed': 20.0, 'optimal_seconds': 0.5}
  fold = {'flops': 5.0, 'bytes accessed': 4.0}
  c = xla_plan.corrected_cost(raw, opt, fold, ratio=3.0, folds=8)
  assert c['flops'] == 10 + 5 * 8 + (100 - 10 - 5) * 3
  assert c['bytes accessed'] == 20 + 4 * 8 + (50 - 20 - 4) * 3
  assert xla_plan.corrected_cost(raw, opt, {}, 2.0, 0)['flops'] == 10 + 90 * 2


def test_roofline_and_out_of_memory_refusals():
  t = xla_plan.Target('gpu', 'h100:1x8', 1, [], 'h100', 60e9, 1e15, 2e12, dict)
  assert xla_plan.roofline({'flops': 2e15, 'bytes accessed': 4e12}, t) == 4.0
  msg = ('Ran out of memory in memory space hbm. Used 22.4G of 15.75G hbm. ... requires 22.4G '
         'which exceeds 15.75G')
  need, have = xla_plan.oom_bytes(msg)
  assert need == pytest.approx(22.4 * 2**30) and have == pytest.approx(15.75 * 2**30)
