"""Downstream tasks through EleutherAI's lm-evaluation-harness, on a run's checkpoints.

  jax_lm   the JAX backend: an lm_eval LM scoring requests with our model (on a mesh if given)
  tasks    small offline task files in the standard tasks' formats (dataset_path: json)
  harness  python -m gpas_jax.evals.harness --workdir RUN --tasks a,b ...: results JSON + table
The Hugging Face route (hf_tools export, then lm-eval's own `hf` backend) is gpas_jax.baseline;
tests/test_evals_harness.py holds the two backends equal.

May import: storage, tree_paths, sharding, distributed, runtime, config, model, data, train.
"""
