"""The analyses: activation variance, gradient norms, layer importance, figures, the run CLI."""

import dataclasses
import functools
import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
from matplotlib.collections import QuadMesh
import numpy as np
import pytest
import torch

from gpas_jax.analysis import cli
from gpas_jax.analysis import compare
from gpas_jax.analysis import plots
from gpas_jax.analysis import runs as runs_lib
from gpas_jax.baseline import torch_model
from gpas_jax.model import interop
from gpas_jax.model import stats
from gpas_jax.model import transformer as model_lib
from gpas_jax import storage
from tests.helpers import perturbed_state_dict

CFG = model_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                            num_heads=2, norm_type='pre_gpas', post_num=1, scan_layers=False)
IDS = np.array([[5, 6, 7, 9, 63, 2, 9, 11], [1, 2, 3, 4, 5, 0, 0, 0]], np.int32)
PNG = b'\x89PNG\r\n\x1a\n'


def _ref_config(cfg):
  return torch_model.RefConfig(cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size,
                               cfg.num_layers, cfg.num_heads, cfg.norm_type, cfg.post_num)


def _perturbed(cfg, seed=0):
  return interop.from_torch_state_dict(perturbed_state_dict(cfg, seed), cfg)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids_BxT, keep_L):
  return nnx.merge(graphdef, state)(ids_BxT, keep_L=keep_L)


def _logits_and_loss(model, ids, keep_L=None):
  logits = _forward(*nnx.split(model), jnp.asarray(ids), keep_L)
  return np.asarray(logits), float(model_lib.lm_loss(logits, jnp.asarray(ids))[0])


def _grads(cfg, sd, ids=IDS):
  """Gradients by the PyTorch reference: (as our param tree, under the baseline's names)."""
  ref = torch_model.RefModel(_ref_config(cfg))
  torch_model.load_numpy_state_dict(ref, sd)
  ids_t = torch.from_numpy(ids.astype(np.int64))
  torch_model.loss_fn(ref(ids_t), ids_t).backward()
  grads_sd = {k: p.grad.numpy().copy() for k, p in ref.named_parameters()}
  # A model whose parameters are the gradients has exactly the trainer's gradient tree.
  return nnx.state(interop.from_torch_state_dict(grads_sd, cfg), nnx.Param), grads_sd


def _assert_png(path):
  with open(path, 'rb') as f:
    head = f.read(8)
  assert head == PNG and os.path.getsize(path) > 5000, path


def test_activation_variance_at_layer0_is_the_embedding_variance():
  model = _perturbed(CFG)
  var_K = stats.activation_variance(model, IDS)
  assert var_K.shape == (CFG.num_layers + 1,) and np.all(np.isfinite(var_K))
  emb_NxD = interop.to_torch_state_dict(model)['model.embed_tokens.weight'][IDS.reshape(-1)]
  real_N = IDS.reshape(-1) != 0
  by_hand = np.mean(np.var(emb_NxD.astype(np.float64), axis=-1)[real_N])
  np.testing.assert_allclose(var_K[0], by_hand, rtol=1e-5)
  # Segment ids, when given, choose the tokens instead of the pad id.
  seg = np.ones_like(IDS)
  seg[1, 3:] = 0
  var_seg = stats.activation_variance(model, IDS, seg)
  keep_N = seg.reshape(-1) != 0
  np.testing.assert_allclose(var_seg[0], np.mean(np.var(emb_NxD, axis=-1)[keep_N]), rtol=1e-5)


@pytest.mark.parametrize('norm_type,scan', [('post_pre_gpas', True), ('pre', False)])
def test_training_stats_record(norm_type, scan):
  cfg = dataclasses.replace(CFG, norm_type=norm_type, scan_layers=scan)
  sd = perturbed_state_dict(cfg)
  model = interop.from_torch_state_dict(sd, cfg)
  grads, grads_sd = _grads(cfg, sd)
  record = stats.training_stats(model, grads, IDS, step=7)
  assert record['step'] == 7
  assert len(record['act_var']) == cfg.num_layers + 1 and len(record['grad_norm']) == 3
  assert np.all(np.isfinite(record['act_var'])) and np.all(np.isfinite(record['grad_norm']))
  emb_NxD = sd['model.embed_tokens.weight'][IDS.reshape(-1)]
  np.testing.assert_allclose(record['act_var'][0],
                             np.mean(np.var(emb_NxD, axis=-1)[IDS.reshape(-1) != 0]), rtol=1e-5)
  np.testing.assert_allclose(record['grad_norm'], stats.layer_grad_norms(grads_sd, 3), rtol=1e-5)
  if norm_type.endswith('_gpas'):
    gate = np.array([sd[f'model.layers.{i}.gpas_block.gate'] for i in range(3)])
    np.testing.assert_allclose(record['gate'], gate, rtol=1e-6)
    np.testing.assert_allclose(record['gate_scale'], 1 - gate / (1 + np.exp(-gate)), rtol=1e-5)
  else:
    assert 'gate' not in record and 'gate_scale' not in record
  json.dumps(record)  # The record is JSON-ready as it is.


def test_layer_grad_norms_by_hand():
  sd = {'model.layers.0.mlp.up_proj.weight': np.full((2, 2), 1.0),
        'model.layers.0.gpas_block.gate': np.array(2.0),
        'model.layers.1.mlp.up_proj.weight': np.full((3,), 2.0),
        'model.embed_tokens.weight': np.full((4, 4), 9.0)}
  np.testing.assert_allclose(stats.layer_grad_norms(sd, 2), [np.sqrt(8.0), np.sqrt(12.0)])
  with pytest.raises(ValueError, match='layers \\[2\\]'):
    stats.layer_grad_norms(sd, 3)


def _drop_layer(model, i):
  """The model without layer i: its state dict minus layer i, later layers renumbered."""
  cfg = model.config
  sd = interop.to_torch_state_dict(model)
  out = {}
  for k, v in sd.items():
    if k.startswith('model.layers.'):
      j = int(k.split('.')[2])
      if j == i:
        continue
      k = k.replace(f'model.layers.{j}.', f'model.layers.{j - (j > i)}.', 1)
    out[k] = v
  post_num = cfg.post_num - (i < cfg.post_num) if cfg.norm_type.startswith('post_pre') else 0
  small = dataclasses.replace(cfg, num_layers=cfg.num_layers - 1, post_num=post_num)
  return interop.from_torch_state_dict(out, small)


@pytest.mark.parametrize('norm_type,skip', [('pre_gpas', 1), ('post_pre_gpas', 0)])
def test_skipping_a_layer_equals_removing_it(norm_type, skip):
  model = _perturbed(dataclasses.replace(CFG, norm_type=norm_type, scan_layers=True))
  keep_L = np.ones(3, bool)
  keep_L[skip] = False
  small = _drop_layer(model, skip)
  skipped_logits, skipped_loss = _logits_and_loss(model, IDS, jnp.asarray(keep_L))
  small_logits, small_loss = _logits_and_loss(small, IDS)
  np.testing.assert_allclose(skipped_logits, small_logits, rtol=1e-5, atol=1e-5)
  if norm_type == 'pre_gpas':
    # Importance = loss without the layer minus loss with all layers.
    imp_L = stats.layer_importance(model, [{'input_ids': IDS}])
    assert imp_L.shape == (3,) and np.all(np.isfinite(imp_L))
    full_loss = _logits_and_loss(model, IDS, jnp.ones(3, bool))[1]
    np.testing.assert_allclose(imp_L[skip], small_loss - full_loss, rtol=1e-4, atol=1e-6)
    # Batches count equally (mean of per-batch token means), whatever their token counts.
    ids2 = IDS.copy()
    ids2[0, 2:] = 0
    both = stats.layer_importance(model, [IDS, ids2])
    one = stats.layer_importance(model, [ids2])
    np.testing.assert_allclose(both, (imp_L + one) / 2, rtol=1e-5, atol=1e-7)


def _fake_records(num_layers=3, steps=(0, 10, 20, 20, 30), per_sublayer=False):
  rng = np.random.default_rng(0)
  records = []
  for s in steps:
    gate = rng.normal(0, 0.3, (num_layers, 2) if per_sublayer else num_layers)
    records.append({'step': s, 'act_var': (rng.uniform(0.1, 50, num_layers + 1)).tolist(),
                    'grad_norm': rng.uniform(1e-3, 1, num_layers).tolist(),
                    'gate': gate.tolist(), 'gate_scale': (1 - gate).tolist()})
  records[1]['grad_norm'][0] = 'nan'
  return records


def _fake_metrics(offset=0.0, gates=True):
  out = []
  for s in range(0, 60, 10):
    out.append({'step': s, 'loss': 5.0 - s / 20 + offset, 'lr': 1e-3, 'grad_norm': 1.0})
    if gates:
      out[-1].update({'gate/0': 0.01 * s, 'gate/1': -0.01 * s,
                      'gate_scale/0': 1 - 0.01 * s, 'gate_scale/1': 1 + 0.01 * s})
    if s % 20 == 0:
      out.append({'step': s, 'eval_loss': 5.1 - s / 20 + offset, 'eval_ppl': 100.0})
  out.append({'step': 30, 'loss': 'nan', 'lr': 1e-3})  # A resumed run repeats step 30.
  return out


def _roundtrip(records, path):
  """Through a jsonl file, as the tools read them ('nan' strings back to floats)."""
  for r in records:
    storage.append_jsonl(str(path), r)
  return storage.read_jsonl(str(path))


def test_plots_write_pngs(tmp_path):
  recs = _roundtrip(_fake_records(), tmp_path / 'analysis.jsonl')
  metrics = _roundtrip(_fake_metrics(), tmp_path / 'metrics.jsonl')
  assert np.isnan(recs[1]['grad_norm'][0]) and np.isnan(metrics[-1]['loss'])
  paths = [
      plots.activation_variance_heatmap(recs, str(tmp_path / 'av.png')),
      plots.grad_norm_plot(recs, str(tmp_path / 'gn.png')),
      plots.gate_plot(recs, str(tmp_path / 'gates.png')),
      plots.gate_plot(_fake_records(per_sublayer=True), str(tmp_path / 'gates_sub.png')),
      plots.gate_plot(metrics, str(tmp_path / 'gates_m.png')),
      plots.layer_importance_plot({'pre': [0.1, 0.5, 0.02], 'pre_gpas': [0.2, 0.6, 0.3]},
                                  str(tmp_path / 'imp.png')),
      plots.loss_curves_plot({'a': metrics, 'b': _fake_metrics(0.3)}, str(tmp_path / 'loss.png')),
  ]
  for p in paths:
    _assert_png(p)
  steps, gate, _, labels = plots.gate_series(_fake_records(per_sublayer=True))
  assert list(steps) == [0, 10, 20, 30] and gate.shape == (4, 6) and labels[1] == '1.mlp'
  with pytest.raises(ValueError, match='no gate'):
    plots.gate_series([{'step': 0, 'loss': 1.0}])


def _captured(monkeypatch):
  """The figures the plot functions would save, to look at their axes."""
  figs = []
  monkeypatch.setattr(plots, '_save', lambda fig, path: figs.append(fig) or path)
  return figs


def test_figures_number_layers_from_one_and_label_every_axis(monkeypatch):
  figs = _captured(monkeypatch)
  recs = _fake_records(steps=(1, 10, 20, 30))
  plots.grad_norm_plot(recs, 'gn.png')
  plots.gate_plot(_fake_metrics(), 'g.png')
  plots.layer_importance_plot({'pre': [0.1, 0.5, 0.02]}, 'imp.png')
  plots.activation_variance_heatmap(recs, 'av.png')
  gn, gates, imp, heat = figs
  (ax,) = gn.axes
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ['layer 1', 'layer 2', 'layer 3']
  assert list(ax.get_lines()[0].get_xdata()) == [1, 10, 20, 30]  # step 1 drawn at 1
  for ax in gates.axes:  # both panels: a y label and a legend naming layers 1 and 2
    assert ax.get_ylabel() and ax.get_xlabel() == 'training step'
    assert {'layer 1', 'layer 2'} <= {t.get_text() for t in ax.get_legend().get_texts()}
  bars = imp.axes[0].patches
  assert [round(b.get_x() + b.get_width() / 2) for b in bars] == [1, 2, 3]
  ax = heat.axes[0]
  assert [t.get_text() for t in ax.get_xticklabels()] == ['1', '10', '20', '30']
  assert [t.get_text() for t in ax.get_yticklabels()] == ['1', '2', '3']


def test_heatmaps_share_one_scale_without_the_embedding(monkeypatch):
  figs = _captured(monkeypatch)
  a = _fake_records()
  b = [dict(r, act_var=[v * 10 for v in r['act_var']]) for r in _fake_records()]
  for r in a + b:
    r['act_var'][0] = 1e-6  # an embedding row far below the layers
  plots.activation_variance_heatmaps({'pre': a, 'pre_gpas': b}, 'both.png')
  (fig,) = figs
  assert len(fig.axes) == 3  # two panels and one colour bar
  meshes = [ax.collections[0] for ax in fig.axes[:2]]
  assert all(isinstance(m, QuadMesh) for m in meshes)
  kept = runs_lib.last_per_step(a, 'act_var') + runs_lib.last_per_step(b, 'act_var')
  lo = min(min(r['act_var'][1:]) for r in kept)
  hi = max(max(r['act_var'][1:]) for r in kept)
  for m in meshes:
    assert m.get_array().shape == (3, 4)  # layers 1..3 x 4 samples: no embedding row
    assert (m.norm.vmin, m.norm.vmax) == (lo, hi)


def test_seeds_are_drawn_as_mean_and_band(monkeypatch):
  figs = _captured(monkeypatch)
  seeds = [_fake_metrics(offset) for offset in (0.0, 0.3, 0.9)]
  plots.loss_curves_plot({'pre': seeds}, 'loss.png')
  plots.layer_profile_plot({'pre': [[1.0, 2.0, 4.0], [3.0, 2.0, 8.0]]}, 'p.png', 'var',
                           embedding=True)
  loss, profile = figs
  ax_t = loss.axes[0]
  (line,) = ax_t.get_lines()
  assert line.get_label() == 'pre (mean of 3)' and 'mean over each log window' in ax_t.get_ylabel()
  steps = list(line.get_xdata())
  assert steps == [0, 10, 20, 30, 40, 50]
  expected = [5.4 - s / 20 for s in steps]
  expected[3] = np.nan  # step 30 is NaN in every seed (a resumed run's last record): a gap
  np.testing.assert_allclose(line.get_ydata(), expected)
  (band,) = ax_t.collections
  ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
  sd = np.std([0, .3, .9], ddof=1)
  np.testing.assert_allclose([ys.max(), ys.min()], [5.4 + sd, 5.4 - 50 / 20 - sd], rtol=1e-6)
  ax = profile.axes[0]
  np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [2.0, 2.0, 6.0])
  assert ax.xaxis.get_major_formatter()(0, 0) == 'emb'


def _write_run(path, norm_type, seed, metrics, analysis):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'size_name': 'tiny', 'seed': seed, 'model': {'norm_type': norm_type},
               'data': {'pad_id': 0, 'layout': 'padded'}}, f)
  for r in metrics:
    storage.append_jsonl(os.path.join(path, 'metrics.jsonl'), r)
  for r in analysis:
    storage.append_jsonl(os.path.join(path, 'analysis.jsonl'), r)
  return str(path)


def test_run_cli_and_compare(tmp_path, monkeypatch, capsys):
  model = _perturbed(CFG)
  # The checkpoint loader and the data pipeline are replaced by stand-ins.
  from gpas_jax.train import loading  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(loading, 'load_model', lambda workdir, step=None: (None, model))
  monkeypatch.setattr('gpas_jax.data.make_eval_batches',
                      lambda c: iter([{'input_ids': b, 'segment_ids': np.ones_like(b)}
                                      for b in (IDS, IDS[::-1].copy())]))
  a = _write_run(tmp_path / 'a', 'pre_gpas', 0, _fake_metrics(), _fake_records())
  os.makedirs(os.path.join(a, 'checkpoints', '4'))
  b = _write_run(tmp_path / 'b', 'pre', 0, _fake_metrics(0.2, gates=False), [])
  written = cli.analyze_run(a)
  names = sorted(os.path.basename(p) for p in written)
  assert names == ['activation_variance.png', 'gates.png', 'grad_norms.png', 'importance.json',
                   'layer_importance.png', 'loss.png']
  for p in written:
    if p.endswith('.png'):
      _assert_png(p)
  imp = storage.read_json(os.path.join(a, 'analysis', 'importance.json'))
  assert imp['step'] == 4
  np.testing.assert_allclose(imp['importance'],
                             stats.layer_importance(model, [IDS, IDS[::-1].copy()]), rtol=1e-6)
  # A run without analysis records or a checkpoint still gets its loss curve.
  monkeypatch.setattr('gpas_jax.analysis.cli.run_importance',
                      lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError('no ckpt')))
  assert [os.path.basename(p) for p in cli.analyze_run(b, str(tmp_path / 'out_b'))] == [
      'loss.png']
  a1 = _write_run(tmp_path / 'a1', 'pre_gpas', 1, _fake_metrics(0.5), _fake_records())
  capsys.readouterr()
  written = compare.compare_runs([a, b, a1], str(tmp_path / 'cmp'))
  assert sorted(os.path.basename(p) for p in written) == [
      'act_var_by_layer.png', 'grad_norm_by_layer.png', 'layer_importance.png',
      'loss_curves.png']
  for p in written:
    _assert_png(p)
  # Runs without the data of a figure are named, not silently dropped.
  out = capsys.readouterr().out
  assert f'per-layer figures: left out 1 run(s) without the data: {b}' in out
  assert f'layer importance: left out 2 run(s) without the data: {b}, {a1}' in out
  # Seeds of one setting are one line: the mean (pre_gpas seeds 0 and 1, offsets 0 and 0.5).
  figs = _captured(monkeypatch)
  compare.compare_runs([a, b, a1], str(tmp_path / 'cmp2'))
  labels = [l.get_label() for l in figs[0].axes[0].get_lines()]
  assert labels == ['pre_gpas (mean of 2)', 'pre']
  np.testing.assert_allclose(figs[0].axes[0].get_lines()[0].get_ydata()[0], 5.25)
