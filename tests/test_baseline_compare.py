"""python -m gpas_jax.baseline.compare end to end on a tiny model: table, JSON, figure, both sides."""

import json
import os

import numpy as np

from gpas_jax.baseline import compare
from tests.helpers import tiny_train_config


def test_compare_writes_the_table_and_figure_and_agrees_in_float32(tmp_path):
  c = tiny_train_config(**{'optim.loss_chunks': 2, 'optim.lr': 3e-3, 'optim.warmup_steps': 1})
  out = str(tmp_path / 'cmp')
  result = compare.compare(c, out, updates=3)
  for name in ('compare.md', 'compare.json', 'compare.png', 'tokens.npy', 'init.safetensors',
               'torch_float32.json', 'torch_bfloat16.json', 'torch_bfloat16_reversed.json'):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  assert np.load(os.path.join(out, 'tokens.npy')).shape == (4 * 8, c.data.max_length)
  f32 = result['float32']['jax_vs_torch']
  assert f32['updates'] == 4 and f32['loss_max_abs'] < 1e-5 and f32['gate_max_abs'] < 1e-5
  bf16 = result['bfloat16']
  assert bf16['jax_vs_torch']['loss_max_abs'] < 0.05  # bf16 round-off, not another model
  assert bf16['noise_floor']['updates'] == 4 and bf16['gate_gap_over_noise'] >= 0
  table = open(os.path.join(out, 'compare.md')).read()
  assert '| float32 | jax_vs_torch |' in table and '| bfloat16 | noise_floor |' in table
  assert json.load(open(os.path.join(out, 'compare.json')))['updates'] == 4
