"""Sweep files for `python -m gpas_jax.sweep --sweep configs/sweeps/<name>.py`."""
