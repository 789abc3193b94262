"""Trains a GPAS model: python train.py --config configs/tiny.py --workdir DIR [--config.x=v].

Exit codes (gpas_jax/train/faults.py, docs/RELIABILITY.md): 0 finished, 1 unexpected error, 2 refused
(config, data, workdir), 3 diverged, 4 checkpoint save failed, 75 stopped by SIGTERM or Ctrl-C
after saving (rerun to resume), 130 aborted by a second Ctrl-C.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from gpas_jax.train import faults

try:
  _CONFIG = config_flags.DEFINE_config_file(
      'config', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'tiny.py'),
      'A config file (get_config()); fields can be overridden with --config.<field>=<value>.')
except (AttributeError, KeyError) as _e:  # an unknown --config.<field> on the default config
  print(faults.override_error(_e, sys.argv), file=sys.stderr)
  sys.exit(faults.EXIT_REFUSED)
_WORKDIR = flags.DEFINE_string('workdir', 'workdir/default',
                               'Checkpoints, metrics.jsonl and TensorBoard logs go here.')
_TRACEBACK = flags.DEFINE_bool('traceback', False,
                               'On an error of our own, print the full traceback too.')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with one line instead of a traceback for an unknown config field."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    print(faults.override_error(e, argv), file=sys.stderr)
    sys.exit(faults.EXIT_REFUSED)


def _load_config():
  """The config; a --config file that cannot be loaded is named in one line."""
  config = _CONFIG.value
  try:
    config.distributed  # pylint: disable=pointless-statement
  except OSError as e:
    print(faults.config_file_error(e, config_flags.get_config_filename(flags.FLAGS['config'])),
          file=sys.stderr)
    sys.exit(faults.EXIT_REFUSED)
  return config


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Imported here so that --help is fast and distributed init precedes any jax use.
  from gpas_jax.runtime import console  # pylint: disable=import-outside-toplevel
  console.quiet_logs()  # third-party INFO (Orbax, TFDS) only with --verbosity=0
  config = _load_config()
  with faults.readable_errors(_TRACEBACK.value):
    from gpas_jax import config as config_lib  # pylint: disable=import-outside-toplevel
    from gpas_jax.runtime import xla_flags  # pylint: disable=import-outside-toplevel
    config_lib.validate(config)  # a bad config is refused before anything starts
    xla_flags.apply(config)  # config.xla_flags, before JAX starts its backend
    from gpas_jax import distributed  # pylint: disable=import-outside-toplevel
    distributed.maybe_initialize(config)
    from gpas_jax.train import trainer  # pylint: disable=import-outside-toplevel
    result = trainer.train(config, _WORKDIR.value)
  if result.get('preempted'):
    print(f'stopped by {result["preempted"]} at step {result["step"]} after saving a checkpoint; '
          f'rerun the same command to resume (workdir {_WORKDIR.value})', flush=True)
    sys.exit(faults.EXIT_PREEMPTED)
  if 'eval_loss' in result:
    again = ' (already finished; nothing changed)' if result.get('already_finished') else ''
    print(f'final step {result["step"]}: eval loss {result["eval_loss"]:.4f}, '
          f'eval perplexity {result["eval_ppl"]:.2f} (workdir {_WORKDIR.value}){again}',
          flush=True)


if __name__ == '__main__':
  # CPU hosts: re-exec with a fast malloc preloaded (jemalloc, or mimalloc from the pip wheel;
  # ~15-25% faster steps; see gpas_jax/runtime/allocator.py). GPAS_ALLOCATOR=default opts out.
  from gpas_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  allocator.reexec_with_fast_malloc()
  app.run(main, flags_parser=_parse_flags)
