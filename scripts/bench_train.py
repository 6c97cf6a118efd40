"""Training step speed: anita-jax vs TRL + PEFT, same model, rows and dtype, in the same run.

python scripts/bench_train.py [--stage=sft|dpo] [--dtypes=float32,bfloat16] [--quants=none,nf4] [--steps=4]
SmolLM2-135M-Instruct, LoRA r=16 on all seven projections.
  sft: 8 sequences of 256 tokens, against TRL SFTTrainer + PEFT.
  dpo: 4 pairs of 64 prompt + 192 completion tokens, against TRL DPOTrainer + PEFT (both: the reference is the
       same model with the adapters disabled; TRL without gradient checkpointing, as ours).
MFU = model FLOPs / step time / peak, peak = the best of five timings of 5 2048^3 JAX matmuls here, same dtype.
Model FLOPs of a LoRA step (no rematerialisation): `train.flops.benchmark_flops`, 4 N_frozen T + 6 N_lora T +
attention; dpo adds the reference forward.

python scripts/bench_train.py --stage=dpo --packing [--dtypes=float32 --quants=none] [--compare_padded]
  One epoch over 48 variable-length pairs (prompt and completion tokens log-normal, medians 60 and 110,
  prompt + completion capped at max_length=512), wall time of the whole epoch after one compiled warm-up step:
  ours with data.packing (rows of 2 x 512 tokens, --rows per step, each prompt computed once) against TRL
  DPOTrainer + PEFT (4 pairs per step in data order, padded to each batch's longest, no gradient checkpointing);
  --compare_padded adds ours unpacked (4 pairs per step, padded to 512). --objectives=dpo,orpo,simpo times ours
  packed for each preference objective in the same run (orpo: dpo.objective=orpo; simpo: dpo.objective=cpo with
  loss_type simpo; both reference-free, so their step has no reference forward) with --trl=false to skip TRL.
"""

import json
import time

from absl import flags

from anita_jax.apps import cli

_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to measure.")
_QUANTS = flags.DEFINE_list("quants", ["none", "nf4"], "Frozen weight formats for anita-jax.")
_STEPS = flags.DEFINE_integer("steps", 4, "Timed steps (after one warm-up step).")
_TRL = flags.DEFINE_bool("trl", True, "Also time TRL (SFTTrainer or DPOTrainer) + PEFT.")
_STAGE = flags.DEFINE_enum("stage", "sft", ["sft", "dpo"], "The step to time.")
_PACKING = flags.DEFINE_bool("packing", False, "dpo: time one epoch of variable-length pairs, ours packed.")
_ROWS = flags.DEFINE_integer("rows", 2, "dpo --packing: packed rows (of 2 x 512 tokens) per step.")
_PADDED = flags.DEFINE_bool("compare_padded", False, "dpo --packing: also time ours unpacked.")
_OBJECTIVES = flags.DEFINE_list("objectives", ["dpo"], "dpo --packing: preference objectives to time, of dpo, "
                                "orpo, simpo (dpo.objective=cpo, loss_type simpo).")
OBJECTIVE_FIELDS = {"dpo": {}, "orpo": {"objective": "orpo"}, "simpo": {"objective": "cpo", "loss_type": "simpo"}}
B, T, RANK = 8, 256, 16  # sft: 8 rows; dpo: 4 pairs = 8 rows
PROMPT = 64  # dpo: prompt tokens of each row; the completion fills the rest of T


def peak_flops(dtype) -> float:
  import jax
  import jax.numpy as jnp
  a = jnp.ones((2048, 2048), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(5):  # the best of five: one slow burst (another process exiting) must not set the peak
    start = time.perf_counter()
    for _ in range(5):
      f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 5 * 2 * 2048 ** 3 / best


def model_flops(config) -> float:
  from anita_jax.model.config import PROJECTIONS
  from anita_jax.train.flops import benchmark_flops
  return benchmark_flops(config, RANK, PROJECTIONS, rows=B, length=T, reference_forward=_STAGE.value == "dpo")


def _text_of(tokenizer, rng):
  """A function n -> a text of exactly n tokens (n words that are one token each)."""
  words = sorted(w[1:] for w in tokenizer.get_vocab() if w.startswith("Ġ") and w[1:].isalpha() and w[1:].islower()
                 and 3 <= len(w) <= 7)[:4000]
  single = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
  words = [w for w, ids in zip(words, single) if len(ids) == 1]
  return lambda n: "".join(" " + words[i] for i in rng.randint(0, len(words), n))


def dpo_rows(tokenizer, seed: int = 0):
  """Texts of 4 pairs whose tokens are exactly PROMPT + (T - PROMPT - 1) + EOS, and their ids."""
  import numpy as np
  text = _text_of(tokenizer, np.random.RandomState(seed))
  rows = [{"prompt": text(PROMPT), "chosen": text(T - PROMPT - 1), "rejected": text(T - PROMPT - 1)}
          for _ in range(B // 2)]
  for row in rows:
    for key in ("prompt", "chosen", "rejected"):
      n = len(tokenizer(row[key], add_special_tokens=False)["input_ids"])
      assert n == (PROMPT if key == "prompt" else T - PROMPT - 1), (key, n)
  return rows


def dpo_batch(tokenizer):
  """Our [1, 8, T] batch of the same rows: chosen rows, then rejected rows; loss on the completions."""
  import numpy as np
  rows = dpo_rows(tokenizer)
  seqs = [tokenizer(r["prompt"] + r[k], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
          for k in ("chosen", "rejected") for r in rows]
  ids = np.array([seqs], np.int32)
  mask = np.zeros_like(ids)
  mask[..., PROMPT:] = 1
  return ids, mask


def our_step(stage_name: str, dtype: str, quant: str, batch_size: int, **fields):
  """(stage, compiled train step) of our trainer on the benchmark's model: LoRA r=RANK, one device row
  (mesh.data=1); `fields` are further dotted config fields ({"data.packing": True, ...})."""
  from anita_jax.train import config as stage_config
  from anita_jax.train import state as ST
  from anita_jax.train import step as STEP
  from anita_jax.train import workdir as W
  from anita_jax.train.optim import make_optimizer
  c = stage_config.stage_config(stage_name)
  c.model.dtype, c.quant.type = dtype, quant
  c.lora.rank, c.lora.alpha = RANK, 32.0
  c.train.batch_size = batch_size
  c.mesh.data = 1
  c.update_from_flattened_dict(fields)
  c = stage_config.freeze(c)
  stage = ST.build_stage(c, W.base_model_path(c))
  tx, _ = make_optimizer(c.train, 100)
  return stage, STEP.compile_step(stage, tx, STEP.batch_shardings(stage.config, stage.mesh))


def time_ours(dtype: str, quant: str, steps: int):
  import jax
  import numpy as np

  stage, step = our_step(_STAGE.value, dtype, quant, B if _STAGE.value == "sft" else B // 2)
  if _STAGE.value == "dpo":
    ids, mask = dpo_batch(stage.tokenizer)
  else:
    ids = np.random.RandomState(0).randint(100, stage.model_config.vocab_size, (1, B, T)).astype(np.int32)
    mask = np.ones_like(ids)
  batch = {"input_ids": ids, "loss_mask": mask, "segment_ids": np.ones_like(ids),
           "positions": np.broadcast_to(np.arange(T, dtype=np.int32), ids.shape).copy()}
  state, rng = stage.state, jax.random.key(0)
  state, m = step(state, stage.frozen, batch, rng)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, stage.frozen, batch, rng)
  jax.block_until_ready(m)
  return (time.perf_counter() - start) / steps, stage.model_config


def time_trl(dtype: str, steps: int) -> float:
  import os

  import datasets
  import numpy as np
  import peft
  import torch
  import transformers
  import trl

  from anita_jax.convert import loading
  path = loading.embedded_default_path()
  torch_dtype = getattr(torch, dtype)
  gguf_model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                                 gguf_file=os.path.basename(path), dtype=torch_dtype)
  # A GGUF-loaded model is flagged as quantized and refused by the trainers: copy it into a plain one.
  config = gguf_model.config
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  model = transformers.LlamaForCausalLM(config).to(torch_dtype)
  model.load_state_dict(gguf_model.state_dict())
  del gguf_model
  times = []

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      times.append(time.perf_counter())

  config = peft.LoraConfig(r=RANK, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"],
                           task_type="CAUSAL_LM")
  tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  if _STAGE.value == "dpo":
    data = datasets.Dataset.from_list(dpo_rows(tokenizer) * (steps + 1))
    args = trl.DPOConfig(output_dir="/tmp/bench_trl", per_device_train_batch_size=B // 2, max_steps=steps + 1,
                         logging_steps=1000, report_to=[], use_cpu=True, bf16=dtype == "bfloat16", max_length=T,
                         save_strategy="no", dataloader_drop_last=True, gradient_checkpointing=False)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=config, callbacks=[Timer()])
    trainer.train()
    times.append(time.perf_counter())
    return (times[-1] - times[1]) / steps
  ids = np.random.RandomState(0).randint(100, model.config.vocab_size, (B, T)).tolist()
  data = datasets.Dataset.from_dict({"input_ids": ids})
  args = trl.SFTConfig(output_dir="/tmp/bench_trl", per_device_train_batch_size=B, max_steps=steps + 1,
                       logging_steps=1000, report_to=[], use_cpu=True, bf16=dtype == "bfloat16", max_length=T,
                       save_strategy="no", packing=False, dataloader_drop_last=True)
  data = datasets.concatenate_datasets([data] * (steps + 1))
  trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=config,
                           callbacks=[Timer()])
  trainer.train()
  times.append(time.perf_counter())
  return (times[-1] - times[1]) / steps  # the first step warms up


PAIRS, MAX_LENGTH = 48, 512


def variable_pairs(tokenizer, seed: int = 0) -> list[dict]:
  """48 string pairs: prompt P and completions C, R (+ the EOS both trainers append) log-normal in tokens,
  medians 60 and 110, sigma 0.6; prompt + completion at most MAX_LENGTH."""
  import numpy as np
  rng = np.random.RandomState(seed)
  text = _text_of(tokenizer, rng)
  lognormal = lambda median: int(round(rng.lognormal(np.log(median), 0.6)))  # noqa: E731
  rows = []
  for _ in range(PAIRS):
    p = min(max(lognormal(60), 1), MAX_LENGTH // 2)
    c, r = (min(max(lognormal(110), 2), MAX_LENGTH - p) for _ in range(2))
    rows.append({"prompt": text(p), "chosen": text(c - 1), "rejected": text(r - 1)})
  return rows


def epoch_runner(dtype: str, quant: str, packing: bool, objective: str = "dpo"):
  """(run, info): run() is the wall time of one epoch over `variable_pairs` (the step compiled, and warmed up
  on the first batch, before the first call); info counts the epoch's pairs, rows and real tokens."""
  import jax

  from anita_jax.data import preference as PR
  stage, step = our_step("dpo", dtype, quant, _ROWS.value if packing else 4, **{
      "data.max_length": MAX_LENGTH, "data.packing": packing,
      **{f"dpo.{field}": value for field, value in OBJECTIVE_FIELDS[objective].items()}})
  c, tokenizer = stage.config, stage.tokenizer
  examples = [PR.encode_preference(r, tokenizer, max_length=MAX_LENGTH) for r in variable_pairs(tokenizer)]
  it = PR.PreferenceBatchIterator(examples, batch_size=c.train.batch_size, max_length=MAX_LENGTH, packing=packing,
                                  pad_id=tokenizer.pad_token_id or 0)
  batches = [{k: v[None] for k, v in next(it).items()} for _ in range(it.steps_in_epoch(0))]
  rng = jax.random.key(0)
  state, m = step(stage.state, stage.frozen, batches[0], rng)  # compiles; the state is donated
  jax.block_until_ready(m)
  holder = {"state": state}

  def run() -> float:
    state, start = holder["state"], time.perf_counter()
    for batch in batches:
      state, m = step(state, stage.frozen, batch, rng)
    jax.block_until_ready(m)
    holder["state"] = state
    return time.perf_counter() - start

  return run, {"steps": len(batches), "pairs": sum(len(g) for g in it.groups(0)), "rows": len(it.groups(0)),
               "real_tokens": sum(PR.pair_length(ex) for ex in examples)}


def epoch_trl(dtype: str) -> float:
  """TRL DPOTrainer + PEFT over the same pairs, 4 per step in data order, after one warm-up step."""
  import os

  import datasets
  import peft
  import torch
  import transformers
  import trl

  from anita_jax.convert import loading
  path = loading.embedded_default_path()
  torch_dtype = getattr(torch, dtype)
  gguf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch_dtype)
  config = gguf.config
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  model = transformers.LlamaForCausalLM(config).to(torch_dtype)
  model.load_state_dict(gguf.state_dict())
  tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  rows = variable_pairs(tokenizer)
  times = []

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      times.append(time.perf_counter())

  class InOrder(trl.DPOTrainer):
    def _get_train_sampler(self, *args, **kwargs):
      return torch.utils.data.SequentialSampler(self.train_dataset)

  lora = peft.LoraConfig(r=RANK, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"], task_type="CAUSAL_LM")
  args = trl.DPOConfig(output_dir="/tmp/bench_trl", per_device_train_batch_size=4, max_steps=PAIRS // 4 + 1,
                       logging_steps=1000, report_to=[], use_cpu=True, bf16=dtype == "bfloat16",
                       max_length=MAX_LENGTH, save_strategy="no", dataloader_drop_last=True,
                       gradient_checkpointing=False)
  trainer = InOrder(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows[:4] + rows),
                    processing_class=tokenizer, peft_config=lora, callbacks=[Timer()])
  trainer.train()
  return time.perf_counter() - times[1]  # steps 2.. : the 48 pairs


def main_packed_epoch():
  """Per dtype and quant: every objective's step compiled first; with several, their epochs are timed in turn,
  twice, each objective's best kept (host load drifts over minutes; alternating keeps one run's ratios fair)."""
  import torch
  for dtype in _DTYPES.value:
    trl_s = epoch_trl(dtype) if _TRL.value else None
    for quant in _QUANTS.value:
      runners = {o: epoch_runner(dtype, quant, packing=True, objective=o) for o in _OBJECTIVES.value}
      times = _alternating(runners) if len(runners) > 1 else {o: run() for o, (run, _) in runners.items()}
      for objective, (_, info) in runners.items():
        seconds = times[objective]
        row = {"stage": "dpo", "objective": objective, "packing": True, "dtype": dtype, "quant": quant,
               "pairs": info["pairs"], "real_tokens": info["real_tokens"], "packed_rows": info["rows"],
               "rows_per_step": _ROWS.value, "anita_jax_epoch_s": round(seconds, 2),
               "vs_dpo": round(seconds / times["dpo"], 3) if "dpo" in times else None,
               "trl_peft_epoch_s": None if trl_s is None else round(trl_s, 2),
               "time_vs_trl": None if trl_s is None else round(seconds / trl_s, 3),
               "torch_threads": torch.get_num_threads()}
        if _PADDED.value and objective == "dpo":
          row["anita_jax_unpacked_epoch_s"] = round(epoch_runner(dtype, quant, packing=False)[0](), 2)
        print(json.dumps(row), flush=True)


def _alternating(runners: dict) -> dict:
  """{objective: the best of two epochs}, the objectives' epochs taken in turn."""
  best = dict.fromkeys(runners, float("inf"))
  for _ in range(2):
    for objective, (run, _) in runners.items():
      best[objective] = min(best[objective], run())
  return best


def main(argv):
  del argv
  import torch
  if _PACKING.value:
    if _STAGE.value != "dpo":
      raise SystemExit("--packing times the dpo stage: add --stage=dpo")
    return main_packed_epoch()
  rows = []
  for dtype in _DTYPES.value:
    peak = peak_flops(dtype)
    trl_s = time_trl(dtype, _STEPS.value) if _TRL.value else None
    for quant in _QUANTS.value:
      seconds, config = time_ours(dtype, quant, _STEPS.value)
      flops = model_flops(config)
      rows.append({"stage": _STAGE.value, "dtype": dtype, "quant": quant, "anita_jax_step_s": round(seconds, 2),
                   "trl_peft_step_s": None if trl_s is None else round(trl_s, 2),
                   "anita_jax_tokens_per_s": round(B * T / seconds, 1),
                   "anita_jax_mfu": round(flops / seconds / peak, 3),
                   "trl_peft_tokens_per_s": None if trl_s is None else round(B * T / trl_s, 1),
                   "speedup_vs_trl": None if trl_s is None else round(trl_s / seconds, 2),
                   "peak_gflops": round(peak / 1e9, 1), "model_gflops_per_step": round(flops / 1e9, 1),
                   "torch_threads": torch.get_num_threads()})
      print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
  cli.run(main)
