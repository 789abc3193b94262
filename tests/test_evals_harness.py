"""The harness on tiny trained runs: the JAX backend and lm-eval's `hf` backend on the export agree.

Runs: tests.helpers.tiny_train_config (2 layers, hidden 32, vocab 512, context 32, seed 0) trained
3 steps on the embedded corpus, for pre, pre_gpas and sandwich_gpas. Tasks: gpas_mc (16 ARC-style
items, 1-shot: contexts of up to ~90 tokens, truncated from the left to 32) and gpas_ppl (6
wikitext-style pages of ~100-200 tokens: several rolling windows each), from the validation split.
Tolerance of per-request log-likelihoods: float32 on both sides, different matmul orders; sums of
up to ~200 log-probs of size ~6: |diff| <= 1e-4 + 1e-6 |ll| (seen: <= 5e-5).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from gpas_jax.evals import harness
from gpas_jax.evals import tasks
from tests.helpers import tiny_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = [tasks.MC_TASK, tasks.PPL_TASK]


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
  from gpas_jax.data import sources, tokenizer  # pylint: disable=import-outside-toplevel
  texts = list(tokenizer.split_texts(sources.open_split(tiny_train_config(), 'validation')))
  out = tmp_path_factory.mktemp('tasks')
  tasks.write_tasks(str(out), texts, n_mc=16, n_ppl=6)
  return str(out)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, task_dir):
  """norm_type -> a trained run directory (trained on first use)."""
  task_dir_of = [task_dir]
  from gpas_jax.train import trainer  # pylint: disable=import-outside-toplevel
  root, made = tmp_path_factory.mktemp('runs'), {}

  def get(norm_type):
    if norm_type not in made:
      c = tiny_train_config(**{'model.norm_type': norm_type, 'num_train_steps': 3})
      made[norm_type] = str(root / norm_type)
      # The pre_gpas run also scores the MC task in training (as the CLI test does, after it).
      hooks = [harness.training_hook([tasks.MC_TASK], 3, task_dir_of[0], 0, limit=8)] if (
          norm_type == 'pre_gpas') else []
      trainer.train(c, made[norm_type], jax.devices()[:1], eval_hooks=hooks)
    return made[norm_type]

  return get


def _lls(results, task):
  """Each request's log-likelihood, in the harness's order (doc, then choice)."""
  out = []
  for sample in results['samples'][task]:
    for resp in sample['resps']:
      r = resp[0]
      out.append(float(r[0] if isinstance(r, (list, tuple)) else r))
  return np.array(out)


@pytest.mark.parametrize('norm_type', ['pre', 'pre_gpas', 'sandwich_gpas'])
def test_jax_and_hf_backends_agree_on_a_trained_run(tmp_path, runs, task_dir, norm_type):
  from gpas_jax.baseline import hf_tools  # pylint: disable=import-outside-toplevel
  from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel
  run = runs(norm_type)
  _, lm, step = harness.lm_from_run(run)
  assert step == 3  # the newest checkpoint, said
  ours = harness.evaluate(lm, TASKS, task_dir, num_fewshot=1, log_samples=True,
                          bootstrap_iters=0)
  out = hf_tools.export_run(run, str(tmp_path / 'hf'))
  hf = HFLM(pretrained=out, trust_remote_code=True, batch_size=16, device='cpu', dtype='float32')
  assert hf.max_length == 32 and hf.prefix_token_id == lm.prefix_token_id  # not 2048, not a BOS
  theirs = harness.evaluate(hf, TASKS, task_dir, num_fewshot=1, log_samples=True,
                            bootstrap_iters=0)
  a, b = harness.scores(ours), harness.scores(theirs)
  assert a.keys() == b.keys() and {'gpas_mc/acc', 'gpas_mc/acc_norm'} <= a.keys()
  for k in a:
    if '/acc' in k:
      assert a[k] == b[k], k
    else:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
  for task in TASKS:
    ll_a, ll_b = _lls(ours, task), _lls(theirs, task)
    assert len(ll_a) == len(ll_b) > 0 and np.all(ll_a < 0)
    np.testing.assert_allclose(ll_a, ll_b, rtol=1e-6, atol=1e-4, err_msg=task)
  # The JAX backend scored everything in a few fixed shapes.
  assert lm.shapes_run <= {(16, 16), (16, 32)}


def test_the_command_line_writes_the_results_json_and_the_samples(tmp_path, runs, task_dir):
  run = runs('pre_gpas')
  out = tmp_path / 'res' / 'gpas.json'
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, '-m', 'gpas_jax.evals.harness', f'--workdir={run}',
                         f'--tasks={tasks.MC_TASK}', f'--include_path={task_dir}',
                         '--num_fewshot=0', f'--output_path={out}', '--log_samples',
                         '--limit=8', '--bootstrap_iters=0'],
                        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '|gpas_mc' in proc.stdout and 'acc_norm' in proc.stdout
  results = json.loads(out.read_text())
  row = results['results'][tasks.MC_TASK]
  assert 0 <= row['acc,none'] <= 1 and results['n-shot'][tasks.MC_TASK] == 0
  samples = (tmp_path / 'res' / f'samples_{tasks.MC_TASK}.jsonl').read_text().splitlines()
  assert len(samples) == 8 and len(json.loads(samples[0])['resps']) == 4
  # The scores go into the run, where the table and the study read them.
  from gpas_jax.analysis import runs as runs_lib  # pylint: disable=import-outside-toplevel
  recorded = runs_lib.load_run(run).downstream()
  assert recorded['gpas_mc/acc'] == row['acc,none']
  assert json.loads((pathlib.Path(run) / 'downstream.json').read_text())['step'] == 3  # loaded
  # The same task scored inside training on the same (final) parameters gave the same numbers.
  from gpas_jax import storage  # pylint: disable=import-outside-toplevel
  logged = [r for r in storage.read_jsonl(os.path.join(run, 'metrics.jsonl'))
            if 'harness/gpas_mc/acc' in r]
  assert [r['step'] for r in logged] == [3]
  assert logged[0]['harness/gpas_mc/acc'] == row['acc,none']
  assert logged[0]['harness/gpas_mc/acc_norm'] == row['acc_norm,none']


def test_a_run_tasks_and_results_in_a_bucket(tmp_path, runs, monkeypatch):
  """Checkpoint, task data and results all gs:// (the local GCS server). datasets counts any URL
  as online, so HF_HUB_OFFLINE is unset here; HF_ENDPOINT points at nothing, so no Hub call."""
  from gpas_jax import storage  # pylint: disable=import-outside-toplevel
  from tests import gcs  # pylint: disable=import-outside-toplevel
  run = runs('pre_gpas')
  for name in gcs._VARS + ('GOOGLE_AUTH_TOKEN_FOR_TESTING',  # pylint: disable=protected-access
                           'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'):
    monkeypatch.setenv(name, '')  # restored as they were after the test
    monkeypatch.delenv(name)
  server = gcs.Server().start()
  try:
    server.create_bucket('evals')
    gcs.point_this_process_at(server)
    gcs.upload_tree(run, 'gs://evals/run')
    from gpas_jax.data import sources, tokenizer  # pylint: disable=import-outside-toplevel
    texts = list(tokenizer.split_texts(sources.open_split(tiny_train_config(), 'validation')))
    tasks.write_tasks('gs://evals/tasks', texts, n_mc=4, n_ppl=2)
    yaml_dir = tmp_path / 'yaml'
    yaml_dir.mkdir()
    for t in TASKS:  # lm-eval reads task YAML locally; the data files stay in the bucket
      (yaml_dir / f'{t}.yaml').write_text(storage.read_text(f'gs://evals/tasks/{t}.yaml'))
    assert 'test: gs://evals/tasks/gpas_mc.jsonl' in (yaml_dir / 'gpas_mc.yaml').read_text()
    env = gcs.child_env(server, HF_ENDPOINT='http://127.0.0.1:9')
    for name in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE'):
      env.pop(name, None)
    proc = subprocess.run([sys.executable, '-m', 'gpas_jax.evals.harness',
                           '--workdir=gs://evals/run', f'--tasks={",".join(TASKS)}',
                           f'--include_path={yaml_dir}', '--output_path=gs://evals/res',
                           '--bootstrap_iters=0'], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(storage.read_text('gs://evals/res/results.json'))['results']
    assert results[tasks.MC_TASK]['sample_len'] == 4 and results[tasks.PPL_TASK]['sample_len'] == 2
    assert storage.read_json('gs://evals/run/downstream.json')['scores']['gpas_mc/acc'] == (
        results[tasks.MC_TASK]['acc,none'])
  finally:
    server.stop()
    storage._CLIENT = None  # pylint: disable=protected-access  (the next test builds its own)
