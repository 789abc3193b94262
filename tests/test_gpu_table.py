"""docs/GPU.md's table rows (gpas_jax.perf.gpu_table) without a compiler: what each row spec
compiles, and the markdown's GPU wording."""

from gpas_jax.perf import gpu_table
from gpas_jax.perf import tpu_table


def test_row_specs_set_precision_faithfulness_and_nodes():
  rows = gpu_table.rows_for(['priority'])
  assert rows[0] == '71m@h100:1x8' and {'7b@h100:2x8', '7b@h100:4x8', '7b@h200:1x8'} <= set(rows)
  c, topo = gpu_table.row_config('7b@h100:2x8:f32master')
  assert topo == 'h100:2x8' and c.size_name == '7b' and not c.baseline_faithful
  assert (c.model.param_dtype, c.model.compute_dtype) == ('float32', 'bfloat16')
  c, topo = gpu_table.row_config('default:1b@h200:1x8:faithful')
  assert topo == 'h200:1x8' and c.baseline_faithful and c.model.param_dtype == 'bfloat16'


def test_markdown_speaks_of_gpus_and_their_attention():
  row = {'mesh': {'data': 8, 'fsdp': 1, 'tensor': 1}, 'micro_batches': 1, 'remat_policy': 'none',
         'attention_impl': 'cudnn', 'peak_bytes_per_chip': 2 ** 33,
         'hbm_bytes_per_chip': 0.75 * 84942979072, 'fits': True, 'estimated_step_s': 0.5,
         'tokens_per_s_per_chip': 3e4, 'estimated_mfu': 0.25, 'num_train_steps': 7200,
         'devices': 8, 'compile_s': 30.0, 'kind': 'pure bf16', 'size': '1b', 'slice': 'h100:1x8'}
  text = tpu_table.markdown([row], chip='GPU')
  assert 'GPU-hours' in text and 'tokens/s/GPU' in text
  assert '| none, cudnn attention | 8.00 (59) | yes | 0.500 |' in text
  assert '| 1.00 h | 8.0 |' in text  # 0.5 s x 7200 steps; x 8 GPUs


def test_rows_land_in_the_file_one_by_one_and_a_failed_row_is_kept(tmp_path, capsys):
  out = str(tmp_path / 'rows.jsonl')

  def refused():
    raise RuntimeError('no such chip\nmore words')

  done = tpu_table.run_rows([('a', {'kind': 'a'}, lambda: {'kind': 'a', 'fits': True}),
                             ('b', {'kind': 'b', 'size': '7b'}, refused),
                             ('c', {'kind': 'c'}, lambda: {'kind': 'c', 'fits': False})], out)
  assert done == [{'kind': 'a', 'fits': True}, {'kind': 'b', 'size': '7b', 'error': 'no such chip'},
                  {'kind': 'c', 'fits': False}]
  assert tpu_table.storage.read_jsonl(out) == done
  said = capsys.readouterr().out
  assert 'a: fits' in said and 'b: does not fit / refused' in said and 'c: does not fit' in said
