"""The paper's analyses of finished runs: figures, results tables, the seeded study.

Submodules are imported on use, so that `table` and `plots` start without loading JAX:
  runs     reading run directories (config.json, metrics.jsonl, analysis.jsonl, summary.json)
  plots    PNG figures from analysis.jsonl / metrics.jsonl records
  cli      python -m gpas_jax.analysis --workdir RUN: one run's figures
  compare  python -m gpas_jax.analysis.compare --runs A B --out DIR: multi-run figures
  table    python -m gpas_jax.analysis.table --root DIR: the paper's results table
  study    python -m gpas_jax.analysis.study --root DIR: paired GPAS deltas and figures
The per-layer statistics themselves (computed inside training too) are gpas_jax.model.stats.

May import: storage, tree_paths, sharding, distributed, runtime, config, model, data, train.
"""
