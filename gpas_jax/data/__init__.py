"""Data: TFDS/ArrayRecord sources, SentencePiece tokenizers and grain pipelines (docs/DATA.md).

The names below load their module on first use, so `python -m gpas_jax.data.tokenizer` and the
grain worker processes (which import gpas_jax.data.layouts) do not import the whole package.

May import: storage, tree_paths, sharding, distributed, runtime, config (model is a peer).
"""

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    'DataError': 'errors',
    'EvalBatches': 'pipeline',
    'TrainIterator': 'pipeline',
    'get_tokenizer': 'tokenizer',
    'load_tokenizer': 'tokenizer',
    'loss_mask': 'layouts',
    'make_eval_batches': 'pipeline',
    'make_train_iterator': 'pipeline',
    'train_tokenizer': 'tokenizer',
    'validate_data': 'validate',
    'workers_row': 'workers',
}
__all__ = [
    'DataError', 'EvalBatches', 'TrainIterator', 'get_tokenizer', 'load_tokenizer', 'loss_mask',
    'make_eval_batches', 'make_train_iterator', 'train_tokenizer', 'validate_data', 'workers_row',
]

if TYPE_CHECKING:
  from gpas_jax.data.errors import DataError
  from gpas_jax.data.layouts import loss_mask
  from gpas_jax.data.pipeline import EvalBatches, make_eval_batches, make_train_iterator
  from gpas_jax.data.pipeline import TrainIterator
  from gpas_jax.data.tokenizer import get_tokenizer, load_tokenizer, train_tokenizer
  from gpas_jax.data.validate import validate_data
  from gpas_jax.data.workers import workers_row


def __getattr__(name: str) -> Any:
  """Imports the module that defines a public name on first access."""
  if name in _EXPORTS:
    value = getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
