"""Tests for gpas_jax.train.metrics: FLOPs against a hand count, MFU, peak table, writers."""

import glob
import io
import json
import math
import os

import ml_collections
import numpy as np
import pytest

from configs import base
from gpas_jax.train import metrics


def _tiny_model():
  m = ml_collections.ConfigDict()
  m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.vocab_size = 64, 176, 2, 4, 100
  return m


def test_flops_against_hand_count():
  # hidden 64, ffn 176, 2 layers, 4 heads (head_dim 16), vocab 100; batch 2 x seq 16 = 32 tokens.
  # Matmul params per layer: q, k, v, o = 4 * 64 * 64 = 16384; gate, up, down = 3 * 64 * 176 =
  # 33792; per layer 50176, 2 layers 100352; lm_head 64 * 100 = 6400; total 106752.
  # learnable = 6 * 106752 * 32 = 20_496_384.
  # Attention fwd per layer: QK^T 2 * B * T^2 * D = 2 * 2 * 256 * 64 = 65536, AV the same ->
  # 131072; x 2 layers x 3 (fwd + bwd) = 786432 full, 393216 causal.
  f = metrics.training_flops_per_step(_tiny_model(), batch_size=2, seq_len=16)
  assert f['matmul_params'] == 106752
  assert f['tokens'] == 32
  assert f['learnable'] == 20_496_384
  assert f['qkv'] == 6 * 3 * 64 * 64 * 2 * 32
  assert f['attn_out'] == 6 * 64 * 64 * 2 * 32
  assert f['mlp'] == 6 * 33792 * 2 * 32
  assert f['lm_head'] == 6 * 6400 * 32
  assert f['attention'] == 393216
  assert f['total'] == 20_496_384 + 393216
  full = metrics.training_flops_per_step(_tiny_model(), 2, 16, causal=False)
  assert full['attention'] == 786432 and full['learnable'] == f['learnable']


def test_flops_scale_with_batch_and_71m_order_of_magnitude():
  c = base.get_config()  # 71m dims, vocab 32000
  f1 = metrics.training_flops_per_step(c.model, 1, 256)
  f2 = metrics.training_flops_per_step(c.model, 2, 256)
  assert f2['total'] == pytest.approx(2 * f1['total'])
  # 12 layers x (4 * 512^2 + 3 * 512 * 1368) + 512 * 32000 = 54.0M matmul params.
  assert f1['matmul_params'] == 12 * (4 * 512**2 + 3 * 512 * 1368) + 512 * 32000


def test_mfu_arithmetic_and_errors():
  # 1 PFLOP per step in 2 s on 8 chips of 100 TFLOP/s: 0.5 PFLOP/s of 0.8 -> 0.625.
  assert metrics.mfu(1e15, 2.0, 1e14, 8) == pytest.approx(0.625)
  assert metrics.mfu(3e12, 1.0, 989e12) == pytest.approx(3e12 / 989e12)
  with pytest.raises(ValueError):
    metrics.mfu(1e15, 0.0, 1e14, 8)


def test_peak_table_and_device_kinds():
  assert metrics.PEAK_FLOPS['tpu_v4']['bfloat16'] == 275e12
  assert metrics.PEAK_FLOPS['tpu_v5e']['bfloat16'] == 197e12
  assert metrics.PEAK_FLOPS['tpu_v5p']['bfloat16'] == 459e12
  assert metrics.PEAK_FLOPS['tpu_v6e']['bfloat16'] == 918e12
  assert metrics.PEAK_FLOPS['a100']['float32'] == 19.5e12
  cases = {'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5p': 459e12, 'TPU v6 lite': 918e12,
           'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H200': 989e12,
           'NVIDIA A100-SXM4-80GB': 312e12}
  for kind, want in cases.items():
    assert metrics.peak_flops(kind, 'bfloat16') == want, kind
  assert metrics.peak_flops('cpu') is None


def test_mfu_peak_is_the_rate_the_matmuls_run_at():
  """float32 matmuls run as TF32 on Hopper/Ampere and as one bf16 pass on a TPU under JAX's
  default precision: MFU divides by those rates, the float32 units' only at 'highest'."""
  h100, v5e, a100 = 'NVIDIA H100 80GB HBM3', 'TPU v5 lite', 'NVIDIA A100-SXM4-80GB'
  assert metrics.matmul_peak(h100, 'float32') == (
      494.7e12, "float32 matmuls as tfloat32 (JAX's default precision)")
  assert metrics.peak_flops(a100, 'float32') == 156e12
  assert metrics.peak_flops(h100, 'float32', 'highest') == 67e12
  assert metrics.peak_flops(h100, 'float32', 'bfloat16') == 989e12
  assert metrics.peak_flops(h100, 'bfloat16', 'highest') == 989e12  # bf16 inputs: bf16 rate
  assert metrics.matmul_peak(v5e, 'float32') == (
      197e12, "float32 matmuls as one bf16 pass (JAX's default precision)")
  assert metrics.peak_flops(v5e, 'float32', 'high') == pytest.approx(197e12 / 3)
  assert metrics.peak_flops(v5e, 'float32', 'highest') == pytest.approx(197e12 / 6)
  assert metrics.peak_flops('TPU v5p', 'bfloat16') == 459e12


def test_jsonl_appends_and_resume_continues(tmp_path):
  workdir = str(tmp_path)
  w = metrics.MetricWriter(workdir, stdout=False)
  w.write_scalars(1, {'loss': np.float32(2.5), 'lr': 1e-3, 'tokens': np.int64(7)})
  w.write_scalars(2, {'loss': float('nan'), 'grad_norm': float('inf')})
  w.close()
  w = metrics.MetricWriter(workdir, stdout=False)  # a resumed run
  w.write_scalars(3, {'loss': 2.25})
  w.close()
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records] == [1, 2, 3]
  assert records[0] == {'step': 1, 'loss': 2.5, 'lr': 1e-3, 'tokens': 7}
  assert isinstance(records[0]['loss'], float) and isinstance(records[0]['tokens'], int)
  assert records[1]['loss'] == 'nan' and records[1]['grad_norm'] == 'inf'
  assert math.isnan(float(records[1]['loss']))
  assert records[2] == {'step': 3, 'loss': 2.25}
  with pytest.raises(ValueError, match='scalars'):
    metrics.MetricWriter(workdir, stdout=False).write_scalars(4, {'v': np.zeros(3)})


def test_only_process_zero_writes(tmp_path):
  w = metrics.MetricWriter(str(tmp_path / 'p1'), process_index=1, tensorboard=True)
  w.write_scalars(1, {'loss': 1.0})
  w.close()
  assert not os.path.exists(tmp_path / 'p1')


def test_tensorboard_writer_writes_the_values(tmp_path):
  from tests.helpers import read_tensorboard_scalars  # pylint: disable=import-outside-toplevel
  w = metrics.MetricWriter(str(tmp_path), stdout=False, jsonl=False, tensorboard=True)
  w.write_scalars(5, {'loss': 1.5, 'lr': 1e-3, 'gate/0': np.float32(-0.25)})
  w.write_scalars(6, {'loss': 1.25, 'lr': 2e-3, 'gate/0': 0.5})
  w.close()
  events = glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents*'))
  assert len(events) == 1
  scalars = read_tensorboard_scalars(str(tmp_path / 'tensorboard'))  # not just the header
  assert scalars == {'loss': {5: 1.5, 6: 1.25}, 'lr': {5: pytest.approx(1e-3, rel=1e-7),
                                                       6: pytest.approx(2e-3, rel=1e-7)},
                     'gate/0': {5: -0.25, 6: 0.5}}


def test_stdout_line_formats_known_keys(tmp_path):
  out = io.StringIO()
  w = metrics.MetricWriter(str(tmp_path / 'unused'), stdout=True, jsonl=False, stream=out,
                           total_steps=1000, process_index=0)
  w.write_scalars(100, {'loss': 3.14159, 'lr': 1e-3, 'tokens_per_s': 12345.0, 'mfu': 0.412,
                        'eta_s': 3725.0, 'gate_0': 0.25})
  line = out.getvalue().strip()
  assert not os.path.exists(tmp_path / 'unused')  # no file sinks, no directory
  assert line.startswith('step 100/1000 | loss 3.1416 | lr 1.00e-03')
  assert 'tok/s 12.3k' in line and 'mfu 41.2%' in line and 'eta 1h02m' in line
  assert 'gate_0 0.25' in line and '\n' not in line
  # An eval line reads one way: 'name value', the baseline's numbers included (issue 22).
  w.write_scalars(200, {'eval_loss': 6.25021, 'eval_ppl': 518.1, 'eval_loss_baseline': 5.469,
                        'eval_ppl_baseline': 237.2, 'eval_time_s': 1.5})
  line = out.getvalue().strip().splitlines()[-1]
  assert line == ('step 200/1000 | eval_loss 6.2502 | eval_ppl 518.10 | eval_loss_baseline '
                  '5.4690 | eval_ppl_baseline 237.20 | eval_time_s 1.5'), line


def test_from_config_and_missing_wandb(tmp_path):
  c = base.get_config()
  c.logging.tensorboard = False
  w = metrics.MetricWriter.from_config(c, str(tmp_path), process_index=0, stdout=False)
  assert w.total_steps == c.num_train_steps
  w.close()
  c.logging.wandb = True
  try:
    import wandb  # pylint: disable=import-outside-toplevel,unused-import
    pytest.skip('wandb is installed here')
  except ImportError:
    pass
  with pytest.raises(ImportError, match='pip install wandb'):
    metrics.MetricWriter.from_config(c, str(tmp_path), process_index=0)


def test_stdout_line_summarises_per_layer_series():
  from gpas_jax.train import metrics
  w = metrics.MetricWriter('/nonexistent', jsonl=False, stdout=False, total_steps=10)
  line = w.format_line(3, {'loss': 2.0, 'gate/0': 0.1, 'gate/1': -0.2, 'gate_scale/0': 0.95,
                           'gate_scale/1': 1.1})
  assert 'gate -0.2..0.1' in line and 'gate_scale 0.95..1.1' in line and 'gate/0' not in line
