"""Training: the loop and everything a run writes or restores.

  trainer      start-up, resume or init, the loop, the end (train.py calls train())
  steps        the sharded state and the jitted train and eval steps
  optim        schedule, clipping, accumulation, precision of the Adam state
  torch_optim  torch's Adam and clip_grad_norm_ arithmetic as optax transformations
  torch_accum  the release's bf16 chunk accumulation (a backward per chunk, DDP's 1/W)
  checkpoint   Orbax manager, saves, a read onto any mesh, data-iterator state
  restore      one restore decision for every host: damage proven, moved aside under a journal
  integrity    checksums of every saved array, computed on device
  workdir      finished runs, resume checks, torn-line repair (and the lock's entry point)
  lock         WORKDIR/lock: flock on a local disk, a heartbeat object in a bucket
  faults       exit codes, error types, SIGTERM / Ctrl-C, the NaN guard
  metrics      FLOPs and MFU, metric writers (stdout, metrics.jsonl, TensorBoard, W&B)
  loading      a run's model from its checkpoint (analysis and export)
  init_from    config.init_from: start from a baseline checkpoint
  launch       python -m gpas_jax.train.launch: train.py's program (flags, allocator, train)
  sweep        python -m gpas_jax.train.sweep: a sweep's runs, one after another or N pinned

May import: storage, tree_paths, sharding, distributed, runtime, config, model, data.
"""
