"""PNG figures of the paper's analyses, drawn with matplotlib's Agg canvas (no display, no pyplot).

Each function takes records as read by `storage.read_jsonl` (or arrays), writes one PNG and returns
its path. Non-finite values leave gaps rather than failing. One layer numbering everywhere:
decoder layers are 1..L; the residual stream after the embedding (index 0 of act_var) is 'emb'.
Figures over several seeds draw the mean and a band of +-1 standard deviation.
"""

import io
import math
import re
import warnings
from typing import Any, Mapping, Sequence

from matplotlib import colors
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from gpas_jax.analysis import runs as runs_lib
from gpas_jax import storage

_DPI = 120
TRAIN_LOSS_LABEL = 'train loss (mean over each log window)'


def _figure(ncols: int = 1, width: float = 6.4, height: float = 4.2) -> tuple[Figure, Any]:
  fig = Figure(figsize=(width * ncols, height), dpi=_DPI, layout='constrained')
  FigureCanvasAgg(fig)
  return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig: Figure, path: str) -> str:
  buf = io.BytesIO()  # matplotlib writes local files only: render, then store (local or gs://)
  fig.savefig(buf, format='png')
  storage.write_bytes(path, buf.getvalue())
  return path


def _matrix(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps [S], values [S, K]) of a per-layer list field; per-sub-layer [K, 2] is flattened."""
  kept = runs_lib.last_per_step(list(records), key)
  if not kept:
    raise ValueError(f'no record has {key!r}.')
  rows = [np.asarray(r[key], np.float64).reshape(-1) for r in kept]
  width = max(len(r) for r in rows)
  values = np.full((len(rows), width), np.nan)
  for i, r in enumerate(rows):
    values[i, :len(r)] = r
  return np.asarray([int(r['step']) for r in kept]), values


def _layer_colors(n: int) -> np.ndarray:
  from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
  return colormaps['viridis'](np.linspace(0.0, 0.95, max(n, 1)))


def _log_ok(values: np.ndarray) -> bool:
  finite = values[np.isfinite(values)]
  return finite.size > 0 and bool(np.all(finite > 0))


# A run logged at this many steps or fewer gets a marker at each: two points joined by a line
# would read as a trend.
FEW_POINTS = 25


def _markers(n: int) -> dict[str, Any]:
  """Line style keywords that mark each point of a short series."""
  return {'marker': 'o', 'ms': 3} if n <= FEW_POINTS else {}


def _legend(ax: Any, n: int, **kwargs: Any) -> None:
  if n <= 32:
    ax.legend(fontsize='x-small', ncol=max(1, math.ceil(n / 12)), loc='best', **kwargs)


def mean_band(values_RxN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [N], sample std [N]) over runs (axis 0), ignoring NaNs; std 0 where one run has it."""
  v = np.asarray(values_RxN, np.float64)
  with warnings.catch_warnings():  # an all-NaN column stays NaN (a gap), without a warning
    warnings.simplefilter('ignore', RuntimeWarning)
    mean = np.nanmean(v, axis=0)
    n = np.sum(np.isfinite(v), axis=0)
    std = np.nanstd(v, axis=0, ddof=1) if v.shape[0] > 1 else np.zeros_like(mean)
  return mean, np.where(n > 1, np.nan_to_num(std), 0.0)


def _plot_band(ax: Any, x: np.ndarray, values_RxN: np.ndarray, label: str, **kwargs: Any) -> Any:
  """The mean line over runs and, with more than one run, a +-1 std band; returns the line."""
  mean, std = mean_band(values_RxN)
  n = values_RxN.shape[0]
  line, = ax.plot(x, mean, label=label if n == 1 else f'{label} (mean of {n})', **kwargs)
  if n > 1:
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
  return line


# ----------------------------------------------------------------------- one run over training


def variance_range(record_sets: Sequence[Sequence[Mapping[str, Any]]]) -> tuple[float, float]:
  """(min, max) of act_var after layers 1..L (the embedding left out) over runs: a shared scale."""
  values = [_matrix(recs, 'act_var')[1][:, 1:] for recs in record_sets]
  finite = np.concatenate([v[np.isfinite(v)] for v in values])
  if not finite.size:
    raise ValueError('no finite act_var after layer 1 in these records.')
  return float(finite.min()), float(finite.max())


def _heatmap(ax: Any, records: Sequence[Mapping[str, Any]], norm: Any, label: str = '') -> Any:
  """Layers 1..L (rows) x analysis samples (equal-width columns, labelled by their step)."""
  steps_S, var_SxK = _matrix(records, 'act_var')
  layers_SxL = var_SxK[:, 1:]  # the embedding row would set the colour scale on its own
  mesh = ax.pcolormesh(np.ma.masked_invalid(layers_SxL.T), norm=norm, cmap='magma')
  ax.set_xticks(np.arange(len(steps_S)) + 0.5)
  ax.set_xticklabels([str(s) for s in steps_S], fontsize='small',
                     rotation=90 if len(steps_S) > 12 else 0)
  num_layers = layers_SxL.shape[1]
  ticks = np.unique(np.linspace(0, num_layers - 1, min(num_layers, 12)).astype(int))
  ax.set_yticks(ticks + 0.5)
  ax.set_yticklabels([str(t + 1) for t in ticks])
  ax.set_xlabel('training step (one column per analysis sample)')
  ax.set_ylabel('after layer')
  emb = var_SxK[:, 0]
  note = f'embedding output (not drawn): {np.nanmin(emb):.3g}..{np.nanmax(emb):.3g}'
  ax.set_title(f'{label}\n{note}' if label else note, fontsize='small')
  return mesh


def _variance_norm(lo: float, hi: float) -> Any:
  return colors.LogNorm(lo, hi) if lo > 0 else colors.Normalize(lo, hi)


def activation_variance_heatmap(records: Sequence[Mapping[str, Any]], path: str,
                                title: str = 'Residual-stream variance',
                                vrange: tuple[float, float] | None = None) -> str:
  """Heatmap of act_var after layers 1..L over the analysis steps, log colour.

  The embedding output's variance (orders of magnitude below the layers') is left out of the
  colour scale and named in the axes title; `vrange` fixes the scale (see variance_range).
  """
  lo, hi = vrange or variance_range([records])
  fig, (ax,) = _figure()
  mesh = _heatmap(ax, records, _variance_norm(lo, hi))
  fig.colorbar(mesh, ax=ax, label='variance over the hidden dim (mean over tokens)')
  fig.suptitle(title)
  return _save(fig, path)


def activation_variance_heatmaps(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str,
                                 title: str = 'Residual-stream variance') -> str:
  """One heatmap per run side by side, on one colour scale (the embedding row left out)."""
  lo, hi = variance_range(list(runs.values()))
  norm = _variance_norm(lo, hi)
  fig, axes = _figure(ncols=len(runs), width=5.0)
  mesh = None
  for ax, (label, records) in zip(axes, runs.items()):
    mesh = _heatmap(ax, records, norm, label)
  fig.colorbar(mesh, ax=list(axes), label='variance over the hidden dim (one scale for all)')
  fig.suptitle(title)
  return _save(fig, path)


def grad_norm_plot(records: Sequence[Mapping[str, Any]], path: str,
                   title: str = 'Per-layer gradient norm') -> str:
  """One line per layer (colour = depth, layers 1..L) of grad_norm over training, log scale."""
  steps_S, norm_SxL = _matrix(records, 'grad_norm')
  fig, (ax,) = _figure()
  for i, c in enumerate(_layer_colors(norm_SxL.shape[1])):
    ax.plot(steps_S, norm_SxL[:, i], color=c, lw=1.2, marker='.', label=f'layer {i + 1}')
  if _log_ok(norm_SxL):
    ax.set_yscale('log')
  _legend(ax, norm_SxL.shape[1])
  ax.set_xlabel('training step')
  ax.set_ylabel("L2 norm of the layer's parameter gradients")
  ax.set_title(title)
  return _save(fig, path)


def _natural_key(s: str) -> list[Any]:
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', s)]


def _one_based(name: str) -> str:
  """'3' -> '4', '3.1' -> '4.mlp': logged gate keys are 0-based, figures number layers from 1."""
  layer, _, sub = name.partition('.')
  if not layer.isdigit():
    return name
  return str(int(layer) + 1) + ('' if not sub else '.attn' if sub == '0' else '.mlp')


def gate_series(records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray, list[str]]:
  """(steps, gates [S, G], scales [S, G], labels 1..L) from analysis records (gate lists) or
  from metrics.jsonl records (scalars gate/<i>, gate_scale/<i>); ValueError if there are none."""
  records = list(records)
  if any('gate' in r for r in records):
    steps, gate = _matrix(records, 'gate')
    _, scale = _matrix(records, 'gate_scale')
    first = np.asarray(runs_lib.last_per_step(records, 'gate')[0]['gate'])
    if first.ndim == 2:  # One gate per sub-layer: attention and MLP.
      labels = [f'{i + 1}.{"attn" if j == 0 else "mlp"}' for i in range(first.shape[0])
                for j in range(first.shape[1])]
    else:
      labels = [str(i + 1) for i in range(first.size)]
    return steps, gate, scale, labels
  names = sorted({k[len('gate/'):] for r in records for k in r if k.startswith('gate/')},
                 key=_natural_key)
  if not names:
    raise ValueError('no gate values in these records (a run without GPAS?).')
  kept = list(runs_lib.last_per_step(records, f'gate/{names[0]}'))
  steps = np.asarray([int(r['step']) for r in kept])
  get = lambda r, k: float(r.get(k, math.nan))
  gate = np.asarray([[get(r, f'gate/{n}') for n in names] for r in kept])
  scale = np.asarray([[get(r, f'gate_scale/{n}') for n in names] for r in kept])
  return steps, gate, scale, [_one_based(n) for n in names]


def gate_plot(records: Sequence[Mapping[str, Any]], path: str, title: str = 'GPAS gates') -> str:
  """Two panels over training: each layer's gate g and its forward scale 1 - act(g)."""
  steps, gate_SxG, scale_SxG, labels = gate_series(records)
  fig, (ax_g, ax_s) = _figure(ncols=2)
  for i, c in enumerate(_layer_colors(len(labels))):
    style = '--' if labels[i].endswith('.mlp') else '-'
    for ax, values in ((ax_g, gate_SxG), (ax_s, scale_SxG)):
      ax.plot(steps, values[:, i], style, color=c, lw=1.2, label=f'layer {labels[i]}',
              **_markers(len(steps)))
  ylim = ax_s.get_ylim()  # Reference lines must not stretch the axis over tiny changes.
  ax_s.axhline(1.0, color='grey', lw=0.6, ls=':', label='1: stream unchanged')
  ax_s.axhline(0.0, color='red', lw=0.6, ls=':')  # Below 0 the stream flips sign.
  ax_s.set_ylim(ylim)
  ax_g.axhline(0.0, color='grey', lw=0.6, ls=':')
  for ax in (ax_g, ax_s):
    _legend(ax, len(labels) + 1)
    ax.set_xlabel('training step')
  ax_g.set_ylabel('gate g')
  ax_s.set_ylabel('forward scale 1 - act(g)  (>1 amplifies)')
  ax_g.set_title('gate g')
  ax_s.set_title('effective scale of the residual stream')
  fig.suptitle(title)
  return _save(fig, path)


# ----------------------------------------------------------------------- across runs and seeds


def layer_importance_plot(importances: Mapping[str, Sequence[Any]], path: str,
                          title: str = 'Layer importance') -> str:
  """Grouped bars: per layer (1..L), the eval-loss increase when it is skipped, one bar per run
  label; a label with several seeds ([seeds][L]) draws their mean with a +-1 std error bar."""
  groups = {k: np.atleast_2d(np.asarray(v, np.float64)) for k, v in importances.items()}
  num_layers = max(v.shape[1] for v in groups.values())
  n_groups = max(1, len(groups))
  fig, (ax,) = _figure(width=max(6.4, 0.35 * num_layers * n_groups))
  width = 0.8 / n_groups
  for k, (label, v_RxL) in enumerate(groups.items()):
    mean, std = mean_band(v_RxL)
    n = v_RxL.shape[0]
    ax.bar(np.arange(1, mean.size + 1) + (k - (n_groups - 1) / 2) * width, mean, width,
           yerr=std if n > 1 else None, capsize=2,
           label=label if n == 1 else f'{label} (mean ± std of {n})')
  ax.axhline(0.0, color='black', lw=0.6)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_xlabel('skipped layer')
  ax.set_ylabel('eval loss increase when skipped')
  ax.set_title(title)
  ax.legend(fontsize='small')
  return _save(fig, path)


def layer_profile_plot(profiles: Mapping[str, Sequence[Any]], path: str, ylabel: str,
                       title: str = '', log: bool = True, embedding: bool = False) -> str:
  """One line per run label of a per-layer quantity against depth: a [L] list, or [seeds][L]
  drawn as mean +- std. embedding=True: index 0 is the embedding output ('emb'), then 1..L."""
  fig, (ax,) = _figure()
  all_v = []
  for label, values in profiles.items():
    v_RxK = np.atleast_2d(np.asarray(values, np.float64))
    all_v.append(v_RxK.reshape(-1))
    x = np.arange(v_RxK.shape[1]) + (0 if embedding else 1)
    _plot_band(ax, x, v_RxK, label, marker='o', ms=3)
  if log and _log_ok(np.concatenate(all_v) if all_v else np.zeros(0)):
    ax.set_yscale('log')
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  if embedding:
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: 'emb' if x == 0 else
                                                      f'{x:.0f}'))
    ax.set_xlabel('residual stream after layer (emb = after the embedding)')
  else:
    ax.set_xlabel('layer')
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize='small')
  return _save(fig, path)


def _aligned(record_sets: Sequence[Sequence[Mapping[str, Any]]],
             key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps [S], values [R, S]) of one metric over runs, on the steps every run logged."""
  series = [runs_lib.series(list(recs), key) for recs in record_sets]
  series = [s for s in series if s[0]]
  if not series:
    return np.zeros(0, int), np.zeros((0, 0))
  common = sorted(set.intersection(*(set(steps) for steps, _ in series)))
  rows = [[float(dict(zip(steps, vals))[s]) for s in common] for steps, vals in series]
  return np.asarray(common), np.asarray(rows, np.float64).reshape(len(rows), len(common))


def loss_curves_plot(runs: Mapping[str, Any], path: str, title: str = 'Loss') -> str:
  """Train loss (left) and eval loss (right) from metrics.jsonl records.

  `runs` maps a label to one run's records, or to a list of such lists (seeds): those are drawn
  as the mean and a +-1 std band on the steps they all logged.
  """
  fig, (ax_t, ax_e) = _figure(ncols=2)
  for label, recs in runs.items():
    recs = list(recs)
    record_sets = recs if recs and isinstance(recs[0], (list, tuple)) else [recs]
    steps, loss_RxS = _aligned(record_sets, 'loss')
    line = _plot_band(ax_t, steps, loss_RxS, label, lw=1.0, **_markers(steps.size))
    e_steps, e_loss_RxS = _aligned(record_sets, 'eval_loss')
    if e_steps.size:
      _plot_band(ax_e, e_steps, e_loss_RxS, label, marker='o', ms=3, color=line.get_color())
  ax_t.set_title(f'{title}: train')
  ax_e.set_title('eval: loss on held-out text (the same tokens each time)')
  ax_t.set_ylabel(TRAIN_LOSS_LABEL)
  ax_e.set_ylabel('eval loss')
  for ax in (ax_t, ax_e):
    ax.set_xlabel('training step')
    # Steps are whole: one eval point must tick 6, not 5.7 .. 6.3 (min_n_ticks=1 allows it).
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a run without eval has no eval line to name
      ax.legend(fontsize='small')
  return _save(fig, path)
