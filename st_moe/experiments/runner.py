"""Runs `t5_mesh_transformer` as a subprocess, shows progress, and stops a diverged run.

The demo and the table-reproduction tool train every model through the same entry point users run
on TPU. This module builds the command line, streams the run's log to a file, and turns the lines the
training loop prints into progress (step, loss, tokens/s, router metrics), applying the divergence
rule of `st_moe.experiments.divergence` as the run goes: a diverged run is killed and reported, never continued.

Lines parsed from the run's output:
  `step, tf_loss[<loss>][<step>]`            printed by mesh_tensorflow's CPU training loop
  `st_moe_router[<name>][<z_loss>][<dropped>]`  printed by SparseFFN when its `print_metrics` is on
  `Saving dict for global step <n>: k = v, ...`  the Estimator's evaluation result (perplexity_eval)
Re-running into the same model_dir resumes from its last checkpoint (the Estimator restores it).
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

from st_moe.experiments import divergence as divergence_lib

STEP_RE = re.compile(r"step, tf_loss\[([^\]]+)\]\[(\d+)\]")
FIRST_STEP_TAG = "# st_moe.experiments.runner: first step "  # written under the command line of every log
ROUTER_RE = re.compile(r"st_moe_router\[([^\]]+)\]\[([^\]]+)\]\[([^\]]+)\]")
EVAL_RE = re.compile(r"Saving dict for global step (\d+): (.*)$")


def t5_mesh_transformer_executable():
  """The console script installed beside the running interpreter."""
  exe = os.path.join(os.path.dirname(sys.executable), "t5_mesh_transformer")
  if not os.path.exists(exe):
    raise FileNotFoundError(
        f"t5_mesh_transformer not found at {exe}: run inside the project's .venv (make venv)")
  return exe


def command(model_dir, gin_files, gin_params=(), module_imports=(), extra_flags=()):
  """The t5_mesh_transformer command line for one run."""
  cmd = [t5_mesh_transformer_executable(), f"--model_dir={model_dir}"]
  cmd += [f"--module_import={m}" for m in module_imports]
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
  if not os.path.exists(path):
    return None
  with open(path) as f:
    m = re.search(r'model_checkpoint_path: "[^"]*ckpt-(\d+)"', f.read())
  return int(m.group(1)) if m else None


@dataclasses.dataclass
class RunResult:
  model_dir: str
  command: List[str]
  returncode: Optional[int]
  steps: List[int] = dataclasses.field(default_factory=list)
  losses: List[float] = dataclasses.field(default_factory=list)
  router: Dict[str, List[float]] = dataclasses.field(default_factory=dict)  # z_loss, dropped per step
  diverged: Optional[divergence_lib.Divergence] = None
  seconds: float = 0.0
  tokens_per_second: Optional[float] = None
  log_path: str = ""

  @property
  def ok(self):
    return self.returncode == 0 and self.diverged is None


class ProgressParser:
  """Turns output lines into (step, loss, router metrics) and a progress line now and then."""

  def __init__(self, tokens_per_step, every=10, label="", monitor=None, clock=time.monotonic,
               first_step=None):
    """first_step: the number of the first step line (the resumed checkpoint's step + 1); None
    takes the step the line prints, which may be one lower (see feed)."""
    self.tokens_per_step = tokens_per_step
    self.first_step = first_step
    self.every = every
    self.label = label
    self.monitor = monitor
    self.clock = clock
    self.steps, self.losses = [], []
    self.router_pending = []  # (z_loss, dropped) of the sparse layers since the last step line
    self.router = {"z_loss": [], "dropped": []}
    self.step_times = []  # (clock, step) of every step line
    self.diverged = None

  def tokens_per_second(self):
    """Throughput over the steps seen (the first step, which includes start-up, is excluded)."""
    if len(self.step_times) < 2:
      return None
    (t0, s0), (t1, s1) = self.step_times[0], self.step_times[-1]
    return (s1 - s0) * self.tokens_per_step / (t1 - t0) if t1 > t0 else None

  def feed(self, line):
    """Consumes one output line; returns a progress line to show, or None."""
    if line.startswith(FIRST_STEP_TAG) and not self.steps:  # a saved log's own first step
      self.first_step = int(line[len(FIRST_STEP_TAG):])
      return None
    m = ROUTER_RE.search(line)
    if m:
      self.router_pending.append((float(m.group(2)), float(m.group(3))))
      return None
    m = STEP_RE.search(line)
    if not m:
      return None
    loss, step = float(m.group(1)), int(m.group(2))
    if self.steps:
      # mesh_tensorflow prints the global step read racing with its increment (it may show the
      # step before or after it, and step n+1 twice): count lines after the first.
      step = self.steps[-1] + 1
    elif self.first_step is not None:
      step = self.first_step
    self.steps.append(step)
    self.losses.append(loss)
    self.step_times.append((self.clock(), step))
    if self.router_pending:
      n = len(self.router_pending)
      self.router["z_loss"].append(sum(z for z, _ in self.router_pending) / n)
      self.router["dropped"].append(sum(d for _, d in self.router_pending) / n)
      self.router_pending = []
    if self.monitor is not None and self.diverged is None:
      self.diverged = self.monitor.update(step, loss)
      if self.diverged:
        return f"[{self.label}] DIVERGED: {self.diverged.reason}"
    if step % self.every == 0 or len(self.steps) == 1:
      return self.progress_line()
    return None

  def progress_line(self):
    step, loss = self.steps[-1], self.losses[-1]
    text = f"[{self.label}] step {step:5d}  loss {loss:7.4f}"
    if self.router["z_loss"]:
      text += (f"  router z-loss {self.router['z_loss'][-1]:7.4f}"
               f"  dropped {100 * self.router['dropped'][-1]:5.1f}%")
    tps = self.tokens_per_second()
    if tps:
      text += f"  {tps:8.0f} tokens/s"
    return text


def run(model_dir, gin_files, gin_params=(), *, tokens_per_step, label="run", every=10,
        monitor: Optional[divergence_lib.DivergenceMonitor] = None,
        show: Callable[[str], None] = print, module_imports=(), extra_flags=(),
        env=None, timeout=None) -> RunResult:
  """Runs one t5_mesh_transformer job to the end (or until it diverges); returns what it saw.

  The full output goes to `<model_dir>/logs/<label>.<n>.log` (a new file per attempt).
  """
  os.makedirs(os.path.join(model_dir, "logs"), exist_ok=True)
  n = 0
  while os.path.exists(os.path.join(model_dir, "logs", f"{label}.{n}.log")):
    n += 1
  log_path = os.path.join(model_dir, "logs", f"{label}.{n}.log")
  cmd = command(model_dir, gin_files, gin_params, module_imports, extra_flags)
  first_step = (latest_checkpoint_step(model_dir) or 0) + 1
  parser = ProgressParser(tokens_per_step, every=every, label=label, monitor=monitor,
                          first_step=first_step)
  start = time.monotonic()
  run_env = dict(os.environ if env is None else env)
  run_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  with open(log_path, "w") as log:
    log.write(shell_quote(cmd) + "\n")
    log.write(f"{FIRST_STEP_TAG}{first_step}\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=run_env, bufsize=1)
    try:
      for line in proc.stdout:
        log.write(line)
        shown = parser.feed(line)
        if shown:
          show(shown)
        if parser.diverged is not None:
          proc.kill()
          break
        if timeout is not None and time.monotonic() - start > timeout:
          proc.kill()
          show(f"[{label}] stopped: over its time limit of {timeout} s")
          break
    finally:
      returncode = proc.wait()
  result = RunResult(model_dir=model_dir, command=cmd, returncode=returncode,
                     steps=parser.steps, losses=parser.losses, router=parser.router,
                     diverged=parser.diverged, seconds=time.monotonic() - start,
                     tokens_per_second=parser.tokens_per_second(), log_path=log_path)
  if returncode != 0 and parser.diverged is None:
    with open(log_path) as f:
      tail = f.readlines()[-25:]
    show(f"[{label}] t5_mesh_transformer exited with {returncode}; last lines of {log_path}:\n"
         + "".join(tail))
  return result


def parse_eval_line(line):
  """(global step, {metric: value}) from the Estimator's 'Saving dict' line, or None."""
  m = EVAL_RE.search(line)
  if not m:
    return None
  metrics = {}
  for item in m.group(2).split(", "):
    key, _, value = item.partition(" = ")
    try:
      metrics[key.strip()] = float(value)
    except ValueError:
      continue
  return int(m.group(1)), metrics


def eval_results(log_path):
  """Every evaluation result in a run's log, in order."""
  found = []
  with open(log_path) as f:
    for line in f:
      parsed = parse_eval_line(line)
      if parsed:
        found.append(parsed)
  return found


def steps_and_losses(model_dir):
  """The whole training curve of a model_dir, from every attempt's log (later attempts win)."""
  by_step = {}
  logs_dir = os.path.join(model_dir, "logs")
  if not os.path.isdir(logs_dir):
    return [], []
  def attempt(name):  # "<label>.<n>.log" sorted by n
    parts = name.rsplit(".", 2)
    return (parts[0], int(parts[1])) if len(parts) == 3 and parts[1].isdigit() else (name, 0)
  for name in sorted(os.listdir(logs_dir), key=attempt):
    parser = ProgressParser(tokens_per_step=1)  # numbers the steps as the live run did
    with open(os.path.join(logs_dir, name)) as f:
      for line in f:
        parser.feed(line)
    by_step.update(zip(parser.steps, parser.losses))
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def tokens_per_step(batch_size, sequence_length: Dict[str, int]):
  """Tokens a step trains on: sequences x (input + target length), padding included."""
  return batch_size * sum(sequence_length.values())


def format_seconds(seconds):
  return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def read_json(path):
  """A run's bookkeeping file (a summary, a cached count), or None when it is not there."""
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def write_json(path, value):
  """Writes `value` to `path` atomically: an interrupted write never leaves a half file behind."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
