"""The rules that decide when a training run has diverged, frozen or collapsed.

Used by the runner (so by the demo and the tables) on the numbers of the run's event files, step by
step, so that a broken run is stopped and reported, never silently continued. The rules, stated
once; the first that fires names the run:

  diverged  (a) the loss is NaN or infinite; or
            (b) after `warmup` observations, the loss level has stayed above
                running_min + max(min_jump, rel_jump * |running_min|) for `patience` consecutive
                observations, where the level is the mean of the last `smoothing` losses (the
                loss itself at smoothing = 1) and running_min the lowest level observed before.
  frozen    (c) the loss has not moved for `frozen_patience` consecutive observations:
                |loss - previous loss| <= frozen_rtol * |previous loss| each time; or
            (d) the in-graph guard (st_moe.GuardedOptimizer) has skipped `frozen_patience`
                consecutive updates (its `st_moe_guard/consecutive_skipped` summary): the weights
                stand still even though the loss, on new batches, still moves.
  collapsed (e) in some sparse layer, more than `collapse_dropped` of the tokens its capacity
                could take got no expert slot (`events.excess_dropped`: the fraction dropped
                beyond what the layer's capacity drops however balanced its router, a quarter
                of the tokens for top-1 at capacity factor 0.75), for `collapse_patience`
                consecutive observations; or
            (f) in some sparse layer with at least 2 experts, one expert took more than
                `collapse_expert_fraction` of the tokens, for `collapse_patience` consecutive
                observations; "took" counts both the tokens' first choices and the router's
                probability (min(max_e f_e, balance_loss / E), `events.router_by_step`), since an
                untrained router, near 1 / E for every expert, can pick the same first expert for
                all the tokens of a small group without meaning it (measured: a decoder layer of
                st_moe_tiny at step 2, 100% of first choices, 5% dropped).

Defaults: min_jump = 1.0 nats, rel_jump = 0.5, patience = 3, warmup = 5, smoothing = 1;
frozen_patience = 5, frozen_rtol = 1e-5; collapse_dropped = 0.5, collapse_expert_fraction = 0.95,
collapse_patience = 50. Why these: a single spike that recovers within `patience` observations is
not a divergence (the paper's unstable runs do not recover). `smoothing` is for losses whose
per-batch noise is comparable to min_jump: fine-tuning on batches of 2-32 short sequences
(st_moe.experiments.finetuning) moves by +-1 nat from step to step, so the lowest single loss of
a healthy run sits more than a nat below its typical loss, and rule (b) at smoothing = 1 stopped
two runs of the finetune_params table whose loss was still falling. A rise of J nats that stays
lifts the mean by J / smoothing per step: it is caught later (after about smoothing x the
threshold's margin / J steps), not missed. A training loss on new batches moves by far more than
1e-5 of itself every step (per-batch noise alone is ~1e-2 at tiny scale), while a frozen run
repeats it exactly (the learning-rate-1000 run: 7.0142 from step 3 on). Top-2 routing at capacity
factor 1.25 drops a few percent of the tokens when balanced; with every token sent to one of E
experts it drops 1 - 1.25 / E of them (69% at E = 4, the 67% measured at learning rate 1000), and
one expert's share of first choices is 1 / E when balanced. An untrained router drops many
more, for tens of steps, and recovers (measured at --scale=small, top-1 at capacity factor 1.0,
seed 0: over half the tokens of a decoder layer dropped from step 2 to 17, 82% at step 6, again
at times up to step 93, 12% at step 150, while no expert took over 3.7% of all the tokens: an
imbalance within groups, not a router that prefers one expert; with a patience of 10 the rule
stopped that run at step 11 and top-1 at 0.75 at step 10), so 50 steps in a row
tell a collapse from a passing imbalance; a collapsed router stays collapsed (the
learning-rate-1000 run drops 67% from step 3 on). Rules (c)-(f) need no warmup: an update that
never happens is broken from the first step.
"""
import collections
import dataclasses
import math
from typing import Dict, Optional

KINDS = ("diverged", "frozen", "collapsed")


@dataclasses.dataclass
class Divergence:
  step: int  # the step at which the rule fired
  loss: float  # the loss observed then
  reason: str  # human-readable: which rule fired, with the numbers
  kind: str = "diverged"  # diverged | frozen | collapsed


class DivergenceMonitor:
  """Streaming form of the rules: feed (step, loss, metrics) in order; `update` returns a
  Divergence once a rule fires (and the same one on every later call)."""

  def __init__(self, min_jump=1.0, rel_jump=0.5, patience=3, warmup=5, frozen_patience=5,
               frozen_rtol=1e-5, collapse_dropped=0.5, collapse_expert_fraction=0.95,
               collapse_patience=50, smoothing=1):
    def count(v, least):
      return isinstance(v, int) and not isinstance(v, bool) and v >= least
    for name, value, ok, want in (
        ("min_jump", min_jump, min_jump >= 0, "a number >= 0"),
        ("rel_jump", rel_jump, rel_jump >= 0, "a number >= 0"),
        ("patience", patience, count(patience, 1), "an integer >= 1"),
        ("warmup", warmup, count(warmup, 0), "an integer >= 0"),
        ("frozen_patience", frozen_patience, count(frozen_patience, 1), "an integer >= 1"),
        ("frozen_rtol", frozen_rtol, frozen_rtol >= 0, "a number >= 0"),
        ("collapse_dropped", collapse_dropped, 0 <= collapse_dropped < 1, "a fraction in [0, 1)"),
        ("collapse_expert_fraction", collapse_expert_fraction,
         0 < collapse_expert_fraction < 1, "a fraction in (0, 1)"),
        ("collapse_patience", collapse_patience, count(collapse_patience, 1), "an integer >= 1"),
        ("smoothing", smoothing, count(smoothing, 1), "an integer >= 1")):
      if not ok:
        raise ValueError(f"DivergenceMonitor {name}={value!r}: must be {want}")
    self.min_jump = min_jump
    self.rel_jump = rel_jump
    self.patience = patience
    self.warmup = warmup
    self.frozen_patience = frozen_patience
    self.frozen_rtol = frozen_rtol
    self.collapse_dropped = collapse_dropped
    self.collapse_expert_fraction = collapse_expert_fraction
    self.collapse_patience = collapse_patience
    self.smoothing = smoothing
    self.recent = collections.deque(maxlen=smoothing)  # the last `smoothing` losses
    self.running_min = math.inf
    self.seen = 0
    self.above = 0
    self.previous = None
    self.unchanged = 0
    self.dropped_run = 0
    self.expert_run = 0
    self.diverged: Optional[Divergence] = None

  def threshold(self):
    return self.running_min + max(self.min_jump, self.rel_jump * abs(self.running_min))

  def _fire(self, step, loss, kind, reason):
    self.diverged = Divergence(step, loss, reason, kind)
    return self.diverged

  def update(self, step, loss, metrics: Optional[Dict[str, float]] = None):
    """Observes one step; returns the Divergence when a rule fires (and on every later call).

    Args:
      step: the global step.
      loss: its training loss.
      metrics: optional {name: value} of the step (`events.step_metrics`): "max_dropped" (the
        largest fraction of tokens dropped in a sparse layer), "max_expert_share" (the largest
        share of the tokens one expert took in a layer; "max_expert_fraction", the share of first
        choices alone, if absent), "max_excess_dropped" (the largest fraction dropped of the
        tokens a layer's capacity could take; "max_dropped" if absent), "num_experts" (the
        fewest experts of a sparse layer),
        "consecutive_skipped" (the guard's count of skipped updates in a row).
    """
    if self.diverged:
      return self.diverged
    loss = float(loss)
    metrics = metrics or {}
    self.seen += 1
    if not math.isfinite(loss):
      return self._fire(step, loss, "diverged", f"loss is {loss} at step {step}")
    self.recent.append(loss)
    if len(self.recent) == self.smoothing:  # rule (b) judges full windows only
      level = sum(self.recent) / self.smoothing
      if (self.seen > self.warmup and math.isfinite(self.running_min)
          and level > self.threshold()):
        self.above += 1
        if self.above >= self.patience:
          what = (f"loss {loss:.4g}" if self.smoothing == 1 else
                  f"mean loss of the last {self.smoothing} steps {level:.4g}")
          return self._fire(
              step, loss, "diverged",
              f"{what} stayed above {self.threshold():.4g} (running minimum "
              f"{self.running_min:.4g} + max({self.min_jump}, {self.rel_jump} x |min|)) for "
              f"{self.patience} observations, up to step {step}")
      else:
        self.above = 0
      self.running_min = min(self.running_min, level)

    if self.previous is not None and abs(loss - self.previous) <= self.frozen_rtol * abs(
        self.previous):
      self.unchanged += 1
    else:
      self.unchanged = 0
    self.previous = loss
    if self.unchanged >= self.frozen_patience:
      return self._fire(
          step, loss, "frozen",
          f"loss {loss:.6g} has not moved (|change| <= {self.frozen_rtol:g} x loss) for "
          f"{self.unchanged} steps, up to step {step}: the weights are not being updated or the "
          "model's output no longer depends on its input")
    skipped = metrics.get("consecutive_skipped")
    if skipped is not None and skipped >= self.frozen_patience:
      return self._fire(
          step, loss, "frozen",
          f"{int(skipped)} consecutive updates skipped by the guard (non-finite gradients or "
          f"updates) up to step {step}: the weights are not being updated")

    dropped = metrics.get("max_excess_dropped", metrics.get("max_dropped"))
    self.dropped_run = self.dropped_run + 1 if (
        dropped is not None and dropped > self.collapse_dropped) else 0
    if self.dropped_run >= self.collapse_patience:
      which = (" that its capacity could take were" if "max_excess_dropped" in metrics else "")
      return self._fire(
          step, loss, "collapsed",
          f"routing collapsed: {100 * dropped:.0f}% of the tokens of a sparse layer{which} dropped "
          f"(over {100 * self.collapse_dropped:.0f}%) for {self.dropped_run} steps, up to step "
          f"{step}")
    share = metrics.get("max_expert_share", metrics.get("max_expert_fraction"))
    experts = metrics.get("num_experts", 2)
    self.expert_run = self.expert_run + 1 if (
        share is not None and experts >= 2 and share > self.collapse_expert_fraction) else 0
    if self.expert_run >= self.collapse_patience:
      return self._fire(
          step, loss, "collapsed",
          f"routing collapsed: one expert took {100 * share:.0f}% of the tokens of a sparse "
          f"layer (over {100 * self.collapse_expert_fraction:.0f}%) for "
          f"{self.expert_run} steps, up to step {step}")
    return None


def find_divergence(losses, steps=None, metrics=None, **rule):
  """Applies the rules to a whole curve; returns the first Divergence or None.

  Args:
    losses: the loss of each observation.
    steps: their steps (default 0, 1, ...).
    metrics: optional list of per-step metric dicts, aligned with `losses` (see `update`).
    **rule: DivergenceMonitor settings.
  """
  monitor = DivergenceMonitor(**rule)
  steps = range(len(losses)) if steps is None else steps
  metrics = [None] * len(losses) if metrics is None else metrics
  for step, loss, row in zip(steps, losses, metrics):
    found = monitor.update(step, loss, row)
    if found:
      return found
  return None
