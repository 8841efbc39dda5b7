"""The rule that decides when a training run has diverged.

Used by the stability study (tools/reproduce.py) and the demo so that a diverged run is stopped and
reported, never silently continued. The rule, stated once:

  A run has diverged at the first observed step where
    (a) the loss is NaN or infinite, or
    (b) after `warmup` observations, the loss has stayed above
        running_min + max(min_jump, rel_jump * |running_min|) for `patience` consecutive observations,
  where running_min is the lowest finite loss observed before that step.

Defaults: min_jump = 1.0 nats, rel_jump = 0.5, patience = 3, warmup = 5. A single spike that recovers
within `patience` observations is not a divergence (the paper's unstable runs do not recover).
"""
import dataclasses
import math
from typing import Optional


@dataclasses.dataclass
class Divergence:
  step: int  # the step at which the rule fired
  loss: float  # the loss observed then
  reason: str  # human-readable: which part of the rule fired, with the numbers


class DivergenceMonitor:
  """Streaming form of the rule: feed (step, loss) pairs in order; `update` returns a Divergence once."""

  def __init__(self, min_jump=1.0, rel_jump=0.5, patience=3, warmup=5):
    for name, value, ok in (("min_jump", min_jump, min_jump >= 0),
                            ("rel_jump", rel_jump, rel_jump >= 0),
                            ("patience", patience, isinstance(patience, int) and patience >= 1),
                            ("warmup", warmup, isinstance(warmup, int) and warmup >= 0)):
      if not ok:
        raise ValueError(f"DivergenceMonitor {name}={value!r}: must be a non-negative number "
                         "(patience: an integer >= 1; warmup: an integer >= 0)")
    self.min_jump = min_jump
    self.rel_jump = rel_jump
    self.patience = patience
    self.warmup = warmup
    self.running_min = math.inf
    self.seen = 0
    self.above = 0
    self.diverged: Optional[Divergence] = None

  def threshold(self):
    return self.running_min + max(self.min_jump, self.rel_jump * abs(self.running_min))

  def update(self, step, loss):
    """Observes one loss; returns the Divergence when the rule fires (and on every later call)."""
    if self.diverged:
      return self.diverged
    loss = float(loss)
    self.seen += 1
    if not math.isfinite(loss):
      self.diverged = Divergence(step, loss, f"loss is {loss} at step {step}")
      return self.diverged
    if self.seen > self.warmup and math.isfinite(self.running_min) and loss > self.threshold():
      self.above += 1
      if self.above >= self.patience:
        self.diverged = Divergence(
            step, loss,
            f"loss {loss:.4g} stayed above {self.threshold():.4g} (running minimum "
            f"{self.running_min:.4g} + max({self.min_jump}, {self.rel_jump} x |min|)) for "
            f"{self.patience} observations, up to step {step}")
        return self.diverged
    else:
      self.above = 0
    self.running_min = min(self.running_min, loss)
    return None


def find_divergence(losses, steps=None, **rule):
  """Applies the rule to a whole loss curve; returns the first Divergence or None."""
  monitor = DivergenceMonitor(**rule)
  steps = range(len(losses)) if steps is None else steps
  for step, loss in zip(steps, losses):
    found = monitor.update(step, loss)
    if found:
      return found
  return None
