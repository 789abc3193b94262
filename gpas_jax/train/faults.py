"""How a run fails: exit codes, our error types, stop signals and the non-finite-update guard.

Exit codes of train.py (docs/RELIABILITY.md):
  0   finished (or already finished: the rerun changed nothing)
  1   an unexpected error (a bug): Python's traceback
  2   refused: a bad config, data input, workdir (locked, incompatible resume, damaged checkpoints)
  3   diverged: a non-finite loss or gradient (nan_policy=stop, or past the nan_policy=skip limits)
  4   a checkpoint could not be saved (disk full, permissions, storage errors)
  5   a checkpoint could not be read for a reason that says nothing about its files (permission
      refused, the storage server unreachable, out of memory): every host stops, nothing moved
  75  stopped early by SIGTERM or Ctrl-C after saving a checkpoint: rerun the command to resume
  130 aborted by a second Ctrl-C (nothing saved after the first)
Imports no jax, so train.py can use it before jax.distributed starts.
"""

import signal
import threading
from typing import Any, Callable

from absl import logging

from gpas_jax.config import ConfigError
from gpas_jax.runtime import cli

EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_DIVERGED, EXIT_SAVE_FAILED = 0, 1, 2, 3, 4
EXIT_RESTORE_FAILED = 5
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: try again later (a requeue wrapper resubmits)
EXIT_ABORTED = 130  # 128 + SIGINT, the shell's convention


class RunError(cli.UserError):
  """An error of our own whose message says what happened and what to do; no traceback needed."""
  exit_code = EXIT_REFUSED


class ResumeError(RunError, ConfigError):
  """The workdir holds a run this config cannot continue; names the differing fields."""


class WorkdirBusyError(RunError):
  """Another live process holds the workdir's lock; names its pid and host."""


class StorageError(RunError):
  """A workdir or bucket that cannot be reached or written; refused before compiling."""


class CheckpointError(RunError):
  """No intact checkpoint to restore (every one damaged), or a requested one is damaged."""


class CheckpointDamageError(CheckpointError):
  """Bytes read from a checkpoint are invalid (a checksum mismatch): proof that it is damaged."""


class RestoreError(RunError):
  """A checkpoint could not be read, and the error proves nothing about its files (storage,
  memory, a bug): every host stops with this code, and nothing is moved."""
  exit_code = EXIT_RESTORE_FAILED


class CheckpointSaveError(RunError):
  """A checkpoint save failed (often asynchronously); names the step, the path and the cause."""
  exit_code = EXIT_SAVE_FAILED


class NonFiniteError(RunError, FloatingPointError):
  """The loss or a gradient was NaN or Inf; the message names the step."""
  exit_code = EXIT_DIVERGED


def exit_code(exc: BaseException) -> int | None:
  """The exit code of an error of our own, or None for an unexpected one (a bug)."""
  return cli.exit_code(exc)


# One helper for every tool (gpas_jax/runtime/cli.py); kept under these names for train.py's callers.
readable_errors = cli.readable_errors
override_error = cli.override_error
config_file_error = cli.config_file_error


class StopSignals:
  """SIGTERM and the first Ctrl-C become a flag checked at step boundaries (save, then stop).

  A second Ctrl-C raises KeyboardInterrupt at once. Multi-host runs leave SIGTERM to
  jax.distributed's preemption notifier, which makes every host stop at the same step, and keep
  Python's Ctrl-C (one host cannot ask the others to save).
  """

  def __init__(self, process_count: int = 1):
    self.process_count = process_count
    self.requested: str | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> 'StopSignals':
    if self.process_count == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and self.requested:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt('second Ctrl-C: aborted without waiting for the save')
    self.requested = name
    hint = ' (Ctrl-C again aborts)' if signum == signal.SIGINT else ''
    logging.warning('%s: saving a checkpoint at the next step boundary, then stopping%s.', name,
                    hint)

  def __exit__(self, *exc: Any) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def reached(self, step: int) -> bool:
    """True once a stop was requested (multi-host: at the step all hosts agreed on)."""
    if self.process_count > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      if multihost_utils.reached_preemption_sync_point(step):
        self.requested = self.requested or 'SIGTERM'
        return True
      return False
    return self.requested is not None


class NanGuard:
  """Counts non-finite updates once each; stops the run by nan_policy and its limits.

  'stop': the first one raises NonFiniteError. 'skip': the step function kept the old
  parameters and optimizer state; more than `max_consecutive` in a row, or more than `max_total`
  in all, raise NonFiniteError as 'stop' does.
  """

  def __init__(self, policy: str, max_consecutive: int, max_total: int,
               where: Callable[[], str] = lambda: ''):
    self.policy, self.max_consecutive, self.max_total = policy, max_consecutive, max_total
    self.where = where
    self.skipped = 0
    self.consecutive = 0
    self._last_step = -1

  def observe(self, step: int, finite: bool, loss: Callable[[], float],
              grad_norm: Callable[[], float]) -> None:
    """Records step's outcome (once per step); raises NonFiniteError when the run must stop."""
    if step <= self._last_step:
      return
    self._last_step = step
    if finite:
      self.consecutive = 0
      return
    what = (f'step {step}: the loss ({loss()}) or the gradient norm ({grad_norm()}) is not '
            'finite')
    fix = ('Lower optim.lr, add optim.grad_clip, or set nan_policy=skip to skip such updates.')
    if self.policy == 'skip':
      self.skipped += 1
      self.consecutive += 1
      if self.consecutive > self.max_consecutive:
        what += (f'; {self.consecutive} updates in a row were skipped (nan_max_consecutive='
                 f'{self.max_consecutive}): the run has diverged')
      elif self.skipped > self.max_total:
        what += (f'; {self.skipped} updates were skipped in all (nan_max_total='
                 f'{self.max_total}): the run has diverged')
      else:
        logging.warning('%s; the update was skipped (%d in a row, %d in all).', what,
                        self.consecutive, self.skipped)
        return
      fix = 'Lower optim.lr or add optim.grad_clip.'
    raise NonFiniteError(f'{what}. {self.where()} {fix}'.replace('  ', ' '))
