"""The PyTorch side as tools (needs `pip install torch==2.13.0`, the `torch` extra).

  torch_model  the port of the release's model: eleven residual forms, init, loss, state dicts
  torch_train  the release's training loop: LambdaLR, Adam, clipping, chunk accumulation
  hf_tools     python -m gpas_jax.baseline.hf_tools: export a run, evaluate a baseline directory
  hf_export    what an export adds for transformers: the modeling code, the run's tokenizer
  hf_modeling  the port as transformers' remote code (GpasLlamaForCausalLM; needs transformers)
  compare      python -m gpas_jax.baseline.compare: gpas_jax vs PyTorch, update by update

What the trainer itself needs from the PyTorch world (parameter names, init_from) lives below,
in model/interop and train/init_from.
May import: every layer below (storage ... analysis, evals).
"""
