"""The seeded study: paired GPAS deltas with their statistics, the report of real runs, the
parallel sweep runner, and the deep study's configs."""

import json
import math
import os
import sys

import jax
import numpy as np
import pytest

from gpas_jax.analysis import runs as runs_lib
from gpas_jax.analysis import study
from gpas_jax import config as config_lib
from gpas_jax import storage
from gpas_jax.train import sweep
from gpas_jax.train import trainer
from tests import helpers


def _run(root, size, norm_type, seed, ppl):
  path = os.path.join(root, size, norm_type, f'seed{seed}')
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'size_name': size, 'seed': seed, 'model': {'norm_type': norm_type}}, f)
  storage.append_jsonl(os.path.join(path, 'summary.json'),
                       {'step': 10, 'eval_ppl': ppl, 'finished': True})


def test_paired_deltas_by_hand(tmp_path):
  root = str(tmp_path)
  for seed, (b, g) in enumerate([(10.0, 9.5), (12.0, 11.0), (14.0, 13.8)]):
    _run(root, 'deep_f32', 'pre', seed, b)
    _run(root, 'deep_f32', 'pre_gpas', seed, g)
  # Seed 3 of the base has no GPAS twin, and a diverged GPAS run: both left out of the pairs.
  _run(root, 'deep_f32', 'pre', 3, 99.0)
  _run(root, 'deep_f32', 'sandwich', 0, 20.0)
  _run(root, 'deep_f32', 'sandwich_gpas', 0, float('nan'))
  _run(root, 'deep_f32', 'sandwich', 1, 20.0)
  _run(root, 'deep_f32', 'sandwich_gpas', 1, 19.0)
  deltas = study.paired_deltas(list(runs_lib.find_runs(root)))
  assert [(d.base, d.seeds) for d in deltas] == [('pre', (0, 1, 2)), ('sandwich', (1,))]
  d = deltas[0]
  diffs = np.array([-0.5, -1.0, -0.2])
  np.testing.assert_allclose(d.diffs, diffs, atol=1e-12)
  mean, sd = diffs.mean(), diffs.std(ddof=1)
  assert math.isclose(d.mean, mean, rel_tol=1e-12) and math.isclose(d.std, sd, rel_tol=1e-12)
  # 95% t interval with 2 degrees of freedom: t_0.975(2) = 4.302652729911275.
  half = 4.302652729911275 * sd / math.sqrt(3)
  np.testing.assert_allclose(d.interval(), (mean - half, mean + half), rtol=1e-9)
  # Paired t-test, 2 degrees of freedom: p = 1 - |t| / sqrt(t^2 + 2) in closed form.
  t = mean / (sd / math.sqrt(3))
  assert math.isclose(d.p_paired, 1 - abs(t) / math.sqrt(t * t + 2), rel_tol=1e-9)
  # Unpaired, the seed-to-seed spread (10..14) swamps the same differences.
  assert d.p_welch > 0.5 > d.p_paired
  one = deltas[1]
  assert one.mean == -1.0 and one.interval() is None and one.p_paired is None
  md = study.deltas_markdown(deltas)
  assert '| deep_f32 | pre vs pre+GPAS | 0,1,2 | -0.50, -1.00, -0.20 | -0.57 |' in md
  assert f'[{mean - half:+.2f}, {mean + half:+.2f}]' in md
  rows = study.deltas_csv(deltas).splitlines()
  assert rows[1].startswith('deep_f32,pre,3,0 1 2,')


def _train(root, norm_type, seed):
  c = helpers.tiny_train_config(**{'model.norm_type': norm_type, 'seed': seed,
                                   'analysis.every_steps': 2, 'model.num_layers': 3})
  c.size_name = 'tiny_test'
  trainer.train(c, os.path.join(root, 'tiny_test', norm_type, f'seed{seed}'), jax.devices()[:1])


def test_study_report_of_real_runs(tmp_path):
  root, out = str(tmp_path / 'runs'), str(tmp_path / 'report')
  for seed in (0, 1):
    for norm_type in ('pre', 'pre_gpas'):
      _train(root, norm_type, seed)
  written = study.write_study(root, out, importance_batches=1)
  rel = sorted(os.path.relpath(p, out) for p in written)
  for name in ('table.md', 'deltas.md', 'deltas.csv', 'tiny_test/loss_curves.png',
               'tiny_test/act_var_heatmaps.png', 'tiny_test/layer_importance.png',
               'tiny_test/last_layer_variance.png', 'tiny_test/pre_gpas/gates.png',
               'tiny_test/pre/grad_norms.png', 'tiny_test/pre/activation_variance.png'):
    assert name in rel, (name, rel)
  assert 'tiny_test/pre/gates.png' not in rel  # no gates without GPAS
  for seed in (0, 1):
    imp = storage.read_json(os.path.join(root, 'tiny_test', 'pre', f'seed{seed}', 'analysis',
                                         'importance.json'))
    assert len(imp['importance']) == 3 and imp['max_batches'] == 1
  # The deltas are those of the runs' own summaries, paired by seed.
  ppl = {(r.norm_type, r.seed): r.final_eval_ppl() for r in runs_lib.find_runs(root)}
  (d,) = study.paired_deltas(list(runs_lib.find_runs(root)))
  np.testing.assert_allclose(d.diffs, [ppl['pre_gpas', k] - ppl['pre', k] for k in (0, 1)])
  assert all(x != 0 for x in d.diffs)
  # The dynamics rows are read from the runs' analysis records.
  rows = {r['norm_type']: r for r in study.dynamics_rows(list(runs_lib.find_runs(root)))}
  assert set(rows) == {'pre', 'pre_gpas'} and rows['pre']['seeds'] == 2
  assert rows['pre']['end_gates'] == '—' and rows['pre_gpas']['end_gates'] != '—'
  recs = [r.analysis() for r in runs_lib.find_runs(root) if r.norm_type == 'pre']
  peaks = [max(x['act_var'][-1] for x in rs) for rs in recs]
  assert rows['pre']['peak_var_last'] == (
      f'{np.mean(peaks):.3g} ± {np.std(peaks, ddof=1):.2g}')
  assert 'dynamics.md' in rel


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason='needs two cores')
def test_parallel_sweep_pins_disjoint_cores_and_overlaps(tmp_path):
  script = tmp_path / 'fake_train.py'
  script.write_text(
      'import json, os, sys, time\n'
      "wd = sys.argv[sys.argv.index('--workdir') + 1]\n"
      'os.makedirs(wd, exist_ok=True)\n'
      'start = time.time(); time.sleep(1.0)\n'
      "json.dump({'cores': sorted(os.sched_getaffinity(0)), 'start': start, 'end': time.time(),"
      " 'xla': os.environ.get('XLA_FLAGS', '')}, open(os.path.join(wd, 'r.json'), 'w'))\n"
      "print('hello from', wd)\n"
      "sys.exit(5 if 'seed1' in wd and 'pre_gpas' in wd else 0)\n")
  cfg = sweep.load_config_file('configs/sweeps/deep_cpu_study.py')
  cfg.sizes = ('deep12_bf16',)
  cfg.norm_types = ('pre', 'pre_gpas')
  cfg.seeds = (0, 1)
  runs = sweep.plan(cfg, str(tmp_path / 'r'))
  failed = sweep.run_sweep(runs, sys.executable, str(script), parallel=2)
  assert [(r.norm_type, r.seed) for r in failed] == [('pre_gpas', 1)]
  res = {(r.norm_type, r.seed): json.load(open(os.path.join(r.workdir, 'r.json'))) for r in runs}
  a, b = res['pre', 0], res['pre_gpas', 0]  # the first two start together
  assert a['start'] < b['end'] and b['start'] < a['end']
  assert not set(a['cores']) & set(b['cores'])
  assert all('intra_op_parallelism_threads=1' in r['xla'] for r in res.values())
  with open(runs[0].workdir + '.log') as f:
    assert f'hello from {runs[0].workdir}' in f.read()
  assert sweep.core_groups(2, [0, 1, 2, 3, 4]) == [[0, 2, 4], [1, 3]]
  with pytest.raises(ValueError, match='--parallel=3: this machine gives 2 cores'):
    sweep.core_groups(3, [0, 1])


def test_deep_study_configs():
  cmds = [sweep.command(r) for r in sweep.plan(
      sweep.load_config_file('configs/sweeps/deep_cpu_study.py'), 'R')]
  assert len(cmds) == 2 * 4 * 3
  assert {c[4] for c in cmds} == {'configs/deep_cpu.py:float32', 'configs/deep_cpu.py:bfloat16'}
  for precision, short in (('float32', 'f32'), ('bfloat16', 'bf16')):
    c = sweep.load_config_file(f'configs/deep_cpu.py:{precision}')
    assert c.size_name == f'deep12_{short}' and c.model.num_layers == 12
    assert c.model.param_dtype == c.model.compute_dtype == precision and c.baseline_faithful
    config_lib.validate(c)
  with pytest.raises(ValueError, match='deep_cpu.py:float16: the precision must be one of'):
    sweep.load_config_file('configs/deep_cpu.py:float16')


def test_downstream_scores_get_paired_deltas_and_table_columns(tmp_path):
  from gpas_jax.analysis import table  # pylint: disable=import-outside-toplevel
  root = str(tmp_path)
  accs = {('pre', 0): 0.25, ('pre', 1): 0.30, ('pre_gpas', 0): 0.35, ('pre_gpas', 1): 0.32}
  for (norm_type, seed), acc in accs.items():
    _run(root, 'tiny', norm_type, seed, 10.0 + seed)
    storage.write_json(os.path.join(root, 'tiny', norm_type, f'seed{seed}', 'downstream.json'),
                       {'step': None, 'scores': {'gpas_mc/acc': acc, 'gpas_mc/acc_stderr': 0.1,
                                                 'gpas_ppl/word_perplexity': 100.0 - seed}})
  _run(root, 'tiny', 'pre', 2, 12.0)  # no harness run: no downstream values, still in the table
  runs = list(runs_lib.find_runs(root))
  md = study.downstream_deltas_markdown(runs)
  # acc: higher is better; the paired deltas are +0.10 and +0.02.
  assert 'GPAS minus base gpas_mc/acc, paired by seed (positive: GPAS better)' in md
  assert '| tiny | pre vs pre+GPAS | 0,1 | +0.100, +0.020 | +0.060 |' in md
  assert 'gpas_ppl/word_perplexity, paired by seed (negative: GPAS better)' in md
  assert 'stderr' not in md
  t = table.build_table(runs)
  assert t.downstream[('tiny', 'pre')]['gpas_mc/acc'] == [0.25, 0.30]
  text = table.to_markdown(t)
  assert '| size | architecture | gpas_mc/acc | gpas_ppl/word_perplexity |' in text
  assert '| tiny | pre+GPAS | 0.335 ± 0.021 (2) | 99.5 ± 0.71 (2) |' in text
