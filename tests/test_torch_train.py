"""The PyTorch port's training loop: the release's LambdaLR schedule, accumulation and clipping."""

import numpy as np
import pytest
import torch

from gpas_jax.baseline import torch_model
from gpas_jax.baseline import torch_train
from tests.test_torch_model import _cfg
from tests.test_torch_model import _ids

def test_schedule_values():
  kw = dict(lr=1e-3, warmup_steps=10, num_steps=100)
  assert torch_train.ref_lr(0, **kw) == 0.0
  assert torch_train.ref_lr(5, **kw) == pytest.approx(5e-4)
  assert torch_train.ref_lr(10, **kw) == pytest.approx(1e-3, rel=1e-15)
  assert torch_train.ref_lr(55, **kw) == pytest.approx(1e-3 * 0.55)
  assert torch_train.ref_lr(100, **kw) == pytest.approx(1e-4, rel=1e-15)
  assert torch_train.ref_lr(150, **kw) == pytest.approx(1e-4, rel=1e-15)
  for s in range(100):
    assert torch_train.ref_lr(s, baseline_last_step=True, **kw) == torch_train.ref_lr(s, **kw)
  assert torch_train.ref_lr(100, baseline_last_step=True, **kw) == pytest.approx(1e-10, rel=1e-12)


@pytest.mark.parametrize('baseline_last_step', [False, True])
def test_scheduler_matches_ref_lr(baseline_last_step):
  kw = dict(warmup_steps=3, num_steps=12, min_lr_ratio=0.1, baseline_last_step=baseline_last_step)
  opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
  sched = torch_train.ref_scheduler(opt, **kw)
  for s in range(14):
    assert opt.param_groups[0]['lr'] == torch_train.ref_lr(s, lr=2e-3, **kw)
    opt.step()
    sched.step()


def test_ref_train_micro_batches_and_clipping():
  batches = [_ids(batch=4, seed=s) for s in range(4)]
  kw = dict(lr=1e-2, warmup_steps=1, num_steps=3, baseline_last_step=True)
  runs = []
  for mb in (1, 2):
    model = torch_model.RefModel(_cfg('pre_gpas'), seed=0).double()
    runs.append((torch_train.ref_train(model, batches, micro_batches=mb, **kw), model))
  (l1, m1), (l2, m2) = runs
  # No pads and equal micro-batches: the mean of token means is the token mean.
  np.testing.assert_allclose(l1, l2, rtol=1e-12)
  for p1, p2 in zip(m1.parameters(), m2.parameters()):
    torch.testing.assert_close(p1, p2, rtol=1e-9, atol=1e-12)
  assert any(float(g.detach()) != 0 for g in torch_model.gate_params(m1))
  model = torch_model.RefModel(_cfg('pre_gpas'), seed=0)
  before = torch_model.state_dict_numpy(model)
  losses = torch_train.ref_train(model, batches[:1] * 6, lr=1e-2, warmup_steps=1, num_steps=5,
                                 grad_clip=1.0, gate_clip=0.01)
  assert losses[-1] < losses[0]
  # Update 0 runs at lr 0: with one step nothing moves.
  frozen = torch_model.RefModel(_cfg('pre_gpas'), seed=0)
  torch_train.ref_train(frozen, batches[:1], lr=1e-2, warmup_steps=1, num_steps=5)
  for k, v in torch_model.state_dict_numpy(frozen).items():
    np.testing.assert_array_equal(v, before[k])
