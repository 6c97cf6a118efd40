"""LLaMAntino-3-ANITA on Meta-Llama-3-8B-Instruct: the published recipe, for Cloud TPU.

configs/anita_8b.py:sft | :dpo | :lm gives one stage; no ARG gives the whole recipe; :dryrun the whole recipe
cut to two steps of one row per stage on the project's small files in ANITA's formats (see `dryrun`).
Hyperparameters and datasets as released by the ANITA authors (QLoRA: NF4 with double
quantization, bf16 compute, LoRA on all seven projections). The global batch is the
ANITA one: batch_size x grad_accum sequences (pairs for DPO) per optimizer step.
"""

import os

import ml_collections

from anita_jax.train.config import recipe_config, stage_config

BASE = "meta-llama/Meta-Llama-3-8B-Instruct"


def stage(name: str) -> ml_collections.ConfigDict:
  c = stage_config(name)
  c.model.path = BASE
  c.model.dtype = "bfloat16"
  c.model.license = "llama3"
  c.model.remat = "full"
  c.quant.type, c.quant.block_size, c.quant.double_quant = "nf4", 64, True
  c.generation.temperature, c.generation.top_p, c.generation.max_new_tokens = 0.6, 0.9, 512
  c.train.log_every = 10
  c.checkpoint.every = 200
  c.checkpoint.keep = 2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  if name == "sft":
    c.data.train = "Chat-Error/wizard_alpaca_dolly_orca"
    c.data.format = "alpaca"
    c.data.max_length = 8192
    c.data.packing = True
    c.data.mask = "all"  # ANITA trained on all tokens
    # At 8192 tokens the plain attention's [T, T] scores dominate memory; with the blockwise kernel one
    # v5e chip holds a micro-batch (README, "ANITA 8B on TPU topologies"). DPO's packed pairs take flash.
    c.model.attention = "splash"
    c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.rslora = 16, 8.0, 0.0, False
    c.train.epochs = 1
    c.train.batch_size, c.train.grad_accum = 16, 8
    c.train.lr, c.train.schedule, c.train.warmup_steps = 2e-4, "linear", 100
    c.train.weight_decay = 0.01
  elif name == "dpo":
    # init_from: the sft workdir (scripts/anita.py sets it; with train.py pass --config.init_from=DIR/sft)
    c.data.train = "mlabonne/orpo-dpo-mix-40k"
    c.data.max_length = 1024
    c.data.max_prompt_length = 512
    c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.rslora = 64, 16.0, 0.0, True
    c.train.epochs = 1
    c.train.batch_size, c.train.grad_accum = 8, 5
    c.train.lr, c.train.schedule, c.train.warmup_ratio = 5e-5, "linear", 0.1
    c.train.weight_decay = 0.0
    c.dpo.beta, c.dpo.loss_type, c.dpo.reference = 0.1, "sigmoid", "base"
    # Pairs packed, [prompt][chosen][rejected] in rows of 2 x 1024 tokens, each prompt computed once (exact:
    # tests/test_dpo_packing.py); batch_size counts rows, and a step averages over the pairs its rows hold.
    # For about ANITA's 96 pairs a step, batch_size x grad_accum ~ 96 / pairs per row: 8 x 5 rows at the 2.4
    # pairs a row of README's length distribution (scripts/preview_data.py --num_examples=2000 prints the rows
    # of your data's first 2000 pairs). data.packing=false: exactly batch_size x grad_accum pairs a step.
    c.data.packing = True
    # Packed pairs through our flash kernel (its masks come from the batch: a completion never sees the other
    # one): on v5e:2x4, 0.80x the plain attention's estimated step and 0.78x its temporaries (docs/benchmarks.md).
    # A TPU kernel: on GPUs and CPUs the plain attention runs (model.attention=dot silences the warning).
    c.model.attention = "flash"
    # The ORPO variant (the objective orpo-dpo-mix-40k was assembled for): --config.dpo.dpo.objective=orpo, with
    # dpo.beta as ORPO's lambda (TRL's default 0.1). Reference-free: the step runs no reference forward
    # (docs/benchmarks.md, "Packed DPO at 8B", has its AOT row). SimPO: dpo.objective=cpo, dpo.loss_type=simpo.
  elif name == "lm":
    # init_from: the dpo workdir
    c.data.train = "gsarti/clean_mc4_it"
    c.data.config_name = "tiny"
    c.data.split = "train[:20000]"
    c.data.format = "text"
    c.data.max_length = 8192
    c.data.packing = True
    c.model.attention = "splash"  # as sft
    c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.rslora = 64, 16.0, 0.0, False
    c.train.epochs = 1
    c.train.batch_size, c.train.grad_accum = 16, 8
    c.train.lr, c.train.schedule, c.train.warmup_steps = 2e-5, "linear", 100
  return c


def _dryrun_data(name: str) -> str:
  import anita_jax  # the installed package's copy, so the config works from any directory
  return os.path.join(os.path.dirname(anita_jax.__file__), "demo_data", "dryrun", name)


def dryrun() -> ml_collections.ConfigDict:
  """The whole recipe as above (model, quantization, LoRA ranks, losses, stage chaining, exports) with every
  stage cut to 2 optimizer steps of one row of 256 tokens (DPO: a packed row of 2 x 128 holding one or two
  pairs), grad_accum 1, on the project's small files in ANITA's formats: alpaca rows (SFT), conversational
  chosen/rejected pairs as in mlabonne/orpo-dpo-mix-40k (DPO), plain text (LM). The report: 2 held-out rows of
  each kind, 8-token answers. What to run on a new host (or this CPU) before the real run: it loads, trains,
  chains, merges, exports and evaluates the 8B model once, on any accelerator or none."""
  recipe = recipe_config(stage, None, "configs/anita_8b.py")
  files = {"sft": ("sft_alpaca.jsonl", "alpaca"), "dpo": ("dpo_orpo.jsonl", "auto"), "lm": ("it_text.jsonl", "text")}
  for name, (file, fmt) in files.items():
    c = recipe[name]
    c.data.train, c.data.format, c.data.config_name, c.data.split = _dryrun_data(file), fmt, None, "train"
    c.data.max_length = 256 if name != "dpo" else 128
    c.data.max_prompt_length = None if name != "dpo" else 64
    c.model.attention = "dot"  # the splash and flash kernels are TPU-only (on CPU they run interpreted)
    c.train.steps, c.train.batch_size, c.train.grad_accum = 2, 1, 1
    c.train.warmup_steps, c.train.warmup_ratio = 0, 0.0
    c.train.log_every, c.checkpoint.every = 1, 2
  recipe.report.max_rows, recipe.report.max_new_tokens = 2, 8
  return recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg == "dryrun":
    return dryrun()
  return recipe_config(stage, arg, "configs/anita_8b.py", recipes=("dryrun",))
