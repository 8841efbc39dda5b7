"""A table's finished runs without their checkpoints: small enough to check in, enough to resume.

A reproduction table that takes longer than one working session (or one machine's life) is
finished in pieces: `save` copies what the tables read of every finished run of an output folder
(<out>/runs/<run id>) into an archive folder, and `restore` copies it back into a fresh output
folder, where `tools/reproduce.py` then skips those runs ("already trained", cached evaluations and
traces) and trains only the rest.

What a finished run keeps (everything else, its checkpoints above all, is left out):
  - its bookkeeping (st_moe.experiments.jobs): job.json, train_done.json or diverged.json, every
    evaluation's <name>.json, and the `checkpoint` index naming its last step (the step the cached
    evaluations are keyed on); operative_config.gin, the record of what it trained;
  - its routing traces (trace_*/: routing.json, trace_meta.json, routing.md and the PNGs);
  - its training curve: one event file with the `loss` scalar of every step, read by
    st_moe.experiments.runner.steps_and_losses like the run's own event files, and each sparse
    layer's auxiliary losses of every step (`<scope>/router/balance_loss` and `.../z_loss`: what
    st_moe.experiments.tables.sparse_vs_dense subtracts from the loss for the cross-entropy).
A run that is still training (neither train_done.json nor diverged.json) is not archived: it
resumes from its checkpoints, which only its own output folder has. Nor is a run that trained to
the end but has no evaluation of its last checkpoint yet (a fine-tuning run whose decoding was
interrupted, say): archived, it could never be evaluated, its checkpoints being left out; `save`
names it and leaves it to be evaluated in its own folder first. A diverged run is archived as it is
(the tables read its diverged.json, not an evaluation).

Both directions go through tf.io.gfile, so either folder may be on gs://.
"""
from typing import List

from st_moe.experiments import events
from st_moe.experiments import jobs
from st_moe.experiments import runner

FINISHED = ("train_done.json", "diverged.json")
BOOKKEEPING = ("job.json",) + FINISHED  # the other .json files of a run are its evaluations
KEPT_FILES = ("checkpoint", "operative_config.gin")
ARCHIVED_EVENTS = "events.out.tfevents.{time}.archive.v2"
# The output folder in the archived JSON (the runs' recorded command lines name their model_dir):
# written as this placeholder, and replaced by the folder restored into.
OUT_PLACEHOLDER = "${ST_MOE_ARCHIVED_OUT}"


def _tf():
  import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
  return tf


def finished_runs(runs_dir) -> List[str]:
  """Names of the run folders in `runs_dir` whose training finished (done or diverged)."""
  gfile = _tf().io.gfile
  if not gfile.isdir(runs_dir):
    return []
  return sorted(name.rstrip("/") for name in gfile.listdir(runs_dir)
                if any(gfile.exists(jobs.join(runs_dir, name.rstrip("/"), f)) for f in FINISHED))


def evaluation_pending(run_dir) -> bool:
  """True for a run that trained to the end (train_done.json, not diverged) but has no evaluation
  (<name>.json as jobs.evaluate writes it) of its last checkpoint's step."""
  gfile = _tf().io.gfile
  if gfile.exists(jobs.join(run_dir, "diverged.json")):
    return False
  last = runner.latest_checkpoint_step(run_dir)
  for name in gfile.listdir(run_dir):
    name = name.rstrip("/")
    if name.endswith(".json") and name not in BOOKKEEPING:
      evaluation = jobs.read_json(jobs.join(run_dir, name)) or {}
      if isinstance(evaluation, dict) and evaluation.get("step") == last:
        return False
  return True


def _write_curve(model_dir, dest_dir):
  """One event file in dest_dir with model_dir's training loss per step and its sparse layers'
  auxiliary losses (later attempts win)."""
  tf = _tf()
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
  reader = events.EventReader(model_dir, events.is_loss_or_aux_loss)
  reader.poll()
  curve = reader.scalars.get(events.LOSS_TAG, {})
  times = reader.wall_times.get(events.LOSS_TAG, {})
  if not curve:
    return None
  first = int(min(times.values())) if times else 0
  tags = [events.LOSS_TAG] + sorted(t for t in reader.scalars if t != events.LOSS_TAG)
  path = jobs.join(dest_dir, ARCHIVED_EVENTS.format(time=first))
  with tf.io.TFRecordWriter(path) as writer:
    writer.write(event_pb2.Event(wall_time=float(first), file_version="brain.Event:2")
                 .SerializeToString())
    for step in sorted(curve):
      values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(reader.scalars[tag][step]))
                for tag in tags if step in reader.scalars[tag]]
      writer.write(event_pb2.Event(wall_time=float(times.get(step, first)), step=int(step),
                                   summary=summary_pb2.Summary(value=values)).SerializeToString())
  return path


def _copy(src, dest, old=None, new=None):
  """Copies a file; in a .json file, the text `old` becomes `new`."""
  gfile = _tf().io.gfile
  if old and src.endswith(".json"):
    jobs.write_text(dest, jobs.read_text(src).replace(old, new))
  else:
    gfile.copy(src, dest, overwrite=True)


def _copy_tree(src, dest, old=None, new=None):
  gfile = _tf().io.gfile
  gfile.makedirs(dest)
  for name in gfile.listdir(src):
    name = name.rstrip("/")
    if gfile.isdir(jobs.join(src, name)):
      _copy_tree(jobs.join(src, name), jobs.join(dest, name), old, new)
    else:
      _copy(jobs.join(src, name), jobs.join(dest, name), old, new)


def _other_training(src, dest, out):
  """The name of the bookkeeping file (train_done.json or diverged.json) in which the archived run
  `dest` differs from the run `src` of the output folder `out`, or None if `dest` is not archived
  or is the same training."""
  gfile = _tf().io.gfile
  if not gfile.isdir(dest):
    return None
  for name in FINISHED:
    archived, current = jobs.join(dest, name), jobs.join(src, name)
    if not (gfile.exists(archived) or gfile.exists(current)):
      continue
    if not (gfile.exists(archived) and gfile.exists(current)):
      return name
    if jobs.read_text(current).replace(out, OUT_PLACEHOLDER) != jobs.read_text(archived):
      return name
  return None


def save(out, archive, show=print) -> List[str]:
  """Archives every finished and evaluated run of <out>/runs into <archive>/<run id>; returns their
  names.

  A run already in the archive is written again (its evaluations may have grown) if it is the same
  training: the same train_done.json or diverged.json. One archived from another training of that
  run id (trained again since, say, after its folder was lost) is kept, named, and not overwritten:
  the archive is what the checked-in tables cite (their wall times and command lines); delete it
  from the archive to replace it. A run whose evaluation is pending (evaluation_pending) is named and
  left out."""
  gfile = _tf().io.gfile
  runs_dir = jobs.join(out, "runs")
  saved = []
  for name in finished_runs(runs_dir):
    src, dest = jobs.join(runs_dir, name), jobs.join(archive, name)
    if evaluation_pending(src):
      show(f"[{name}] not archived: trained, but its last checkpoint (step "
           f"{runner.latest_checkpoint_step(src)}) has no evaluation yet, and the archive keeps no "
           f"checkpoints; evaluate it (rerun its table) and save again")
      continue
    other = _other_training(src, dest, out.rstrip("/"))
    if other:
      show(f"[{name}] not archived: {dest} holds another training of this run ({other} differs: "
           f"trained again since it was archived); kept as it is; delete it to archive this one")
      continue
    if gfile.isdir(dest):
      gfile.rmtree(dest)
    gfile.makedirs(dest)
    for entry in gfile.listdir(src):
      entry = entry.rstrip("/")
      path = jobs.join(src, entry)
      if gfile.isdir(path):
        if entry.startswith("trace_"):
          _copy_tree(path, jobs.join(dest, entry), out.rstrip("/"), OUT_PLACEHOLDER)
      elif entry.endswith(".json") or entry in KEPT_FILES:
        _copy(path, jobs.join(dest, entry), out.rstrip("/"), OUT_PLACEHOLDER)
    _write_curve(src, dest)
    saved.append(name)
    show(f"[{name}] archived in {dest}")
  return saved


def restore(archive, out, show=print) -> List[str]:
  """Copies each archived run into <out>/runs/<run id> unless that folder exists (a run there is
  never overwritten); returns the names restored."""
  gfile = _tf().io.gfile
  if not gfile.isdir(archive):
    raise FileNotFoundError(f"--archive={archive}: no such folder (made by `save`)")
  restored = []
  for name in finished_runs(archive):
    dest = jobs.join(out, "runs", name)
    if gfile.exists(dest):
      show(f"[{name}] kept: {dest} exists")
      continue
    _copy_tree(jobs.join(archive, name), dest, OUT_PLACEHOLDER, out.rstrip("/"))
    restored.append(name)
    show(f"[{name}] restored from {jobs.join(archive, name)}")
  return restored

