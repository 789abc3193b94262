"""The model: the GPAS op, RMSNorm / RoPE / attention / SwiGLU, the residual forms, the stack.

  gpas         the op h - silu(g) * stop_gradient(h) and the gate activations (start here)
  layers       RMSNorm, RoPE, causal attention, SwiGLU
  blocks       one decoder layer per residual form (pre, post, sandwich), with GPAS
  transformer  embedding, scanned or looped layer stacks, head, loss, initialisation
  stats        per-layer activation variance, gradient norms, gates, layer importance
  interop      the baseline's parameter names: PyTorch / HF state dicts and directories

May import: storage, tree_paths, sharding, distributed, runtime, config.
"""
