"""Reference-free preference losses: TRL 1.16's CPOTrainer (CPO, SimPO, AlphaPO) and ORPOTrainer.

Each pair's loss and metrics are a function of its own policy log-probs (summed over its completion, with
the completion's token count): no reference model. The NLL term over the step's chosen tokens that both
trainers add is the objective's (`train.dpo`), a token mean over the step as `losses.chosen_nll`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from anita_jax.errors import UserError
from anita_jax.model.losses import reward_metrics

Array = jax.Array
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
_CPO_AVERAGED = ("ipo", "simpo", "alphapo")  # the types whose log-probs TRL averages per token


def check_cpo_options(loss_type: str, label_smoothing: float, simpo_gamma: float, alpha: float) -> None:
  """Raises UserError for a CPO option TRL 1.16 ignores, or one outside the range where it has a meaning."""
  if loss_type not in CPO_LOSS_TYPES:
    raise UserError(f"config field 'dpo.loss_type'={loss_type!r}: dpo.objective=cpo takes one of {CPO_LOSS_TYPES} "
                    f"(TRL's CPOTrainer: one loss type, no list)")
  if loss_type in ("hinge", "ipo") and label_smoothing != 0.0:
    raise UserError(f"config field 'dpo.label_smoothing'={label_smoothing}: the cpo {loss_type!r} loss does not "
                    f"read it (TRL ignores it there); set it to 0")
  if not 0.0 <= label_smoothing < 0.5:
    raise UserError(f"config field 'dpo.label_smoothing'={label_smoothing}: must lie in [0, 0.5) (the chance "
                    f"that a pair's labels are flipped)")
  if loss_type not in ("simpo", "alphapo") and simpo_gamma != 0.5:
    raise UserError(f"config field 'dpo.simpo_gamma'={simpo_gamma}: read by loss_type simpo and alphapo only; "
                    f"leave it at 0.5 for {loss_type!r}")
  if not math.isfinite(alpha):
    raise UserError(f"config field 'dpo.alpha'={alpha}: must be a finite float (0: no AlphaPO reward shaping)")


def cpo_loss(chosen_logps: Array, rejected_logps: Array, chosen_tokens: Array, rejected_tokens: Array, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
             alpha: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """(per-pair losses [N], per-pair metrics [N] under TRL's names) of TRL 1.16's `CPOTrainer.cpo_loss`, from
  summed completion log-probs [N] and token counts [N].

  ipo, simpo and alphapo (simpo, its NLL weight set to 0 by the caller) average the log-probs per token
  (counts clamped to >= 1, where TRL's division makes an empty completion NaN). alpha != 0 replaces each
  log-prob by AlphaPO's reward (1 - p^-alpha) / alpha, written exp(-alpha log p) so that a small p cannot
  underflow to 0 first (TRL: inf, the same value wherever it is finite). The rewards logged are beta x those.
  """
  check_cpo_options(loss_type, label_smoothing, simpo_gamma, alpha)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  chosen_b, rejected_b = f32(chosen_logps), f32(rejected_logps)
  if loss_type in _CPO_AVERAGED:
    chosen_b = chosen_b / jnp.maximum(f32(chosen_tokens), 1.0)
    rejected_b = rejected_b / jnp.maximum(f32(rejected_tokens), 1.0)
  shaped = (lambda x: (1 - jnp.exp(-alpha * x)) / alpha) if alpha != 0.0 else (lambda x: x)
  logits_b = shaped(chosen_b) - shaped(rejected_b)
  if loss_type in ("simpo", "alphapo"):
    logits_b = logits_b - simpo_gamma / beta
  if loss_type == "hinge":
    loss_b = jax.nn.relu(1 - beta * logits_b)
  elif loss_type == "ipo":
    loss_b = (logits_b - 1 / (2 * beta)) ** 2
  else:  # sigmoid, simpo: conservative (label-smoothed) DPO's form
    loss_b = (-jax.nn.log_sigmoid(beta * logits_b) * (1 - label_smoothing)
              - jax.nn.log_sigmoid(-beta * logits_b) * label_smoothing)
  return loss_b, reward_metrics(beta * shaped(chosen_b), beta * shaped(rejected_b), chosen_b, rejected_b)


def _log1mexp(x: Array) -> Array:
  """log(1 - exp(x)) for x < 0, branching at -log 2 against cancellation (TRL's `log1mexp`)."""
  return jnp.where(x < -math.log(2), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_loss(chosen_logps: Array, rejected_logps: Array, chosen_tokens: Array, rejected_tokens: Array, *,
              beta: float) -> tuple[Array, dict[str, Array]]:
  """(per-pair losses [N], per-pair metrics [N]) of TRL 1.16's ORPO odds-ratio term, from summed completion
  log-probs [N] and token counts [N]: -beta log sigmoid(log odds(chosen) - log odds(rejected)) of the per-token
  mean log-probs, beta being ORPO's lambda. The objective adds the NLL of the chosen sequences.

  Metrics: rewards beta x the mean log-probs; `log_odds_ratio` the log sigmoid and `log_odds_chosen` the log
  odds ratio itself (TRL's names)."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  chosen_b = f32(chosen_logps) / jnp.maximum(f32(chosen_tokens), 1.0)
  rejected_b = f32(rejected_logps) / jnp.maximum(f32(rejected_tokens), 1.0)
  log_odds_b = (chosen_b - rejected_b) - (_log1mexp(chosen_b) - _log1mexp(rejected_b))
  ratio_b = jax.nn.log_sigmoid(log_odds_b)
  metrics = reward_metrics(beta * chosen_b, beta * rejected_b, chosen_b, rejected_b)
  metrics.update({"log_odds_ratio": jax.lax.stop_gradient(ratio_b),
                  "log_odds_chosen": jax.lax.stop_gradient(log_odds_b)})
  return -beta * ratio_b, metrics
