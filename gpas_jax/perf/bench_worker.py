"""A bench worker process: python -m gpas_jax.perf.bench_worker {torch,jax} SPEC_JSON (see bench_proc)."""

import json
import sys

from gpas_jax.perf import bench_proc


def main(argv: list[str]) -> None:
  """Builds the named kind of step from its JSON spec and serves timing requests."""
  kind, spec = argv[1], json.loads(argv[2])
  if kind == 'torch':
    from gpas_jax.perf import bench_torch  # pylint: disable=import-outside-toplevel
    bench_proc.serve(lambda: bench_torch.build_step(bench_torch.TorchSpec(**spec)))
  elif kind == 'jax':
    from gpas_jax.perf import bench_jax  # pylint: disable=import-outside-toplevel
    bench_proc.serve(lambda: bench_jax.build_worker_step(spec))
  else:
    sys.exit(f'unknown worker kind {kind!r} (torch, jax)')


if __name__ == '__main__':
  main(sys.argv)
