"""One restore decision for every host: the newest intact checkpoint, damage proven, never guessed.

Process 0 lists the steps; every host reads each candidate (its own shards, no collective) and
says what happened; all hosts act on the combined word (distributed.exchange, a bounded wait):
  every host read it          the checksums are verified (one computation over the global arrays,
                              the same answer on every host) and the run resumes from it;
  a host proved it damaged    damaged on every host's word: the next older step is tried;
  a host failed otherwise     every host raises RestoreError (exit 5) naming that host and its
                              cause, and nothing is moved: the files may well be intact;
  a host refused (config)     every host raises that refusal (exit 2).
Proof of damage is bytes that were read and are invalid (a checksum mismatch; JSON, _METADATA or
an OCDBT manifest that does not parse; a compressed stream cut short; a byte range the file does
not hold) or files that are missing. Anything else (permission refused, the server unreachable or
failing after its retries, a timeout, out of memory, a bug) proves nothing about the files.

Damaged steps are moved to WORKDIR/checkpoints_damaged by process 0 under a journal
(`<step>.moving` there) that the next run reads first and finishes, so an interruption never
leaves a step half in two folders.
"""

import json
import re
from typing import Any, Callable

from absl import logging
import jax
import orbax.checkpoint as ocp

from gpas_jax import distributed
from gpas_jax import storage
from gpas_jax.config import ConfigError
from gpas_jax.train import checkpoint as ckpt
from gpas_jax.train.faults import CheckpointDamageError, CheckpointError, ResumeError
from gpas_jax.train.faults import RestoreError, RunError

JOURNAL = '.moving'
# TensorStore's status codes (its errors are ValueErrors starting with one) that prove the bytes
# read are invalid or absent; FAILED_PRECONDITION only with words of a cut or garbled stream,
# since a storage precondition (a generation mismatch) reads the same code.
_DAMAGE_CODES = ('DATA_LOSS', 'OUT_OF_RANGE', 'NOT_FOUND')
_DAMAGE_WORDS = re.compile(r'Truncated|Error decoding|[Cc]orrupt|Unexpected end of|ZSTD_|'
                           r'[Dd]ecompress')
_STATUS = re.compile(r'\b(OK|CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|'
                     r'ALREADY_EXISTS|PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|'
                     r'ABORTED|OUT_OF_RANGE|UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|'
                     r'UNAUTHENTICATED): ')
_HINTS = {
    'PERMISSION_DENIED': 'the caller may not read the bucket (storage.objects.get): fix its '
                         'credentials or IAM role',
    'UNAUTHENTICATED': 'the storage credentials are missing or expired',
    'UNAVAILABLE': 'the storage server could not be reached',
    'DEADLINE_EXCEEDED': 'the storage server did not answer in time',
    'RESOURCE_EXHAUSTED': 'out of memory: restore on more devices or a larger host',
}


def _chain(e: BaseException) -> list[BaseException]:
  out = [e]
  while (out[-1].__cause__ or out[-1].__context__) is not None and len(out) < 32:
    out.append(out[-1].__cause__ or out[-1].__context__)
  return out


def status_codes(e: BaseException) -> list[str]:
  """The status codes (TensorStore, XLA) named anywhere in an error's chain, in order."""
  return [m.group(1) for x in _chain(e) for m in _STATUS.finditer(str(x))]


def is_damage(e: BaseException) -> bool:
  """True only when the error proves the checkpoint's files damaged or incomplete."""
  codes = status_codes(e)
  if any(c not in _DAMAGE_CODES + ('FAILED_PRECONDITION',) for c in codes):
    return False  # e.g. PERMISSION_DENIED beside NOT_FOUND: the server refused, proves nothing
  for x in _chain(e):
    if isinstance(x, (CheckpointDamageError, FileNotFoundError, NotADirectoryError,
                      json.JSONDecodeError, UnicodeDecodeError)):
      return True
    if isinstance(x, KeyError) and 'was not found in the checkpoint' in str(x):
      return True  # an item folder (state, meta) is missing
    if isinstance(x, ValueError) and 'Found incomplete checkpoint' in str(x):
      return True
  if any(c in _DAMAGE_CODES for c in codes):
    return True
  return 'FAILED_PRECONDITION' in codes and bool(_DAMAGE_WORDS.search(
      ' '.join(str(x) for x in _chain(e))))


def hint(e: BaseException) -> str:
  """What to do about an error that is not damage, in words."""
  for code in status_codes(e):
    if code in _HINTS:
      return _HINTS[code]
  if isinstance(e, MemoryError):
    return _HINTS['RESOURCE_EXHAUSTED']
  return 'fix the cause'


def _outcome(e: BaseException) -> dict[str, str]:
  if isinstance(e, (ConfigError, RunError)) and not isinstance(e, CheckpointError):
    return {'outcome': 'refused', 'cause': str(e)}
  if is_damage(e):
    return {'outcome': 'damaged', 'cause': getattr(e, 'reason', None) or ckpt.cause(e)}
  return {'outcome': 'error', 'cause': ckpt.cause(e), 'hint': hint(e)}


def _read_step(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
               data_iterator: Any, check: Callable) -> tuple[Any, dict, BaseException | None]:
  """This host's read of one step: (state or None, its word, its own error or None)."""
  try:
    shapes = ckpt.saved_shapes(manager, step)
    check(step, shapes, ckpt.read_data_state(manager, step))
    state, meta = ckpt.read(manager, step, abstract_state, data_iterator)
    return (state, meta), {'outcome': 'read'}, None
  except Exception as e:  # pylint: disable=broad-except
    return None, _outcome(e), e


def _act_on(words: list[dict], mine: BaseException | None, step: int, where: str) -> None:
  """Raises on every host when any host failed or refused (the same error everywhere)."""
  me = jax.process_index()
  errors = [h for h, w in enumerate(words) if w['outcome'] == 'error']
  if errors:
    h, w = errors[0], words[errors[0]]
    on = f' on host {h} of {len(words)}' if len(words) > 1 else ''
    raise RestoreError(
        f'checkpoint step {step} at {where} could not be read{on}: {w["cause"]}. That proves '
        f'nothing about the files: nothing was moved or deleted. {w["hint"].capitalize()}, then '
        'rerun the same command to resume.') from (mine if me in errors else None)
  refusals = [h for h, w in enumerate(words) if w['outcome'] == 'refused']
  if refusals:
    if me in refusals and mine is not None:
      raise mine
    raise ResumeError(f'host {refusals[0]} refused to resume: {words[refusals[0]]["cause"]}')


def restore_latest_intact(
    manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any, workdir: str,
    check: Callable[[int, dict[str, tuple[int, ...]], dict[str, Any] | None], None],
) -> tuple[Any, int] | None:
  """(state, step) of the newest intact checkpoint, the same on every host; None without any.

  `check(step, saved_shapes, data_state)` raises when this config cannot continue the run.
  Damaged newer steps are logged (step, path, cause) and moved to WORKDIR/checkpoints_damaged;
  every checkpoint damaged is CheckpointError; an error that proves no damage is RestoreError.
  """
  try:
    return _restore_latest_intact(manager, abstract_state, data_iterator, workdir, check)
  except distributed.HostsTimeoutError as e:
    raise RestoreError(f'restoring from {manager.directory}: {e} Nothing was moved.') from e


def _restore_latest_intact(manager, abstract_state, data_iterator, workdir, check):
  finish_moves(workdir)
  manager.reload()
  candidates = distributed.from_process_0(
      'checkpoint-steps', lambda: sorted(manager.all_steps(), reverse=True))
  damaged, result = [], None
  for step in candidates:
    where = str(ckpt.step_dir(manager, step))
    read, word, mine = _read_step(manager, step, abstract_state, data_iterator, check)
    words = distributed.exchange('restore-read', word)
    _act_on(words, mine, step, where)
    bad = [(h, w['cause']) for h, w in enumerate(words) if w['outcome'] == 'damaged']
    if not bad:
      state, meta = read
      try:
        ckpt.verify(state, meta, step, where)  # every host computes the same global checksums
      except CheckpointDamageError as e:
        bad = [(0, e.reason)]
    if bad:
      causes = '; '.join(f'host {h}: {c}' if len(words) > 1 else c for h, c in bad)
      damaged.append((step, where, causes))
      continue
    result = (state, step)
    break
  for step, where, why in damaged:
    logging.error('Checkpoint step %d at %s is damaged or incomplete: %s', step, where, why)
  if damaged and result is None:
    raise CheckpointError(
        f'every checkpoint in {manager.directory} is damaged or incomplete (steps '
        f'{", ".join(str(d[0]) for d in damaged)}; the log names the cause of each). Nothing was '
        'moved or deleted. Move them away to start afresh, or use a new --workdir.')
  if damaged:
    target = move_aside(manager, [d[0] for d in damaged], workdir)
    logging.warning('Resuming from step %d, the newest intact checkpoint; the damaged step(s) %s '
                    'were moved to %s (nothing deleted).', result[1],
                    ', '.join(str(d[0]) for d in damaged), target)
  return result


def _damaged_dir(workdir: str) -> str:
  return storage.join(storage.absolute(workdir), ckpt.DAMAGED_DIR)


def move_aside(manager: ocp.CheckpointManager, steps: list[int], workdir: str) -> str:
  """Process 0 moves damaged step folders out of Orbax's way, each under a journal."""
  target = _damaged_dir(workdir)
  if jax.process_index() == 0:
    for step in steps:
      dest, n = storage.join(target, str(step)), 1
      while storage.exists(dest) or storage.exists(dest + JOURNAL):
        dest, n = storage.join(target, f'{step}.{n}'), n + 1
      journal = dest + JOURNAL
      storage.write_json(journal, {'from': str(ckpt.step_dir(manager, step)), 'to': dest})
      _move(str(ckpt.step_dir(manager, step)), dest)
      storage.remove(journal)
  distributed.exchange('checkpoint-moved', True)  # the others wait (bounded) for the move
  manager.reload()
  return target


def _move(src: str, dest: str) -> None:
  """Moves a step folder; run again after an interruption, it finishes the same move."""
  if storage.is_url(src) or storage.is_url(dest) or not storage.exists(dest):
    if storage.exists(src):
      storage.move_tree(src, dest)  # a bucket: copy (again, whole), then delete the source
    return
  # Local, dest exists: an earlier move was cut between its rename and the journal's removal.
  if storage.exists(src):
    raise CheckpointError(f'{src} and {dest} both exist: move one of them away by hand.')


def finish_moves(workdir: str) -> None:
  """Finishes every move of a damaged step that an interruption cut short (process 0)."""
  target = _damaged_dir(workdir)
  if jax.process_index() == 0 and storage.is_dir(target):
    for name in sorted(storage.path(target).iterdir(), key=str):
      if not str(name).endswith(JOURNAL):
        continue
      try:
        journal = storage.read_json(str(name))
      except ValueError:
        journal = None
      if journal is None:  # torn: the move had not started (the journal is written first)
        storage.remove(str(name))
        continue
      logging.warning('Finishing the move of damaged checkpoint %s to %s (cut short before).',
                      journal['from'], journal['to'])
      _move(journal['from'], journal['to'])
      storage.remove(str(name))
  distributed.exchange('checkpoint-moves-finished', True)
