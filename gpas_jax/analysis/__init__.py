"""The paper's analyses: per-layer statistics (stats), figures (plots), the results table (table).

Submodules are imported on use, so that `table` and `plots` start without loading JAX:
  stats    activation_variance, layer_grad_norms, training_stats, layer_importance, eval_loss
  plots    PNG figures from analysis.jsonl / metrics.jsonl records
  runs     reading run directories (config.json, metrics.jsonl, analysis.jsonl, summary.json)
  table    python -m gpas_jax.analysis.table --root DIR: the paper's results table
  compare  python -m gpas_jax.analysis.compare --runs A B --out DIR: multi-run figures
  cli      python -m gpas_jax.analysis --workdir RUN: one run's figures
"""
