"""optim.grad_accumulation='torch': the release's per-chunk backward summed as torch and DDP sum it.

The release (torchrun_main.py) backpropagates each chunk's `loss / A` into the bf16 `.grad` and
never uses `no_sync`, so DDP all-reduces after every backward (each rank's .grad times 1 / W,
then summed). The torch side here is that arithmetic done by torch itself: AccumulateGrad adding
each chunk's gradient into `.grad`, `mul(1 / W)` as DDP's reducer does, the bf16 sum over ranks;
the first test checks that emulation against a real DDP run (gloo, 2 CPU processes).
"""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpas_jax import config as config_lib
from gpas_jax import sharding
from gpas_jax.model import transformer as model_lib
from gpas_jax.train import steps
from gpas_jax.train import torch_accum
from tests.helpers import tiny_train_config

torch.set_num_threads(1)
B, T = 12, 16


def _torch_release_grads(chunk_grads, world: int) -> list[torch.Tensor]:
  """torch's .grad after the release's loop, each chunk's backward giving chunk_grads[k].

  chunk_grads: K lists of bf16 tensors, chunk k = accumulation step k // W on rank k % W.
  backward() of sum(p * g) hands AccumulateGrad exactly g (mul's backward: 1 * g).
  """
  params = [torch.zeros_like(g, requires_grad=True) for g in chunk_grads[0]]
  reduced = None
  for a in range(len(chunk_grads) // world):
    buckets = []
    for r in range(world):
      for p, g in zip(params, reduced or [None] * len(params)):
        p.grad = None if g is None else g.clone()  # every rank's .grad: the last average
      sum((p * g).sum() for p, g in zip(params, chunk_grads[a * world + r])).backward()
      buckets.append([p.grad.mul(1.0 / world) for p in params])  # DDP: grad * (1 / W)
    reduced = [sum(bs[1:], bs[0]) for bs in zip(*buckets)]  # the all-reduce's bf16 sum
  return reduced


def _ddp_worker(rank: int, world: int, chunk_grads, out: str) -> None:
  os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'] = '127.0.0.1', '29517'
  dist.init_process_group('gloo', rank=rank, world_size=world)
  torch.set_num_threads(1)
  params = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros_like(g))
                                   for g in chunk_grads[0]])
  model = torch.nn.parallel.DistributedDataParallel(_Linearish(params))
  for a in range(len(chunk_grads) // world):  # no no_sync: an all-reduce after every backward
    model(chunk_grads[a * world + rank]).backward()
  if rank == 0:
    torch.save([p.grad for p in params], out)
  dist.destroy_process_group()


class _Linearish(torch.nn.Module):
  """sum(p * g) over the parameters: its backward gives each parameter the gradient g."""

  def __init__(self, params):
    super().__init__()
    self.params = params

  def forward(self, grads):
    return sum((p * g).sum() for p, g in zip(self.params, grads))


def _random_bf16_grads(k: int, seed: int = 0) -> list[list[torch.Tensor]]:
  rng = np.random.default_rng(seed)
  shapes = [(7, 5), (33,), (3, 4, 2)]
  # Scales far apart, so that sums round and the order of the roundings shows.
  return [[torch.from_numpy(rng.standard_normal(s).astype(np.float32) * 10.0 ** rng.integers(-3, 2))
           .to(torch.bfloat16) for s in shapes] for _ in range(k)]


def _as_jax(chunk_grads) -> list[jax.Array]:
  """K lists of torch bf16 tensors -> one [K, ...] bf16 array per leaf."""
  return [jnp.asarray(np.stack([g.float().numpy() for g in leaf]).astype(ml_dtypes.bfloat16))
          for leaf in zip(*chunk_grads)]


def _jax_release(chunks, world: int, groups: int = 1) -> list[np.ndarray]:
  """torch_accum's sum of the given chunk gradients, taken in `groups` groups of K / groups."""
  k = chunks[0].shape[0]
  grouped = [c.reshape((groups, k // groups) + c.shape[1:]) for c in chunks]
  g = k // groups
  fn = lambda p, ch: ((jnp.zeros(g), jnp.ones(g)), ch)  # each chunk's gradient: given
  _, grads, _ = jax.jit(lambda c: torch_accum.release_gradient(fn, None, c, world))(grouped)
  return [np.asarray(g) for g in grads]


def _bits(x) -> np.ndarray:
  x = x.float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
  return x.astype(ml_dtypes.bfloat16).view(np.uint16)


@pytest.mark.skipif(not dist.is_gloo_available(), reason='torch without gloo')
def test_the_torch_emulation_is_what_real_ddp_computes(tmp_path):
  """Real DDP, 2 ranks x 3 accumulation steps in bf16: bit for bit the emulation (and JAX's)."""
  chunk_grads = _random_bf16_grads(6)
  out = str(tmp_path / 'ddp.pt')
  mp.spawn(_ddp_worker, args=(2, chunk_grads, out), nprocs=2)
  ddp = torch.load(out)
  # JAX folds the same chunk gradients whether they come one at a time, 2 or all 6 at once.
  for d, e, j1, j3, j6 in zip(ddp, _torch_release_grads(chunk_grads, 2),
                              *[_jax_release(_as_jax(chunk_grads), 2, m) for m in (6, 3, 1)]):
    np.testing.assert_array_equal(_bits(d), _bits(e))
    for j in (j1, j3, j6):
      np.testing.assert_array_equal(_bits(d), _bits(j))
  # Not the no_sync form (accumulate on each rank, one all-reduce at the end): the interleaved
  # order moves bits, so the test can tell the two apart.
  local = [[sum(gs[1:], gs[0]) for gs in zip(*chunk_grads[r::2])] for r in range(2)]
  nosync = [a.mul(0.5) + b.mul(0.5) for a, b in zip(*local)]
  assert any((_bits(d) != _bits(n)).any() for d, n in zip(ddp, nosync))


def _setup(world: int, chunks: int, dtype: str, accumulation: str = 'torch', group: int = 0):
  c = tiny_train_config(**{
      'optim.global_batch_size': B, 'optim.loss_chunks': chunks, 'optim.ddp_world_size': world,
      'optim.grad_accumulation': accumulation, 'model.param_dtype': dtype,
      'model.compute_dtype': dtype, 'model.loss_dtype': 'compute', 'data.max_length': T,
      'model.norm_type': 'sandwich_gpas', 'optim.chunk_group': group})
  s = steps.setup(c, jax.devices()[:1])
  return s, steps.init_state(s)['params']


def _batch(s):
  rng = np.random.default_rng(3)
  ids = rng.integers(2, s.model_config.vocab_size, size=(B, T))
  lengths = rng.integers(T // 3, T + 1, size=B)
  ids[np.arange(T)[None, :] >= lengths[:, None]] = 0  # unequal chunk token counts
  return steps.global_batch(s, {'input_ids': ids.astype(np.int32),
                                'segment_ids': (ids != 0).astype(np.int32)})


def _step_grads(s, params, batch):
  """The train step's gradient (grad_accumulation='torch'), as one jitted program."""
  with sharding.use_mesh(s.mesh, s.rules):
    return jax.jit(lambda p, b: steps._release_gradient(s, b, p)[1])(params, batch)


def _chunk_grads(s, params, batch, chunks: int, together: bool) -> list:
  """Each chunk's own token-mean gradient: one jitted backward per chunk, or all chunks' at once
  (a vmap over [K, b] rows, the step's default grouping); torch tensors, K lists of leaves."""
  b = B // chunks
  if together:
    loss_fn = steps._loss_fn(s, weighted=False)
    grad = jax.vmap(jax.grad(lambda p, r: loss_fn(p, r)[0]), in_axes=(None, 0))
    rows = {n: v.reshape((chunks, b) + v.shape[1:]) for n, v in batch.items()}
    with sharding.use_mesh(s.mesh, s.rules):
      stacked = jax.jit(grad)(params, rows)
    per_chunk = [jax.tree.map(lambda x: x[k], stacked) for k in range(chunks)]
  else:
    grad_step = steps.make_grad_step(s)
    per_chunk = [grad_step(params, {n: v[k * b:(k + 1) * b] for n, v in batch.items()})
                 for k in range(chunks)]
  return per_chunk


# (W GPUs, K chunks): one GPU x 4 steps (71m/130m's form), 2 x 2 (250m), 3 x 2 (1/3 rounds);
# chunk_group 1: one chunk at a time (a scan); K or 3: a group's backwards at once (a vmap).
@pytest.mark.parametrize('world,chunks,group', [(1, 4, 1), (2, 4, 1), (3, 6, 1), (1, 4, 4),
                                                (2, 4, 4), (3, 6, 3)])
def test_bf16_step_gradient_is_bit_identical_to_torch_accumulating_the_same_chunks(world, chunks,
                                                                                  group):
  """The step's bf16 gradient = torch's .grad after the release's loop over the same chunks."""
  s, params = _setup(world, chunks, 'bfloat16', group=group)
  batch = _batch(s)
  # The step's program also hands out the chunk gradients it folds: torch folds the very same
  # values (XLA may round one chunk's bf16 backward differently in another program: on CPUs with
  # AVX512-BF16 a standalone backward and a vmapped one differ in the last bit).
  with sharding.use_mesh(s.mesh, s.rules):
    _, grads, _, stacked = jax.jit(lambda p, b: steps._release_gradient(s, b, p, True))(
        params, batch)
  stacked = jax.tree.map(lambda x: x.reshape((chunks,) + x.shape[2:]), stacked)
  step_chunks = [jax.tree.map(lambda x: x[k], stacked) for k in range(chunks)]
  chunk_grads = [[torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16)
                  for x in jax.tree.leaves(g)] for g in step_chunks]
  ref = _torch_release_grads(chunk_grads, world)
  leaves = jax.tree.leaves(grads)
  assert all(x.dtype == jnp.bfloat16 for x in leaves)
  differ = [i for i, (x, r) in enumerate(zip(leaves, ref)) if (_bits(x) != _bits(r)).any()]
  assert not differ, f'{len(differ)} of {len(leaves)} leaves differ from torch'
  # Each chunk's gradient is its own backward (its token mean) / A, chunk k being rows
  # [k*b, (k+1)*b): within bf16 rounding of a separately compiled backward (a few ulps of each
  # leaf's largest entry; a wrong chunk, scale or row moves entries by far more).
  steps_a = chunks // world
  for k, g in enumerate(_chunk_grads(s, params, batch, chunks, together=group > 1)):
    for x, y in zip(jax.tree.leaves(step_chunks[k]), jax.tree.leaves(g)):
      x, y = np.asarray(x, np.float32), np.asarray(y, np.float32) / steps_a
      np.testing.assert_allclose(x, y, rtol=0, atol=2 ** -6 * float(np.abs(y).max()) + 1e-30,
                                 err_msg=f'chunk {k}')
  # And the order matters: the weighted one-backward gradient is not the release's.
  s2, _ = _setup(world, chunks, 'bfloat16', 'weighted')
  weighted = _weighted_grads(s2, params, batch)
  assert any((_bits(x) != _bits(w)).any() for x, w in zip(leaves, jax.tree.leaves(weighted)))


def _weighted_grads(s, params, batch):
  """The default form's gradient: one backward of the chunk-weighted batch loss."""
  loss_fn = steps._loss_fn(s, weighted=True)
  chunks = s.config.optim.loss_chunks

  def grad(p, b):
    b = dict(b, weights=model_lib.chunk_weights(b['input_ids'], None, 0, chunks))
    return jax.grad(lambda q: loss_fn(q, b)[0])(p)

  with sharding.use_mesh(s.mesh, s.rules):
    return jax.jit(grad)(params, batch)


@pytest.mark.parametrize('world,chunks', [(1, 4), (2, 4)])
def test_float32_release_gradient_equals_the_weighted_gradient(world, chunks):
  """Float32: the per-chunk sum is today's gradient up to the order of float32 sums.

  The two differ only in how float32 sums are grouped (per-chunk matmuls added up vs one matmul
  over the batch, 1/A then 1/W vs 1/K), a few ulps of the terms summed: with K <= 4 chunks
  and 192 tokens, 1e-5 of each leaf's largest entry is ~100 ulps of headroom and 100x below
  any real difference (a chunk dropped or weighted twice moves leaves by >10%).
  """
  s, params = _setup(world, chunks, 'float32')
  batch = _batch(s)
  ours = jax.tree.leaves(_step_grads(s, params, batch))
  theirs = jax.tree.leaves(_weighted_grads(s, params, batch))
  for x, y in zip(ours, theirs):
    scale = float(np.abs(np.asarray(y)).max())
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5 * scale)


def test_faithful_turns_it_on_and_bad_values_are_refused_before_compiling():
  """baseline_faithful implies it; a bad value or world size: one-line errors before compiling."""
  c = tiny_train_config(**{'optim.global_batch_size': 8, 'optim.loss_chunks': 4})
  c.baseline_faithful = True
  config_lib.validate(c)
  assert c.optim.grad_accumulation == 'torch'
  for field, value, message in [
      ('grad_accumulation', 'nccl', "optim.grad_accumulation='nccl' is not supported"),
      ('ddp_world_size', 3, 'optim.ddp_world_size=3 does not divide optim.loss_chunks=4'),
      ('ddp_world_size', 0, 'optim.ddp_world_size=0 must be a positive integer')]:
    bad = tiny_train_config(**{'optim.global_batch_size': 8, 'optim.loss_chunks': 4,
                               f'optim.{field}': value})
    bad.baseline_faithful = True
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(bad)


def _mesh_setup(dtype: str, data: int, fsdp: int, chunks: int = 4, world: int = 2, group: int = 0):
  c = tiny_train_config(**{
      'optim.global_batch_size': B, 'optim.loss_chunks': chunks, 'optim.ddp_world_size': world,
      'optim.grad_accumulation': 'torch', 'model.param_dtype': dtype, 'model.compute_dtype': dtype,
      'model.loss_dtype': 'compute', 'data.max_length': T, 'model.norm_type': 'sandwich_gpas',
      'optim.chunk_group': group, 'mesh.data': data, 'mesh.fsdp': fsdp})
  return steps.setup(c, jax.devices()[:data * fsdp])


# B = 12 rows; (G, chunk axes, row axes): chunk_group 0 takes the fewest chunks at once that the
# mesh splits, with the fewest chunk shards.
@pytest.mark.parametrize('data,fsdp,chunks,world,group,layout', [
    (4, 1, 4, 2, 0, (4, ('data',), ())),          # chunks of 3 rows: one a device, as a GPU
    (2, 2, 4, 2, 0, (4, ('data', 'fsdp'), ())),   # the same over two axes, parameters over fsdp
    (2, 1, 2, 1, 0, (1, (), ('data',))),          # one chunk at a time, its 6 rows over data
    (2, 2, 2, 1, 2, (2, ('data',), ('fsdp',)))])  # 2 chunks over data, their rows over fsdp
def test_chunks_spread_over_the_mesh_give_the_one_device_gradient(data, fsdp, chunks, world,
                                                                  group, layout):
  """Sharded vs one device: the chunk layout moves where the work runs, not the result."""
  s1 = _mesh_setup('float32', 1, 1, chunks, world, layout[0])
  params = steps.init_state(s1)['params']
  one = jax.tree.leaves(_step_grads(s1, params, _batch(s1)))
  s = _mesh_setup('float32', data, fsdp, chunks, world, group)
  assert steps.chunk_layout(s.config, s.mesh.shape) == layout
  params_s = jax.device_put(params, s.state_shardings['params'])
  sharded = jax.tree.leaves(_step_grads(s, params_s, _batch(s)))
  for x, y in zip(sharded, one):  # float32 sums split over other devices: round-off only
    scale = float(np.abs(np.asarray(y)).max())
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5 * scale)


def _fake_mesh(data: int, fsdp: int = 1):
  return type('M', (), {'shape': {'data': data, 'fsdp': fsdp, 'tensor': 1}})()


def test_chunks_that_do_not_split_over_the_mesh_are_refused_with_the_fix():
  """No split of the data axes divides a group's chunks and their rows: refused before
  compiling, naming the chunk_group that would fit, or else a mesh that would."""
  c = tiny_train_config(**{'optim.global_batch_size': 8, 'optim.loss_chunks': 4,
                           'optim.grad_accumulation': 'torch', 'optim.chunk_group': 1})
  with pytest.raises(sharding.MeshError, match=r'chunk of 2 sequences .* 1 chunks at a time .*'
                     r'set optim.chunk_group to one of \[4\]'):
    steps.check_batch_fits_mesh(c, _fake_mesh(4))
  c.optim.chunk_group = 0
  assert steps.chunk_layout(c, _fake_mesh(4).shape) == (4, ('data',), ())  # 4 chunks on 4 devices
  with pytest.raises(sharding.MeshError, match=r'--config.mesh.data=4 --config.mesh.fsdp=2'):
    steps.check_batch_fits_mesh(c, _fake_mesh(8))
  c.optim.chunk_group = 3
  with pytest.raises(config_lib.ConfigError, match='optim.chunk_group=3 does not divide '
                     'optim.loss_chunks=4'):
    config_lib.validate(c)
