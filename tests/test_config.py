"""Config files load and validate; every bad config is rejected with its message."""

import glob
import json
import importlib
import os

import pytest

from configs import base
from gpas_jax import config as config_lib
from gpas_jax.model import transformer as model_lib

CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                                     '*.py'))
                      if not os.path.basename(p).startswith('_'))  # not the package's __init__


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_validates(path):
  mod = importlib.import_module('configs.' + os.path.basename(path)[:-3])
  config_lib.validate(mod.get_config())


def test_sizes_match_the_baseline_table():
  from configs import llama_71m, llama_7b, llama_100m
  c = llama_71m.get_config()
  assert (c.model.hidden_size, c.model.intermediate_size, c.model.num_layers,
          c.model.num_heads) == (512, 1368, 12, 8)
  assert (c.optim.lr, c.num_train_steps, c.optim.warmup_steps) == (1e-3, 10_000, 1_000)
  c7 = llama_7b.get_config()
  assert c7.optim.grad_clip == 1.0 and c7.optim.gate_clip == 0.01
  assert c7.optim.global_batch_size == 2048 and c7.model.remat_policy == 'full'
  assert llama_100m.get_config().model.vocab_size == 32100


def test_paper_sizes_train_pure_bf16_and_the_cpu_default_float32():
  """The paper's precision is the size configs' own (not the platform's): a plan made on a CPU
  host is what a pod runs; configs/tiny.py, the CPU default, stays float32."""
  from configs import tiny  # pylint: disable=import-outside-toplevel
  files = glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs',
                                 'llama_*.py'))
  assert len(files) >= 6
  for path in files:
    m = importlib.import_module('configs.' + os.path.basename(path)[:-3]).get_config().model
    assert (m.param_dtype, m.compute_dtype) == ('bfloat16', 'bfloat16'), path
  m = tiny.get_config().model
  assert (m.param_dtype, m.compute_dtype) == ('float32', 'float32')


BAD = [
    (('model', 'norm_type', 'post_gpas'), r"model.norm_type='post_gpas' is not supported.*pre_gpas"),
    (('model', 'gate_act', 'swish'), r"model.gate_act='swish'.*silu, identity, relu"),
    (('model', 'num_heads', 7), r'hidden_size=512 is not divisible by model.num_heads=7'),
    (('model', 'post_num', 13), r'post_num=13 is outside 0..model.num_layers=12'),
    (('model', 'post_num', -1), r'post_num=-1 is outside'),
    (('model', 'vocab_size', 2), r'vocab_size=2 is too small for the special ids.*at least 3'),
    (('model', 'remat_policy', 'some'), r'remat_policy.*none, full, save_dots'),
    (('optim', 'micro_batches', 3), r'global_batch_size=512 is not divisible by optim.micro_batches=3'),
    (('data', 'max_length', 1), r'max_length=1 must be at least 2'),
]


@pytest.mark.parametrize('override,message', BAD, ids=[b[0][1] + str(b[0][2]) for b in BAD])
def test_bad_config_raises_naming_the_field(override, message):
  c = base.get_config()
  section, field, value = override
  c[section][field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_odd_head_dim_is_rejected_before_building():
  c = base.get_config()
  c.model.hidden_size, c.model.num_heads = 24, 8  # head dim 3
  with pytest.raises(config_lib.ConfigError, match='= 3 is odd'):
    model_lib.create_model(c.model)


# Every numeric field that can be out of range, written out here (not read from config.RANGES,
# so a row dropped from the table fails): (field, bad value, words the message must contain).
BAD_NUMBERS = [
    ('optim.min_lr_ratio', -1.0, r'optim.min_lr_ratio=-1.0 must be .* in \[0.0, 1.0\].*ascent'),
    ('optim.min_lr_ratio', 1.5, r'in \[0.0, 1.0\]'),
    ('checkpoint_keep', 0, r'checkpoint_keep=0 must be an integer in \[1, inf\]'),
    ('checkpoint_keep', -1, r'checkpoint_keep=-1 must be an integer'),
    ('nan_max_consecutive', 0, r'nan_max_consecutive=0'),
    ('nan_max_total', 0, r'nan_max_total=0'),
    ('seed', -1, r'seed=-1'),
    ('optim.lr', -1e-3, r'optim.lr=-0.001'),
    ('optim.lr', float('nan'), r'optim.lr=nan must be a finite number'),
    ('optim.b1', 1.0, r'optim.b1=1.0 must be .* in \[0.0, 1.0\)'),
    ('optim.b2', -0.1, r'optim.b2=-0.1'),
    ('optim.eps', 0.0, r'optim.eps=0.0 must be .* in \(0.0, inf\]'),
    ('optim.weight_decay', -0.1, r'optim.weight_decay=-0.1'),
    ('optim.grad_clip', -1.0, r'optim.grad_clip=-1.0'),
    ('optim.gate_clip', float('inf'), r'optim.gate_clip=inf'),
    ('model.rms_eps', 0.0, r'model.rms_eps=0.0'),
    ('model.rope_theta', -1.0, r'model.rope_theta=-1.0'),
    ('model.init_std', 0.0, r'model.init_std=0.0'),
    ('model.embed_init_std', -0.1, r'model.embed_init_std=-0.1'),
    ('model.gate_init', float('nan'), r'model.gate_init=nan'),
    ('data.eval_tokens', 0, r'data.eval_tokens=0'),
    ('data.eval_batch_size', 0, r'data.eval_batch_size=0'),
    ('data.worker_count', -2, r'data.worker_count=-2'),
    ('data.prefetch_buffer_size', -1, r'data.prefetch_buffer_size=-1'),
    ('data.validation_percent', 101.0, r'data.validation_percent=101.0'),
    ('data.tokenizer_vocab_size', 0, r'data.tokenizer_vocab_size=0'),
    ('mesh.dcn_data', 0, r'mesh.dcn_data=0'),
    ('mesh.fsdp', 0, r'mesh.fsdp=0 must be a positive integer'),
    ('analysis.every_steps', -1, r'analysis.every_steps=-1'),
    ('num_train_steps', 0, r'num_train_steps=0 must be a positive integer'),
    ('optim.warmup_steps', -1, r'optim.warmup_steps=-1 is outside'),
]


def _set(c, field, value):
  *parents, leaf = field.split('.')
  for p in parents:
    c = c[p]
  c[leaf] = value


@pytest.mark.parametrize('field,value,message', BAD_NUMBERS,
                         ids=[f'{b[0]}={b[1]}' for b in BAD_NUMBERS])
def test_out_of_range_number_is_rejected_naming_field_and_range(field, value, message):
  c = base.get_config()
  _set(c, field, value)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


@pytest.mark.parametrize('row', config_lib.RANGES, ids=[r[0] for r in config_lib.RANGES])
def test_range_bounds_are_inclusive_or_open_as_the_table_says(row):
  field, lo, hi, lo_open, hi_open, integer = row[:6]
  step = 1 if integer else 1e-6
  for bound, is_open, inside in ((lo, lo_open, +step), (hi, hi_open, -step)):
    if bound is None:
      continue
    c = base.get_config()
    _set(c, field, bound if integer else float(bound))
    if is_open:
      with pytest.raises(config_lib.ConfigError, match=field):
        config_lib.validate(c)
    else:
      config_lib.validate(c)
    _set(c, field, bound + inside if integer else float(bound) + inside)
    config_lib.validate(c)
    _set(c, field, bound - inside if integer else float(bound) - inside)
    with pytest.raises(config_lib.ConfigError, match=field):
      config_lib.validate(c)


def _tiny():
  from configs import tiny  # pylint: disable=import-outside-toplevel
  return tiny.get_config()


@pytest.mark.parametrize('faithful', [False, True])
def test_resolve_puts_what_baseline_faithful_decides_into_the_plain_fields(faithful):
  """Every reader reads the field: no config.effective, the value resolve fills is the run's."""
  assert not hasattr(config_lib, 'effective')
  c = _tiny()
  c.baseline_faithful = faithful
  assert c.optim.grad_accumulation is None  # unset until the config is resolved
  config_lib.validate(c)  # resolves first
  side = config_lib.FAITHFUL if faithful else config_lib.DEFAULTS
  for key, value in side.items():
    section, field = key.split('.')
    assert c[section][field] == value, key
  assert c.resolved_faithful is faithful
  assert config_lib.total_updates(c) == c.num_train_steps + faithful


def test_an_explicit_value_beside_baseline_faithful_is_kept_and_named(caplog):
  c = _tiny()
  c.baseline_faithful = True
  c.model.excess_precision = True  # the plain default, set on purpose
  c.optim.grad_accumulation = 'weighted'
  config_lib.resolve(c)
  assert c.model.excess_precision is True and c.optim.grad_accumulation == 'weighted'
  assert c.optim.arithmetic == 'torch' and c.model.loss_dtype == 'compute'
  assert 'baseline_faithful: keeping' in caplog.text
  assert 'model.excess_precision=True' in caplog.text
  assert "optim.grad_accumulation='weighted'" in caplog.text
  caplog.clear()
  config_lib.resolve(c)  # a second call changes nothing and says nothing
  assert c.model.excess_precision is True and not caplog.text


def test_flipping_baseline_faithful_after_resolving_moves_only_the_fields_it_filled():
  c = _tiny()
  c.model.loss_dtype = 'compute'  # explicit (not the plain default): stays either way
  config_lib.resolve(c)
  assert c.optim.arithmetic == 'optax'
  c.baseline_faithful = True
  config_lib.resolve(c)
  assert (c.optim.arithmetic, c.model.excess_precision, c.model.loss_dtype) == (
      'torch', False, 'compute')
  c.baseline_faithful = False
  config_lib.resolve(c)
  assert (c.optim.arithmetic, c.model.excess_precision) == ('optax', True)


def test_a_config_json_from_before_resolution_reads_as_it_ran():
  """An old config.json (no resolved_faithful; the fields at their old defaults) under
  baseline_faithful: the switch won then, so the fields read FAITHFUL's values; a resolved
  config.json is read as written, an explicit value kept."""
  old = json.loads(_tiny().to_json_best_effort())
  del old['resolved_faithful']
  old['baseline_faithful'] = True
  for key, value in config_lib.DEFAULTS.items():
    section, field = key.split('.')
    old[section][field] = value
  for key in ('optim.loss_chunks', 'optim.ddp_world_size', 'optim.chunk_group'):
    del old['optim'][key.split('.')[1]]  # older still: fields that came later
  c = config_lib.from_saved(old)
  for key, value in config_lib.FAITHFUL.items():
    section, field = key.split('.')
    assert c[section][field] == value, key
  assert (c.optim.loss_chunks, c.optim.ddp_world_size) == (1, 1)
  config_lib.validate(c)
  new = _tiny()
  new.baseline_faithful, new.model.excess_precision = True, True
  saved = json.loads(config_lib.resolve(new).to_json_best_effort())
  assert saved['model']['excess_precision'] is True and saved['resolved_faithful'] is True
  assert config_lib.from_saved(saved).model.excess_precision is True
