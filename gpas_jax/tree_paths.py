"""Names of jax key-path entries, shared by the optimizer, torch arithmetic and checksums."""

from typing import Any

import jax


def key_name(key: Any) -> Any:
  """The plain name of one jax key-path entry: a dict key, attribute name or sequence index."""
  if isinstance(key, (jax.tree_util.DictKey, jax.tree_util.FlattenedIndexKey)):
    return key.key
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return key.idx
  return key


def path_str(path: tuple) -> str:
  """A key path as 'opt_state/0/mu/lm_head'."""
  return '/'.join(str(key_name(k)) for k in path)
