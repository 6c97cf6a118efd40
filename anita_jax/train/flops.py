"""FLOP counts of one LoRA training step.

`analytic_flops`: every matmul the step computes, the cross-check of the compiler's count (`aot`).
`benchmark_flops`: the usual MFU convention of the training benchmarks (6 N T style, no recomputation),
so their MFU compares with published figures; it differs from `analytic_flops`' "model" count by a few
percent (attention counted as 2 instead of 3 products of the full square, layer 0's q/k/v input gradients).
"""

from __future__ import annotations

from anita_jax.model import attention as AT
from anita_jax.model import lora as LA
from anita_jax.model import splash
from anita_jax.model.config import ModelConfig


def _computed_attention(mc: ModelConfig, rows: int, length: int, kernel: bool) -> tuple[float, float]:
  """(forward, backward) attention FLOPs per layer that the attention kind computes, of rows x length tokens.

  A Pallas kernel (splash, flash) computes the tiles on or below the diagonal (of the padded length; flash
  skips more on packed rows, which depends on the data: this is its upper bound), both with the same tiles
  (`flash_tiles.block_sizes`, `splash.block_size`); its backward recomputes Q K^T from the saved log-sum-exp: 7 tile
  products (dq: QK^T, dO V^T, dS K; dk and dv: QK^T, P^T dO, dO V^T, dS^T Q) against autodiff's 4. The plain
  attention takes query blocks against the keys up to each block's end (`model.attention.attention`); its
  backward recomputes Q K^T from the softmax's row max and sum: 5 products (QK^T, dO V^T, dS K, dS^T Q, P^T dO).
  """
  if kernel:
    computed, _ = splash.causal_blocks(length)
    forward = 4 * rows * computed * splash.block_size(length) ** 2 * mc.num_heads * mc.head_dim
    return forward, 3.5 * forward
  forward = 4 * rows * AT.score_entries(length) * mc.num_heads * mc.head_dim
  return forward, 2.5 * forward


def analytic_flops(mc: ModelConfig, lora_rank: int, lora_targets, *, rows: int, length: int, grad_accum: int,
                   remat: str, reference_forward: bool, head_weight_grad: bool = False,
                   attention: str = "dot") -> dict:
  """FLOPs of one optimizer step (all chips): {"model": without recomputation, "executed": with it,
  "kernel": the executed FLOPs inside Pallas kernels, "formula"}.

  Matmuls only (2 per multiply-add); norms, softmax, RoPE, SiLU, the loss,
  dequantization and the optimizer are left out (a few percent at most for these models).
  "model" counts attention over the full T x T whatever the kernel, so that MFU
  compares kernels on the same work; "executed" counts what the kernel computes.
  """
  d, v, n_layers = mc.hidden_size, mc.vocab_size, mc.num_layers
  dims = LA.projection_dims(mc)
  frozen = sum(i * o for i, o in dims.values())  # per layer
  adapters = sum(lora_rank * (i + o) for name, (i, o) in dims.items() if name in lora_targets)
  tokens = rows * length
  attn = 4 * rows * length ** 2 * mc.num_heads * mc.head_dim  # QK^T and PV over the full T x T
  kernel_attention = attention in ("splash", "flash")
  attn_fwd, attn_bwd = _computed_attention(mc, rows, length, kernel_attention)
  layer_fwd = 2 * tokens * (frozen + adapters) + attn
  head = 2 * tokens * d * v
  fwd = n_layers * layer_fwd + head
  # Layer 0's q/k/v products need no input gradient (the embedding is frozen): not counted.
  qkv = ("q_proj", "k_proj", "v_proj")
  unneeded = sum(2 * tokens * dims[p][0] * (dims[p][1] + (lora_rank if p in lora_targets else 0)) for p in qkv)
  bwd = (n_layers * (2 * tokens * frozen + 4 * tokens * adapters + 2 * attn) - unneeded
         + head * (2 if head_weight_grad else 1))
  ref = n_layers * (2 * tokens * frozen + attn) + head if reference_forward else 0
  # Full remat recomputes a layer's forward except down_proj's product: the backward pass needs
  # its input (and the adapter's x A), not its output. Under "dots" every product is saved; under
  # "dots_no_batch" the attention products (batched einsums) are not.
  f_in, f_out = dims["down_proj"]
  last = 2 * tokens * f_in * f_out + (2 * tokens * lora_rank * f_out if "down_proj" in lora_targets else 0)
  recompute = {"none": 0, "full": n_layers * (layer_fwd - last), "dots": 0, "dots_no_batch": n_layers * attn}[remat]
  kernel = 0
  # What the remat policy recomputes of the attention: its computed products, not the full T x T.
  recompute += {"none": 0, "full": n_layers * (attn_fwd - attn), "dots": 0,
                "dots_no_batch": n_layers * (attn_fwd - attn)}[remat]
  if kernel_attention:
    # A Pallas call is not a dot: every remat policy recomputes its forward.
    recompute += n_layers * attn_fwd if remat == "dots" else 0
  if attention == "splash":  # flash's calls carry their cost (`flash_tiles.cost`), so the compiler counts them
    kernel = grad_accum * n_layers * (attn_fwd + attn_bwd + (attn_fwd if reference_forward else 0)
                                      + (attn_fwd if remat != "none" else 0))
  model = grad_accum * (fwd + bwd + ref)
  # What the kernel executes instead of the model's full T x T (forward, backward, DPO reference).
  swap = grad_accum * n_layers * ((attn_fwd - attn) * (2 if reference_forward else 1) + attn_bwd - 2 * attn)
  formula = (
      f"per micro-batch of n = rows x T = {rows} x {length} tokens, per layer (L = {n_layers}): forward "
      f"2 n P + 2 n P_lora + A, backward 2 n P (input gradients only, frozen weights get none) + 4 n P_lora "
      f"(input and weight gradients) + 2 A, less layer 0's q/k/v input gradients (nothing upstream needs them; "
      f"the layer scan computes them anyway); lm_head 2 n D V forward + 2 n D V backward"
      f"{' + 2 n D V weight gradient' if head_weight_grad else ''}"
      f"{'; DPO reference forward (adapters off) L (2 n P + A) + 2 n D V' if reference_forward else ''}; "
      f"times {grad_accum} micro-batches. P = {frozen} frozen projection weights per layer, P_lora = {adapters} "
      f"adapter weights per layer, A = 4 rows T^2 N H = {attn} attention FLOPs per layer (QK^T and PV over the "
      f"full T x T), D = {d}, V = {v}. "
      + (f"With attention=dot the queries go in blocks of {AT.query_block(length)} against the keys up to "
         f"each block's end: A_d = {attn_fwd:.6g} forward and 2.5 A_d backward (Q K^T recomputed) are computed, "
         "so 'executed' counts A_d and 2.5 A_d where 'model' counts A and 2 A. "
         if not kernel_attention else
         f"With attention={attention} the kernel computes only the {splash.causal_blocks(length)[0]} of "
         f"{splash.causal_blocks(length)[1]} tiles ({splash.block_size(length)} x {splash.block_size(length)}) "
         f"on or below the diagonal: A_s = {attn_fwd:.6g} forward, 3.5 A_s backward (7 tile products, "
         f"Q K^T recomputed), so 'executed' counts A_s and 3.5 A_s where 'model' counts A and 2 A; "
         + (f"the compiler counts no FLOPs inside the splash call, so the kernel's {kernel:.6g} FLOPs of the "
            "step are added to its count. " if attention == "splash" else
            "each flash call carries its causal tiles' cost (`flash_tiles.cost`), which the compiler counts. "))
      + f"'executed' adds the remat={remat} recomputation of the forward ({recompute} per micro-batch; full: "
      "all but down_proj's product, whose output the backward does not need). Matmuls only.")
  return {"model": float(model), "executed": float(model + swap + grad_accum * recompute), "kernel": float(kernel),
          "formula": formula,
          "attention_share": float(grad_accum * n_layers * attn * (3 + (1 if reference_forward else 0)) / model)}


def benchmark_flops(mc: ModelConfig, lora_rank: int, lora_targets, *, rows: int, length: int,
                    reference_forward: bool) -> float:
  """Model FLOPs of one micro-batch for MFU: 4 N_frozen T (forward, and the backward through activations
  only) + 6 N_lora T (LoRA forward, input and weight gradients) + attention 8 L T d_attn per token (QK^T and
  AV, forward and backward, full square); with `reference_forward` (DPO) + 2 N_frozen T + 2 L T d_attn per
  token. N_frozen includes the head."""
  dims = LA.projection_dims(mc)
  frozen = mc.num_layers * sum(i * o for i, o in dims.values()) + mc.vocab_size * mc.hidden_size
  adapters = mc.num_layers * sum(lora_rank * (i + o) for name, (i, o) in dims.items() if name in lora_targets)
  attention = 4 * 2 * mc.num_layers * length * mc.num_heads * mc.head_dim
  flops = (4 * frozen + 6 * adapters + attention) * rows * length
  if reference_forward:
    flops += (2 * frozen + attention // 4) * rows * length
  return float(flops)
