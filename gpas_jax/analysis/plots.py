"""PNG figures of the paper's analyses, drawn with matplotlib's Agg canvas (no display, no pyplot).

Each function takes records as read by `runs.read_jsonl` (or arrays), writes one PNG and returns
its path. Non-finite values leave gaps rather than failing.
"""

import math
import os
import re
from typing import Any, Mapping, Sequence

from matplotlib import colors
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from gpas_jax.analysis import runs as runs_lib

_DPI = 120


def _figure(ncols: int = 1, width: float = 6.4, height: float = 4.2) -> tuple[Figure, Any]:
  fig = Figure(figsize=(width * ncols, height), dpi=_DPI, layout='constrained')
  FigureCanvasAgg(fig)
  return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, format='png')
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


def activation_variance_heatmap(records: Sequence[Mapping[str, Any]], path: str,
                                title: str = 'Residual-stream variance') -> str:
  """Heatmap of act_var: depth (0 = embedding, l = after layer l) x training step, log colour."""
  steps_S, var_SxK = _matrix(records, 'act_var')
  fig, (ax,) = _figure()
  norm = colors.LogNorm() if _log_ok(var_SxK) else colors.Normalize()
  masked = np.ma.masked_invalid(var_SxK.T)
  mesh = ax.pcolormesh(steps_S, np.arange(var_SxK.shape[1]), masked, shading='nearest',
                       norm=norm, cmap='magma')
  fig.colorbar(mesh, ax=ax, label='variance over hidden dim')
  ax.set_xlabel('training step')
  ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_ylabel('layer (0 = embedding)')
  ax.set_title(title)
  return _save(fig, path)


def grad_norm_plot(records: Sequence[Mapping[str, Any]], path: str,
                   title: str = 'Per-layer gradient norm') -> str:
  """One line per layer (colour = depth) of grad_norm over training, log scale."""
  steps_S, norm_SxL = _matrix(records, 'grad_norm')
  fig, (ax,) = _figure()
  for i, c in enumerate(_layer_colors(norm_SxL.shape[1])):
    ax.plot(steps_S, norm_SxL[:, i], color=c, lw=1.2, label=f'layer {i}')
  if _log_ok(norm_SxL):
    ax.set_yscale('log')
  _legend(ax, norm_SxL.shape[1])
  ax.set_xlabel('training step')
  ax.set_ylabel('L2 norm of layer gradients')
  ax.set_title(title)
  return _save(fig, path)


def _legend(ax: Any, n: int) -> None:
  if n <= 32:
    ax.legend(fontsize='x-small', ncol=max(1, math.ceil(n / 12)), loc='best')


def _natural_key(s: str) -> list[Any]:
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', s)]


def gate_series(records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray, list[str]]:
  """(steps, gates [S, G], scales [S, G], labels) from analysis records (gate lists) or from
  metrics.jsonl records (scalars gate/<i>, gate_scale/<i>); raises ValueError if there are none."""
  records = list(records)
  if any('gate' in r for r in records):
    steps, gate = _matrix(records, 'gate')
    _, scale = _matrix(records, 'gate_scale')
    first = np.asarray(runs_lib.last_per_step(records, 'gate')[0]['gate'])
    if first.ndim == 2:  # One gate per sub-layer: attention and MLP.
      labels = [f'{i}.{"attn" if j == 0 else "mlp"}' for i in range(first.shape[0])
                for j in range(first.shape[1])]
    else:
      labels = [str(i) for i in range(first.size)]
    return steps, gate, scale, labels
  names = sorted({k[len('gate/'):] for r in records for k in r if k.startswith('gate/')},
                 key=_natural_key)
  if not names:
    raise ValueError('no gate values in these records (a run without GPAS?).')
  kept = [r for r in runs_lib.last_per_step(records, f'gate/{names[0]}')]
  steps = np.asarray([int(r['step']) for r in kept])
  get = lambda r, k: float(r.get(k, math.nan))
  gate = np.asarray([[get(r, f'gate/{n}') for n in names] for r in kept])
  scale = np.asarray([[get(r, f'gate_scale/{n}') for n in names] for r in kept])
  return steps, gate, scale, names


def gate_plot(records: Sequence[Mapping[str, Any]], path: str, title: str = 'GPAS gates') -> str:
  """Two panels over training: each layer's gate g and its forward scale 1 - act(g)."""
  steps, gate_SxG, scale_SxG, labels = gate_series(records)
  fig, (ax_g, ax_s) = _figure(ncols=2)
  for i, c in enumerate(_layer_colors(len(labels))):
    style = '--' if labels[i].endswith('.mlp') else '-'
    ax_g.plot(steps, gate_SxG[:, i], style, color=c, lw=1.2, label=f'layer {labels[i]}')
    ax_s.plot(steps, scale_SxG[:, i], style, color=c, lw=1.2)
  ylim = ax_s.get_ylim()  # Reference lines must not stretch the axis over tiny changes.
  ax_s.axhline(1.0, color='grey', lw=0.6, ls=':')
  ax_s.axhline(0.0, color='red', lw=0.6, ls=':')  # Below 0 the stream flips sign.
  ax_s.set_ylim(ylim)
  _legend(ax_g, len(labels))
  ax_g.set_title(f'{title}: gate g')
  ax_s.set_title('effective scale 1 - act(g)')
  for ax in (ax_g, ax_s):
    ax.set_xlabel('training step')
  return _save(fig, path)


def layer_importance_plot(importances: Mapping[str, Sequence[float]], path: str,
                          title: str = 'Layer importance') -> str:
  """Grouped bars: per layer, the eval-loss increase when it is skipped, one bar per run."""
  fig, (ax,) = _figure(width=max(6.4, 0.35 * max(len(v) for v in importances.values()) *
                                 max(1, len(importances))))
  n_runs = max(1, len(importances))
  width = 0.8 / n_runs
  for k, (label, values) in enumerate(importances.items()):
    v = np.asarray(values, np.float64)
    ax.bar(np.arange(v.size) + (k - (n_runs - 1) / 2) * width, v, width, label=label)
  ax.axhline(0.0, color='black', lw=0.6)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_xlabel('skipped layer')
  ax.set_ylabel('eval loss increase')
  ax.set_title(title)
  ax.legend(fontsize='small')
  return _save(fig, path)


def layer_profile_plot(profiles: Mapping[str, Sequence[float]], path: str, ylabel: str,
                       title: str = '', log: bool = True) -> str:
  """One line per run of a per-layer quantity (e.g. the last act_var) against depth."""
  fig, (ax,) = _figure()
  all_v = []
  for label, values in profiles.items():
    v = np.asarray(values, np.float64)
    all_v.append(v)
    ax.plot(np.arange(v.size), v, marker='o', ms=3, label=label)
  if log and _log_ok(np.concatenate(all_v) if all_v else np.zeros(0)):
    ax.set_yscale('log')
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_xlabel('layer')
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize='small')
  return _save(fig, path)


def loss_curves_plot(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str,
                     title: str = 'Loss') -> str:
  """Train loss (left) and eval loss (right) of several runs from their metrics.jsonl records."""
  fig, (ax_t, ax_e) = _figure(ncols=2)
  for label, records in runs.items():
    records = list(records)
    steps, loss = runs_lib.series(records, 'loss')
    line, = ax_t.plot(steps, np.asarray(loss, np.float64), lw=1.0, label=label)
    e_steps, e_loss = runs_lib.series(records, 'eval_loss')
    ax_e.plot(e_steps, np.asarray(e_loss, np.float64), marker='o', ms=3, color=line.get_color(),
              label=label)
  ax_t.set_title(f'{title}: train')
  ax_e.set_title('eval')
  for ax in (ax_t, ax_e):
    ax.set_xlabel('training step')
    ax.set_ylabel('loss')
    ax.grid(alpha=0.3)
  ax_t.legend(fontsize='small')
  return _save(fig, path)
