"""Baseline-format (HF `save_pretrained`) directories: export our runs, evaluate theirs.

    python -m gpas_jax.baseline.hf_tools export --workdir RUN --out HF_DIR [--step N]
    python -m gpas_jax.baseline.hf_tools eval --hf_dir HF_DIR --norm_type pre_gpas [--config configs/tiny.py]

`export` writes config.json + model.safetensors with the baseline's parameter names, which the
baseline's LlamaForCausalLM loads with strict=True, and (hf_export) the modeling code of the
architecture and the run's tokenizer: `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` and `AutoTokenizer.from_pretrained(dir)` load it, lm-eval's `hf` backend
scores it. `eval` runs a baseline checkpoint through our
eval pipeline (data.make_eval_batches) and reports the loss as the trainer does (the mean of
per-batch token means; perplexity = exp) - the baseline's own script divides by batches + 1.
"""

import itertools
import json
import math
from typing import Any, Iterable, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections

from gpas_jax.baseline import hf_export
from gpas_jax.model import interop
from gpas_jax.model import transformer as model_lib
from gpas_jax import storage
from gpas_jax.runtime import cli
from gpas_jax.runtime import console

# The model dims a baseline config.json fixes; the eval config must agree with them.
_HF_DIMS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads',
            'norm_type', 'post_num')


def evaluate_model(model: model_lib.Transformer, batches: Iterable[Any],
                   pad_id: int = 0) -> tuple[float, float]:
  """(eval loss, perplexity): the mean of per-batch token-mean losses, and its exp."""
  from gpas_jax.model import stats  # pylint: disable=import-outside-toplevel
  loss = stats.eval_loss(model, batches, pad_id)
  return loss, math.exp(loss) if loss < 700 else math.inf


EXPORT_FILES = ('config.json', 'model.safetensors', 'gpas_jax_export.json', *hf_export.CODE_FILES,
                *hf_export.TOKENIZER_FILES)


def export_run(workdir: str, out_dir: str, step: int | None = None,
               overwrite: bool = False) -> str:
  """Writes a run's checkpoint (latest, or `step`) as a baseline-format directory.

  An existing export in out_dir is refused unless `overwrite` (then its files are replaced).
  """
  from gpas_jax.analysis import runs  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import loading  # pylint: disable=import-outside-toplevel
  if storage.is_url(out_dir):  # a missing bucket: one line before the checkpoint is read
    try:
      storage.check_writable(out_dir)
    except OSError as e:
      raise cli.UserError(f'--out={out_dir}: {e}') from None
  there = [f for f in EXPORT_FILES if storage.exists(storage.join(out_dir, f))]
  if there and not overwrite:
    raise cli.UserError(f'--out={out_dir} already holds an export ({", ".join(there)}); give a '
                        'new --out, or --overwrite to replace it.')
  if step is None:
    saved = runs.checkpoint_steps(workdir)
    step = saved[-1] if saved else None
  from gpas_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  config, model = loading.load_model(workdir, step=step)
  interop.save_hf_directory(model, out_dir)
  hf_export.add_code_and_tokenizer(out_dir, model.config, tok_lib.get_tokenizer(config),
                                   config.data.max_length)
  # Provenance next to the weights; HF loaders ignore unknown files.
  storage.write_json(storage.join(out_dir, 'gpas_jax_export.json'), {
      'workdir': storage.absolute(workdir), 'step': step, 'size_name': config.get('size_name'),
      'seed': config.get('seed'), 'norm_type': model.config.norm_type})
  return out_dir


def export_report(out_dir: str) -> list[str]:
  """'wrote PATH (N bytes)' for each file of an export."""
  paths = [storage.join(out_dir, n) for n in EXPORT_FILES]
  return [f'wrote {p} ({storage.size(p):,} bytes)' for p in paths if storage.exists(p)]


def eval_config(config: ml_collections.ConfigDict,
                model_cfg: model_lib.ModelConfig) -> ml_collections.ConfigDict:
  """A copy of the run config with the model dims of the loaded model (the tokenizer checks
  its vocab against config.model.vocab_size)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for k in _HF_DIMS:
    if k in config.model and config.model[k] != model_cfg[k]:
      logging.info('eval config: model.%s %r -> %r (from the checkpoint).', k, config.model[k],
                   model_cfg[k])
    config.model[k] = model_cfg[k]
  return config


def evaluate_hf_directory(hf_dir: str, config: ml_collections.ConfigDict,
                          norm_type: str | None = None, post_num: int | None = None,
                          max_batches: int | None = None) -> tuple[float, float]:
  """(eval loss, perplexity) of a `save_pretrained` directory on config's eval data."""
  from gpas_jax import data  # pylint: disable=import-outside-toplevel
  if not storage.is_file(storage.join(hf_dir, 'config.json')):
    raise cli.InputNotFound(f'--hf_dir={hf_dir} holds no config.json; give a save_pretrained '
                            'directory (config.json + model.safetensors or pytorch_model.bin).')
  try:
    model = interop.load_hf_directory(hf_dir, norm_type=norm_type, post_num=post_num)
  except (ValueError, KeyError) as e:  # a norm type or post_num its tensors do not fit
    msg = ' '.join(l.strip() for l in str(e).splitlines()[:4]) or type(e).__name__
    raise cli.UserError(f'--hf_dir={hf_dir} does not load as norm_type={norm_type!r} '
                        f'post_num={post_num!r}: {msg} Pass the NORM_TYPE (and POST_NUM) the '
                        'checkpoint was trained with.') from e
  config = eval_config(config, model.config)
  batches = data.make_eval_batches(config)
  if max_batches:
    batches = itertools.islice(batches, max_batches)
  from gpas_jax.model import stats  # pylint: disable=import-outside-toplevel
  batches = stats.model_batches(batches, packed=config.data.layout == 'packed')
  batches = console.progress(batches, f'eval of {hf_dir}', unit='batches')
  return evaluate_model(model, batches, pad_id=config.data.pad_id)


def define_flags() -> None:
  """Defines this tool's flags (only when run as a program)."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('workdir', None, 'export: the run directory.')
  flags.DEFINE_string('out', None, 'export: the directory to write.')
  flags.DEFINE_integer('step', None, 'export: checkpoint step; default the latest.')
  flags.DEFINE_bool('overwrite', False, 'export: replace an existing export in --out.')
  flags.DEFINE_string('hf_dir', None, 'eval: a save_pretrained directory.')
  flags.DEFINE_string('norm_type', None, "eval: the baseline's NORM_TYPE (needed when "
                      'config.json does not name it).')
  flags.DEFINE_integer('post_num', None, 'eval: Mix-LN post_num; default from config.json or 0.')
  flags.DEFINE_integer('max_batches', 0, 'eval: stop after this many batches; 0 = all.')
  config_flags.DEFINE_config_file('config', None, 'eval: the config whose data section gives '
                                  'the eval set; default configs/tiny.py.')


def main(argv: Sequence[str]) -> None:
  console.quiet_logs()
  f = flags.FLAGS
  if len(argv) != 2 or argv[1] not in ('export', 'eval'):
    raise app.UsageError('usage: python -m gpas_jax.baseline.hf_tools {export|eval} [flags]')
  if argv[1] == 'export':
    if not f.workdir or not f.out:
      raise app.UsageError('export needs --workdir and --out.')
    from gpas_jax.analysis import runs  # pylint: disable=import-outside-toplevel
    workdir = cli.resolve_path(f.workdir)
    runs.load_run(workdir)  # not a run: one line naming it
    if not runs.checkpoint_steps(workdir):
      raise cli.InputNotFound(f'--workdir={f.workdir} has no checkpoint to export.')
    out = export_run(workdir, cli.resolve_path(f.out), f.step, f.overwrite)
    print('\n'.join(export_report(out)))  # what was written, so nothing is replaced unseen
    return
  if not f.hf_dir:
    raise app.UsageError('eval needs --hf_dir.')
  if f.config is not None:
    config = f.config
  else:
    from gpas_jax.train import sweep  # pylint: disable=import-outside-toplevel
    config = sweep.load_config_file('configs/tiny.py')  # found from any directory
  hf_dir = cli.resolve_path(f.hf_dir)
  loss, ppl = evaluate_hf_directory(hf_dir, config, f.norm_type, f.post_num,
                                    f.max_batches or None)
  print(json.dumps({'hf_dir': hf_dir, 'eval_loss': loss, 'eval_ppl': ppl}))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
