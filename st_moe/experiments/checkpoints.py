"""Which checkpoints of a model_dir can be read, and what to do when the latest cannot.

A run killed while it writes a checkpoint, a full disk or a bad copy leaves a latest checkpoint
whose data file is partial or missing. The Estimator restores the latest checkpoint (the one the
`checkpoint` state file names) and fails with a `DataLossError` traceback that does not say the
previous checkpoint is intact. Here:

  * `checkpoints(model_dir)`: every `model.ckpt-N` with an index file, by step.
  * `readable(prefix)`: None if the checkpoint can be read, else the reason. Cheap by default
    (`full=False`): the index opens, every data shard `.data-0000i-of-0000n` exists, and the data
    files hold at least the bytes the index's tensors need (a partial write is short); the
    contents are not read, so a 32B checkpoint is checked in milliseconds. `full=True` also reads
    every tensor (which checks the CRCs).
  * `latest_readable_checkpoint(model_dir)`: (step, prefix) of the newest readable one, or None.
  * `check_latest(model_dir)`: raises `UnreadableCheckpointError` naming the unreadable latest
    checkpoint, the intact earlier one, and how to resume from it.
  * `fall_back(model_dir)`: moves the files of unreadable checkpoints newer than the last readable
    one aside (`<file>.unreadable`) and points the `checkpoint` state at the readable one, so a
    rerun resumes from it; returns what it did, for the caller's warning.

Starting from another run's checkpoint (utils.run.init_checkpoint) restores its optimizer slots
too; `st_moe.not_optimizer_slot` leaves them out (fine-tuning with the slots reset, Table 20):
  utils.should_load_variable.filter_fn = @st_moe.not_optimizer_slot

All file access is tf.io.gfile / tf.train (gs:// works). Run as a module, the fall-back is:

  python -m st_moe.experiments.checkpoints --fall_back MODEL_DIR
"""
import os
import re
import sys
from typing import List, Optional, Tuple

import gin
import tensorflow.compat.v1 as tf

_CKPT_RE = re.compile(r"^model\.ckpt-(\d+)\.index$")
_SHARD_RE = re.compile(r"\.data-(\d+)-of-(\d+)$")
UNREADABLE_SUFFIX = ".unreadable"


# mesh_tensorflow's optimizers name a variable's slots <variable>_slot_<vr|vc|v|m> (optimize.py).
OPTIMIZER_SLOT = "_slot_"


@gin.register(module="st_moe")
def not_optimizer_slot(name: str) -> bool:
  """False for an optimizer slot variable (Adafactor's vr, vc, v; momentum's m), else True: as
  `utils.should_load_variable.filter_fn`, a run restores weights and global step from its
  init_checkpoint and starts its optimizer statistics from zero."""
  return OPTIMIZER_SLOT not in name


class UnreadableCheckpointError(RuntimeError):
  """The latest checkpoint of a model_dir cannot be read."""


def checkpoints(model_dir: str) -> List[Tuple[int, str]]:
  """[(step, prefix)] of every `model.ckpt-<step>` in `model_dir` that has an index file, by step.

  A checkpoint the `checkpoint` state file names but whose index is missing is included too (it is
  what the Estimator would try to restore).
  """
  found = {}
  if not tf.io.gfile.isdir(model_dir):
    return []
  for name in tf.io.gfile.listdir(model_dir):
    match = _CKPT_RE.match(name.rstrip("/"))
    if match:
      found[int(match.group(1))] = os.path.join(model_dir, f"model.ckpt-{match.group(1)}")
  state_path = _state_path(model_dir)
  if state_path:
    step = step_of(state_path)
    if step is not None:
      found.setdefault(step, state_path)
  return sorted(found.items())


def step_of(prefix: str) -> Optional[int]:
  """N of a checkpoint prefix ".../model.ckpt-N"; None for any other path."""
  match = re.search(r"model\.ckpt-(\d+)$", prefix)
  return int(match.group(1)) if match else None


def _state_path(model_dir: str) -> Optional[str]:
  """The checkpoint the `checkpoint` state file names (absolute), or None."""
  try:
    state = tf.train.get_checkpoint_state(model_dir)
  except (tf.errors.OpError, ValueError):  # an unparsable state file
    return None
  if state is None or not state.model_checkpoint_path:
    return None
  path = state.model_checkpoint_path
  return path if os.path.isabs(path) or "://" in path else os.path.join(model_dir, path)


def readable(prefix: str, full: bool = False) -> Optional[str]:
  """Why the checkpoint `prefix` (e.g. `<dir>/model.ckpt-100`) cannot be read; None if it can.

  Args:
    prefix: a checkpoint prefix (no `.index` suffix).
    full: also read every tensor (checks the data's CRCs; reads the whole checkpoint).

  Returns:
    None, or a one-line reason.
  """
  index = prefix + ".index"
  if not tf.io.gfile.exists(index):
    return f"its index file {index} is missing"
  try:
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    shapes = reader.get_variable_to_shape_map()
  except (tf.errors.OpError, ValueError) as e:
    return f"its index {index} cannot be read ({type(e).__name__}: {_first_line(e)})"
  data_files = tf.io.gfile.glob(prefix + ".data-*")
  shard_counts = {int(m.group(2)) for m in map(_SHARD_RE.search, data_files) if m}
  expected_shards = max(shard_counts) if shard_counts else 1
  present = {int(m.group(1)) for m in map(_SHARD_RE.search, data_files) if m}
  missing = sorted(set(range(expected_shards)) - present)
  if missing:
    return (f"data shard(s) {', '.join(f'{prefix}.data-{i:05d}-of-{expected_shards:05d}' for i in missing)}"
            " missing")
  needed = 0
  for name, dtype in dtypes.items():
    if dtype != tf.string:
      size = 1
      for dim in shapes[name]:
        size *= dim
      needed += size * dtype.size
  have = sum(tf.io.gfile.stat(f).length for f in data_files)
  if have < needed:
    return (f"its data files hold {have} bytes but its index lists {needed} bytes of tensors "
            "(a partial write)")
  if full:
    try:
      for name in dtypes:
        reader.get_tensor(name)
    except (tf.errors.OpError, ValueError) as e:
      return f"reading {name} failed ({type(e).__name__}: {_first_line(e)})"
  return None


def _first_line(error) -> str:
  text = getattr(error, "message", None) or str(error)
  return text.strip().split("\n")[0][:300]


def latest_readable_checkpoint(model_dir: str, full: bool = False) -> Optional[Tuple[int, str]]:
  """(step, prefix) of the newest checkpoint of `model_dir` that `readable` accepts; None if none."""
  for step, prefix in reversed(checkpoints(model_dir)):
    if readable(prefix, full=full) is None:
      return step, prefix
  return None


def unreadable_latest_message(model_dir: str, full: bool = False) -> Optional[str]:
  """The error text for `model_dir` if its latest checkpoint cannot be read; None if it can (or
  there is none)."""
  found = checkpoints(model_dir)
  if not found:
    return None
  step, prefix = found[-1]
  reason = readable(prefix, full=full)
  if reason is None:
    return None
  intact = latest_readable_checkpoint(model_dir, full=full)
  text = (f"The latest checkpoint of --model_dir={model_dir}, step {step} ({prefix}), cannot be "
          f"read: {reason}. ")
  if intact is None:
    return text + (
        "No earlier checkpoint there is readable either. Delete the model_dir's model.ckpt-* and "
        "checkpoint files to start afresh, or start from another run's checkpoint with "
        "--gin_param=\"utils.run.init_checkpoint='<dir>/model.ckpt-<step>'\" and a new "
        "--model_dir.")
  good_step, good_prefix = intact
  return text + (
      f"The checkpoint of step {good_step} ({good_prefix}) is intact. To resume from it, either "
      f"move the broken files aside and point the checkpoint state at step {good_step}:\n"
      f"  python -m st_moe.experiments.checkpoints --fall_back {model_dir}\n"
      f"(or delete {prefix}.* and every newer model.ckpt-* by hand and edit {model_dir}/checkpoint "
      f"to name model.ckpt-{good_step}), or train into a new --model_dir from it with\n"
      f"  --gin_param=\"utils.run.init_checkpoint='{good_prefix}'\"")


def check_latest(model_dir: str, full: bool = False):
  """Raises UnreadableCheckpointError if the latest checkpoint of `model_dir` cannot be read."""
  message = unreadable_latest_message(model_dir, full=full)
  if message:
    raise UnreadableCheckpointError(message)


def fall_back(model_dir: str, full: bool = False) -> Optional[str]:
  """Makes the newest readable checkpoint the latest: the files of the unreadable checkpoints
  after it get the suffix `.unreadable`, and the `checkpoint` state names it.

  Args:
    model_dir: the run's model_dir.
    full: see `readable`.

  Returns:
    None if the latest checkpoint was readable (nothing changed), else a one-line description of
    what changed (for a warning).

  Raises:
    UnreadableCheckpointError: no checkpoint of model_dir is readable.
  """
  message = unreadable_latest_message(model_dir, full=full)
  if message is None:
    return None
  intact = latest_readable_checkpoint(model_dir, full=full)
  if intact is None:
    raise UnreadableCheckpointError(message)
  good_step, good_prefix = intact
  moved = []
  for step, prefix in checkpoints(model_dir):
    if step > good_step:
      for path in tf.io.gfile.glob(prefix + ".*"):
        if not path.endswith(UNREADABLE_SUFFIX):
          tf.io.gfile.rename(path, path + UNREADABLE_SUFFIX, overwrite=True)
          moved.append(path)
  kept = [p for s, p in checkpoints(model_dir) if s <= good_step]
  tf.train.update_checkpoint_state(model_dir, good_prefix, all_model_checkpoint_paths=kept)
  return (f"resuming {model_dir} from its checkpoint of step {good_step}: "
          f"moved {len(moved)} file(s) of unreadable later checkpoint(s) aside "
          f"(suffix {UNREADABLE_SUFFIX})")


def main(argv):
  if len(argv) != 3 or argv[1] != "--fall_back":
    print("usage: python -m st_moe.experiments.checkpoints --fall_back MODEL_DIR", file=sys.stderr)
    return 2
  try:
    done = fall_back(argv[2])
  except UnreadableCheckpointError as e:
    print(e, file=sys.stderr)
    return 1
  print(done or f"the latest checkpoint of {argv[2]} is readable; nothing changed")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
