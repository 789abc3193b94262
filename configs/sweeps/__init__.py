"""Sweep files for `python -m gpas_jax.train.sweep --sweep configs/sweeps/<name>.py`."""
