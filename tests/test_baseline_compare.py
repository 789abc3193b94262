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
  # The N + 1 and the ratio explained where they are printed.
  assert "4 updates (--updates 3, plus the release's extra last one" in table
  assert 'cannot say which side is nearer exact arithmetic' in table
  assert "the largest gap: layer " in table
  assert bf16['jax_vs_float32']['updates'] == 4 and 'the nearer to exact arithmetic is' in table
  assert json.load(open(os.path.join(out, 'compare.json')))['updates'] == 4


def test_the_bf16_figure_draws_the_noise_floor_beside_the_gap(tmp_path, monkeypatch):
  """A precision with a noise floor gets its loss/grad-norm line and its gate band; float32 none."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import figure  # pylint: disable=import-outside-toplevel
  figs = []
  monkeypatch.setattr(figure.Figure, 'savefig', lambda self, *a, **k: figs.append(self))
  h = lambda d: [{'loss': 1.0 + d * u, 'grad_norm': 2.0, 'gates': [0.1 + d, -0.2]}
                 for u in range(5)]
  compare.plot({'float32': (h(0), h(0)), 'bfloat16': (h(0.01), h(0), h(0.003))},
               str(tmp_path / 'x.png'), 'pre_gpas')
  (fig,) = figs
  floor = lambda ax: [a for a in ax.lines + ax.collections
                      if a.get_label().startswith('noise floor')]
  f32_axes, bf16_axes = fig.axes[:3], fig.axes[3:]
  assert not any(floor(ax) for ax in f32_axes)
  assert all(len(floor(ax)) == 1 for ax in bf16_axes)
  band = floor(bf16_axes[2])[0].get_paths()[0].vertices[:, 1]
  np.testing.assert_allclose([band.min(), band.max()], [-0.003, 0.003], rtol=1e-6)
  loss_floor = floor(bf16_axes[0])[0].get_ydata()
  np.testing.assert_allclose(loss_floor, 0.003 * np.arange(5), atol=1e-12)
  # Layers count from 1, as every other figure; a short run's points are marked, not joined.
  gate_lines = [l for l in bf16_axes[2].lines if l.get_label().startswith('layer')]
  assert [l.get_label() for l in gate_lines] == ['layer 1', 'layer 2']
  assert all(l.get_marker() == 'o' for l in gate_lines)


def test_a_multi_gpu_world_size_is_refused(tmp_path):
  c = tiny_train_config(**{'optim.loss_chunks': 2, 'optim.ddp_world_size': 2})
  import pytest  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match='optim.ddp_world_size=2: the PyTorch side runs one'):
    compare.compare(c, str(tmp_path / 'cmp'), updates=1)
