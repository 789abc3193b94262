"""What training and the performance tools share, below both: how a process runs and reports.

  console    the start-up block, timings, progress, quiet third-party logs
  profiling  op times from a profiler trace: dots by shape, other ops by source line
  cpu_peak   the CPU's peak FLOP/s for MFU, measured once per machine and cached
  xla_flags  config.xla_flags: checked, added to XLA_FLAGS before JAX starts
  cli        every tool's path rule and one-line errors (exit 2, --traceback)
  allocator  the fast malloc (jemalloc or pip's mimalloc) preloaded for CPU runs

May import: storage, tree_paths, sharding, distributed.
"""
