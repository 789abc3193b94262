"""Trains a GPAS model: python train.py --config configs/tiny.py --workdir DIR [--config.x=v].

The clone's entry point; the program is gpas_jax/train/launch.py (`python -m
gpas_jax.train.launch` runs the same from any folder). Exit codes (gpas_jax/train/faults.py,
docs/RELIABILITY.md): 0 finished, 1 unexpected error, 2 refused (config, data, workdir), 3
diverged, 4 checkpoint save failed, 75 stopped by SIGTERM or Ctrl-C after saving (rerun to
resume), 130 aborted by a second Ctrl-C.
"""

from gpas_jax.train import launch

if __name__ == '__main__':
  launch.main()
