"""Trains a GPAS model: python train.py --config configs/tiny.py --workdir DIR [--config.x=v]."""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'tiny.py'),
    'A config file (get_config()); fields can be overridden with --config.<field>=<value>.')
_WORKDIR = flags.DEFINE_string('workdir', 'workdir/default',
                               'Checkpoints, metrics.jsonl and TensorBoard logs go here.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  # Imported here so that --help is fast and distributed init precedes any jax use.
  from gpas_jax import distributed  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  distributed.maybe_initialize(config)
  from gpas_jax import trainer  # pylint: disable=import-outside-toplevel
  result = trainer.train(config, _WORKDIR.value)
  if 'eval_loss' in result:
    print(f'final step {result["step"]}: eval loss {result["eval_loss"]:.4f}, '
          f'eval perplexity {result["eval_ppl"]:.2f} (workdir {_WORKDIR.value})', flush=True)


if __name__ == '__main__':
  # CPU hosts: re-exec with a fast malloc preloaded (jemalloc, or mimalloc from the pip wheel;
  # ~15-25% faster steps; see gpas_jax/allocator.py). GPAS_ALLOCATOR=default opts out.
  from gpas_jax import allocator  # pylint: disable=g-import-not-at-top
  allocator.reexec_with_fast_malloc()
  app.run(main)
