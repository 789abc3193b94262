"""The whole update matches the baseline's recipe in PyTorch over 20 steps."""

from flax import nnx
import jax
import numpy as np
import pytest
import torch

from gpas_jax.baseline import torch_model
from gpas_jax.baseline import torch_train
from gpas_jax.model import interop
from gpas_jax.train import steps
from tests.helpers import tiny_train_config

torch.set_num_threads(1)
V, D, F, L, H, T, B, K, N = 96, 32, 56, 3, 4, 16, 8, 2, 20


# Gate clips below the gates' joint gradient norm after the global clip (pre_gpas ~5e-4,
# sandwich_gpas ~4e-3), so the gate clip engages.
@pytest.mark.parametrize('norm_type,gate_clip', [('pre_gpas', 3e-4), ('sandwich_gpas', 2e-3)])
def test_twenty_steps_match_the_pytorch_recipe(norm_type, gate_clip):
  ref = torch_model.RefModel(torch_model.RefConfig(
      vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
      num_attention_heads=H, norm_type=norm_type, post_num=1), seed=4)
  sd0 = torch_model.state_dict_numpy(ref)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(N):
    ids = rng.integers(2, V, size=(B, T))
    lengths = rng.integers(T // 2, T + 1, size=B)
    ids[np.arange(T)[None, :] >= lengths[:, None]] = 0  # right padding, ignored in the loss
    batches.append(ids)
  recipe = dict(lr=3e-3, warmup_steps=5, num_steps=N, micro_batches=K, grad_clip=0.5,
                gate_clip=gate_clip)
  gate_norms = []
  t_losses = torch_train.ref_train(ref, [torch.from_numpy(b) for b in batches], **recipe,
                                   gate_norms=gate_norms)
  engaged = sum(n > recipe['gate_clip'] * 1.2 for n in gate_norms)
  assert engaged >= N // 2, gate_norms

  c = tiny_train_config(num_train_steps=N, **{
      'model.vocab_size': V, 'model.hidden_size': D, 'model.intermediate_size': F,
      'model.num_layers': L, 'model.num_heads': H, 'model.norm_type': norm_type,
      'model.post_num': 1, 'optim.global_batch_size': B, 'optim.loss_chunks': K,
      'optim.micro_batches': K,
      'optim.lr': recipe['lr'], 'optim.warmup_steps': recipe['warmup_steps'],
      'optim.grad_clip': recipe['grad_clip'], 'optim.gate_clip': recipe['gate_clip'],
      'data.max_length': T, 'data.tokenizer_vocab_size': V})
  s = steps.setup(c, jax.devices()[:1])
  params = nnx.split(interop.from_torch_state_dict(sd0, s.model_config), nnx.Param, ...)[1]
  params = params.to_pure_dict()
  state = jax.device_put({'step': np.zeros((), np.int32), 'params': params,
                          'opt_state': s.tx.init(params)}, s.state_shardings)
  train_step = steps.make_train_step(s)
  j_losses = []
  for rows in batches:
    # K loss chunks are contiguous rows, as torch's micro-batches; micro_batches only saves memory.
    state, m = train_step(state, steps.global_batch(
        s, {'input_ids': rows.astype(np.int32), 'segment_ids': (rows != 0).astype(np.int32)}))
    j_losses.append(float(m['loss']))
  np.testing.assert_allclose(j_losses, t_losses, rtol=2e-6)
  final = nnx.merge(s.graphdef, state['params'], s.rest)
  ours, theirs = interop.to_torch_state_dict(final), torch_model.state_dict_numpy(ref)
  worst = 0.0
  for k, v in theirs.items():
    moved = np.abs(v - sd0[k]).max()  # Adam moves every weight by ~lr per step
    err = np.abs(ours[k] - v).max()
    worst = max(worst, err / max(moved, 1e-12))
    # torch's clip_grad_norm_ divides by norm + 1e-6, optax by the norm: every clipped gate
    # step differs by 1e-6 / gate_clip relative (3e-3 and 5e-4 here).
    rtol = 2e-6 / gate_clip if k.endswith('gate') else 1e-4
    np.testing.assert_allclose(ours[k], v, rtol=rtol, atol=1e-6, err_msg=k)
  gates = [k for k in theirs if k.endswith('gate')]
  assert all(abs(theirs[k]) > 1e-3 for k in gates)  # the gates trained
  print(f'{norm_type}: largest weight error / distance moved = {worst:.2e}')
