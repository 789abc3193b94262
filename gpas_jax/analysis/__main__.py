"""`python -m gpas_jax.analysis --workdir RUN [--out DIR]` (see cli.py)."""

from absl import app

from gpas_jax.analysis import cli

if __name__ == '__main__':
  cli.define_flags()
  app.run(cli.main)
