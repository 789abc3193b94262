"""`python -m gpas_jax.analysis --workdir RUN [--out DIR]`: every figure of one run.

From the run's jsonl files: activation-variance heatmap, per-layer gradient norms, gates, loss
curves. With a checkpoint (and `--importance`, the default): layer importance on the first
`--importance_batches` eval batches, written as a figure and as importance.json.
"""

import itertools
import os
from typing import Any, Sequence

from absl import flags
from absl import logging

from gpas_jax.analysis import plots
from gpas_jax.analysis import runs as runs_lib
from gpas_jax.runtime import cli as cli_lib
from gpas_jax.runtime import console
from gpas_jax import storage


# analysis.jsonl is written only when training asked for it: say how.
_RECORD_HINT = (' (per-layer records are written by training with --config.analysis.every_steps=N, '
                'e.g. 50)')


def run_importance(workdir: str, step: int | None = None,
                   max_batches: int | None = 16) -> dict[str, Any]:
  """Layer importance of a run's checkpoint on its eval batches, as importance.json holds it."""
  saved = runs_lib.checkpoint_steps(workdir)
  if not saved:
    raise FileNotFoundError(f'no checkpoint under {workdir}/checkpoints.')
  step = saved[-1] if step is None else step  # Recorded with the result.
  # Lazy: the checkpoint and data modules pull in orbax and grain, not needed for the figures.
  from gpas_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from gpas_jax import data  # pylint: disable=import-outside-toplevel
  from gpas_jax.model import stats  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import loading  # pylint: disable=import-outside-toplevel
  _, model = loading.load_model(workdir, step=step)
  # The run's own config.json: load_model shrinks the batch sizes for its one-device restore.
  config = config_lib.from_saved(storage.read_json(os.path.join(workdir, 'config.json')))
  batches = data.make_eval_batches(config)
  if max_batches:
    batches = itertools.islice(batches, max_batches)
  batches = stats.model_batches(batches, packed=config.data.layout == 'packed')
  base, skipped_L = stats.layer_losses(model, batches, pad_id=config.data.pad_id)
  return {'step': step, 'base_loss': base, 'skipped_loss': skipped_L.tolist(),
          'importance': (skipped_L - base).tolist(), 'max_batches': max_batches}


def analyze_run(workdir: str, out_dir: str | None = None, importance: bool = True,
                importance_batches: int | None = 16, step: int | None = None) -> list[str]:
  """Writes every figure the run's files allow into out_dir (default RUN/analysis); their paths."""
  run = runs_lib.load_run(workdir)
  out_dir = out_dir or os.path.join(workdir, 'analysis')
  storage.makedirs(out_dir)
  written = []
  title = run.label
  records = run.analysis()
  metrics = run.metrics()
  jobs = [
      ('activation_variance.png', plots.activation_variance_heatmap, records,
       f'{title}: residual-stream variance'),
      ('grad_norms.png', plots.grad_norm_plot, records, f'{title}: per-layer gradient norm'),
      ('gates.png', plots.gate_plot, _denser_gates(metrics, records), f'{title}: GPAS gates'),
  ]
  for fname, fn, recs, fig_title in jobs:
    try:
      written.append(fn(recs, os.path.join(out_dir, fname), title=fig_title))
    except ValueError as e:  # No such records (analysis off, or no GPAS): skip that figure.
      if fname == 'gates.png' and not run.norm_type.endswith('_gpas'):
        e = f'{run.norm_type} has no GPAS gates'
      console.say(f'no {fname} for {workdir}: {e}' + (_RECORD_HINT if recs is records else ''))
  if any('loss' in r for r in metrics):
    written.append(plots.loss_curves_plot({title: metrics}, os.path.join(out_dir, 'loss.png'),
                                          title=title))
  if importance:
    try:
      with console.timed(f'layer importance of {workdir} on '
                         f'{importance_batches or "all"} eval batches'):
        imp = run_importance(workdir, step=step, max_batches=importance_batches)
    except (ImportError, FileNotFoundError, ValueError) as e:
      logging.warning('No layer importance for %s: %s', workdir, e)
    else:
      path = storage.join(out_dir, 'importance.json')
      storage.write_json(path, imp)
      written += [path, plots.layer_importance_plot(
          {title: imp['importance']}, os.path.join(out_dir, 'layer_importance.png'),
          title=f'{title}: layer importance')]
  return written


def _denser_gates(metrics: list[dict[str, Any]], records: list[dict[str, Any]]) -> list:
  """The records that sample the gates at more steps: metrics.jsonl (gate/<i>, each log step)
  or analysis.jsonl (analysis.every_steps, which a run may set denser)."""
  def steps(recs: list[dict[str, Any]], has: Any) -> int:
    return len({r.get('step') for r in recs if has(r)})
  in_metrics = steps(metrics, lambda r: any(k.startswith('gate/') for k in r))
  in_analysis = steps(records, lambda r: 'gate' in r)
  return metrics if in_metrics and in_metrics >= in_analysis else records


def define_flags() -> None:
  """Defines this tool's flags (only when run as a program, so modules import side-effect free)."""
  flags.DEFINE_string('workdir', None, 'The run directory.', required=True)
  flags.DEFINE_string('out', None, 'Output folder; default WORKDIR/analysis.')
  flags.DEFINE_bool('importance', True, 'Compute layer importance from the checkpoint.')
  flags.DEFINE_integer('importance_batches', 16, 'Eval batches for layer importance (each costs '
                       'L+1 forwards); 0 = the whole eval set.')
  flags.DEFINE_integer('step', None, 'Checkpoint step for importance; default latest.')


def main(argv: Sequence[str]) -> None:
  console.quiet_logs()
  f = flags.FLAGS
  path_of = cli_lib.resolve_path
  for path in analyze_run(path_of(f.workdir), path_of(f.out), f.importance,
                          f.importance_batches or None, f.step):
    print(path)


if __name__ == '__main__':
  define_flags()
  cli_lib.run(main, positional=False)
