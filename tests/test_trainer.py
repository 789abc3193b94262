"""Training: loss falls, exact resume, sharded == single device, mesh changes, faults."""

import json
import os

import jax
import numpy as np
import pytest

from gpas_jax import sharding
from gpas_jax.train import checkpoint as ckpt
from gpas_jax.train import loading
from gpas_jax.train import trainer
from tests.helpers import tiny_train_config


def _losses(workdir):
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      r = json.loads(line)
      if 'loss' in r:
        out[r['step']] = r['loss']
  return out


def _params(result):
  return jax.tree.map(np.asarray, jax.device_get(result['state']['params']))


def test_loss_falls_on_the_tiny_config(tmp_path):
  c = tiny_train_config(num_train_steps=30, eval_every_steps=30, checkpoint_every_steps=30,
                        **{'optim.warmup_steps': 3, 'optim.lr': 1e-2, 'analysis.every_steps': 10})
  result = trainer.train(c, str(tmp_path), jax.devices()[:1])
  losses = _losses(str(tmp_path))
  first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (28, 29, 30)])
  assert last < first - 1.0, (first, last)
  assert result['finished'] and np.isfinite(result['eval_loss'])
  summary = json.load(open(tmp_path / 'summary.json', encoding='utf-8'))
  assert summary['finished'] and summary['eval_ppl'] == pytest.approx(np.exp(summary['eval_loss']))
  records = [json.loads(l) for l in open(tmp_path / 'analysis.jsonl', encoding='utf-8')]
  assert [r['step'] for r in records] == [1, 10, 20, 30]
  assert len(records[-1]['act_var']) == 3 and len(records[-1]['grad_norm']) == 2
  assert records[0]['gate'] == [0.0, 0.0] and records[-1]['gate'] != [0.0, 0.0]
  _, model = loading.load_model(str(tmp_path))  # the checkpoint loads back as a model
  np.testing.assert_array_equal(np.asarray(model.lm_head[...]),
                                np.asarray(result['state']['params']['lm_head']))


def test_preempted_run_resumes_bitwise(tmp_path):
  c = tiny_train_config(checkpoint_every_steps=100)
  full = trainer.train(c, str(tmp_path / 'full'), jax.devices()[:1])
  c_stop = tiny_train_config(checkpoint_every_steps=100, **{'debug.sigterm_at_step': 4})
  part = trainer.train(c_stop, str(tmp_path / 'resumed'), jax.devices()[:1])
  assert part['step'] == 4 and not part['finished']
  assert ckpt.make_manager(str(tmp_path / 'resumed'), c).latest_step() == 4
  resumed = trainer.train(c, str(tmp_path / 'resumed'), jax.devices()[:1])
  assert resumed['step'] == 6 and resumed['finished']
  assert _losses(str(tmp_path / 'full')) == _losses(str(tmp_path / 'resumed'))
  for a, b in zip(jax.tree.leaves(_params(full)), jax.tree.leaves(_params(resumed))):
    np.testing.assert_array_equal(a, b)
  print('resume test: losses', _losses(str(tmp_path / 'resumed')))


def test_2x2x2_mesh_matches_one_device_and_restores_on_other_meshes(tmp_path):
  c1 = tiny_train_config(num_train_steps=3, checkpoint_every_steps=3)
  one = trainer.train(c1, str(tmp_path / 'one'), jax.devices()[:1])
  c8 = tiny_train_config(num_train_steps=3, checkpoint_every_steps=3,
                         **{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2})
  eight = trainer.train(c8, str(tmp_path / 'eight'), jax.devices())
  spec = eight['state']['params']['stacks'][0]['layers'][0]['mlp']['gate_proj'].sharding.spec
  assert spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  l1, l8 = _losses(str(tmp_path / 'one')), _losses(str(tmp_path / 'eight'))
  # Sharded reductions sum in another order: fp32 rounding, amplified a little by Adam.
  np.testing.assert_allclose([l8[s] for s in l1], [l1[s] for s in l1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(_params(one)), jax.tree.leaves(_params(eight))):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
  # The (2,2,2) checkpoint restores exactly onto (8,1,1) and onto one device.
  from gpas_jax.train import steps
  manager = ckpt.make_manager(str(tmp_path / 'eight'), c8)
  for mesh, devices in (((8, 1, 1), jax.devices()), ((1, 1, 1), jax.devices()[:1])):
    c = tiny_train_config(**{'mesh.data': mesh[0], 'mesh.fsdp': mesh[1], 'mesh.tensor': mesh[2]})
    s = steps.setup(c, devices)
    state, _ = ckpt.restore(manager, 3, s.abstract_state)
    leaf = state['params']['lm_head']
    assert leaf.sharding.mesh.devices.size == len(devices)
    for a, b in zip(jax.tree.leaves(_params(eight)), jax.tree.leaves(
        jax.tree.map(np.asarray, jax.device_get(state['params'])))):
      np.testing.assert_array_equal(a, b)


def test_micro_batches_save_memory_and_loss_chunks_set_the_objective(tmp_path):
  from gpas_jax import data as data_lib
  from gpas_jax.train import steps
  c = tiny_train_config(num_train_steps=2, **{'optim.micro_batches': 4})
  s = steps.setup(c, jax.devices()[:1])
  state = steps.init_state(s)
  batch = next(data_lib.make_train_iterator(c))
  eval_step = steps.make_eval_step(s)
  one_batch = float(eval_step(state['params'], steps.global_batch(s, batch))[0])
  expected = np.mean([float(eval_step(state['params'], steps.global_batch(
      s, {k: v[2 * i:2 * i + 2] for k, v in batch.items()}))[0]) for i in range(4)])
  # micro_batches=4 accumulates, but the objective stays one token mean over the batch.
  _, m = steps.make_train_step(s)(state, steps.global_batch(s, batch))
  np.testing.assert_allclose(float(m['loss']), one_batch, rtol=1e-6)
  c1 = tiny_train_config(num_train_steps=2)
  s1 = steps.setup(c1, jax.devices()[:1])
  _, m1 = steps.make_train_step(s1)(steps.init_state(s1), steps.global_batch(s1, batch))
  np.testing.assert_allclose(float(m['grad_norm']), float(m1['grad_norm']), rtol=1e-5)
  # loss_chunks=4: the baseline's mean of 4 token means over contiguous rows.
  c4 = tiny_train_config(num_train_steps=2, **{'optim.loss_chunks': 4})
  s4 = steps.setup(c4, jax.devices()[:1])
  _, m4 = steps.make_train_step(s4)(steps.init_state(s4), steps.global_batch(s4, batch))
  np.testing.assert_allclose(float(m4['loss']), expected, rtol=1e-6)
  assert abs(one_batch - expected) > 1e-4  # the rows' token counts differ: the grouping matters


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  c = tiny_train_config(**{'debug.inject_nan_step': 4})
  with pytest.raises(trainer.NonFiniteError, match='step 5:.*last good checkpoint is step 3'):
    trainer.train(c, str(tmp_path), jax.devices()[:1])
  manager = ckpt.make_manager(str(tmp_path), c)
  assert manager.all_steps() == [3]


def test_nan_before_the_first_checkpoint_says_so(tmp_path):
  c = tiny_train_config(**{'debug.inject_nan_step': 0})
  with pytest.raises(trainer.NonFiniteError,
                     match=r'step 1:.*No checkpoint was saved before it \(checkpoint_every_'):
    trainer.train(c, str(tmp_path), jax.devices()[:1])


def test_nan_skip_policy_skips_the_update_and_counts_it_once(tmp_path):
  c = tiny_train_config(nan_policy='skip', **{'debug.inject_nan_step': 2})
  result = trainer.train(c, str(tmp_path), jax.devices()[:1])
  assert result['finished']
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(_params(result)))
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl', encoding='utf-8')]
  # Logged every step and checked at the log and the save too: one skipped update is one.
  assert [r.get('skipped_steps', 0) for r in records if 'loss' in r] == [0, 0, 1, 1, 1, 1]


def test_a_skipped_update_leaves_parameters_and_optimizer_state_bit_identical():
  from gpas_jax import data as data_lib
  from gpas_jax.train import steps
  c = tiny_train_config(nan_policy='skip', **{'debug.inject_nan_step': 1})
  s = steps.setup(c, jax.devices()[:1])
  train_step = steps.make_train_step(s)
  batches = data_lib.make_train_iterator(c)
  state, m = train_step(steps.init_state(s), steps.global_batch(s, next(batches)))
  assert bool(m['finite'])
  before = jax.tree.map(np.asarray, jax.device_get(state))  # the state is donated below
  state, m = train_step(state, steps.global_batch(s, next(batches)))
  assert not bool(m['finite'])
  after = jax.tree.map(np.asarray, jax.device_get(state))
  assert int(after['step']) == 2
  for key in ('params', 'opt_state'):
    for a, b in zip(jax.tree.leaves(before[key]), jax.tree.leaves(after[key])):
      assert a.tobytes() == b.tobytes()
  state, m = train_step(state, steps.global_batch(s, next(batches)))  # the next one updates
  assert bool(m['finite']) and not np.array_equal(
      np.asarray(state['params']['lm_head']), before['params']['lm_head'])


@pytest.mark.parametrize('limit,match', [
    ({'nan_max_consecutive': 2}, r'step 4:.*3 updates in a row were skipped \(nan_max_consecu'),
    ({'nan_max_total': 1}, r'step 3:.*2 updates were skipped in all \(nan_max_total=1'),
])
def test_nan_skip_policy_stops_a_diverged_run(tmp_path, limit, match):
  c = tiny_train_config(nan_policy='skip', num_train_steps=12, checkpoint_every_steps=2,
                        **{'debug.inject_nan_step': 1, 'debug.inject_nan_count': 100}, **limit)
  with pytest.raises(trainer.NonFiniteError, match=match + r'.*last good checkpoint is step 2'):
    trainer.train(c, str(tmp_path), jax.devices()[:1])
  assert not os.path.exists(tmp_path / 'summary.json')  # not reported as a finished run


def test_ctrl_c_saves_and_stops_like_sigterm(tmp_path):
  c = tiny_train_config(checkpoint_every_steps=100, **{'debug.sigint_at_step': 2})
  try:
    result = trainer.train(c, str(tmp_path), jax.devices()[:1])
  except KeyboardInterrupt:
    pytest.fail('the first Ctrl-C interrupted the run instead of saving and stopping')
  assert result['preempted'] == 'SIGINT' and result['step'] == 2 and not result['finished']
  assert ckpt.make_manager(str(tmp_path), c).all_steps() == [2]


def test_unusable_mesh_is_rejected_before_compiling(tmp_path):
  c = tiny_train_config(**{'mesh.data': 3, 'mesh.fsdp': 2})
  with pytest.raises(sharding.MeshError, match='multiplies to 6, but there are 8 devices'):
    trainer.train(c, str(tmp_path), jax.devices())
  c = tiny_train_config(**{'mesh.data': 8, 'optim.micro_batches': 2})
  with pytest.raises(sharding.MeshError, match='micro-batch of 4 sequences.*8 devices'):
    trainer.train(c, str(tmp_path), jax.devices())
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_kill_during_async_save_resumes_from_last_complete_checkpoint(tmp_path):
  import signal
  import subprocess
  import sys
  import textwrap
  import time
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg_file = tmp_path / 'cfg.py'
  cfg_file.write_text(textwrap.dedent('''
      from tests.helpers import tiny_train_config

      def get_config():
        c = tiny_train_config(num_train_steps=400, checkpoint_every_steps=2,
                              eval_every_steps=1000, log_every_steps=50)
        c.checkpoint_async = True
        return c
  '''))
  workdir = tmp_path / 'run'
  cmd = [sys.executable, os.path.join(root, 'train.py'), f'--config={cfg_file}',
         f'--workdir={workdir}']
  env = dict(os.environ, PYTHONPATH=root)
  proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = workdir / 'checkpoints'
  deadline = time.time() + 120
  in_flight = []
  try:  # SIGKILL while a save is in flight: a temporary (uncommitted) step directory exists
    while time.time() < deadline and proc.poll() is None:
      names = os.listdir(ckpts) if ckpts.exists() else []
      if any('tmp' in n for n in names) and any(n.isdigit() for n in names):
        in_flight = [n for n in names if 'tmp' in n]
        break
      time.sleep(0.005)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert in_flight, 'the run was never caught with a save in flight'
  committed = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
  assert committed, os.listdir(ckpts)
  c = tiny_train_config(num_train_steps=400, checkpoint_every_steps=2)
  manager = ckpt.make_manager(str(workdir), c)
  latest = manager.latest_step()
  assert latest == committed[-1]
  from gpas_jax.train import steps
  s = steps.setup(c, jax.devices()[:1])
  state, _ = ckpt.restore(manager, latest, s.abstract_state)  # the last complete one restores
  assert int(state['step']) == latest


def test_console_and_windowed_loss(tmp_path, capsys):
  every_step = trainer.train(tiny_train_config(), str(tmp_path / 'a'), jax.devices()[:1])
  capsys.readouterr()
  c = tiny_train_config(log_every_steps=3)
  result = trainer.train(c, str(tmp_path / 'b'), jax.devices()[:1])
  out = capsys.readouterr().out
  # The logged loss is the mean of the window's steps (the compiling step 1 included).
  per_step, windowed = _losses(str(tmp_path / 'a')), _losses(str(tmp_path / 'b'))
  assert sorted(windowed) == [3, 6]
  for end in (3, 6):
    window = [per_step[s] for s in range(end - 2, end + 1)]
    np.testing.assert_allclose(windowed[end], np.mean(window), rtol=1e-6)
  # The start-up block, compile timing apart, then step lines.
  n_params = sum(x.size for x in jax.tree.leaves(_params(result)))
  assert f'parameters    {n_params / 1e3:.3g}k ({n_params:,}, ' in out, out
  assert 'tokens/step   256 (8 x 32)' in out and 'resumed from  nothing' in out
  assert out.index('compiling the train step (and running step 1) ... done in') < out.index(
      'step 3/6')
  # Throughput only for windows of timed steps: step 1 (compiling) has none, step 2 has.
  records = {r['step']: r for r in map(json.loads, open(tmp_path / 'a' / 'metrics.jsonl'))
             if 'loss' in r}
  assert 'tokens_per_s' not in records[1] and records[2]['tokens_per_s'] > 0
  del every_step
  # A rerun of the finished run says so and reports its recorded eval.
  again = trainer.train(c, str(tmp_path / 'b'), jax.devices()[:1])
  out = capsys.readouterr().out
  assert 'holds a finished run (step 6 of 6): nothing to train (eval_loss ' in out
  assert again['eval_loss'] == result['eval_loss'] and again['finished']
  summary = json.load(open(tmp_path / 'b' / 'summary.json', encoding='utf-8'))
  assert summary['eval_loss'] == result['eval_loss']  # not overwritten by the empty rerun
