"""Trains a GPAS model from any folder: python -m gpas_jax.train.launch [--config F] [--workdir D].

The same program as the clone's `train.py` (which only calls `main()` here), so an installed
package trains, and a sweep prints commands that run from any folder. Exit codes
(gpas_jax/train/faults.py, docs/RELIABILITY.md): 0 finished, 1 unexpected error, 2 refused
(config, data, workdir), 3 diverged, 4 checkpoint save failed, 5 a checkpoint could not be read
(storage, memory: every host stops, nothing moved), 75 stopped by SIGTERM or Ctrl-C
after saving (rerun to resume), 130 aborted by a second Ctrl-C.
"""

import os
import sys

from absl import flags

import gpas_jax
from gpas_jax.runtime import cli

DEFAULT_CONFIG = os.path.join(gpas_jax.ROOT, 'configs', 'tiny.py')


def define_flags() -> None:
  """--config (default configs/tiny.py), --workdir and --traceback."""
  cli.define_config_file(
      'config', DEFAULT_CONFIG,
      'A config file (get_config()); fields can be overridden with --config.<field>=<value>.')
  flags.DEFINE_string('workdir', 'workdir/default',
                      'Checkpoints, metrics.jsonl and TensorBoard logs go here (relative: '
                      'to the working directory).')
  cli.define_traceback_flag()


def train_main(argv: list[str]) -> None:
  """Validates the config, applies its XLA flags, starts jax.distributed and trains."""
  # Imported here so that --help is fast and distributed init precedes any jax use.
  from gpas_jax.runtime import console  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import faults  # pylint: disable=import-outside-toplevel
  console.quiet_logs()  # third-party INFO (Orbax, TFDS) only with --verbosity=0
  config = flags.FLAGS.config
  workdir = cli.resolve_path(flags.FLAGS.workdir)  # a gs:// workdir stays as it is
  from gpas_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from gpas_jax.runtime import xla_flags  # pylint: disable=import-outside-toplevel
  config_lib.resolve(config)  # what baseline_faithful decides, into the plain fields, once
  config_lib.resolve_paths(config)  # relative data/init paths: to this folder, as recorded
  config_lib.validate(config)  # a bad config is refused before anything starts
  xla_flags.apply(config)  # config.xla_flags, before JAX starts its backend
  from gpas_jax import distributed  # pylint: disable=import-outside-toplevel
  distributed.maybe_initialize(config)
  from gpas_jax.train import trainer  # pylint: disable=import-outside-toplevel
  result = trainer.train(config, workdir)
  if result.get('preempted'):
    print(f'stopped by {result["preempted"]} at step {result["step"]} after saving a checkpoint; '
          f'rerun the same command to resume (workdir {workdir})', flush=True)
    sys.exit(faults.EXIT_PREEMPTED)
  if 'eval_loss' in result:
    again = ' (already finished; nothing changed)' if result.get('already_finished') else ''
    print(f'final step {result["step"]}: eval loss {result["eval_loss"]:.4f}, '
          f'eval perplexity {result["eval_ppl"]:.2f} (workdir {workdir}){again}', flush=True)


def main() -> None:
  """The launcher: fast malloc first (a re-exec), then flags, one-line errors and training."""
  # CPU hosts: re-exec with a fast malloc preloaded (jemalloc, or mimalloc from the pip wheel;
  # ~15-25% faster steps; see gpas_jax/runtime/allocator.py). GPAS_ALLOCATOR=default opts out.
  from gpas_jax.runtime import allocator  # pylint: disable=import-outside-toplevel
  allocator.reexec_with_fast_malloc()
  define_flags()
  cli.run(train_main, file_flags=('config',), positional=False)


if __name__ == '__main__':
  main()
