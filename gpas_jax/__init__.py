"""gpas_jax: LLaMA-style pretraining with Gradient-Preserving Activation Scaling in JAX/Flax NNX."""
