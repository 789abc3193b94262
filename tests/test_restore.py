"""One restore decision for all hosts: damage only when proven, other errors stop every host with
exit 5 and move nothing, every host acts on the same word, an interrupted move is finished."""

import json
import os
import shutil
import types

import jax
import pytest

from gpas_jax import distributed
from gpas_jax.train import checkpoint as ckpt
from gpas_jax.train import faults
from gpas_jax.train import restore
from gpas_jax.train import steps
from tests.helpers import tiny_train_config
from tests.test_integrity import run_with_two_checkpoints  # pylint: disable=unused-import


def _errors():
  """(error, proves damage) as TensorStore, Orbax, XLA and Python raise them."""
  def chained(outer, inner):
    try:
      raise inner
    except Exception as e:  # pylint: disable=broad-except
      try:
        raise outer from e
      except Exception as x:  # pylint: disable=broad-except
        return x
  gcs = 'Error reading "params.w/0.0" in OCDBT database at "gs://b/run/checkpoints/20/state/"'
  return [
      (faults.CheckpointDamageError('1 array(s) differ from their saved checksums'), True),
      (FileNotFoundError('state/_METADATA is missing'), True),
      (json.JSONDecodeError('Unterminated string', '{"a', 2), True),
      (KeyError('Item "meta" was not found in the checkpoint. Available items: []'), True),
      (ValueError(f'DATA_LOSS: {gcs}: Error decoding manifest'), True),
      (chained(Exception('Encountered error while reading array index'),
               ValueError(f'OUT_OF_RANGE: {gcs}: Requested byte range [4, 9) is not valid')), True),
      (ValueError(f'FAILED_PRECONDITION: {gcs}: Truncated Zstd-compressed stream'), True),
      (ValueError(f'FAILED_PRECONDITION: {gcs}: ZSTD_decompressStream() failed: Destination '
                  'buffer is too small'), True),
      (ValueError(f'NOT_FOUND: {gcs}'), True),
      (ValueError(f'PERMISSION_DENIED: {gcs}: HTTP response code: 403'), False),
      (chained(Exception('Encountered error while reading array index'),
               ValueError(f'PERMISSION_DENIED: {gcs}: 403 beside NOT_FOUND: x')), False),
      (ValueError(f'UNAVAILABLE: {gcs}: CURL error Couldn\'t connect to server'), False),
      (ValueError(f'DEADLINE_EXCEEDED: {gcs}'), False),
      (ValueError(f'FAILED_PRECONDITION: {gcs}: generation mismatch'), False),
      (RuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 17179869184 bytes.'), False),
      (MemoryError(), False),
      (PermissionError(13, 'Permission denied'), False),
      (ConnectionRefusedError(111, 'Connection refused'), False),
      (TypeError("unsupported operand type(s) for +: 'int' and 'str'"), False),  # a bug
      (ValueError('pytree structure error: different types at key path'), False),
  ]


@pytest.mark.parametrize('error,damage', _errors(), ids=lambda x: str(x)[:40])
def test_only_errors_that_prove_the_files_damaged_count_as_damage(error, damage):
  assert restore.is_damage(error) is damage


def _restore(workdir, **kw):
  c = tiny_train_config()
  s = steps.setup(c, jax.devices()[:1])
  manager = ckpt.make_manager(workdir, c)
  from gpas_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  try:
    return restore.restore_latest_intact(manager, s.abstract_state,
                                         data_lib.make_train_iterator(c), workdir,
                                         lambda *a: None, **kw)
  finally:
    manager.close()


@pytest.fixture
def run(run_with_two_checkpoints, tmp_path):  # pylint: disable=redefined-outer-name
  workdir = str(tmp_path / 'run')
  shutil.copytree(run_with_two_checkpoints, workdir)
  return workdir


def test_a_storage_error_at_restore_stops_with_exit_5_and_moves_nothing(run, monkeypatch):
  read = ckpt.read

  def refused(manager, step, *a, **k):
    if step == 6:
      raise ValueError('PERMISSION_DENIED: Error reading "params.lm_head/0.0" in OCDBT database '
                       'at "gs://b/run/checkpoints/6/state/": HTTP response code: 403')
    return read(manager, step, *a, **k)

  monkeypatch.setattr(ckpt, 'read', refused)
  with pytest.raises(faults.RestoreError, match=r'checkpoint step 6 at .* could not be read: '
                     r'ValueError: PERMISSION_DENIED.*nothing was moved or deleted. The caller '
                     r'may not read the bucket') as e:
    _restore(run)
  assert faults.exit_code(e.value) == faults.EXIT_RESTORE_FAILED == 5
  assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['3', '6']
  assert not os.path.exists(os.path.join(run, ckpt.DAMAGED_DIR))


class _Hosts:
  """distributed.exchange as if a second host answered with `other(topic, my_word)`."""

  def __init__(self, other):
    self.other, self.topics = other, []

  def __call__(self, topic, word):
    self.topics.append(topic)
    return [word, self.other(topic, word)]


def test_every_host_acts_on_the_word_of_all(run, monkeypatch):
  # Host 1 cannot read step 6's files at all: this host, which read it, stops too (exit 5).
  monkeypatch.setattr(distributed, 'exchange', _Hosts(
      lambda t, w: {'outcome': 'error', 'cause': 'ValueError: UNAVAILABLE (server gone)',
                    'hint': 'the storage server could not be reached'}
      if t == 'restore-read' else w))
  with pytest.raises(faults.RestoreError, match='could not be read on host 1 of 2: ValueError: '
                     'UNAVAILABLE'):
    _restore(run)
  assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['3', '6']
  # Host 1 proved step 6 damaged (a shard only it reads): this host skips it too.
  hosts = _Hosts(lambda t, w: {'outcome': 'damaged', 'cause': 'DATA_LOSS in its shard'}
                 if t == 'restore-read' and w['outcome'] == 'read' and hosts.topics.count(t) == 1
                 else w)
  monkeypatch.setattr(distributed, 'exchange', hosts)
  state, step = _restore(run)
  assert step == 3 and int(state['step']) == 3
  assert os.listdir(os.path.join(run, ckpt.DAMAGED_DIR)) == ['6']
  assert 'checkpoint-moved' in hosts.topics  # the others waited for process 0's move


def test_process_0_lists_the_steps_for_every_host(run, monkeypatch):
  # Process 0 saw only step 3 (a listing that differs between hosts): that is every host's list.
  monkeypatch.setattr(distributed, 'exchange', lambda topic, word: (
      [[3], word] if topic == 'checkpoint-steps' else [word, word]))
  monkeypatch.setattr(distributed, 'jax', types.SimpleNamespace(process_index=lambda: 1))
  state, step = _restore(run)
  assert step == 3 and int(state['step']) == 3


def test_an_interrupted_move_of_a_damaged_step_is_finished_by_the_next_run(run):
  damaged = os.path.join(run, ckpt.DAMAGED_DIR)
  os.makedirs(damaged)
  src = os.path.join(run, 'checkpoints', '6')
  files = sorted(os.listdir(src))
  # Cut after the journal was written, before the rename.
  with open(os.path.join(damaged, '6' + restore.JOURNAL), 'w', encoding='utf-8') as f:
    json.dump({'from': src, 'to': os.path.join(damaged, '6')}, f)
  restore.finish_moves(run)
  assert sorted(os.listdir(damaged)) == ['6'] and sorted(os.listdir(os.path.join(damaged, '6'))) \
      == files and not os.path.exists(src)
  # A journal left after the rename (cut before its removal): removed, nothing else touched.
  with open(os.path.join(damaged, '6' + restore.JOURNAL), 'w', encoding='utf-8') as f:
    json.dump({'from': src, 'to': os.path.join(damaged, '6')}, f)
  restore.finish_moves(run)
  assert sorted(os.listdir(damaged)) == ['6']
  state, step = _restore(run)  # step 6 is out of Orbax's way; step 3 restores
  assert step == 3 and int(state['step']) == 3
