"""Defaults shared by every run; size files override the model dims and the recipe."""

import math

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config: a 71m-shaped Pre+GPAS model with the paper's recipe."""
  c = ml_collections.ConfigDict()
  c.size_name = '71m'  # Which row of the results table a run belongs to.
  c.paper_recipe = ''  # Set by configs/llama_<size>.py: the paper's data and tokenizer required.
  c.seed = 0
  c.num_train_steps = 10_000
  c.log_every_steps = 50
  c.eval_every_steps = 1_000
  c.checkpoint_every_steps = 1_000
  c.checkpoint_keep = 3
  c.checkpoint_async = True
  # What to do when the loss or a gradient is not finite: 'stop' or 'skip' (the update).
  c.nan_policy = 'stop'
  # nan_policy='skip' stops the run (as 'stop' does) after more skipped updates than these.
  c.nan_max_consecutive = 10
  c.nan_max_total = 100
  # One switch to compute what the PyTorch baseline computes (gpas_jax/config.py:FAITHFUL lists
  # the fields it sets): torch's clipping and Adam arithmetic op by op, cross-entropy on the
  # compute-dtype logits, attention logits kept in float32 (torch's SDPA), N+1 updates. The
  # dtypes stay as set: the release trains in pure bf16 (model.param_dtype=compute_dtype=bfloat16).
  c.baseline_faithful = False
  # An explicit value of one of those fields (a config file, --config.x=v) is kept beside it:
  # they are left unset (None) here, and gpas_jax.config.resolve fills them once, when the config
  # is loaded, with baseline_faithful's value or the plain default; config.json records the result.
  c.resolved_faithful = None  # set by that resolve: the baseline_faithful the fields hold
  # A PyTorch/HF checkpoint in the baseline's names (.bin, .safetensors, or a directory holding
  # one) to start from; used only while the workdir holds no checkpoint of its own.
  c.init_from = ''
  # XLA flags for this config, added to XLA_FLAGS before JAX starts (train.py, the bench); a flag
  # the environment's XLA_FLAGS sets already wins. For tuning measured per shape, e.g. bench_cpu.
  c.xla_flags = ''

  c.model = ml_collections.ConfigDict()
  m = c.model
  m.vocab_size = 32_000
  m.hidden_size = 512
  m.intermediate_size = 1368
  m.num_layers = 12
  m.num_heads = 8
  m.norm_type = 'pre_gpas'
  m.post_num = 3  # Mix-LN: layers with index < post_num are Post-LN (baseline: L // 4).
  m.gate_act = 'silu'
  m.gate_init = 0.0
  m.gate_learnable = True
  m.gate_per_sublayer = False  # False: one gate per decoder layer, used twice (baseline).
  m.lns_mode = 'init'  # 'init': gains initialised to 1/sqrt(l+1) (baseline); 'fixed': fixed multiplier.
  m.rms_eps = 1e-6
  m.rope_theta = 10_000.0
  m.init_std = 0.02
  m.embed_init_std = math.sqrt(2 / 5)
  # Baseline quirk: pad_token_id=-1 makes embedding row vocab_size-1 start at zero, never trained.
  m.frozen_last_embed_row = True
  m.scan_layers = True
  m.remat_policy = 'none'  # 'none' | 'full' | 'save_dots'
  m.param_dtype = 'float32'
  m.compute_dtype = 'float32'
  # 'xla': einsum in causal query blocks (default) | 'einsum': full masked square |
  # 'dot_product': jax.nn.dot_product_attention(implementation='xla') | 'cudnn': its cuDNN kernel.
  m.attention_impl = 'xla'
  # 'compute': q.k^T rounded to the compute dtype before the float32 softmax | 'float32': kept in
  # float32, as torch's SDPA does with bf16 inputs.
  m.attention_logits_dtype = placeholder(str)  # default 'compute'
  # 'float32': cross-entropy on float32 logits | 'compute': on the compute-dtype logits, as the
  # baseline's F.cross_entropy on its bf16 logits (log-probabilities rounded to bf16).
  m.loss_dtype = placeholder(str)  # default 'float32'
  # True: XLA may keep float32 through a fusion of bf16 ops (its default, faster) | False: every
  # op's result rounded to the compute dtype, as each torch kernel rounds its result
  # (xla_allow_excess_precision=false for every step this config compiles).
  m.excess_precision = placeholder(bool)  # default True

  c.data = ml_collections.ConfigDict()
  d = c.data
  d.source = 'embedded'  # 'embedded' | 'tfds' | 'text_folder' | 'tokens'
  # data.source='tokens': pre-tokenized rows, read in order (update u trains on rows [u*B, (u+1)*B)).
  # A .npy integer array [rows, max_length] padded with pad_id, or (layout 'packed') a flat
  # token stream .bin of tokens_dtype. eval_tokens_path: the same for eval ('' skips eval).
  d.tokens_path = ''
  d.eval_tokens_path = ''
  d.tokens_dtype = 'uint16'  # of a flat .bin stream: 'uint16' | 'uint32'
  d.tfds_name = 'c4/en:3.1.0'
  d.data_dir = ''
  d.text_dir = ''
  d.text_field = 'text'
  d.validation_percent = 2.0  # text_folder: share of documents (by hash) in the validation split
  d.validation_glob = ''  # text_folder: files matching this glob form the validation split
  d.train_split = 'train'
  d.eval_split = 'validation'
  d.tokenizer = ''  # A sentencepiece .model; '' trains (once, cached) one on the embedded corpus.
  d.tokenizer_vocab_size = 32_000
  d.cache_dir = ''  # '' -> ~/.cache/gpas_jax
  d.max_length = 256
  # 'padded' (the baseline: one document per sample; rows as on one host, any host count) |
  # 'packed' (packed per host by design: its rows depend on the host count, which a resume keeps)
  d.layout = 'padded'
  d.pad_id = 0
  d.eos_id = 1
  d.worker_count = -1  # -1: chosen from the host's cores (gpas_jax/data/workers.py); 0 = none
  d.prefetch_buffer_size = 2
  d.eval_tokens = 10_000_000
  d.eval_batch_size = 64

  c.optim = ml_collections.ConfigDict()
  o = c.optim
  o.name = 'adam'  # 'adam' | 'adamw'
  o.global_batch_size = 512
  o.micro_batches = 1  # Gradient accumulation: micro-batches per step.
  o.lr = 1e-3
  o.warmup_steps = 1_000
  o.min_lr_ratio = 0.1
  # Baseline quirk: the last step uses lr = 1e-7 * peak (N + 1 updates); default False.
  o.baseline_last_step = placeholder(bool)
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.0
  o.grad_clip = 0.0  # Global-norm clip over all parameters; 0 disables.
  o.gate_clip = 0.0  # Joint norm clip over all gates, after the global clip; 0 disables.
  o.state_dtype = ''  # Adam moments' dtype; '' follows model.param_dtype.
  # 'optax': optax's clipping and Adam | 'torch': torch's op-by-op arithmetic (each op in float32,
  # rounded once to the storage dtype): bit-identical bf16 updates to torch.optim.Adam.
  o.arithmetic = placeholder(str)  # default 'optax'
  # The objective of one update: the mean of loss_chunks per-chunk token means, chunk k being
  # rows [k*b, (k+1)*b) of the global batch (b = batch / loss_chunks); 1 = one token mean. The
  # baseline's chunks are its GPUs x accumulation steps. micro_batches (memory) never changes it.
  o.loss_chunks = 1
  # How the gradient of those chunks is formed: 'weighted' (one backward of the chunk-weighted
  # batch loss) | 'torch' (the release's: a backward per chunk in the compute dtype, summed into
  # a compute-dtype .grad over the accumulation steps, DDP's average over ddp_world_size GPUs
  # after each; chunk k = step k // ddp_world_size on GPU k % ddp_world_size). Float32: the same
  # gradient to round-off. Under 'torch' micro_batches has no effect (a chunk's backward is whole).
  o.grad_accumulation = placeholder(str)  # default 'weighted'
  o.ddp_world_size = 1  # The release's GPUs; loss_chunks / ddp_world_size accumulation steps.
  # Under 'torch': chunks whose backwards run at once (a vmap; the groups run one after another),
  # a divisor of loss_chunks; 0: the fewest the mesh can split (1 where a chunk's rows split over
  # the data axes; on a pod, where they cannot, chunks spread over devices as over GPUs).
  o.chunk_group = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # One of data/fsdp/tensor may be -1: the rest of the devices.
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.dcn_data = 1  # Slices (multi-slice TPU): data parallelism across DCN.

  c.logging = ml_collections.ConfigDict()
  c.logging.tensorboard = True
  c.logging.wandb = False
  c.logging.wandb_project = 'gpas_jax'

  c.analysis = ml_collections.ConfigDict()
  c.analysis.every_steps = 0  # 0 disables per-layer statistics during training.

  # A profiler trace of train steps start_step .. start_step + num_steps - 1 (step 1 compiles),
  # for TensorBoard's profile plugin or ui.perfetto.dev (its perfetto_trace.json.gz).
  c.profile = ml_collections.ConfigDict()
  c.profile.start_step = 0  # 0 disables.
  c.profile.num_steps = 3
  c.profile.dir = ''  # '' -> WORKDIR/profile

  c.debug = ml_collections.ConfigDict()  # test hooks; never set in a real run
  c.debug.inject_nan_step = -1  # poison this step's loss and gradients with NaN
  c.debug.inject_nan_count = 1  # ... and the steps after it, this many in all
  c.debug.sigterm_at_step = -1  # send this process SIGTERM after this step (preemption)
  c.debug.sigterm_process = -1  # ... only on this host (-1: every host)
  c.debug.interleave_hosts = False  # mesh order alternating hosts, as a TPU torus's can be
  c.debug.sigint_at_step = -1  # send this process SIGINT (Ctrl-C) after this step
  c.debug.sigkill_at_step = -1  # SIGKILL this process once this step's checkpoint is saved
  c.debug.sigstop_at_step = -1  # SIGSTOP it there (a test then breaks storage and resumes it)

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ''  # '' -> auto-detect (TPU, SLURM) or single process.
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  return c


def with_size(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Sets the model dims of a baseline size (gpas_jax.config.SIZES) and its Mix-LN post_num."""
  from gpas_jax import config as gconfig  # pylint: disable=import-outside-toplevel
  hidden, ffn, layers, heads, vocab = gconfig.SIZES[name]
  c.size_name = name
  c.model.hidden_size = hidden
  c.model.intermediate_size = ffn
  c.model.num_layers = layers
  c.model.num_heads = heads
  c.model.vocab_size = vocab
  c.model.post_num = layers // 4
  return c


def with_recipe(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Sets the paper's training recipe of a size (gpas_jax.config.RECIPES)."""
  from gpas_jax import config as gconfig  # pylint: disable=import-outside-toplevel
  r = gconfig.RECIPES[name]
  c.optim.lr = r['lr']
  c.num_train_steps = r['steps']
  c.optim.warmup_steps = r['warmup']
  c.optim.global_batch_size = r['batch']
  c.optim.grad_clip = r['grad_clip']
  c.optim.gate_clip = r['gate_clip']
  c.optim.loss_chunks = r['loss_chunks']
  c.optim.ddp_world_size = r['ddp_gpus']
  c.data.max_length = 256
  # The baseline evaluates per-device batches of its per-GPU training batch size.
  c.data.eval_batch_size = r['batch'] // r['loss_chunks']
  c.model.remat_policy = r.get('remat', 'none')
  # Precision: pure bf16 parameters, Adam state and compute, as the paper trains (the release's
  # model.to(bfloat16)): a reproduction of its numbers wants its arithmetic, and the plans of
  # docs/TPU.md and docs/GPU.md fit at it (float32 parameters with the paper's batches do not
  # all fit: 71m on v5e-8 needs 16.46 GiB of 16, the TPU compiler). Set in the config, not by
  # the platform, so that a plan made on a CPU host is what a pod runs and config.json says it.
  # MaxText's alternative, float32 master weights with bf16 compute:
  # --config.model.param_dtype=float32 (docs/GPU.md has its rows).
  c.model.param_dtype = c.model.compute_dtype = 'bfloat16'
  # The paper trains on C4 with the T5 tokenizer: a paper size needs its data flags (data.data_dir
  # and data.tokenizer, or data.source='tokens') instead of silently using the embedded corpus.
  c.data.source = 'tfds'
  c.data.tfds_name = 'c4/en:3.1.0'
  c.paper_recipe = name
  return c
