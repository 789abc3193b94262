"""Hugging Face modeling code of every architecture: the torch port behind transformers' API.

`hf_tools export` copies this file and torch_model.py into the export and names them in
config.json's `auto_map`, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
(lm-eval's `hf` backend, anything built on transformers) computes the eleven residual forms, GPAS
gates and every option as the port does. Written against transformers 4.31 (the baseline's pin).
Only a forward pass: no KV cache, so `generate` reruns the prefix at each step.
"""

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .torch_model import RefModel
from .torch_model import ref_config_from_hf

MODEL_TYPE = 'gpas_llama'


class GpasLlamaConfig(PretrainedConfig):
  """The baseline's LlamaConfig keys plus ours (norm_type, post_num, gate and LNS options)."""
  model_type = MODEL_TYPE

  def __init__(self, vocab_size: int = 32000, hidden_size: int = 4096,
               intermediate_size: int = 11008, num_hidden_layers: int = 32,
               num_attention_heads: int = 32, norm_type: str = 'pre', post_num: int = 0,
               rms_norm_eps: float = 1e-6, rope_theta: float = 10000.0, gate_act: str = 'silu',
               lns_mode: str = 'init', gate_per_sublayer: bool = False, gate_init: float = 0.0,
               gate_learnable: bool = True, max_position_embeddings: int = 2048,
               tie_word_embeddings: bool = False, **kwargs):
    self.vocab_size, self.hidden_size = vocab_size, hidden_size
    self.intermediate_size, self.num_hidden_layers = intermediate_size, num_hidden_layers
    self.num_attention_heads, self.norm_type, self.post_num = num_attention_heads, norm_type, post_num
    self.rms_norm_eps, self.rope_theta, self.gate_act = rms_norm_eps, rope_theta, gate_act
    self.lns_mode, self.gate_per_sublayer = lns_mode, gate_per_sublayer
    self.gate_init, self.gate_learnable = gate_init, gate_learnable
    self.max_position_embeddings = max_position_embeddings
    super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class GpasLlamaForCausalLM(PreTrainedModel):
  """input_ids [B, T] -> logits [B, T, V] (and the baseline's shifted loss given labels)."""
  config_class = GpasLlamaConfig
  base_model_prefix = 'model'
  # transformers 4.31 stores RoPE's inv_freq; the port builds its tables from rope_theta.
  _keys_to_ignore_on_load_unexpected = [r'rotary_emb\.inv_freq']
  _no_split_modules = ['RefDecoderLayer']

  def __init__(self, config: GpasLlamaConfig, gguf_file: str | None = None):
    # lm-eval's hf backend passes gguf_file (None) to from_pretrained; transformers 4.31 does
    # not know it and hands it on to the model.
    if gguf_file is not None:
      raise ValueError(f'gguf_file={gguf_file!r}: this model loads from safetensors only.')
    super().__init__(config)
    ref = RefModel(ref_config_from_hf(config.to_dict()))
    self.model, self.lm_head = ref.model, ref.lm_head

  def _init_weights(self, module: torch.nn.Module) -> None:
    """The port initialises in its constructor; from_pretrained then loads every weight."""

  def get_input_embeddings(self) -> torch.nn.Module:
    return self.model.embed_tokens

  def get_output_embeddings(self) -> torch.nn.Module:
    return self.lm_head

  def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
    """Plain causal attention, as the baseline: right padding cannot reach earlier positions;
    left padding (a mask that starts with 0) would, and is refused."""
    del kwargs
    if attention_mask is not None and not bool(attention_mask[:, 0].all()):
      raise ValueError('a left-padded batch: this model attends plainly causally (as the '
                       'baseline), so pad on the right or pass one sequence at a time.')
    logits = self.lm_head(self.model(input_ids))
    loss = None
    if labels is not None:
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                             labels[:, 1:].reshape(-1), ignore_index=-100)
    return CausalLMOutputWithPast(loss=loss, logits=logits)

  def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs) -> dict:
    return {'input_ids': input_ids}
