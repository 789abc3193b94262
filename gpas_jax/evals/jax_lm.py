"""The JAX backend of lm-evaluation-harness: an `lm_eval` LM that scores requests with our model.

Requests are split into context and continuation tokens by lm-eval's own TemplateLM (the code its
`hf` backend runs), truncated from the left to the run's context as the `hf` backend truncates,
and scored in batches of a few fixed shapes ([B, L] with L a power of two up to data.max_length)
so that a task compiles a handful of programs, not one per request. A live train state on a mesh
scores in place: the batch is laid out over the mesh's data axes.

Shapes: B rows of a batch, L positions (the bucket), V vocabulary.
"""

import dataclasses
import functools
from typing import Any, Iterable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
from lm_eval.api.model import TemplateLM
from lm_eval import utils as lm_utils
import numpy as np

from gpas_jax import sharding
from gpas_jax.model import transformer as model_lib

MIN_BUCKET = 16


def buckets(max_length: int) -> list[int]:
  """The sequence lengths a batch is padded to: powers of two from MIN_BUCKET, then max_length."""
  out, n = [], MIN_BUCKET
  while n < max_length:
    out.append(n)
    n *= 2
  return out + [max_length]


def bucket_of(length: int, max_length: int) -> int:
  """The shortest bucket that holds `length` positions."""
  return next(b for b in buckets(max_length) if b >= length)


@dataclasses.dataclass
class Scored:
  """One window to score: input ids (length <= L), and how many of its last targets count."""
  ids: list[int]
  targets: list[int]
  count: int


def window(context: Sequence[int], continuation: Sequence[int], max_length: int) -> Scored:
  """The hf backend's window: (context + continuation)[-(max_length + 1):], input = all but the
  last token, target t = token t + 1; the continuation's tokens are the last targets."""
  if not continuation:
    raise ValueError('an empty continuation has no log-likelihood.')
  if len(continuation) > max_length:
    raise ValueError(f'a continuation of {len(continuation)} tokens exceeds the model\'s '
                     f'context of {max_length} tokens.')
  whole = (list(context) + list(continuation))[-(max_length + 1):]
  return Scored(whole[:-1], whole[1:], len(continuation))


@functools.partial(jax.jit, static_argnums=0)
def _score_jit(graphdef, state, ids_BxL, targets_BxL, mask_BxL):
  """(sum of target log-probs where mask, whether every masked target is the argmax) per row."""
  logits_BxLxV = nnx.merge(graphdef, state)(ids_BxL).astype(jnp.float32)
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV)
  logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  greedy_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
  return (jnp.sum(jnp.where(mask_BxL, logp_BxL, 0.0), axis=1),
          jnp.all(greedy_BxL | ~mask_BxL, axis=1))


@functools.partial(jax.jit, static_argnums=0)
def _next_token_jit(graphdef, state, ids_BxL, last_B):
  """The argmax of the next token after position last_B of each row."""
  logits_BxLxV = nnx.merge(graphdef, state)(ids_BxL)
  return jnp.argmax(jnp.take_along_axis(logits_BxLxV, last_B[:, None, None], axis=1)[:, 0], -1)


class JaxLM(TemplateLM):
  """lm-eval's LM interface over a gpas_jax Transformer and the run's SentencePiece tokenizer."""

  def __init__(self, model: model_lib.Transformer, tokenizer: Any, max_length: int,
               batch_size: int = 16, pad_id: int = 0, mesh: jax.sharding.Mesh | None = None,
               rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES):
    super().__init__()
    self.graphdef, self.state = nnx.split(model)
    self.sp = tokenizer
    self._max_length = max_length
    self.batch_size = batch_size
    self.pad_id = pad_id
    self.mesh, self.rules = mesh, rules
    self.shapes_run: set[tuple[int, int]] = set()  # (B, L) of every batch scored

  @property
  def eot_token_id(self) -> int:
    return self.sp.eos_id()

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def tokenizer_name(self) -> str:
    return 'sentencepiece'

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """The run's tokenization: no BOS (the model was trained without one)."""
    del add_special_tokens, kwargs
    return self.sp.encode(string)

  def tok_decode(self, tokens: Iterable[int]) -> str:
    return self.sp.decode(list(tokens))

  def _run(self, fn, *arrays: np.ndarray):
    """Calls a jitted function on host arrays, laid out over the mesh's data axes if there is one."""
    self.shapes_run.add(arrays[0].shape)
    if self.mesh is None:
      return jax.device_get(fn(self.graphdef, self.state, *map(jnp.asarray, arrays)))
    with sharding.use_mesh(self.mesh, self.rules):
      placed = [jax.device_put(a, sharding.batch_sharding(self.mesh) if a.ndim == 2 else
                               jax.sharding.NamedSharding(self.mesh, sharding.logical_to_spec(
                                   ('batch',)))) for a in arrays]
      return jax.device_get(fn(self.graphdef, self.state, *placed))

  def score_windows(self, windows: Sequence[Scored]) -> list[tuple[float, bool]]:
    """(log-likelihood, is greedy) of each window's counted targets, in the given order."""
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].ids))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(windows)
    b = self.batch_size
    for start in range(0, len(order), b):
      rows = order[start:start + b]
      length = bucket_of(len(windows[rows[0]].ids), self._max_length)
      ids = np.full((b, length), self.pad_id, np.int32)
      targets = np.full((b, length), self.pad_id, np.int32)
      mask = np.zeros((b, length), bool)
      for r, i in enumerate(rows):
        w = windows[i]
        n = len(w.ids)
        ids[r, :n], targets[r, :n] = w.ids, w.targets
        mask[r, n - w.count:n] = True
      ll, greedy = self._run(_score_jit, ids, targets, mask)
      for r, i in enumerate(rows):
        out[i] = (float(ll[r]), bool(greedy[r]))
    return out

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    del disable_tqdm, kwargs
    return self.score_windows([window(ctx, cont, self._max_length) for _, ctx, cont in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """The hf backend's disjoint rolling windows (prefix: EOS, as no BOS was trained), summed."""
    del disable_tqdm
    spans, windows = [], []
    for (string,) in (r.args for r in requests):
      ws = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self._max_length, context_len=1)]
      spans.append((len(windows), len(windows) + len(ws)))
      windows += [window(ctx, cont, self._max_length) for ctx, cont in ws]
    scored = self.score_windows(windows)
    return [sum(ll for ll, _ in scored[a:z]) for a, z in spans]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy decoding (the hf backend's default, do_sample=False) until a stop string or
    max_gen_toks; each step reruns the batch's bucket (no KV cache: short answers only)."""
    del disable_tqdm
    out = []
    for start in range(0, len(requests), self.batch_size):
      chunk = requests[start:start + self.batch_size]
      out += self._generate([r.args[0] for r in chunk], [dict(r.args[1]) for r in chunk])
    return out

  def _generate(self, contexts: list[str], kwargs: list[dict[str, Any]]) -> list[str]:
    b = self.batch_size
    until = [[u] if isinstance(u, str) else list(u or []) for u in
             (k.get('until', [self.tok_decode([self.eot_token_id])]) for k in kwargs)]
    max_gen = max(int(k.get('max_gen_toks', 256)) for k in kwargs)
    # As the hf backend: the context keeps its last max_length - max_gen_toks tokens.
    keep = max(self._max_length - max_gen, 1)
    rows = [self.tok_encode(c)[-keep:] for c in contexts]
    new: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for _ in range(max_gen):
      seqs = [r + n for r, n in zip(rows, new)]
      if all(done) or max(map(len, seqs)) > self._max_length:
        break
      length = bucket_of(max(map(len, seqs)), self._max_length)
      ids = np.full((b, length), self.pad_id, np.int32)
      last = np.zeros((b,), np.int32)
      for r, s in enumerate(seqs):
        ids[r, :len(s)], last[r] = s, len(s) - 1
      nxt = self._run(_next_token_jit, ids, last)
      for r in range(len(rows)):
        if done[r]:
          continue
        new[r].append(int(nxt[r]))
        text = self.tok_decode(new[r])
        done[r] = (int(nxt[r]) == self.eot_token_id or any(u and u in text for u in until[r])
                   or len(new[r]) >= int(kwargs[r].get('max_gen_toks', 256)))
    texts = []
    for r, n in enumerate(new):
      text = self.tok_decode([t for t in n if t != self.eot_token_id])
      for u in until[r]:
        if u:
          text = text.split(u)[0]
      texts.append(text)
    return texts
