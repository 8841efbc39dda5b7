"""Adafactor with per-variable learning-rate multipliers.

mesh_tensorflow's Adafactor gives every variable one learning rate. An expert of a sparse layer
learns each step from the few tokens routed to it (at 32 experts, top-2 and capacity factor 1.25,
at most 1.25/32 of the layer's tokens), where a dense FFN learns from all of them, so with the same
rate an expert's updates carry more noise. `st_moe.MultiplierAdafactor` scales the learning rate of
the variables whose names match a pattern, and is mesh_tensorflow's Adafactor otherwise (every
other setting is read from the usual `AdafactorOptimizer.*` bindings):

  st_moe.GuardedOptimizer.optimizer = @st_moe.MultiplierAdafactor
  st_moe.MultiplierAdafactor.learning_rate_multipliers = {"SparseFFN/(wi|wo)": 0.3}

The patterns are regular expressions searched (`re.search`) in the variable's name, e.g.
`encoder/block_001/sparse_ffn/SparseFFN/wi_0/kernel`; the first pattern that matches (in the
mapping's order) gives the multiplier, and a variable no pattern matches keeps the schedule's rate.
`SparseFFN/(wi|wo)` matches the experts' kernels and not the router (`SparseFFN/router/kernel`).
Multiplying the rate of a variable is the same as running Adafactor on it with the scaled rate:
with `multiply_by_parameter_scale` (the default) each update is rate x RMS(variable) x the
normalised, clipped gradient, so scaling the gradient or the variable instead would change nothing.
"""
import re
from typing import Dict, List, Optional, Tuple

import gin
from mesh_tensorflow import optimize


def _compile(multipliers) -> List[Tuple["re.Pattern", float]]:
  """[(compiled pattern, multiplier)] in the mapping's order; ValueError on a bad entry."""
  setting = "st_moe.MultiplierAdafactor.learning_rate_multipliers"
  if multipliers is None:
    return []
  if not isinstance(multipliers, dict):
    raise ValueError(f"{setting} = {multipliers!r}: must be a dict {{variable-name regex: "
                     "multiplier}, e.g. {\"SparseFFN/(wi|wo)\": 0.3}")
  compiled = []
  for pattern, multiplier in multipliers.items():
    if not isinstance(pattern, str) or not pattern:
      raise ValueError(f"{setting}: key {pattern!r} must be a non-empty regular expression string, "
                       "e.g. \"SparseFFN/(wi|wo)\"")
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{setting}: key {pattern!r} is not a regular expression ({e})") from e
    if (isinstance(multiplier, bool) or not isinstance(multiplier, (int, float))
        or not multiplier > 0):
      raise ValueError(f"{setting}: {pattern!r}: {multiplier!r} must be a number > 0 (1.0 keeps "
                       "the schedule's rate; 0 would freeze the variables: use "
                       "utils.run.variable_filter for that)")
    compiled.append((regex, float(multiplier)))
  return compiled


@gin.configurable(module="st_moe")
class MultiplierAdafactor(optimize.AdafactorOptimizer):
  """mesh_tensorflow's AdafactorOptimizer with the learning rate scaled per variable (by name)."""

  def __init__(self, learning_rate=None,
               learning_rate_multipliers: Optional[Dict[str, float]] = None, **kwargs):
    """Initializes Adafactor.

    Args:
      learning_rate: the schedule's rate (utils.run passes it), as for AdafactorOptimizer.
      learning_rate_multipliers: {regex: multiplier > 0}; a variable whose name the first
        matching regex finds is updated at rate x multiplier. None or {}: plain Adafactor.
      **kwargs: AdafactorOptimizer's other arguments (gin: `AdafactorOptimizer.<name>` bindings
        apply, as to mesh_tensorflow's class).

    Raises:
      ValueError: a multiplier that is not a number > 0, or a key that is not a regex string.
    """
    self._multipliers = _compile(learning_rate_multipliers)
    super().__init__(learning_rate=learning_rate, **kwargs)

  def multiplier(self, variable_name: str) -> float:
    """The multiplier of the first pattern found in `variable_name`; 1.0 when none is."""
    for regex, multiplier in self._multipliers:
      if regex.search(variable_name):
        return multiplier
    return 1.0

  def apply_grad(self, grad, var):
    multiplier = self.multiplier(var.name)
    if multiplier == 1.0:
      return super().apply_grad(grad, var)
    base = self._learning_rate
    self._learning_rate = base * multiplier
    try:
      return super().apply_grad(grad, var)
    finally:
      self._learning_rate = base
