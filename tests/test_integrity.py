"""Checkpoint integrity: checksums catch flipped bytes; damaged checkpoints fall back, kept."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpas_jax.train import checkpoint as ckpt
from gpas_jax.train import faults
from gpas_jax.train import integrity
from gpas_jax.train import loading
from gpas_jax.train import restore as restore_lib
from gpas_jax.train import steps
from gpas_jax.train import trainer
from tests.helpers import tiny_train_config


def test_fingerprints_see_one_flipped_bit_and_ignore_the_mesh():
  mesh = jax.make_mesh((8,), ('x',))
  x = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8) / 7
  tree = {'w': x, 'b': jnp.ones((8,), jnp.bfloat16), 'n': jnp.zeros((), jnp.int32)}
  fp = integrity.fingerprints(tree)
  sharded = dict(tree, w=jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('x'))))
  assert integrity.fingerprints(sharded) == fp
  bits = np.asarray(x).view(np.uint32).copy()
  for index in [(0, 0), (17, 3), (63, 7)]:
    for bit in (0, 31):
      flipped = bits.copy()
      flipped[index] ^= np.uint32(1 << bit)
      assert integrity.mismatches(dict(tree, w=jnp.asarray(flipped.view(np.float32))), fp) == [
          'w']
  swapped = np.asarray(x).copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # the same values elsewhere: position matters
  assert integrity.mismatches(dict(tree, w=jnp.asarray(swapped)), fp) == ['w']
  assert integrity.mismatches(dict(tree, b=tree['b'].at[3].set(2)), fp) == ['b']


@pytest.fixture(scope='module')
def run_with_two_checkpoints(tmp_path_factory):
  """A finished 6-step run with asynchronous saves at steps 3 and 6 (the default path)."""
  workdir = str(tmp_path_factory.mktemp('two') / 'run')
  trainer.train(tiny_train_config(checkpoint_async=True), workdir, jax.devices()[:1])
  return workdir


def _state_files(step_dir):
  return [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, 'state'))
          for f in fs if '/d/' in os.path.join(d, f)]


def _flip_a_stored_value(step_dir, name='params.lm_head'):
  """Flips one bit of one stored value through TensorStore: a valid file with a wrong value,
  as bit rot in an uncompressed block or a faulty writer leaves it (nothing fails to decode)."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  kvstore = {'driver': 'ocdbt', 'base': f'file://{step_dir}/state/', 'path': f'{name}/'}
  for driver in ('zarr', 'zarr3'):  # Orbax's array format: zarr v2 here, zarr3 in later versions
    try:
      array = ts.open({'driver': driver, 'kvstore': kvstore}).result()
      break
    except ValueError:
      continue
  value = np.asarray(array[3, 5].read().result())
  array[3, 5].write((value.view(np.uint32) ^ np.uint32(4)).view(np.float32)).result()
  assert np.asarray(array[3, 5].read().result()) != value


def _flip_bytes(step_dir):
  """Flips a byte in every page of the largest data file (values, compressed blocks, headers)."""
  path = max(_state_files(step_dir), key=os.path.getsize)
  data = bytearray(open(path, 'rb').read())
  for k in range(1024, len(data) - 1024, 4096):
    data[k] ^= 0x10
  open(path, 'wb').write(data)


def _damage(step_dir, how):
  if how == 'flipped_bit':
    _flip_a_stored_value(step_dir)
  elif how == 'flipped_bytes':
    _flip_bytes(step_dir)
  elif how == 'missing_METADATA':
    os.remove(os.path.join(step_dir, 'state', '_METADATA'))
  elif how == 'broken_meta_json':
    open(os.path.join(step_dir, 'meta', 'metadata'), 'w').write('{"process_count": 1, "che')
  elif how == 'broken_data_json':
    open(os.path.join(step_dir, 'data', 'process_0-of-1.json'), 'w').write('{"version": 1,')
  elif how == 'empty_step_folder':
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


DAMAGES = ['flipped_bit', 'flipped_bytes', 'missing_METADATA', 'broken_meta_json', 'broken_data_json',
           'empty_step_folder']


@pytest.mark.parametrize('how', DAMAGES)
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(
    run_with_two_checkpoints, tmp_path, caplog, how):
  workdir = str(tmp_path / 'run')
  shutil.copytree(run_with_two_checkpoints, workdir)
  step6 = os.path.join(workdir, 'checkpoints', '6')
  _damage(step6, how)
  damaged_files = sorted(os.listdir(step6))
  c = tiny_train_config()
  s = steps.setup(c, jax.devices()[:1])
  manager = ckpt.make_manager(workdir, c)
  from gpas_jax import data as data_lib
  it = data_lib.make_train_iterator(c)
  with caplog.at_level('WARNING'):
    state, step = restore_lib.restore_latest_intact(manager, s.abstract_state, it, workdir,
                                             lambda *a: None)
  assert step == 3 and int(state['step']) == 3
  assert it.get_state()['batches'] == 3  # the data stream resumes with the state
  assert f'Checkpoint step 6 at {step6} is damaged or incomplete' in caplog.text
  if how == 'flipped_bit':  # loads without an error: only the checksum sees it
    assert '1 array(s) differ from their saved checksums (params/lm_head)' in caplog.text
  kept = os.path.join(workdir, ckpt.DAMAGED_DIR, '6')
  assert sorted(os.listdir(kept)) == damaged_files  # moved aside whole, nothing deleted
  assert manager.all_steps() == [3]
  manager.close()


def test_every_checkpoint_damaged_is_refused_and_nothing_moved(run_with_two_checkpoints, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(run_with_two_checkpoints, workdir)
  os.remove(os.path.join(workdir, 'summary.json'))
  for step in ('3', '6'):
    _flip_bytes(os.path.join(workdir, 'checkpoints', step))
  with pytest.raises(faults.CheckpointError, match=r'every checkpoint in .* is damaged.*steps 6, '
                     r'3.*Nothing was moved or deleted'):
    trainer.train(tiny_train_config(), workdir, jax.devices()[:1])
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']


def test_run_resumes_past_a_flipped_bit_exactly(run_with_two_checkpoints, tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  shutil.copytree(run_with_two_checkpoints, workdir)
  os.remove(os.path.join(workdir, 'summary.json'))
  _flip_a_stored_value(os.path.join(workdir, 'checkpoints', '6'))
  with caplog.at_level('WARNING'):
    result = trainer.train(tiny_train_config(checkpoint_async=True), workdir, jax.devices()[:1])
  assert 'Resuming from step 3, the newest intact checkpoint' in caplog.text
  assert result['finished'] and result['step'] == 6
  # Steps 4..6 again from step 3 give the uninterrupted run's parameters, bit for bit.
  _, model = loading.load_model(run_with_two_checkpoints)
  np.testing.assert_array_equal(np.asarray(result['state']['params']['lm_head']),
                                np.asarray(model.lm_head[...]))
  assert os.listdir(os.path.join(workdir, ckpt.DAMAGED_DIR)) == ['6']


def test_load_model_skips_a_damaged_latest_and_ignores_optimizer_changes(
    run_with_two_checkpoints, tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  shutil.copytree(run_with_two_checkpoints, workdir)
  config = json.load(open(os.path.join(workdir, 'config.json')))
  config['optim']['grad_clip'] = 1.0  # another optimizer tree than the checkpoint's
  json.dump(config, open(os.path.join(workdir, 'config.json'), 'w'))
  _, intact6 = loading.load_model(workdir)
  _flip_a_stored_value(os.path.join(workdir, 'checkpoints', '6'))
  with pytest.raises(faults.CheckpointError, match='step 6 at .* is damaged'):
    loading.load_model(workdir, step=6)
  with caplog.at_level('WARNING'):
    _, model = loading.load_model(workdir)
  assert 'Loaded step 3, the newest intact checkpoint' in caplog.text
  _, model3 = loading.load_model(run_with_two_checkpoints, step=3)
  np.testing.assert_array_equal(np.asarray(model.lm_head[...]), np.asarray(model3.lm_head[...]))
  assert not np.array_equal(np.asarray(intact6.lm_head[...]), np.asarray(model3.lm_head[...]))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']  # never moves
