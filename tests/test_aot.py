"""Ahead-of-time compilation for TPU topologies: memory, the 4-bit base in the TPU program, FLOPs.

The FLOP reference is what the TPU compiler counts for the compiled program.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (requirements.txt pins it): no compile-only TPU devices to compile for")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small Llama whose matmuls dominate its elementwise work, so the FLOP counts can be compared closely.
ARCH = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, model_type="llama", hidden_act="silu", bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("aot_model")
  (out / "config.json").write_text(json.dumps(ARCH))
  return str(out)


def small_config(demo_config, model_dir, stage):
  c = demo_config(stage)
  c.model.path = model_dir
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.quant.type, c.quant.block_size, c.quant.double_quant = "nf4", 64, True
  c.lora.rank, c.lora.targets = 8, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
  c.data.max_length = 128
  c.data.packing = False  # dpo: the padded [2B, T] layout, whose FLOPs the analytic count below describes
  c.train.batch_size, c.train.grad_accum = 8, 2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  return c


@pytest.mark.parametrize("stage,topology", [("sft", "v5e:1x1"), ("dpo", "v5e:2x4")])
def test_report_memory_4bit_and_flops(demo_config, model_dir, stage, topology):
  from anita_jax.train import aot
  c = small_config(demo_config, model_dir, stage)
  r = aot.compile_report(c, topology)
  devices = {"v5e:1x1": 1, "v5e:2x4": 8}[topology]
  for key in ("topology", "devices", "per_device_bytes", "hbm_bytes_per_device", "fits", "flops", "bytes_accessed",
              "estimated_step_seconds", "estimated_mfu", "compile_seconds", "tokens_per_second_per_chip",
              "flop_formula", "frozen_bytes_per_device"):
    assert key in r, key
  assert r["devices"] == devices and r["mesh"] == {"data": 1, "fsdp": devices, "tensor": 1}
  b = r["per_device_bytes"]
  assert r["fits"] and 0 < b["total"] <= r["hbm_bytes_per_device"] == 16 * 2 ** 30

  # The base stays 4-bit on the TPU: NF4 codes (u8, two weights a byte) are the program's parameters;
  # 4 bits + an 8-bit absmax per 64-weight block + an fp32 scale per 256 blocks = 4.127 bits a weight.
  check = r["frozen_check"]
  assert check["ok"], check
  assert check["nf4_weights"] == check["nf4_codes_u8_parameters"] == 7
  assert check["dense_float_weight_parameters"] == 0 and check["stacked_dense_weights_in_program"] == 0
  if devices == 1:
    assert check["nf4_bits_per_weight"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=0.02)

  # The analytic matmul count against what the TPU compiler counts in the compiled program (loop bodies
  # rescaled by the trip count). The compiler also counts the elementwise work (norms, softmax, the loss)
  # that the analytic count leaves out: measured here 1.04 (sft) and 1.01 (dpo).
  ratio = r["flops"] / r["flops_analytic"]
  assert 0.98 < ratio < 1.1, ratio

  # The estimate against counts written here from the architecture and the published v5e figures
  # (cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 819 GB/s HBM, 16 GiB per chip), not read from the code.
  peak, bandwidth = 197e12, 819e9
  layers, d, f, v = (ARCH[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size"))
  heads, kv, hd = ARCH["num_attention_heads"], ARCH["num_key_value_heads"], ARCH["head_dim"]
  rank, accum, length = 8, 2, 128
  rows = 8 * (2 if stage == "dpo" else 1)  # a DPO pair is two rows (chosen, rejected)
  shapes = [(d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d), (d, f), (d, f), (f, d)]
  frozen = layers * sum(i * o for i, o in shapes)  # 4-bit projection weights
  lora = layers * sum(rank * (i + o) for i, o in shapes)
  tokens = accum * rows * length
  attention = accum * rows * layers * 4 * length ** 2 * heads * hd  # Q K^T and P V of one forward
  # "6 N T" with frozen weights: 2 (forward) + 2 (input gradient) per frozen weight and token, 6 per adapter
  # weight; the head frozen as well; attention forward + 2x backward; DPO adds a reference forward (adapters
  # off). The code leaves out layer 0's q/k/v input gradients (nothing needs them): up to 5% below this count.
  model_flops = tokens * (4 * (frozen + d * v) + 6 * lora) + 3 * attention
  if stage == "dpo":
    model_flops += tokens * 2 * (frozen + d * v) + attention
  assert 0.95 <= r["model_flops"] / model_flops <= 1.0, r["model_flops"] / model_flops
  # remat=full also recomputes every layer's forward once: the compiler's executed count within 15% of that
  # (it also counts the elementwise work; the blocked attention computes less than the full T x T)
  executed = model_flops + tokens * 2 * (frozen + lora) + attention
  assert 0.85 <= r["flops"] * devices / executed <= 1.1, r["flops"] * devices / executed
  # Bytes: at least the 4-bit codes (half a byte a weight; each device reads the whole of a weight, FSDP gathers
  # it) and the bf16 head once per micro-batch forward, and the fp32 adapters, gradients and both Adam moments
  # read and written once (per device: its shard). At most 400x the activation traffic of an fp32 forward
  # (every layer's x, norm, q, k, v, o, gate, up, hidden; scores and probabilities; the logits) for each
  # micro-batch: the compiler counts each fusion's operands and outputs (measured 25x on one chip, 160x on 8).
  floor = accum * (frozen / 2 + 2 * d * v) + 2 * 4 * 4 * lora / devices
  per_token = 4 * (2 * d + 2 * heads * hd + 2 * kv * hd + 3 * f)
  rows_dev, tokens_dev = rows // devices, rows * length // devices
  activations = accum * (layers * (tokens_dev * per_token + rows_dev * heads * length ** 2 * 8) + tokens_dev * v * 4)
  assert floor <= r["bytes_accessed"] <= 400 * activations, (floor, r["bytes_accessed"], activations)
  # the extrapolation, from the compiler's own counts of the 1- and 2-layer programs and the update alone
  counts = r["cross_check"]
  for key, name in (("flops", "flops"), ("bytes", "bytes_accessed")):
    one, two, update = (counts[k][key] for k in ("cost_1_layer", "cost_2_layers", "cost_update"))
    assert r[name] == pytest.approx(accum * (one + (two - one) * (layers - 1)) - (accum - 1) * update, rel=1e-9)
  # the roofline, MFU and throughput from those figures
  step_s = max(r["flops"] / peak, r["bytes_accessed"] / bandwidth)
  assert r["estimated_step_seconds"] == pytest.approx(step_s, rel=1e-9)
  assert 0.95 <= r["estimated_mfu"] / (model_flops / (step_s * peak * devices)) <= 1.0
  assert r["estimated_mfu"] == pytest.approx(r["model_flops"] / (step_s * peak * devices), rel=1e-9)
  assert r["tokens_per_second_per_chip"] == pytest.approx(tokens / step_s / devices, rel=1e-9)
  assert r["estimated_bound"] == ("compute" if r["flops"] / peak >= r["bytes_accessed"] / bandwidth else "memory")


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_no_dense_weights_at_any_remat(demo_config, model_dir, remat):
  # The 4-bit matmul's backward rebuilds W from the codes: no policy may keep a dense weight stack.
  from anita_jax.train import aot
  c = small_config(demo_config, model_dir, "sft")
  c.model.remat = remat
  r = aot.compile_report(c, "v5e:1x1", cross_check=False)
  assert r["frozen_check"]["stacked_dense_weights_in_program"] == 0
  assert r["frozen_check"]["ok"], r["frozen_check"]


def test_frozen_adapters_of_a_stacked_stage_are_in_the_compiled_step(demo_config, model_dir):
  # A stacked stage keeps the earlier stages' adapters (rank r_f in all) frozen in the compute dtype
  # (bfloat16 here): its program's arguments grow by exactly layers x sum over projections of
  # r_f x (d_in + d_out) x 2 bytes.
  from anita_jax.train import aot
  c = small_config(demo_config, model_dir, "dpo")
  plain = aot.compile_report(c, "v5e:1x1", cross_check=False)
  stacked = aot.compile_report(c, "v5e:1x1", cross_check=False, frozen_rank=24)
  h, i, heads, kv, d = (ARCH[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads", "head_dim"))
  dims = [(h, heads * d), (h, kv * d), (h, kv * d), (heads * d, h), (h, i), (h, i), (i, h)]
  expected = ARCH["num_hidden_layers"] * sum(24 * (a + b) for a, b in dims) * 2
  assert stacked["model"]["frozen_lora_rank"] == 24 and stacked["fits"]
  got = stacked["per_device_bytes"]["argument"] - plain["per_device_bytes"]["argument"]
  assert got == expected, (got, expected)


def test_script_writes_the_report_and_reports_bad_topologies(model_dir, tmp_path):
  out = tmp_path / "report.json"
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "aot_compile.py"), "--config=configs/anita_demo.py:lm",
         f"--config.model.path={model_dir}", "--config.data.max_length=64", "--config.train.batch_size=2",
         "--cross_check=false"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(cmd + ["--topology=v5e:1x1", f"--output={out}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads(done.stdout)
  assert json.loads(out.read_text()) == report
  assert report["topology"] == "v5e:1x1" and report["stage"] == "lm" and report["fits"]
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]

  bad = subprocess.run(cmd + ["--topology=v5e:2x2x2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1].startswith("error: --topology='v5e:2x2x2'")


def test_fit_finds_the_largest_micro_batch_that_fits(demo_config, model_dir, monkeypatch):
  # The search alone: a stand-in compile says a micro-batch fits from 8 pairs down (the real compile's
  # verdicts are tested above; the 8B run is in README).
  from anita_jax.train import aot
  from anita_jax.errors import UserError
  asked = []

  def compile_report(c, topology, cross_check, frozen_rank):
    asked.append((c.train.batch_size, c.train.grad_accum, cross_check))
    fits = c.train.batch_size <= limit
    return {"fits": fits, "per_device_bytes": {"total": c.train.batch_size} if fits else None,
            "compile_error": None if fits else "RESOURCE_EXHAUSTED"}

  monkeypatch.setattr(aot, "compile_report", compile_report)
  c = small_config(demo_config, model_dir, "dpo")
  c.train.batch_size, c.train.grad_accum = 16, 3  # 48 pairs per optimizer step, over 4 chips (fsdp)
  limit = 8
  fitted, report, trials = aot.fit_micro_batch(c, "v5e:2x2")
  # Sizes are divisors of 48 that 4 chips share evenly, from the config's down: 16, 12, 8.
  assert asked == [(16, 3, False), (12, 4, False), (8, 6, False)]
  assert [(t["batch_size"], t["grad_accum"], t["fits"]) for t in trials] == [(16, 3, False), (12, 4, False),
                                                                          (8, 6, True)]
  assert (fitted.train.batch_size, fitted.train.grad_accum) == (8, 6) and report["fits"]
  assert (c.train.batch_size, c.train.grad_accum) == (16, 3)  # the caller's config is left as it was
  limit = 0
  with pytest.raises(UserError, match="no micro-batch of the step's 48 pairs fits, down to 4 per micro-batch"):
    aot.fit_micro_batch(c, "v5e:2x2")
