"""`python -m gpas_jax.analysis --workdir RUN [--out DIR]` (see cli.py)."""

from absl import app
from absl import flags

from gpas_jax.analysis import cli

if __name__ == '__main__':
  cli.define_flags()
  flags.adopt_module_key_flags(cli)  # --help lists the flags defined in cli.py, not only --helpfull
  app.run(cli.main)
