"""The data pipeline's error type."""

from gpas_jax.config import ConfigError


class DataError(ConfigError):
  """Bad data input (path, file, dataset, tokenizer or data config); the message says the fix."""
