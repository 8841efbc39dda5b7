"""A run's numbers, read from its event files: the one source of truth, on the CPU as on a TPU.

What a t5_mesh_transformer run writes (with `st_moe.register` imported, see `st_moe.summaries`):

  <model_dir>/events.out.tfevents.*      training: `loss` at every step, the router scalars of
                                         every sparse layer (`<layer scope>/router/<metric>`:
                                         balance_loss, z_loss, fraction_dropped, confidence,
                                         entropy, max_logit, expert_fraction/NN), the Estimator's
                                         `learning_rate` and `global_step/sec` every 100 steps
  <model_dir>/eval_<name>/events.out.*   `perplexity_eval` (Estimator.evaluate, name
                                         "<dataset>_<split>_<examples>"): loss, neg_log_perplexity,
                                         token_accuracy, num_eval_tokens, ... and the mean of every
                                         router scalar over the evaluation batches, at the
                                         checkpoint's global step
  <model_dir>/<split>_eval*/events.out.* t5's `eval` mode (metric functions of the task)

Steps are global steps: a resumed run's events continue the curve, and where two attempts wrote
the same step (steps after the last checkpoint of a killed attempt, trained again), the later
file wins. Every read goes through tf.io.gfile (gs:// works) and is incremental: an
`EventReader` remembers how far it read each file, so polling a run while it trains costs only
the new records.
"""
import os
import re
import struct
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

EVENTS_GLOB = "events.out.tfevents.*"
ROUTER_TAG_INFIX = "/router/"  # st_moe.summaries.ROUTER_TAG_INFIX (no TensorFlow import here)
# The router metrics that are auxiliary losses (unscaled): the training loss is the cross-entropy
# plus, per sparse layer, balance_loss_coef x balance_loss + router_z_loss_coef x z_loss.
AUX_LOSS_METRICS = ("balance_loss", "z_loss")

LOSS_TAG = "loss"
GUARD_CONSECUTIVE_TAG = "st_moe_guard/consecutive_skipped"  # st_moe.guard.CONSECUTIVE_SUMMARY
GUARD_SKIPPED_TAG = "st_moe_guard/skipped_steps"  # st_moe.guard.SKIPPED_SUMMARY
_HEADER = struct.Struct("<QI")  # record length, masked crc32c of the length
_FOOTER_BYTES = 4  # masked crc32c of the data


def is_loss_or_aux_loss(tag):
  """The training loss and the sparse layers' auxiliary losses: cross_entropy_by_step's input."""
  return tag == LOSS_TAG or any(tag.endswith(ROUTER_TAG_INFIX + m) for m in AUX_LOSS_METRICS)


def _tf():
  import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
  return tf


def _file_order(path):
  """Event files in the order they were created: the timestamp in the name, then the name."""
  name = os.path.basename(path)
  m = re.match(r"events\.out\.tfevents\.(\d+)", name)
  return (int(m.group(1)) if m else 0, name)


def _scalar(value):
  """The float of a Summary.Value: TF1 simple_value or a TF2 scalar tensor; None otherwise."""
  if value.HasField("simple_value"):
    return float(value.simple_value)
  if value.HasField("tensor"):
    arr = _tf().make_ndarray(value.tensor)
    if arr.size == 1 and arr.dtype.kind in "fiub":
      return float(arr.reshape(()))
  return None


class EventReader:
  """Scalars of the event files directly in one directory, read incrementally.

  `poll()` reads the records added since the last call (a record still being written is left for
  the next poll) and returns how many scalar values it read. `scalars` is then
  {tag: {global step: value}} and `wall_times` {tag: {global step: unix time of the event}}.

  Args:
    log_dir: the directory (local or gs://).
    tag_filter: optional predicate on tags: only those it accepts are kept.
    since: optional unix time: only files created from then on (the time in their name), e.g.
      the files of one attempt.
  """

  def __init__(self, log_dir, tag_filter: Optional[Callable[[str], bool]] = None, since=None):
    self.log_dir = log_dir
    self.tag_filter = tag_filter
    self.since = since
    self.scalars: Dict[str, Dict[int, float]] = {}
    self.wall_times: Dict[str, Dict[int, float]] = {}
    self._offsets: Dict[str, int] = {}
    self._by_file: Dict[str, Dict[str, Dict[int, float]]] = {}

  def files(self):
    gfile = _tf().io.gfile
    if not gfile.isdir(self.log_dir):
      return []
    paths = sorted(gfile.glob(os.path.join(self.log_dir, EVENTS_GLOB)), key=_file_order)
    if self.since is not None:
      paths = [p for p in paths if _file_order(p)[0] >= int(self.since)]
    return paths

  def poll(self):
    """Reads what was appended to the directory's event files; returns the values read."""
    tf = _tf()
    from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
    new = 0
    files = self.files()
    changed = False
    for path in files:
      offset = self._offsets.get(path, 0)
      try:
        size = tf.io.gfile.stat(path).length
      except tf.errors.NotFoundError:
        continue
      if size <= offset:
        continue
      with tf.io.gfile.GFile(path, "rb") as f:
        f.seek(offset)
        data = f.read()
      pos = 0
      values = self._by_file.setdefault(path, {})
      while pos + _HEADER.size <= len(data):
        length, _ = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length + _FOOTER_BYTES
        if end > len(data):
          break  # a record still being written
        event = event_pb2.Event.FromString(data[pos + _HEADER.size:pos + _HEADER.size + length])
        pos = end
        if not event.HasField("summary"):
          continue
        for value in event.summary.value:
          if self.tag_filter is not None and not self.tag_filter(value.tag):
            continue
          v = _scalar(value)
          if v is None:
            continue
          values.setdefault(value.tag, {})[int(event.step)] = v
          self.wall_times.setdefault(value.tag, {})[int(event.step)] = event.wall_time
          new += 1
          changed = True
      self._offsets[path] = offset + pos
    if changed:  # later files win where two attempts wrote the same step
      merged: Dict[str, Dict[int, float]] = {}
      for path in files:
        for tag, by_step in self._by_file.get(path, {}).items():
          merged.setdefault(tag, {}).update(by_step)
      self.scalars = merged
    return new

  def curve(self, tag) -> Tuple[List[int], List[float]]:
    """(steps, values) of one tag, sorted by step."""
    by_step = self.scalars.get(tag, {})
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def read_scalars(log_dir, tags=None):
  """Scalar summaries of every events file directly in `log_dir` (TF1 and TF2 summaries).

  Args:
    log_dir: a directory (local or gs://).
    tags: optional set of tags to keep.

  Returns:
    {tag: (steps <int64>[n], values <float64>[n])}, sorted by step; for a step written twice (a
    resumed run), the later file's value wins.
  """
  reader = EventReader(log_dir, None if tags is None else (lambda t: t in tags))
  reader.poll()
  result = {}
  for tag in reader.scalars:
    steps, values = reader.curve(tag)
    result[tag] = (np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64))
  return result


def router_layers(scalars) -> Dict[str, Dict[str, Dict[int, float]]]:
  """{layer scope: {metric: {step: value}}} from the `<scope>/router/<metric>` tags of `scalars`.

  Args:
    scalars: {tag: {step: value}} (`EventReader.scalars`).
  """
  layers: Dict[str, Dict[str, Dict[int, float]]] = {}
  for tag, by_step in scalars.items():
    if ROUTER_TAG_INFIX not in tag:
      continue
    scope, _, metric = tag.partition(ROUTER_TAG_INFIX)
    layers.setdefault(scope, {})[metric] = by_step
  return layers


def excess_dropped(layer, step) -> float:
  """The fraction of the tokens a sparse layer's capacity could take that it dropped at `step`.

  (dropped - floor) / (1 - floor), where floor = max(0, 1 - slots_per_token) is what the layer
  drops however balanced its router (`st_moe.routing.routing_metrics`): a quarter of the tokens
  for top-1 at capacity factor 0.75, none for top-2 at 1.25. Event files without
  `slots_per_token` (written before 2026-12-04) give the fraction dropped itself.

  Args:
    layer: {metric: {step: value}} of one layer (`router_layers`).
    step: a step at which the layer wrote `fraction_dropped`.
  """
  dropped = layer["fraction_dropped"][step]
  slots = layer.get("slots_per_token", {})
  if not slots:
    return dropped
  floor = max(0.0, 1.0 - slots.get(step, next(iter(slots.values()))))
  return max(0.0, (dropped - floor) / (1.0 - floor))


def router_by_step(scalars) -> Dict[int, Dict[str, float]]:
  """Router metrics of each step, summarised over the sparse layers.

  Args:
    scalars: {tag: {step: value}} (`EventReader.scalars`).

  Returns:
    {step: {"z_loss": mean over layers, "balance_loss": mean, "dropped": mean fraction of tokens
    dropped, "max_dropped": the largest layer's, "max_excess_dropped": the largest layer's
    `excess_dropped`, "max_expert_fraction": the largest fraction of
    tokens any one expert got as first choice in any layer, "max_expert_share": the same, but
    at most the layer's balance_loss / E (= sum_e f_e P_e: the router's mean probability of the
    experts it picks first), so that it is near 1 only when one expert gets nearly every token
    and nearly all of the router's probability (an untrained router near 1 / E per expert can
    send a small decoder group's first choices all to one expert), "num_experts": the fewest
    experts of a layer, "confidence": mean, "entropy": mean, "max_logit": the largest router
    logit of any layer}}, for the steps where every layer
    wrote its metrics.
  """
  layers = router_layers(scalars)
  if not layers:
    return {}
  steps = None
  for metrics in layers.values():
    layer_steps = set(metrics.get("fraction_dropped", {}))
    steps = layer_steps if steps is None else steps & layer_steps
  found = {}
  for step in sorted(steps or ()):
    row = {}
    for key, metric in (("z_loss", "z_loss"), ("balance_loss", "balance_loss"),
                        ("dropped", "fraction_dropped"), ("confidence", "confidence"),
                        ("entropy", "entropy")):
      vals = [m[metric][step] for m in layers.values() if step in m.get(metric, {})]
      if vals:
        row[key] = sum(vals) / len(vals)
    row["max_dropped"] = max(m["fraction_dropped"][step] for m in layers.values())
    row["max_excess_dropped"] = max(excess_dropped(m, step) for m in layers.values())
    logits = [m["max_logit"][step] for m in layers.values() if step in m.get("max_logit", {})]
    if logits:
      row["max_logit"] = max(logits)  # the largest router logit of any sparse layer
    fractions, shares, experts = [], [], []
    for m in layers.values():
      layer = [v[step] for k, v in m.items() if k.startswith("expert_fraction/") and step in v]
      if not layer:
        continue
      fractions.append(max(layer))
      experts.append(len(layer))
      balance = m.get("balance_loss", {}).get(step)
      # E * sum_e f_e P_e / E: the mean router probability of the experts, weighted by their
      # first choices (P_0 when every token's first choice is expert 0).
      shares.append(max(layer) if balance is None else min(max(layer), balance / len(layer)))
    if fractions:
      row["max_expert_fraction"] = max(fractions)
      row["max_expert_share"] = max(shares)
      row["num_experts"] = min(experts)
    found[step] = row
  return found


def cross_entropy_by_step(scalars, balance_loss_coef, router_z_loss_coef) -> Dict[int, float]:
  """{step: the training loss less the sparse layers' weighted auxiliary losses}.

  loss - sum over layers of (balance_loss_coef x balance_loss + router_z_loss_coef x z_loss), for
  the steps where every layer wrote both; the loss itself for a model without sparse layers.
  """
  loss = scalars.get(LOSS_TAG, {})
  layers = router_layers(scalars)
  found = {}
  for step, value in loss.items():
    aux = 0.0
    for metrics in layers.values():
      balance = metrics.get("balance_loss", {}).get(step)
      z_loss = metrics.get("z_loss", {}).get(step)
      if balance is None or z_loss is None:
        aux = None
        break
      aux += balance_loss_coef * balance + router_z_loss_coef * z_loss
    if aux is not None:
      found[step] = value - aux
  return found


def step_metrics(scalars) -> Dict[int, Dict[str, float]]:
  """What the divergence monitor reads besides the loss, by step: `router_by_step` and the
  guard's counters (`st_moe_guard/consecutive_skipped` -> "consecutive_skipped",
  `st_moe_guard/skipped_steps` -> "skipped_steps")."""
  found = router_by_step(scalars)
  for tag, key in ((GUARD_CONSECUTIVE_TAG, "consecutive_skipped"),
                   (GUARD_SKIPPED_TAG, "skipped_steps")):
    for full_tag, by_step in scalars.items():
      if full_tag == tag or full_tag.endswith("/" + tag):
        for step, value in by_step.items():
          found.setdefault(step, {})[key] = value
  return found


def eval_dirs(model_dir) -> List[str]:
  """The evaluation folders of a model_dir (names), e.g. ['eval_validation_80']."""
  gfile = _tf().io.gfile
  if not gfile.isdir(model_dir):
    return []
  names = []
  for name in sorted(gfile.listdir(model_dir)):
    name = name.rstrip("/")
    if (name.startswith("eval") or "_eval" in name) and gfile.isdir(
        os.path.join(model_dir, name)):
      names.append(name)
  return names


def evaluations(model_dir, since=None) -> Dict[str, Dict[int, Dict[str, float]]]:
  """Every evaluation result of a model_dir: {eval folder: {global step: {metric: value}}}.

  Args:
    model_dir: the run's folder.
    since: optional unix time: only event files created from then on (one attempt's).
  """
  found = {}
  for name in eval_dirs(model_dir):
    reader = EventReader(os.path.join(model_dir, name), since=since)
    reader.poll()
    by_step: Dict[int, Dict[str, float]] = {}
    for tag, values in reader.scalars.items():
      for step, value in values.items():
        by_step.setdefault(step, {})[tag] = value
    if by_step:
      found[name] = by_step
  return found


def summarise_router_metrics(metrics: Dict[str, float]) -> Dict[str, float]:
  """Means over the sparse layers of an evaluation's router metrics ({tag: value} -> {name: v}).

  Returns {"z_loss", "balance_loss", "fraction_dropped", "confidence", "entropy"} (those
  present), the means over layers of `<scope>/router/<metric>`.
  """
  sums: Dict[str, List[float]] = {}
  for tag, value in metrics.items():
    if ROUTER_TAG_INFIX in tag:
      metric = tag.partition(ROUTER_TAG_INFIX)[2]
      if not metric.startswith("expert_fraction/"):
        sums.setdefault(metric, []).append(value)
  return {k: sum(v) / len(v) for k, v in sums.items()}
