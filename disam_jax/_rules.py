"""The SAM-family rules DISAM's perturbation can be put under (`disam(..., rule=...)`): their checks and gradients.

All rules share one step (see `disam_jax._disam`); they differ in the perturbed point (SAGM steps back by `alpha`
along `g_p`, in `_disam._ascent_point`) and in the final gradient, `final_gradient` here. Adding a rule: a default
`alpha` in `DEFAULT_ALPHA`, its final gradient in `final_gradient`, its name in `checked_rule`.
"""

from typing import Any

import jax
import optax

from disam_jax import _sharding
from disam_jax._checks import check_hyperparameter
from disam_jax._numerics import NORM_EPS, wide

DEFAULT_ALPHA = {"gsam": 0.2, "sagm": 0.001}


def checked_rule(rule: str, alpha: Any, per_device_perturbation: bool) -> Any:
  """The rule's alpha (its published default for None), refusing what the rule cannot take."""
  if rule not in ("sam", "gsam", "sagm"):
    raise ValueError(f"rule must be 'sam', 'gsam' or 'sagm'; got {rule!r}.")
  if rule == "sam":
    if alpha is not None:
      raise ValueError("alpha is GSAM's / SAGM's parameter: pass rule='gsam' or rule='sagm', or drop alpha.")
    return None
  alpha = DEFAULT_ALPHA[rule] if alpha is None else alpha
  check_hyperparameter("alpha", alpha)
  if per_device_perturbation:
    raise ValueError(
      f"rule={rule!r} combines the unperturbed gradient into the final one, which per_device_perturbation "
      "keeps per device: use the global perturbation (per_device_perturbation=False) with GSAM/SAGM."
    )
  return alpha


def final_gradient(
  rule: str, alpha: jax.Array, g_w: optax.Updates, g_adv: optax.Updates, layout: _sharding.ParamLayout
) -> optax.Updates:
  """GSAM's / SAGM's gradient from the unperturbed ascent gradient `g_w` and the perturbed one `g_adv`.

  gsam: `g_adv - alpha (g_w - <g_w, g_adv> / ||g_adv||^2 g_adv)` (the official code's eps placement);
  sagm: `(g_w + g_adv) / 2`. Elementwise work only: no pass through the model.
  """
  if rule == "sagm":
    return jax.tree.map(lambda a, b: ((wide(a) + wide(b)) / 2).astype(b.dtype), g_w, g_adv)
  norm_w, norm_adv = layout.norm(g_w), layout.norm(g_adv)
  cosine = layout.vdot(g_w, g_adv) / (norm_w * norm_adv + NORM_EPS)
  parallel = cosine * norm_w / (norm_adv + NORM_EPS)  # <g_w, g_adv> / ||g_adv||^2, eps-guarded
  return jax.tree.map(lambda a, b: (wide(b) - alpha * (wide(a) - parallel * wide(b))).astype(b.dtype), g_w, g_adv)
