"""lm-evaluation-harness on a run: its checkpoint, its tokenizer, the JAX backend, lm-eval's tasks.

    python -m gpas_jax.evals.harness --workdir RUN --tasks a,b --include_path TASK_DIR \\
        --num_fewshot N --output_path PATH [--log_samples] [--step S] [--limit K]

Writes the harness's results JSON (its own format: PATH if it ends in .json, else
PATH/results.json; with --log_samples, samples_<task>.jsonl beside it) and prints its table
(acc, acc_norm and their stderr; perplexities); the scores also go into WORKDIR/downstream.json,
which the results table and the study show beside perplexity. Tasks are lm-eval's by name (their datasets from
the Hugging Face cache: HF_DATASETS_OFFLINE=1 reads it without a network) or YAML files under
--include_path (gpas_jax.evals.tasks writes small ones).
"""

import json
import math
from typing import TYPE_CHECKING, Any, Sequence

from absl import flags
import ml_collections

from gpas_jax import storage
from gpas_jax.evals import jax_lm
from gpas_jax.runtime import cli
from gpas_jax.runtime import console

if TYPE_CHECKING:
  from gpas_jax.train.trainer import EvalHook

DOWNSTREAM_FILE = 'downstream.json'  # analysis.runs.RunDir.downstream reads it


def lm_from_run(workdir: str, step: int | None = None, batch_size: int = 16
                ) -> tuple[ml_collections.ConfigDict, jax_lm.JaxLM, int]:
  """The run's config, a JaxLM over its checkpoint (latest intact, or `step`) and tokenizer, and
  the step it holds."""
  from gpas_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import loading  # pylint: disable=import-outside-toplevel
  config, model, loaded = loading.load_model_step(workdir, step=step)
  sp = tok_lib.get_tokenizer(config)
  tok_lib.check_tokenizer(sp, config, f'the tokenizer of {workdir}')
  return config, jax_lm.JaxLM(model, sp, config.data.max_length, batch_size,
                              config.data.pad_id), loaded


def training_hook(tasks: Sequence[str], every_steps: int, include_path: str | None = None,
                  num_fewshot: int | None = None, limit: int | None = None,
                  batch_size: int = 16) -> 'EvalHook':
  """A trainer.train eval hook: the tasks every `every_steps` steps and at the end, scored on the
  live state where it lies on the mesh; logged as harness/<task>/<metric>."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gpas_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import trainer  # pylint: disable=import-outside-toplevel
  tokenizers = {}

  def hook(s: Any, params: Any, step: int) -> dict[str, float]:  # pylint: disable=unused-argument
    if 'sp' not in tokenizers:
      tokenizers['sp'] = tok_lib.get_tokenizer(s.config)
    lm = jax_lm.JaxLM(nnx.merge(s.graphdef, params, s.rest), tokenizers['sp'],
                      s.config.data.max_length, batch_size, s.config.data.pad_id, s.mesh, s.rules)
    results = evaluate(lm, tasks, include_path, num_fewshot, limit, bootstrap_iters=0)
    return {f'harness/{k}': v for k, v in scores(results).items() if not k.endswith('_stderr')}

  return trainer.EvalHook(every_steps, hook)


def evaluate(lm: Any, tasks: Sequence[str], include_path: str | None = None,
             num_fewshot: int | None = None, limit: int | None = None,
             log_samples: bool = False, bootstrap_iters: int = 100_000) -> dict[str, Any]:
  """lm_eval.simple_evaluate on an LM instance; the harness's results dict."""
  import lm_eval  # pylint: disable=import-outside-toplevel
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  manager = None
  if include_path:  # indexing lm-eval's own thousands of tasks takes seconds: only if needed
    manager = TaskManager(include_path=include_path, include_defaults=False)
  if manager is None or any(t not in manager.all_tasks for t in tasks):
    manager = TaskManager(include_path=include_path)
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    where = f' or under --include_path={include_path}' if include_path else ''
    raise cli.UserError(f'--tasks names {", ".join(unknown)}, not a task of lm-eval{where}; '
                        'see `python -m lm_eval ls tasks`, or give the folder of its YAML.')
  return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot,
                                 limit=limit, log_samples=log_samples, task_manager=manager,
                                 bootstrap_iters=bootstrap_iters)


def write_results(results: dict[str, Any], output_path: str) -> list[str]:
  """Writes the results JSON (and each task's samples as JSON lines); returns the paths."""
  from lm_eval.utils import handle_non_serializable  # pylint: disable=import-outside-toplevel
  results = dict(results)
  samples = results.pop('samples', None) or {}
  path = output_path if output_path.endswith('.json') else storage.join(output_path,
                                                                         'results.json')
  folder = path.rsplit('/', 1)[0] if '/' in path else '.'
  storage.makedirs(folder)
  storage.write_text(path, json.dumps(results, indent=2, default=handle_non_serializable,
                                      ensure_ascii=False) + '\n')
  written = [path]
  for task, rows in samples.items():
    p = storage.join(folder, f'samples_{task}.jsonl')
    storage.write_text(p, ''.join(json.dumps(r, default=handle_non_serializable,
                                             ensure_ascii=False) + '\n' for r in rows))
    written.append(p)
  return written


def table(results: dict[str, Any]) -> str:
  """The harness's own markdown table of the results."""
  from lm_eval.utils import make_table  # pylint: disable=import-outside-toplevel
  return make_table(results)


def scores(results: dict[str, Any]) -> dict[str, float]:
  """'task/metric' -> value for every numeric metric (stderr included), for metrics and tables."""
  out = {}
  for task, metrics in results.get('results', {}).items():
    for key, value in metrics.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool) and ',' in key:
        name = key.replace(',none', '').replace(',', '_')
        out[f'{task}/{name}'] = float(value) if math.isfinite(value) else math.nan
  return out


def record(workdir: str, results: dict[str, Any], step: int | None) -> str:
  """Writes the scores into WORKDIR/downstream.json, where the results table and the study
  read them (analysis.runs.RunDir.downstream); returns its path."""
  path = storage.join(workdir, DOWNSTREAM_FILE)
  storage.write_json(path, {'step': step, 'n-shot': results.get('n-shot', {}),
                            'scores': scores(results)})
  return path


def define_flags() -> None:
  """Defines this tool's flags (only when run as a program), named as lm-eval's CLI names them."""
  flags.DEFINE_string('workdir', None, 'The run directory (local or gs://).', required=True)
  flags.DEFINE_list('tasks', None, 'Comma-separated task names.', required=True)
  flags.DEFINE_string('include_path', None, 'A folder of task YAML files (local).')
  flags.DEFINE_integer('num_fewshot', None, "Few-shot examples; default each task's own.")
  flags.DEFINE_string('output_path', None, 'The results JSON (PATH.json), or a folder for '
                      'results.json and samples.', required=True)
  flags.DEFINE_bool('log_samples', False, 'Also write every request and its response.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the newest intact one.')
  flags.DEFINE_integer('limit', None, 'Score only the first N documents of each task.')
  flags.DEFINE_integer('batch_size', 16, 'Rows of each batch the model scores.')
  flags.DEFINE_bool('record', True, 'Also write the scores into WORKDIR/downstream.json (the '
                    'results table and the study show them).')
  flags.DEFINE_integer('bootstrap_iters', 100_000, 'Bootstrap resamples for the stderr of '
                       'metrics without a closed form.')


def main(argv: Sequence[str]) -> None:
  console.quiet_logs()
  f = flags.FLAGS
  workdir = cli.resolve_path(f.workdir)
  include = cli.resolve_path(f.include_path) if f.include_path else None
  if include and not storage.is_dir(include):
    raise cli.InputNotFound(f'--include_path={f.include_path} is not a folder of task YAMLs.')
  try:
    _, lm, loaded = lm_from_run(workdir, f.step, f.batch_size)
  except FileNotFoundError as e:  # no config.json, or no checkpoint
    raise cli.InputNotFound(f'--workdir={f.workdir}: {e}') from None
  results = evaluate(lm, f.tasks, include, f.num_fewshot, f.limit, f.log_samples,
                     f.bootstrap_iters)
  print(table(results))
  written = write_results(results, cli.resolve_path(f.output_path))
  if f.record:
    written.append(record(workdir, results, loaded))
  for path in written:
    print(f'wrote {path}')


if __name__ == '__main__':
  define_flags()
  cli.run(main, file_flags=(), positional=False)
