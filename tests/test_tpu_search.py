"""The TPU plan search's candidates (no compiler needed): under baseline_faithful's per-chunk
backward the mesh must split the release's chunks, so the search offers the meshes that do."""

from gpas_jax.perf import tpu_plan
from gpas_jax.perf import tpu_search
from gpas_jax.perf import tpu_table


def _meshes(config, chips: int, gen: str) -> set:
  return {c['mesh'] for c in tpu_search.candidates(config, chips, tpu_plan.hbm_bytes(gen))}


def test_release_chunks_choose_meshes_that_split_them():
  """250m: 4 chunks of 128 sequences on 256 chips split over neither one axis of 256, so the
  chunks go over data=4 and their rows over fsdp=64; the weighted form keeps all-data."""
  c = tpu_table.paper_config('250m')
  assert c.optim.loss_chunks == 4
  torch_meshes = _meshes(c, 256, 'v5e')
  assert (4, 64, 1) in torch_meshes
  assert not torch_meshes & {(256, 1, 1), (1, 256, 1)}
  assert all(p['micro'] == 1 for p in tpu_search.candidates(c, 256, tpu_plan.hbm_bytes('v5e')))
  c.optim.grad_accumulation = 'weighted'
  c.baseline_faithful = False
  assert (256, 1, 1) in _meshes(c, 256, 'v5e')


def test_a_chunk_on_chips_of_its_own_counts_a_whole_gradient():
  """7b's chunks of 4 sequences on 64 chips: one chunk a chip, whose gradient is whole there, so
  the all-fsdp plan's estimate holds one full bf16 gradient (14 GB) beyond its sharded state."""
  c = tpu_table.paper_config('7b')
  hbm = tpu_plan.hbm_bytes('v5p')
  plans = {p['mesh']: p for p in tpu_search.candidates(c, 64, hbm) if p['remat'] == 'none'}
  fsdp = plans[(1, 64, 1)]['estimate']
  c.optim.grad_accumulation, c.baseline_faithful = 'weighted', False
  c.optim.micro_batches = 8  # the same rows a pass: 2048 / 8 = 64 chunks of 4
  weighted = tpu_search.estimate_bytes(c, 1, 64, 1, 8, 'none')
  params = 2 * (32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 2 * 32000 * 4096)  # bf16 bytes
  assert abs(fsdp - weighted - params) < 0.01 * params


def test_table_rows_say_how_the_gradient_is_formed():
  """A per-chunk row names its chunk group in the micro column (micro_batches has no effect
  there); a refusal keeps its message."""
  c = tpu_table.paper_config('1b')
  row = {'mesh': {'data': 16, 'fsdp': 16, 'tensor': 1}, 'micro_batches': 1, 'remat_policy': 'none',
         'peak_bytes_per_chip': 2 ** 31, 'hbm_bytes_per_chip': 2 ** 34, 'fits': True,
         'estimated_step_s': 0.1, 'tokens_per_s_per_chip': 5e3, 'estimated_mfu': 0.3,
         'num_train_steps': 100, 'devices': 256, 'compile_s': 60.0, 'kind': 'best', 'size': '1b',
         'slice': 'v5e-256'}
  row.update(tpu_table.accumulation(c, row))
  assert row['chunk_group'] == 16 and row['chunk_axes'] == ['data'] and row['row_axes'] == ['fsdp']
  text = tpu_table.markdown([row, {'kind': 'default', 'size': '1b', 'slice': 'v5e-256',
                                   'error': 'mesh data x fsdp = 1 x 256'}])
  assert '| 16/16/1 | 16 of 16 chunks at once | none | 2.00 (16) | yes |' in text
  assert 'refused: mesh data x fsdp = 1 x 256' in text


def test_both_forms_of_the_compilers_out_of_memory_refusal_are_read():
  """The HBM a refused plan needs is read from either wording of XLA:TPU's refusal."""
  gib = 2.0 ** 30
  for msg in ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
              'temporaries (22.74G) exceeds available HBM (15.75G).',
              'Ran out of memory in memory space hbm. It requires 22.74G of memory, which '
              'exceeds the 15.75G available'):
    need, have = tpu_plan._oom_bytes(msg)
    assert (round(need / gib, 2), round(have / gib, 2)) == (22.74, 15.75)


def test_plans_the_memory_model_says_fit_are_tried_first():
  """7b on v5e-256: the cheapest-scored plans (no remat) need more than a chip's HBM by the
  model, so the ones it says fit come first, whatever their score."""
  c = tpu_table.paper_config('7b')
  hbm = tpu_plan.hbm_bytes('v5e')
  plans = tpu_search.candidates(c, 256, hbm)
  fit = [p['estimate'] <= 0.9 * hbm for p in plans]
  assert fit[0] and not all(fit) and fit == sorted(fit, reverse=True)
  assert min(p['score'] for p in plans) < plans[0]['score']
