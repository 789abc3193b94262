"""One run per workdir: the lock, finished-run detection, resume checks, torn-line repair.

Everything here runs before the run writes anything (config.json, metrics, checkpoints), so a
refused start leaves the workdir as it was.
"""

import contextlib
import json
import os
from typing import Any, Callable, Iterator

from absl import logging
import ml_collections

from gpas_jax import distributed
from gpas_jax import storage
from gpas_jax.train import checkpoint as ckpt
from gpas_jax.train import lock as lock_lib
from gpas_jax.train.faults import ResumeError, WorkdirBusyError

# The model fields that fix the shapes of the saved arrays.
SHAPE_KEYS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads',
              'norm_type', 'post_num', 'gate_per_sublayer', 'scan_layers')
# Data-state fields whose change gives another batch stream (host count has its own message).
_STREAM_KEYS = {'padded': ('layout', 'dataset', 'seed', 'tokenizer'),
                'packed': ('layout', 'dataset', 'seed', 'tokenizer', 'worker_count',
                           'global_batch_size', 'max_length')}


def _is_process_0() -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index() == 0




@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/lock for the run (process 0 of a multi-host run takes it for all).

  A second live run is refused with WorkdirBusyError naming the holder's pid and host; a dead
  run's lock is taken over with a log line naming it (train/lock.py: flock on a local disk, a
  heartbeat object in a bucket).
  """
  hold = lock_lib.hold_bucket if storage.is_url(workdir) else lock_lib.hold_local
  with contextlib.ExitStack() as stack:
    error = stack.enter_context(hold(workdir)) if _is_process_0() else ''
    # Every process gets process 0's answer (a bounded wait, not a device broadcast).
    if not distributed.from_process_0('workdir-lock', lambda: not error):
      raise WorkdirBusyError(error or f'{storage.absolute(workdir)} is in use by another run '
                             '(process 0 says so).')
    yield


def finished_summary(workdir: str, total_steps: int) -> dict[str, Any] | None:
  """summary.json of a run that already finished `total_steps`, else None.

  A summary of more steps than this config trains is refused (ResumeError).
  """
  summary = storage.read_json(storage.join(workdir, 'summary.json'))
  if summary is None:
    return None
  step = summary.get('step')
  if not summary.get('finished') or not isinstance(step, int) or step < total_steps:
    return None  # a longer run continues from the last checkpoint
  if step > total_steps:
    raise ResumeError(
        f'{workdir} holds a run that finished {step} steps, more than the {total_steps} this '
        'config trains (num_train_steps). Use its own num_train_steps, or a new --workdir.')
  return summary


def _saved_config(workdir: str) -> dict[str, Any]:
  return storage.read_json(storage.join(workdir, 'config.json')) or {}


def _changed(saved: dict[str, Any], now: dict[str, Any], prefix: str) -> list[str]:
  """'optim.grad_clip: 0.0 -> 1.0' for every leaf that differs between two config dicts."""
  out = []
  for k in sorted(set(saved) | set(now)):
    a, b = saved.get(k), now.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _changed(a, b, f'{prefix}{k}.')
    elif a != b:
      out.append(f'{prefix}{k}: {a!r} -> {b!r}')
  return out


def resume_check(config: ml_collections.ConfigDict, workdir: str, abstract_state: Any,
                 data_meta: dict[str, Any] | None, total_steps: int
                 ) -> Callable[[int, dict[str, tuple[int, ...]], dict[str, Any] | None], None]:
  """The check restore.restore_latest_intact runs on a checkpoint before restoring it.

  It raises ResumeError, naming the differing fields and the way out, when the checkpoint
  cannot continue under this config: more steps than num_train_steps, another model or
  optimizer state tree, or another data stream (dataset, seed, layout, tokenizer, ...).
  """
  saved_cfg = _saved_config(workdir)
  now_cfg = json.loads(config.to_json_best_effort())
  way_out = ('Resume with the settings the run was started with (its config.json), or use a new '
             '--workdir.')

  def check(step: int, shapes: dict[str, tuple[int, ...]], data_state: dict | None) -> None:
    head = f'cannot resume {storage.absolute(workdir)} from its checkpoint at step {step}'
    if step > total_steps:
      raise ResumeError(f'{head}: it is beyond num_train_steps={config.num_train_steps} '
                        f'({total_steps} updates). Raise num_train_steps to at least {step}, or '
                        'use a new --workdir.')
    bad = ckpt.tree_mismatch(shapes, abstract_state)
    if bad:
      changed = _changed(saved_cfg.get('optim', {}), now_cfg['optim'], 'optim.')
      changed += [d for d in _changed(saved_cfg.get('model', {}), now_cfg['model'], 'model.')
                  if d.split(':')[0][len('model.'):] in SHAPE_KEYS or 'dtype' in d]
      raise ResumeError(
          f'{head}: the saved model or optimizer state does not fit this config '
          f'({"; ".join(bad[:3])}{"; ..." if len(bad) > 3 else ""}). Changed since the run '
          f'started: {", ".join(changed) or "nothing in config.json"}. ' + way_out)
    if data_state and data_meta:
      saved_meta = data_state.get('meta', {})
      keys = _STREAM_KEYS.get(data_meta.get('layout'), _STREAM_KEYS['padded'])
      diff = [f'{k}: {saved_meta.get(k)!r} -> {data_meta.get(k)!r}' for k in keys
              if k in saved_meta and k in data_meta and saved_meta[k] != data_meta[k]]
      if diff:
        hint = (' (a tokenizer of the same vocabulary size is another tokenizer: the saved model '
                'reads tokens by its ids)' if any(d.startswith('tokenizer') for d in diff) else '')
        data_fields = [d for d in _changed(saved_cfg.get('data', {}), now_cfg['data'], 'data.')
                       ] if saved_cfg else []
        raise ResumeError(
            f'{head}: the data stream differs from the saved one ({", ".join(diff)}){hint}. '
            f'Changed data settings: {", ".join(data_fields) or "none recorded"}. ' + way_out)

  return check


def repair_jsonl(path: str) -> None:
  """Cuts a torn last line (a run killed mid-write) so the next record starts on its own line.

  Local files only: an object in a bucket is written whole, never torn.
  """
  if storage.is_url(path) or not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, 'rb+') as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b'\n':
      return
    f.seek(0)
    data = f.read()
    keep = data.rfind(b'\n') + 1
    try:
      json.loads(data[keep:])
      f.write(b'\n')  # a whole record that only lacks its newline
      return
    except ValueError:
      f.truncate(keep)
  logging.warning('%s ended in a torn line (%d bytes, a run killed mid-write); removed it.', path,
                  len(data) - keep)


def schedule_change(config: ml_collections.ConfigDict, saved: dict[str, Any],
                    step: int) -> str | None:
  """How resuming at `step` changes the lr schedule the workdir's run was started with (its
  config.json), or None when it does not: a longer num_train_steps re-stretches the cosine."""
  keys = ('num_train_steps', 'optim.lr', 'optim.warmup_steps', 'optim.min_lr_ratio')

  def get(c: Any, key: str) -> Any:
    for part in key.split('.'):
      c = c.get(part) if hasattr(c, 'get') else None
    return c
  if not saved or step <= 0 or all(get(saved, k) is None for k in keys):
    return None
  changed = [k for k in keys if get(saved, k) is not None and get(saved, k) != get(config, k)]
  if not changed:
    return None
  from gpas_jax.train import optim as optim_lib  # pylint: disable=import-outside-toplevel
  old = ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))
  for k in changed:
    *parents, field = k.split('.')
    (old[parents[0]] if parents else old)[field] = get(saved, k)
  lr_old = float(optim_lib.lr_schedule(old)(step))
  lr_new = float(optim_lib.lr_schedule(config)(step))
  what = ', '.join(f'{k} {get(saved, k)} -> {get(config, k)}' for k in changed)
  return (f'changed on resume ({what}): the lr of update {step + 1} is {lr_new:.3g}, it was '
          f'{lr_old:.3g} under the schedule the run started with (the cosine spans the new '
          'length from here); keep the old values, or use a new --workdir, to avoid it')
