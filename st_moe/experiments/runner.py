"""Runs `t5_mesh_transformer` as a subprocess, shows progress, and stops a diverged run.

The demo and the table-reproduction tool train every model through the same entry point users run
on TPU. This module builds the command line, sends the run's output to a log file, and follows the
run through its event files (`st_moe.experiments.events`: loss and router metrics at every step,
written on the CPU as on a TPU by `st_moe.summaries`), applying the divergence and collapse rules
of `st_moe.experiments.divergence` as the run goes: a diverged or collapsed run is stopped and
reported, never continued. Nothing is read from the run's output.

Re-running into the same model_dir resumes from its last checkpoint (the Estimator restores it);
the event files then hold the whole curve (`steps_and_losses`).

The child dies with its parent: on Linux it gets a parent-death signal (SIGKILL), and SIGINT /
SIGTERM of the parent stop it before the parent exits.
"""
import collections
import ctypes
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

from st_moe.experiments import divergence as divergence_lib
from st_moe.experiments import events

REGISTER_MODULE = "st_moe.register"  # imported into every run: loss and router events (summaries)
STARTED_TAG = "# st_moe.experiments.runner: started "  # second line of every log: unix time
_PR_SET_PDEATHSIG = 1


def _gfile():
  import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def t5_mesh_transformer_executable():
  """The console script installed beside the running interpreter."""
  exe = os.path.join(os.path.dirname(sys.executable), "t5_mesh_transformer")
  if not os.path.exists(exe):
    raise FileNotFoundError(
        f"t5_mesh_transformer not found at {exe}: run inside the project's .venv (make venv)")
  return exe


def command(model_dir, gin_files, gin_params=(), module_imports=(), extra_flags=()):
  """The t5_mesh_transformer command line for one run (always imports st_moe.register)."""
  cmd = [t5_mesh_transformer_executable(), f"--model_dir={model_dir}"]
  imports = list(module_imports)
  if REGISTER_MODULE not in imports and "st_moe" not in imports:
    imports.insert(0, REGISTER_MODULE)
  cmd += [f"--module_import={m}" for m in imports]
  cmd += [f"--gin_file={g}" for g in gin_files]
  cmd += [f"--gin_param={p}" for p in gin_params]
  cmd += list(extra_flags)
  return cmd


def shell_quote(cmd):
  """The command as one line a user can paste into a shell."""
  import shlex  # pylint: disable=g-import-not-at-top
  return " ".join(shlex.quote(c) for c in cmd)


def latest_checkpoint_step(model_dir):
  """Global step of the newest checkpoint in model_dir, or None."""
  path = os.path.join(model_dir, "checkpoint")
  gfile = _gfile()
  if not gfile.exists(path):
    return None
  with gfile.GFile(path) as f:
    m = re.search(r'model_checkpoint_path: "[^"]*ckpt-(\d+)"', f.read())
  return int(m.group(1)) if m else None


@dataclasses.dataclass
class RunResult:
  """What one attempt saw (steps from the attempt's first step; values from the event files).

  router: {"z_loss", "balance_loss", "dropped", "max_dropped", "max_expert_fraction",
  "confidence", "entropy", "max_logit"} -> one value per entry of `steps` that has router metrics (means
  over the sparse layers, `events.router_by_step`); empty for a model without sparse layers.
  started: the attempt's start (unix time): `eval_results(model_dir, since=started)` reads the
  evaluations this attempt wrote.
  """
  model_dir: str
  command: List[str]
  returncode: Optional[int]
  steps: List[int] = dataclasses.field(default_factory=list)
  losses: List[float] = dataclasses.field(default_factory=list)
  router: Dict[str, List[float]] = dataclasses.field(default_factory=dict)
  diverged: Optional[divergence_lib.Divergence] = None
  seconds: float = 0.0
  tokens_per_second: Optional[float] = None
  log_path: str = ""
  started: float = 0.0

  @property
  def ok(self):
    return self.returncode == 0 and self.diverged is None


class Progress:
  """Follows a run's event files: new steps, the monitor, and a progress line now and then."""

  def __init__(self, model_dir, tokens_per_step, first_step=1, every=10, label="",
               monitor=None, since=None):
    """since: the attempt's start (unix time): event files of earlier attempts are not read."""
    self.reader = events.EventReader(model_dir, since=since)
    self.tokens_per_step = tokens_per_step
    self.first_step = first_step
    self.every = every
    self.label = label
    self.monitor = monitor
    self.steps, self.losses = [], []
    self.router: Dict[str, List[float]] = {}
    self.diverged = None

  def poll(self, final=False):
    """Reads the event files; returns the progress lines of the steps completed since the last
    call. While the run goes (final=False) the newest step waits for the next poll, so that its
    router metrics, written just after its loss, are complete."""
    self.reader.poll()
    by_step = self.reader.scalars.get(events.LOSS_TAG, {})
    router = events.step_metrics(self.reader.scalars)
    last_seen = self.steps[-1] if self.steps else self.first_step - 1
    new = sorted(s for s in by_step if s > last_seen)
    if not final and new:
      new = new[:-1]
    shown = []
    for step in new:
      loss = by_step[step]
      self.steps.append(step)
      self.losses.append(loss)
      row = router.get(step)
      if row:
        for key, value in row.items():
          self.router.setdefault(key, []).append(value)
      if self.monitor is not None and self.diverged is None:
        self.diverged = self.monitor.update(step, loss, row)
        if self.diverged:
          shown.append(f"[{self.label}] {self.diverged.kind.upper()}: {self.diverged.reason}")
          break
      if step % self.every == 0 or len(self.steps) == 1:
        shown.append(self.progress_line(row))
    return shown

  def tokens_per_second(self):
    """Throughput over this attempt's steps, from the times of their loss events.

    The interval up to the second step is left out when there are 3 steps or more: the first
    two session runs of an Estimator fetch different things (the summary hook's first step),
    and each builds its executor (measured: 36 s from step 1 to 2 of the demo's tiny model, then
    0.2 s a step)."""
    times = self.reader.wall_times.get(events.LOSS_TAG, {})
    steps = [s for s in self.steps if s in times]
    if len(steps) < 2:
      return None
    s0, s1 = steps[1 if len(steps) >= 3 else 0], steps[-1]
    t0, t1 = times[s0], times[s1]
    return (s1 - s0) * self.tokens_per_step / (t1 - t0) if t1 > t0 else None

  def progress_line(self, row=None):
    step, loss = self.steps[-1], self.losses[-1]
    text = f"[{self.label}] step {step:5d}  loss {loss:7.4f}"
    if row and "z_loss" in row:
      text += f"  router z-loss {row['z_loss']:7.4f}  dropped {100 * row['dropped']:5.1f}%"
    tps = self.tokens_per_second()
    if tps:
      text += f"  {tps:8.0f} tokens/s"
    return text


def _die_with_parent(parent_pid):
  """preexec_fn of the child: SIGKILL when the parent dies (Linux), even by SIGKILL.

  libc is loaded here, in the parent: the child, forked from a process with threads, only calls
  prctl and getppid before it execs.
  """
  try:
    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
  except OSError:
    return None  # not Linux: the parent's SIGINT/SIGTERM handling still stops the child

  def set_death_signal():
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
      os._exit(1)  # pylint: disable=protected-access
  return set_death_signal


def _stop(proc, grace=10.0):
  """SIGTERM, then SIGKILL after `grace` seconds; waits for the child."""
  if proc.poll() is not None:
    return proc.returncode
  proc.terminate()
  try:
    return proc.wait(grace)
  except subprocess.TimeoutExpired:
    proc.kill()
    return proc.wait()


class _SigtermAsExit:
  """While active (main thread only), SIGTERM raises SystemExit so that `finally` stops the child."""

  def __enter__(self):
    self.previous = None
    if threading.current_thread() is threading.main_thread():
      if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        def handler(signum, frame):
          del frame
          raise SystemExit(128 + signum)
        self.previous = signal.signal(signal.SIGTERM, handler)
    return self

  def __exit__(self, *exc):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)
    return False


def _copy_output(stream, log, tail):
  for line in stream:
    log.write(line)
    log.flush()
    tail.append(line)


def run(model_dir, gin_files, gin_params=(), *, tokens_per_step, label="run", every=10,
        monitor: Optional[divergence_lib.DivergenceMonitor] = None,
        show: Callable[[str], None] = print, module_imports=(), extra_flags=(),
        env=None, timeout=None, poll_seconds=2.0) -> RunResult:
  """Runs one t5_mesh_transformer job to the end (or until it diverges); returns what it saw.

  The output goes only to `<model_dir>/logs/<label>.<n>.log` (a new file per attempt); progress,
  losses, router metrics and throughput come from the event files, polled every `poll_seconds`.
  """
  gfile = _gfile()
  logs_dir = os.path.join(model_dir, "logs")
  gfile.makedirs(logs_dir)
  n = 0
  while gfile.exists(os.path.join(logs_dir, f"{label}.{n}.log")):
    n += 1
  log_path = os.path.join(logs_dir, f"{label}.{n}.log")
  cmd = command(model_dir, gin_files, gin_params, module_imports, extra_flags)
  first_step = (latest_checkpoint_step(model_dir) or 0) + 1
  started, start = time.time(), time.monotonic()
  progress = Progress(model_dir, tokens_per_step, first_step=first_step, every=every,
                      label=label, monitor=monitor, since=started)
  run_env = dict(os.environ if env is None else env)
  run_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  tail = collections.deque(maxlen=25)
  returncode = None
  with gfile.GFile(log_path, "w") as log, _SigtermAsExit():
    log.write(shell_quote(cmd) + "\n")
    log.write(f"{STARTED_TAG}{started}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=run_env, bufsize=1,
                            preexec_fn=_die_with_parent(os.getpid()))
    copier = threading.Thread(target=_copy_output, args=(proc.stdout, log, tail), daemon=True)
    copier.start()
    try:
      while proc.poll() is None:
        time.sleep(poll_seconds)
        for line in progress.poll():
          show(line)
        if progress.diverged is not None:
          _stop(proc)
          break
        if timeout is not None and time.monotonic() - start > timeout:
          _stop(proc)
          show(f"[{label}] stopped: over its time limit of {timeout} s")
          break
    finally:
      returncode = _stop(proc)
      copier.join(30)
  if progress.diverged is None:
    for line in progress.poll(final=True):
      show(line)
  result = RunResult(model_dir=model_dir, command=cmd, returncode=returncode,
                     steps=progress.steps, losses=progress.losses, router=progress.router,
                     diverged=progress.diverged, seconds=time.monotonic() - start,
                     tokens_per_second=progress.tokens_per_second(), log_path=log_path,
                     started=started)
  if returncode != 0 and progress.diverged is None:
    show(f"[{label}] t5_mesh_transformer exited with {returncode}; last lines of {log_path}:\n"
         + "".join(tail))
  return result


def _attempt_of_log(log_path):
  """(model_dir, start time) of the attempt that wrote `<model_dir>/logs/<label>.<n>.log`."""
  with _gfile().GFile(log_path) as f:
    head = [f.readline() for _ in range(3)]
  started = None
  for line in head:
    if line.startswith(STARTED_TAG):
      started = float(line[len(STARTED_TAG):])
  if started is None:
    raise ValueError(f"{log_path}: not a log of st_moe.experiments.runner (no '{STARTED_TAG}' "
                     "line): call eval_results(model_dir, since=result.started)")
  return os.path.dirname(os.path.dirname(log_path)), started


def steps_and_losses(model_dir):
  """The whole training curve of a model_dir from its event files: (steps, losses), one loss per
  global step (where attempts overlap, the later one wins)."""
  reader = events.EventReader(model_dir, lambda tag: tag == events.LOSS_TAG)
  reader.poll()
  return reader.curve(events.LOSS_TAG)


def eval_results(model_dir, since=None, eval_dir=None):
  """Evaluation results of a model_dir from its event files, sorted by global step.

  Args:
    model_dir: the run's model_dir (its `eval*` folders are read); or the log of one attempt
      (`RunResult.log_path`), which reads that attempt's evaluations.
    since: a unix time (e.g. `RunResult.started`): only event files created from then on, i.e.
      the evaluations of that attempt.
    eval_dir: only this folder (e.g. "eval_validation_80"); default all.

  Returns:
    [(global step, {metric: value})]; the metrics include the router's, averaged over the
    evaluation batches (`<scope>/router/<metric>`; `events.summarise_router_metrics` averages
    them over the layers).
  """
  if str(model_dir).endswith(".log"):  # a run's log: that attempt's evaluations
    model_dir, since = _attempt_of_log(model_dir)
  found = []
  for name, by_step in events.evaluations(model_dir, since=since).items():
    if eval_dir is not None and name != eval_dir:
      continue
    for step, metrics in by_step.items():
      found.append((step, metrics))
  return sorted(found, key=lambda item: item[0])


def tokens_per_step(batch_size, sequence_length: Dict[str, int]):
  """Tokens a step trains on: sequences x (input + target length), padding included."""
  return batch_size * sum(sequence_length.values())


def format_seconds(seconds):
  return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def read_json(path):
  """A run's bookkeeping file (a summary, a cached count), or None when it is not there."""
  gfile = _gfile()
  if gfile.exists(path):
    with gfile.GFile(path) as f:
      return json.load(f)
  return None


def write_json(path, value):
  """Writes `value` to `path` atomically: an interrupted write never leaves a half file behind."""
  gfile = _gfile()
  folder = os.path.dirname(path)
  if folder:
    gfile.makedirs(folder)
  tmp = f"{path}.tmp"
  with gfile.GFile(tmp, "w") as f:
    f.write(json.dumps(value, indent=2, sort_keys=True))
  gfile.rename(tmp, path, overwrite=True)
