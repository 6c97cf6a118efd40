"""The embedded default: the ANITA recipe on SmolLM2-135M-Instruct (NF4) and the project's own small data.

configs/anita_demo.py:sft | :dpo | :lm gives one stage; no ARG gives the whole recipe
(one full stage config under each of sft, dpo, lm), as scripts/anita.py runs it.
Sized to run all three stages in minutes on a 2-core CPU.
"""

import os

import ml_collections

from anita_jax.train.config import recipe_config, stage_config



# QLoRA in every stage, as ANITA: the NF4 base of the first stage stays, and each later stage keeps the earlier
# adapters frozen beside it (init_as=stacked, the default). Re-quantizing a merged model instead (init_as=merged)
# rounds away most of a 135M model's small adapter deltas (measured on this data: the DPO model's held-out
# preference accuracy 0.80 -> 0.40).


def _data(name: str) -> str:
  import anita_jax  # the installed package's copy, so the config works from any directory
  return os.path.join(os.path.dirname(anita_jax.__file__), "demo_data", name)


def stage(name: str) -> ml_collections.ConfigDict:
  c = stage_config(name)
  c.model.path = "embedded"
  c.quant.type = "nf4"
  c.train.log_every = 5
  c.train.eval_on_start = True  # the held-out loss before training, to show what each stage changes
  c.checkpoint.every = 20
  c.checkpoint.keep = 2
  c.train.batch_size = 4
  if name == "sft":
    c.data.train, c.data.eval = _data("sft_train.jsonl"), _data("sft_eval.jsonl")
    c.data.max_length = 256
    c.data.packing = True
    c.data.truncation = "drop"
    c.lora.rank, c.lora.alpha = 16, 32.0
    c.train.steps = 26
    c.train.lr = 5e-4
    c.train.warmup_steps = 4
  elif name == "dpo":
    c.data.train, c.data.eval = _data("dpo_train.jsonl"), _data("dpo_eval.jsonl")
    c.data.max_length = 96  # 97% of the pairs fit whole (median 65 tokens)
    c.data.max_prompt_length = 64
    c.lora.rank, c.lora.alpha, c.lora.rslora = 16, 16.0, True
    c.train.steps = 24
    c.train.lr = 2e-4
    c.train.warmup_ratio = 0.1
    c.train.weight_decay = 0.0
    c.dpo.beta = 0.1
    # Pairs packed: each laid out once, [prompt][chosen][rejected], several to a row of 2 x max_length tokens,
    # so the prompt is computed once and no padding is trained on (exact: tests/test_dpo_packing.py).
    # train.batch_size counts rows: 2 rows hold 3.7 pairs on average on this data (1.87 a row; see
    # scripts/preview_data.py --config=configs/anita_demo.py:dpo), about the 4 pairs a step of the padded layout.
    c.data.packing = True
    c.train.batch_size = 2
  elif name == "lm":
    c.data.train, c.data.eval = _data("it_train.jsonl"), _data("it_eval.jsonl")
    c.data.format = "text"
    c.data.max_length = 256
    c.data.packing = True
    c.lora.rank, c.lora.alpha = 16, 32.0
    c.train.steps = 16
    c.train.lr = 3e-4
    c.train.warmup_steps = 2
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return recipe_config(stage, arg, "configs/anita_demo.py")
