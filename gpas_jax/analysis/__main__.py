"""`python -m gpas_jax.analysis --workdir RUN [--out DIR]` (see cli.py)."""

from absl import flags

from gpas_jax.analysis import cli
from gpas_jax.runtime import cli as cli_lib

if __name__ == '__main__':
  cli.define_flags()
  flags.adopt_module_key_flags(cli)  # --help lists the flags defined in cli.py, not only --helpfull
  cli_lib.run(cli.main, positional=False)
