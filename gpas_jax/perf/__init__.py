"""Performance tools, the top of the house.

  bench         python -m gpas_jax.perf.bench: tokens/s, MFU, GPAS cost, PyTorch side by side
  bench_jax     the JAX variants' timing
  bench_torch   the PyTorch side
  bench_proc    worker processes, CPU share of other processes
  bench_report  per-round ratios, intervals and the report
  bench_worker  the worker processes' entry point
  aot           python -m gpas_jax.perf.aot: compile a config for a mesh without allocating it
                (--topology: the TPU compiler, tpu_plan / tpu_search; tpu_table: docs/TPU.md;
                GPU nodes h100:2x8: the GPU compiler, gpu_plan; gpu_table: docs/GPU.md)
  xla_plan      the report both compilers' plans share: memory, loop-corrected cost, roofline
  data_bench    python -m gpas_jax.perf.data_bench: the data pipeline's tokens/s per host
                beside what each paper size's TPU plan needs

May import: every layer below.
"""
