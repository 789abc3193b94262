"""WORKDIR/lock: one run per workdir, on a local disk (flock) and in a bucket (an object).

Local: an OS advisory lock, so the kernel releases it when its process dies however it dies.
A bucket has no flock: the lock is an object created only if absent (generation precondition
if_generation_match=0) holding pid, host, start time and a heartbeat that a thread refreshes
every HEARTBEAT_S (each write conditional on the generation it last wrote). A lock whose
heartbeat is older than STALE_S, or whose holder ran on this host and is gone, belonged to a
run that died: the next run takes it over
(conditional on that generation, so of two racing takers one wins) and logs the dead holder.
Release deletes it, conditional on its generation.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any, Iterator

from absl import logging

from gpas_jax import storage
from gpas_jax.train.faults import StorageError

LOCK_FILE = 'lock'
# A dead run's bucket lock is taken over once its heartbeat is this old; the live holder
# refreshes it 20 times as often. GPAS_LOCK_STALE_S sets it (the tests use seconds).
STALE_S = float(os.environ.get('GPAS_LOCK_STALE_S', '600'))
HEARTBEAT_S = STALE_S / 20
# Each lock request is retried for at most this long (the client's default is 120 s), so a run
# whose bucket went away is not held up at its end by its own lock.
RETRY_S = 10.0


def _retry() -> Any:
  from google.cloud.storage.retry import DEFAULT_RETRY  # pylint: disable=import-outside-toplevel
  return DEFAULT_RETRY.with_timeout(RETRY_S)


def _me() -> dict[str, Any]:
  now = time.time()
  return {'pid': os.getpid(), 'host': socket.gethostname(),
          'started': datetime.datetime.fromtimestamp(now).isoformat(timespec='seconds'),
          'heartbeat': now}


def _busy(workdir: str, h: dict[str, Any]) -> str:
  return (f'{storage.absolute(workdir)} is in use by another run (pid {h.get("pid", "?")} on '
          f'host {h.get("host", "?")}, started {h.get("started", "?")}). Wait for it to end or '
          'stop it, or use another --workdir.')


def _dead(h: dict[str, Any]) -> bool:
  """True when the holder ran on this host and its process is gone (no need to wait)."""
  if h.get('host') != socket.gethostname() or not isinstance(h.get('pid'), int):
    return False
  try:
    os.kill(h['pid'], 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False
  return False


def _holder(path: str) -> dict[str, Any]:
  try:
    return json.loads(storage.read_text(path))
  except (OSError, ValueError):
    return {}


@contextlib.contextmanager
def hold_local(workdir: str) -> Iterator[str]:
  """Holds a local WORKDIR/lock with flock; yields '' or the reason it is refused."""
  storage.makedirs(workdir)
  path = os.path.join(storage.absolute(workdir), LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    h = _holder(path)
    os.close(fd)
    yield _busy(workdir, h)
    return
  except OSError as e:  # a file system without flock: run unlocked rather than not at all
    logging.warning('Cannot lock %s (%s); two runs on this workdir would not be detected.',
                    path, e)
    os.close(fd)
    yield ''
    return
  old = _holder(path)
  if old.get('pid') and old.get('pid') != os.getpid():
    logging.warning('Took over the lock of a run that ended without releasing it (pid %s on '
                    'host %s).', old.get('pid'), old.get('host'))
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(_me()).encode(), 0)
  os.fsync(fd)
  try:
    yield ''
  finally:
    os.ftruncate(fd, 0)  # a released lock names no holder
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


class _Heartbeat(threading.Thread):
  """Rewrites the lock object's heartbeat while the run lives, each write on its generation."""

  def __init__(self, blob: Any, generation: int, holder: dict[str, Any]):
    super().__init__(name='gpas_jax-lock-heartbeat', daemon=True)
    self.blob, self.generation, self.holder = blob, generation, holder
    self.stop = threading.Event()

  def run(self) -> None:
    while not self.stop.wait(HEARTBEAT_S):
      self.holder['heartbeat'] = time.time()
      try:
        self.blob.upload_from_string(json.dumps(self.holder), if_generation_match=self.generation,
                                     timeout=RETRY_S, retry=_retry())
        self.generation = self.blob.generation
      except Exception as e:  # pylint: disable=broad-except
        # A lost precondition means another run took the lock over; the run goes on (its
        # checkpoints are its own), but says so.
        logging.error('Could not refresh the workdir lock %s: %s', self.blob.name, e)


@contextlib.contextmanager
def hold_bucket(workdir: str) -> Iterator[str]:
  """Holds gs://.../WORKDIR/lock as an object; yields '' or the reason it is refused."""
  from google.api_core import exceptions as gexc  # pylint: disable=import-outside-toplevel
  try:
    storage.check_writable(workdir)
  except OSError as e:
    raise StorageError(f'--workdir {workdir}: {e}') from e
  bucket_name, prefix = storage.bucket_and_name(workdir)
  blob = storage.gcs_client().bucket(bucket_name).blob(f'{prefix.rstrip("/")}/{LOCK_FILE}')
  me = _me()
  try:
    blob.upload_from_string(json.dumps(me), if_generation_match=0, timeout=RETRY_S,
                            retry=_retry())
  except gexc.PreconditionFailed:
    blob.reload(timeout=RETRY_S, retry=_retry())
    held = blob.generation
    h = _holder(storage.join(workdir, LOCK_FILE))
    age = time.time() - float(h.get('heartbeat', 0))
    if age < STALE_S and not _dead(h):
      yield _busy(workdir, h) + (f' Its heartbeat is {age:.0f} s old: a lock is taken over once '
                                 f'it is {STALE_S:.0f} s old (GPAS_LOCK_STALE_S).')
      return
    try:
      blob.upload_from_string(json.dumps(me), if_generation_match=held, timeout=RETRY_S,
                              retry=_retry())
    except gexc.PreconditionFailed:
      yield _busy(workdir, _holder(storage.join(workdir, LOCK_FILE)))
      return
    logging.warning('Took over the lock of a run that ended without releasing it (pid %s on host '
                    '%s, last heartbeat %.0f s ago).', h.get('pid'), h.get('host'), age)
  beat = _Heartbeat(blob, blob.generation, me)
  beat.start()
  try:
    yield ''
  finally:
    beat.stop.set()
    beat.join(RETRY_S + 5)  # a refresh in flight ends within its retry bound
    try:
      blob.delete(if_generation_match=beat.generation, timeout=RETRY_S, retry=_retry())
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Could not release the workdir lock %s: %s', blob.name, e)
