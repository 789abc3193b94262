"""Side by side with the PyTorch baseline: the same init, the same token rows, N updates each.

    python -m gpas_jax.baseline.compare --config configs/tiny.py --out cmp \
        --config.model.norm_type=pre_gpas --updates 50 [--init ckpt.safetensors] [--tokens rows.npy]

Both sides run on one device. For each precision (float32, and bfloat16 as the baseline trains: `model.to(bfloat16)` before
Adam), gpas_jax trains with `baseline_faithful` through the real trainer (init_from + the
'tokens' source) and PyTorch trains the same rows with the baseline's recipe (LambdaLR schedule,
global then joint gate clip, loss_chunks contiguous chunks, N + 1 updates). In bfloat16 PyTorch
also trains with each chunk's rows reversed (the same objective summed in another order): how
far that moves PyTorch from itself is the bf16 noise floor that the gpas_jax-vs-PyTorch gap is
read against. Writes OUT/compare.md (table), OUT/compare.json and OUT/compare.png (per-update
loss, gradient-norm and per-layer gate differences).

The PyTorch side is the project's port of the baseline (gpas_jax/baseline/torch_model.py; `pip install
torch==2.13.0`), or with --baseline_repo DIR the authors' own `peft_pretraining.modeling_llama`
from a checkout (it reads NORM_TYPE and POST_NUM from the environment).
"""

import copy
import json
import os
import sys
from typing import Any, Sequence

from absl import flags
from absl import logging
import ml_collections
import numpy as np

import gpas_jax
from gpas_jax import config as config_lib
from gpas_jax.runtime import cli

_HISTORY_KEYS = ('loss', 'grad_norm', 'gates')


def read_history(workdir: str) -> list[dict[str, Any]]:
  """Per-update loss, grad_norm and gates (layer order) from a run's metrics.jsonl."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      rec = json.loads(line)
      if 'loss' not in rec:
        continue
      gate_keys = sorted((k for k in rec if k.startswith('gate/')),
                         key=lambda k: tuple(int(x) for x in k[5:].split('.')))
      out[rec['step']] = {'loss': rec['loss'], 'grad_norm': rec['grad_norm'],
                          'gates': [rec[k] for k in gate_keys]}
  return [out[s] for s in sorted(out)]


def faithful_config(config: ml_collections.ConfigDict, tokens_path: str, init: str,
                    updates: int, dtype: str, faithful: bool = True) -> ml_collections.ConfigDict:
  """The run config of the gpas_jax side on the given rows and init.

  faithful=False keeps the config's own optim.arithmetic / model.loss_dtype /
  model.attention_logits_dtype / optim.grad_accumulation (to measure what each part moves);
  N + 1 updates either way.
  """
  c = copy.deepcopy(config)
  c.baseline_faithful = faithful
  c.optim.baseline_last_step = True
  c.init_from = init
  c.num_train_steps = updates
  c.model.param_dtype = c.model.compute_dtype = dtype
  c.optim.state_dtype = ''
  c.data.source, c.data.tokens_path, c.data.eval_tokens_path = 'tokens', tokens_path, ''
  c.log_every_steps = 1
  c.eval_every_steps = c.checkpoint_every_steps = updates + 1
  c.analysis.every_steps = 0
  c.logging.tensorboard = False
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.dcn_data = 1, 1, 1, 1  # one device, as torch
  return config_lib.resolve(c)


def run_jax(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Trains with gpas_jax's trainer in a fresh workdir; returns its per-update history."""
  import jax  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import trainer  # pylint: disable=import-outside-toplevel
  if os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    raise FileExistsError(f'{workdir} already holds a gpas_jax run; give a new --out (the '
                          'PyTorch histories there, torch_*.json, are reused).')
  trainer.train(config, workdir, jax.devices()[:1])
  return read_history(workdir)


def build_torch_model(config: ml_collections.ConfigDict, baseline_repo: str = ''):
  """The PyTorch model (the port, or the authors' class) and its loss(model, ids) function."""
  from gpas_jax.baseline import torch_model  # pylint: disable=import-outside-toplevel
  m = config.model
  if not baseline_repo:
    cfg = torch_model.RefConfig(m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers,
                                m.num_heads, m.norm_type, m.post_num, gate_act=m.gate_act,
                                lns_mode=m.lns_mode, gate_per_sublayer=m.gate_per_sublayer)
    return torch_model.RefModel(cfg, seed=config.seed), None
  os.environ['NORM_TYPE'], os.environ['POST_NUM'] = m.norm_type, str(m.post_num)
  sys.path.insert(0, baseline_repo)
  from peft_pretraining import modeling_llama  # pylint: disable=import-outside-toplevel,import-error
  import transformers  # pylint: disable=import-outside-toplevel
  hf = transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, rms_norm_eps=m.rms_eps,
      pad_token_id=-1, max_position_embeddings=max(2048, config.data.max_length))
  model = modeling_llama.LlamaForCausalLM(hf)
  pad = config.data.pad_id

  def loss_of(mdl, ids):
    return mdl(input_ids=ids, labels=ids.masked_fill(ids == pad, -100)).loss

  return model, loss_of


def run_torch(config: ml_collections.ConfigDict, rows_NxT: np.ndarray, init: str, dtype: str,
              updates: int, baseline_repo: str = '', reverse_chunks: bool = False
              ) -> list[dict[str, Any]]:
  """Trains the PyTorch model on the same rows with the baseline's recipe; per-update history."""
  import torch  # pylint: disable=import-outside-toplevel
  from gpas_jax.baseline import torch_train  # pylint: disable=import-outside-toplevel
  from gpas_jax.model import interop  # pylint: disable=import-outside-toplevel
  torch.manual_seed(config.seed)
  model, loss_of = build_torch_model(config, baseline_repo)
  sd = {k: torch.from_numpy(np.asarray(v, np.float32))
        for k, v in interop.load_state_dict_file(init).items()}
  model.load_state_dict(sd, strict=True)
  if dtype == 'bfloat16':
    model = model.to(torch.bfloat16)  # before Adam: parameters and moments in bf16
  o, b, k = config.optim, config.optim.global_batch_size, config.optim.loss_chunks
  batches = []
  for u in range(updates + 1):
    rows = rows_NxT[u * b:(u + 1) * b]
    if reverse_chunks:  # the same objective, summed in another order
      rows = rows.reshape(k, b // k, -1)[:, ::-1].reshape(b, -1)
    batches.append(torch.from_numpy(np.ascontiguousarray(rows, np.int64)))
  history: list[dict[str, Any]] = []
  torch_train.ref_train(model, batches, lr=o.lr, warmup_steps=o.warmup_steps, num_steps=updates,
                        min_lr_ratio=o.min_lr_ratio, micro_batches=k, grad_clip=o.grad_clip,
                        gate_clip=o.gate_clip, b1=o.b1, b2=o.b2, eps=o.eps,
                        weight_decay=o.weight_decay, baseline_last_step=True,
                        pad_id=config.data.pad_id, history=history, loss_of=loss_of)
  return history


# Fields that change only the gpas_jax side: a PyTorch history does not depend on them.
_JAX_ONLY = {'model': ('loss_dtype', 'attention_logits_dtype', 'attention_impl', 'scan_layers',
                       'remat_policy', 'param_dtype', 'compute_dtype', 'excess_precision'),
             'optim': ('arithmetic', 'micro_batches', 'state_dtype', 'grad_accumulation')}


def _torch_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
  return {k: ({f: v for f, v in val.items() if f not in _JAX_ONLY[k]} if k in _JAX_ONLY else val)
          for k, val in inputs.items()}


def cached_torch(out: str, key: str, inputs: dict[str, Any], run: Any) -> list[dict[str, Any]]:
  """run() once per `inputs`: OUT/torch_<key>.json keeps a PyTorch history for reruns."""
  path = os.path.join(out, f'torch_{key}.json')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
    if _torch_inputs(saved['inputs']) == _torch_inputs(inputs):
      logging.info('PyTorch %s: reusing %s.', key, path)
      return saved['history']
  history = run()
  with open(path, 'w', encoding='utf-8') as f:
    json.dump({'inputs': inputs, 'history': history}, f)
  return history


def gaps(a: Sequence[dict], b: Sequence[dict]) -> dict[str, float]:
  """Largest per-update differences of two histories, and the final gates' largest difference."""
  out = {'updates': min(len(a), len(b))}
  for key in ('loss', 'grad_norm'):
    out[f'{key}_max_abs'] = max(abs(x[key] - y[key]) for x, y in zip(a, b))
  g = [np.abs(np.subtract(x['gates'], y['gates'])) for x, y in zip(a, b) if x['gates']]
  out['gate_max_abs'] = float(max(d.max() for d in g)) if g else 0.0
  out['gate_final_max_abs'] = float(g[-1].max()) if g else 0.0
  if g:  # where the largest gate difference is: after how many updates, and the layer (from 1)
    u = int(np.argmax([d.max() for d in g]))  # record u holds the gates after u updates
    out['gate_max_at'] = [u, int(np.argmax(g[u])) + 1]
  return out


def ratio_note(entry: dict[str, Any]) -> str:
  """What the bf16 gate gap / noise floor ratio says, and what it cannot."""
  at = entry['jax_vs_torch'].get('gate_max_at')
  where = (f' (the largest gap: layer {at[1]}\'s gate after {at[0]} update'
           f'{"s" if at[0] != 1 else ""})' if at else '')
  nearer = ''
  if 'jax_vs_float32' in entry:
    j, t = entry['jax_vs_float32']['gate_max_abs'], entry['torch_vs_float32']['gate_max_abs']
    nearer = (f' Against the float32 run, the gates of gpas_jax bf16 are {j:.3g} away at most, '
              f'PyTorch bf16\'s {t:.3g}: the nearer to exact arithmetic is '
              f'{"gpas_jax" if j < t else "PyTorch" if t < j else "neither"}.')
  return (f'bf16 gate gap / noise floor: {entry["gate_gap_over_noise"]:.2f}x{where}. Near 1: '
          'gpas_jax moves the gates about as far from PyTorch as reordering PyTorch\'s own sums '
          'does (rows reversed in each chunk); well above 1: the two round differently. It '
          'cannot say which side is nearer exact arithmetic, and it reads high over short runs: '
          'reordering rows barely moves a gate\'s bf16 gradient (each sum accumulates in float32 '
          'and rounds once), while that gradient, a sum that nearly cancels, is itself off the '
          'exact one by tens of percent on either side; Adam\'s first updates, where a '
          'gradient changes sign, magnify the difference.' + nearer)


def make_rows(config: ml_collections.ConfigDict, count: int) -> np.ndarray:
  """`count` padded token rows from the config's own train pipeline (e.g. the embedded corpus)."""
  from gpas_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  it = data_lib.make_train_iterator(config, 0, 1)
  rows = []
  while sum(len(r) for r in rows) < count:
    rows.append(next(it)['input_ids'])
  return np.concatenate(rows)[:count]


def save_torch_init(config: ml_collections.ConfigDict, path: str, baseline_repo: str = '') -> None:
  """The PyTorch model's seeded initialisation as a .safetensors state dict."""
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  model, _ = build_torch_model(config, baseline_repo)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def _check_run_config(config: ml_collections.ConfigDict, updates: int,
                      precisions: Sequence[str], faithful: bool) -> None:
  """The gpas_jax run configs of every precision validated, a warmup longer than --updates
  refused with the flag that fixes it."""
  if config.optim.warmup_steps > updates:
    fix = max(1, updates // 10)
    raise config_lib.ConfigError(
        f'--updates {updates} trains num_train_steps={updates}, fewer than the config\'s '
        f'optim.warmup_steps={config.optim.warmup_steps}: add --config.optim.warmup_steps={fix} '
        '(10% of the updates, as the paper\'s recipes), or raise --updates.')
  for dtype in precisions:
    config_lib.validate(faithful_config(config, '', '', updates, dtype, faithful))


def compare(config: ml_collections.ConfigDict, out: str, updates: int, init: str = '',
            tokens: str = '', precisions: Sequence[str] = ('float32', 'bfloat16'),
            baseline_repo: str = '', faithful: bool = True) -> dict[str, Any]:
  """Runs both sides for each precision; writes the table, JSON and figure; returns the gaps."""
  if config.optim.get('ddp_world_size', 1) != 1:
    raise ValueError(f'optim.ddp_world_size={config.optim.ddp_world_size}: the PyTorch side runs '
                     'one process (one GPU); compare with --config.optim.ddp_world_size=1.')
  _check_run_config(config, updates, precisions, faithful)  # before anything is written
  os.makedirs(out, exist_ok=True)
  b = config.optim.global_batch_size
  if not tokens:
    tokens = os.path.join(out, 'tokens.npy')
    np.save(tokens, make_rows(config, (updates + 1) * b))
  rows = np.load(tokens, mmap_mode='r')
  if not init:
    init = os.path.join(out, 'init.safetensors')
    save_torch_init(config, init, baseline_repo)
  # N + 1: the release's loop performs one more update than its num_training_steps, at 1e-7 x
  # the peak lr (torch_train.ref_lr_lambda); both sides run it.
  result: dict[str, Any] = {'norm_type': config.model.norm_type, 'updates': updates + 1,
                            'updates_flag': updates}
  inputs = {'tokens': os.path.abspath(tokens), 'init': os.path.abspath(init),
            'mtimes': [os.path.getmtime(tokens), os.path.getmtime(init)],
            'model': config.model.to_dict(), 'optim': config.optim.to_dict(),
            'baseline_repo': baseline_repo, 'updates': updates}
  curves = {}
  for dtype in precisions:
    logging.info('%s: gpas_jax ...', dtype)
    jax_h = run_jax(faithful_config(config, tokens, init, updates, dtype, faithful),
                    os.path.join(out, f'jax_{dtype}'))
    logging.info('%s: PyTorch ...', dtype)
    torch_h = cached_torch(out, dtype, inputs, lambda: run_torch(
        config, rows, init, dtype, updates, baseline_repo))
    entry = {'jax_vs_torch': gaps(jax_h, torch_h)}
    curves[dtype] = (jax_h, torch_h)
    if dtype == 'bfloat16':
      noise_h = cached_torch(out, f'{dtype}_reversed', inputs, lambda: run_torch(
          config, rows, init, dtype, updates, baseline_repo, reverse_chunks=True))
      entry['noise_floor'] = gaps(noise_h, torch_h)
      curves[dtype] = (jax_h, torch_h, noise_h)
      # Largest gate difference over all updates (the final one alone can happen to be 0).
      floor = entry['noise_floor']['gate_max_abs']
      entry['gate_gap_over_noise'] = (entry['jax_vs_torch']['gate_max_abs'] / floor
                                      if floor > 0 else float('inf'))
    result[dtype] = entry
  if 'float32' in curves and 'bfloat16' in curves:
    # Which bf16 side is nearer exact arithmetic: each against PyTorch's float32 run.
    reference = curves['float32'][1]
    for side, h in zip(('jax', 'torch'), curves['bfloat16'][:2]):
      result['bfloat16'][f'{side}_vs_float32'] = gaps(h, reference)
  with open(os.path.join(out, 'compare.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out, 'compare.md'), 'w', encoding='utf-8') as f:
    f.write(format_table(result))
  note = (f'bf16 gate gap / noise floor {result["bfloat16"]["gate_gap_over_noise"]:.1f}x: near 1 '
          'as reordering PyTorch\'s sums; which side is nearer exact arithmetic: compare.md'
          if 'bfloat16' in result else '')
  plot(curves, os.path.join(out, 'compare.png'), config.model.norm_type, note)
  return result


def format_table(result: dict[str, Any]) -> str:
  """The comparison as a Markdown table."""
  extra = (f' (--updates {result["updates_flag"]}, plus the release\'s extra last one at 1e-7 x '
           'the peak lr)' if 'updates_flag' in result else '')
  lines = [f'# gpas_jax vs PyTorch: {result["norm_type"]}, {result["updates"]} updates{extra}', '',
           '| precision | pair | max abs loss diff | max abs grad-norm diff | max abs gate diff '
           '| final max abs gate diff |', '|---|---|---|---|---|---|']
  for dtype in ('float32', 'bfloat16'):
    for pair in ('jax_vs_torch', 'noise_floor', 'jax_vs_float32', 'torch_vs_float32'):
      g = result.get(dtype, {}).get(pair)
      if g:
        lines.append(f'| {dtype} | {pair} | {g["loss_max_abs"]:.3g} | {g["grad_norm_max_abs"]:.3g} '
                     f'| {g["gate_max_abs"]:.3g} | {g["gate_final_max_abs"]:.3g} |')
  if 'bfloat16' in result:
    lines += ['', ratio_note(result['bfloat16'])]
  return '\n'.join(lines) + '\n'


def plot(curves: dict[str, tuple], path: str, title: str, note: str = '') -> None:
  """Per-update differences gpas_jax - PyTorch (loss, gradient norm, each layer's gate).

  Where a precision has a noise floor (bf16: PyTorch with each chunk's rows reversed), its
  differences from PyTorch are drawn beside the gap: a grey line for the loss and gradient norm,
  a grey band +-(the largest gate difference of any layer, per update) for the gates.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(len(curves), 3, figsize=(13, 3.4 * len(curves)), squeeze=False)
  floor_label = 'noise floor (PyTorch, rows reversed)'
  for row, (dtype, (jax_h, torch_h, *rest)) in zip(axes, curves.items()):
    noise_h = rest[0] if rest else None
    n = min(len(jax_h), len(torch_h), len(noise_h) if noise_h else len(jax_h))
    steps = np.arange(1, n + 1)
    marks = {'marker': 'o', 'ms': 3} if n <= 25 else {}  # a short run's points, not a trend
    for ax, key in zip(row[:2], ('loss', 'grad_norm')):
      ax.plot(steps, [x[key] - y[key] for x, y in zip(jax_h[:n], torch_h)], label='gpas_jax',
              **marks)
      if noise_h:
        ax.plot(steps, [x[key] - y[key] for x, y in zip(noise_h[:n], torch_h)], color='0.5',
                ls='--', label=floor_label)
        ax.legend(fontsize=7)
      ax.set(title=f'{dtype}: {key} (gpas_jax - PyTorch)', xlabel='update', ylabel='difference')
    gates = np.array([np.subtract(x['gates'], y['gates']) for x, y in zip(jax_h[:n], torch_h)])
    if gates.size:
      if noise_h:
        env = np.array([np.abs(np.subtract(x['gates'], y['gates'])).max()
                        for x, y in zip(noise_h[:n], torch_h)])
        row[2].fill_between(steps, -env, env, color='0.6', alpha=0.35, lw=0, label=floor_label)
      for i in range(gates.shape[1]):
        row[2].plot(steps, gates[:, i], label=f'layer {i + 1}', **marks)
      row[2].legend(fontsize=7)
    row[2].set(title=f'{dtype}: gates (gpas_jax - PyTorch)', xlabel='update', ylabel='difference')
  fig.suptitle(f'{title}\n{note}' if note else title, fontsize='medium')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def define_flags() -> None:
  """This tool's flags."""
  cli.define_config_file('config', os.path.join(gpas_jax.ROOT, 'configs', 'tiny.py'),
                         'The run config (model, recipe, chunks); its fields can be '
                         'overridden with --config.x=v.')
  flags.DEFINE_string('out', None, 'Output folder (table, JSON, PNG, both runs).', required=True)
  flags.DEFINE_integer('updates', 50, 'N: both sides perform N + 1 updates, as the baseline.')
  flags.DEFINE_string('init', '', 'Initial checkpoint (.bin/.safetensors/directory, baseline '
                      'names); default: the PyTorch model seeded with --config.seed.')
  flags.DEFINE_string('tokens', '', 'Token rows .npy [rows, max_length]; default: rows from the '
                      "config's own data pipeline, saved as OUT/tokens.npy.")
  flags.DEFINE_list('precisions', ['float32', 'bfloat16'], 'Which precisions to compare.')
  flags.DEFINE_string('baseline_repo', '', "A checkout of the authors' code: use its "
                      'peft_pretraining.modeling_llama instead of the port.')
  flags.DEFINE_bool('faithful', True, 'gpas_jax with baseline_faithful; --nofaithful keeps the '
                    "config's optim.arithmetic, model.loss_dtype, model.attention_logits_dtype and "
                    'optim.grad_accumulation (to measure what each part moves).')


def main(argv: Sequence[str]) -> None:
  from gpas_jax.runtime import console  # pylint: disable=import-outside-toplevel
  console.quiet_logs()  # as train.py: third-party INFO (Orbax, TFDS) only with --verbosity=0
  f = flags.FLAGS
  path = cli.resolve_path  # relative to the working directory, gs:// as it is
  result = compare(f.config, path(f.out), f.updates, path(f.init), path(f.tokens),
                   f.precisions, path(f.baseline_repo), f.faithful)
  print(format_table(result))


if __name__ == '__main__':
  # As train.py: re-exec with the fast malloc preloaded before jax or torch start.
  from gpas_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  allocator.reexec_with_fast_malloc()
  define_flags()
  cli.run(main, positional=False)
