"""One orchestration for the demo and the paper's tables: train, evaluate, trace, resume, bookkeeping.

A `Job` is one model in one folder, trained and evaluated through `t5_mesh_transformer` (the entry
point users run on TPU, via st_moe.experiments.runner). Its stages:

  train(job, steps, ...)        trains to `steps`, resuming from the folder's last checkpoint; a run
                                the divergence rule stops (NaN, a spike that stays, a frozen loss or
                                a routing collapse: st_moe.experiments.divergence) is recorded as
                                diverged and never continued; its summary says which.
  evaluate(job, name, ...)      a `perplexity_eval` (or any eval gin file) at one checkpoint, cached
                                in `<model_dir>/<name>.json` for that step and those settings.
  trace(job, {cf: folder}, ...) the routing tracer (st_moe.analysis.tracing) at one or more eval
                                capacity factors, in a fresh Python (gin's configuration is
                                process-wide), cached per folder for the checkpoint's step.
  count(gin_files, ...)         parameters and FLOPs per token (st_moe.analysis.model_graph), in a
                                fresh Python too, cached by its arguments.

Bookkeeping files (all JSON, written atomically with tf.io.gfile so gs:// folders work):
  <model_dir>/job.json          the job's settings, written before the first step; a later call
                                with other settings stops with an error instead of mixing runs.
  <model_dir>/train_done.json   written when training reached `steps`: a rerun skips it.
  <model_dir>/diverged.json     written when the divergence rule stopped it: a rerun skips it too.
  <model_dir>/<name>.json       an evaluation's result; <trace folder>/trace_meta.json a trace's.

A later stage (fine-tuning from another job's checkpoint, decoding evaluation) is the same calls:
`train(job, steps, init_checkpoint=...)` and `evaluate(job, name, eval_gin_files=("eval.gin",),
parse=...)`.

Children run as `python -m st_moe.experiments.jobs '<json>'` (see `child_main`), never by a path
into tools/, so an installed wheel works the same.
"""
import concurrent.futures
import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from st_moe.experiments import divergence
from st_moe.experiments import runner


# ---------------------------------------------------------------------------------------------
# Files through tf.io.gfile (local paths and gs:// alike).


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (slow: only when needed)
  return tf.io.gfile


def join(*parts):
  """os.path.join that keeps gs:// paths intact."""
  return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]]) if (
      parts[0].startswith("gs://")) else os.path.join(*parts)


def exists(path):
  return _gfile().exists(path)


def read_text(path):
  with _gfile().GFile(path, "r") as f:
    return f.read()


def write_text(path, text):
  gfile = _gfile()
  gfile.makedirs(os.path.dirname(path) or ".")
  with gfile.GFile(path, "w") as f:
    f.write(text)


def read_json(path):
  """A bookkeeping file's value, or None when it is not there."""
  return json.loads(read_text(path)) if exists(path) else None


def write_json(path, value):
  """Writes `value` atomically (a temporary file renamed over `path`): never a half file."""
  gfile = _gfile()
  gfile.makedirs(os.path.dirname(path) or ".")
  tmp = f"{path}.tmp"
  with gfile.GFile(tmp, "w") as f:
    f.write(json.dumps(value, indent=2, sort_keys=True))
  gfile.rename(tmp, path, overwrite=True)


def abspath(path):
  return path if path.startswith("gs://") else os.path.abspath(path)


# ---------------------------------------------------------------------------------------------
# A run's shape: the one place batch size and lengths become gin bindings and tokens per step.


@dataclasses.dataclass(frozen=True)
class Shape:
  """Sequences per batch and the encoder / decoder lengths of a run."""
  batch_size: int
  inputs_length: int
  targets_length: int

  def sequence_length(self) -> Dict[str, int]:
    return {"inputs": self.inputs_length, "targets": self.targets_length}

  def tokens_per_step(self) -> int:
    """Tokens a step trains on: sequences x (input + target length), padding included."""
    return runner.tokens_per_step(self.batch_size, self.sequence_length())

  def gin_params(self) -> List[str]:
    return [f"utils.run.batch_size = ('sequences_per_batch', {self.batch_size})",
            f"utils.run.sequence_length = {self.sequence_length()!r}"]

  def validate(self):
    """Raises ValueError naming the first flag that cannot work."""
    for name, value, low in (("--batch_size", self.batch_size, 1),
                             ("--inputs_length", self.inputs_length, 2),
                             ("--targets_length", self.targets_length, 2)):
      if not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


@dataclasses.dataclass
class Job:
  """One model trained in one folder.

  Attributes:
    name: shown in front of every progress line.
    model_dir: the run's folder (checkpoints, logs, bookkeeping).
    gin_files: model, layout and run files (t5's dataset.gin is added in front for
      t5_mesh_transformer; the tracer and the counter build the model from these alone).
    gin_params: bindings on top (variant, seed, the user's --gin_param), after the shape's.
    task: the SeqIO task or mixture trained and evaluated on (MIXTURE_NAME).
    shape: batch size and lengths.
    extra_flags: more t5_mesh_transformer flags (e.g. --tpu=NAME).
  """
  name: str
  model_dir: str
  gin_files: List[str]
  gin_params: List[str]
  task: str
  shape: Shape
  extra_flags: Tuple[str, ...] = ()

  def model_params(self) -> List[str]:
    """Bindings that build the model (the shape's and the job's): for the tracer and counter."""
    return self.shape.gin_params() + list(self.gin_params)

  def run_files(self) -> List[str]:
    return ["dataset.gin"] + list(self.gin_files)

  def run_params(self) -> List[str]:
    return [f"MIXTURE_NAME = '{self.task}'"] + self.model_params()

  def settings(self):
    return {"gin_files": self.run_files(), "gin_params": self.run_params(),
            "extra_flags": list(self.extra_flags)}

  def path(self, *parts):
    return join(self.model_dir, *parts)


def failed(summary) -> bool:
  """True for a run that diverged or crashed: its evaluation is skipped, and it is reported."""
  return summary.get("status") != "done"


def _check_settings(job: Job):
  """Records the job's settings in job.json, or raises if the folder holds another run."""
  path = job.path("job.json")
  recorded = read_json(path)
  now = job.settings()
  if recorded is None:
    write_json(path, now)
    return
  for key in now:
    if recorded.get(key) != now[key]:
      was, new = recorded.get(key) or [], now[key]
      diff = ([f"-{v}" for v in was if v not in new] + [f"+{v}" for v in new if v not in was])
      raise ValueError(
          f"[{job.name}] {job.model_dir} holds a run with other {key} ({'; '.join(diff) or was}); "
          f"use another output folder, or delete {job.model_dir} to start this one afresh")


def _mean_tail(values, frac=0.25):
  values = [v for v in values or [] if v is not None]
  if not values:
    return None
  tail = values[-max(1, int(len(values) * frac)):]
  return sum(tail) / len(tail)


def _last(values):
  return values[-1] if values else None


# st_moe.guard.STOP_MESSAGE_PREFIX: the graph's guard (st_moe.GuardedOptimizer) stops a run whose
# gradients stay non-finite with an error starting so, on CPU and TPU alike. (Not imported: that
# module needs TensorFlow and mesh_tensorflow.)
GUARD_STOP = "st_moe.GuardedOptimizer stopped the run"


def _guard_stop(log_path, step):
  """A Divergence from the guard's error in a failed run's log, or None."""
  if not log_path or not exists(log_path):
    return None
  for line in reversed(read_text(log_path).splitlines()):
    at = line.find(GUARD_STOP)
    if at >= 0:
      return divergence.Divergence(step=step, loss=float("nan"), reason=line[at:].strip())
  return None


def _fall_back_to_readable(job: Job, show):
  """Resumes from the newest readable checkpoint: an unreadable latest one (a partial write, e.g.
  killed while saving) is set aside with a warning (st_moe.experiments.checkpoints.fall_back)."""
  if not exists(job.path("checkpoint")):
    return
  from st_moe.experiments import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    warning = checkpoints.fall_back(job.model_dir)
  except checkpoints.UnreadableCheckpointError as e:  # nothing readable: t5_mesh_transformer's
    show(f"[{job.name}] WARNING: {e}")  # pre-flight check (st_moe.guard) names it and stops
    return
  if warning:
    show(f"[{job.name}] WARNING: {warning}")


def train(job: Job, steps: int, checkpoint_every: int, *, show=print, every=None,
          monitor_factory: Callable[[], divergence.DivergenceMonitor] = divergence.DivergenceMonitor,
          init_checkpoint: Optional[str] = None, label: Optional[str] = None) -> Dict:
  """Trains `job` to `steps` (resuming), unless its folder says it finished or diverged.

  Args:
    job: the Job.
    steps: total training steps (utils.run.train_steps).
    checkpoint_every: steps between checkpoints (the granularity of resuming).
    show: called with every progress line.
    every: steps between progress lines (default: steps / 10).
    monitor_factory: makes the divergence monitor; on resume it is first fed the curve so far.
    init_checkpoint: start from this checkpoint's weights (utils.run.init_checkpoint), e.g. to
      fine-tune another job's model.
    label: tags the progress lines and names the logs <model_dir>/logs/<label>.<n>.log
      (default: the job's name).

  Returns:
    the summary dict (also in train_done.json or diverged.json): status "done", "diverged" or
    "failed"; diverged (the reason) and diverged_step; final_train_loss; tokens_per_second;
    step_seconds; router_z_loss, router_max_logit and fraction_dropped (last step);
    train_fraction_dropped (mean of the last quarter); command.
  """
  done_path, div_path = job.path("train_done.json"), job.path("diverged.json")
  for path, what in ((done_path, "trained"), (div_path, "diverged")):
    done = read_json(path)
    if done and done.get("train_steps") == steps:
      _check_settings(job)
      show(f"[{job.name}] already {what} (delete {path} to rerun)"
           + (f": {done['diverged']}" if what == "diverged" else ""))
      return done
  _check_settings(job)
  params = job.run_params() + [f"utils.run.train_steps = {steps}",
                               f"utils.run.save_checkpoints_steps = {checkpoint_every}",
                               f"utils.run.iterations_per_loop = {checkpoint_every}"]
  # A resumed run reads on where it stopped: without this the Estimator's input restarts at the
  # first batch of the seeded data order, so a run killed and resumed trains on other batches
  # than the same run uninterrupted (mesh_tensorflow's utils.run.skip_seen_data: it skips the
  # checkpoint's step less seen_data_init_step batches; a fine-tuning run counts from its
  # pretrained checkpoint's step). The skipped batches are read and dropped once per resume.
  init_step = 0
  if init_checkpoint:
    from st_moe.experiments import checkpoints  # pylint: disable=g-import-not-at-top
    params.append(f"utils.run.init_checkpoint = '{init_checkpoint}'")
    init_step = checkpoints.step_of(init_checkpoint) or 0
  params += ["utils.run.skip_seen_data = True", f"utils.run.seen_data_init_step = {init_step}"]
  summary = {"train_steps": steps, "gin_files": job.run_files()}
  _fall_back_to_readable(job, show)
  start = runner.latest_checkpoint_step(job.model_dir) or 0
  # The curve so far primes the monitor, so that a resumed run is judged on its whole history.
  monitor = monitor_factory()
  primed = None
  for step, loss in zip(*runner.steps_and_losses(job.model_dir)):
    if step <= start:
      primed = primed or monitor.update(step, loss)
  result = None
  if primed:
    show(f"[{job.name}] its curve up to the checkpoint at step {start} already diverged")
  elif start >= steps:  # trained to the end, bookkeeping lost (e.g. killed right after)
    show(f"[{job.name}] its checkpoint is at step {start} >= {steps}: nothing left to train")
  else:
    first = start + 1
    if init_checkpoint and not start:  # fine-tuning: the global step counts on from the checkpoint
      first = init_step + 1
    show(f"[{job.name}] training steps {first}..{steps}"
         + (" (resuming from its checkpoint)" if start else "")
         + (f" from {init_checkpoint}" if init_checkpoint and not start else ""))
    result = runner.run(job.model_dir, job.run_files(), params,
                        tokens_per_step=job.shape.tokens_per_step(), label=label or job.name,
                        every=every or max(1, steps // 10), monitor=monitor, show=show,
                        extra_flags=job.extra_flags)
  curve_steps, curve = runner.steps_and_losses(job.model_dir)
  router = result.router if result else {}
  tps = result.tokens_per_second if result else None
  diverged = primed or (result.diverged if result else None)
  if not diverged and result is not None and result.returncode != 0:
    diverged = _guard_stop(result.log_path, _last(curve_steps) or start)
  summary.update(
      returncode=result.returncode if result else 0,
      command=runner.shell_quote(result.command if result else
                                 runner.command(job.model_dir, job.run_files(), params,
                                                extra_flags=job.extra_flags)),
      diverged=diverged.reason if diverged else None,
      diverged_step=diverged.step if diverged else None,
      final_train_loss=_last(curve), final_step=_last(curve_steps),
      tokens_per_second=tps, step_seconds=job.shape.tokens_per_step() / tps if tps else None,
      router_z_loss=_last(router.get("z_loss")), fraction_dropped=_last(router.get("dropped")),
      router_max_logit=_last(router.get("max_logit")),
      train_fraction_dropped=_mean_tail(router.get("dropped")),
      seconds=result.seconds if result else 0.0)
  if diverged:
    summary["status"] = "diverged"
    show(f"[{job.name}] DIVERGED: {diverged.reason}; stopped, not evaluated")
    write_json(div_path, summary)
  elif result is not None and result.returncode != 0:
    summary["status"] = "failed"
    summary["log"] = result.log_path
    summary["error"] = (f"t5_mesh_transformer exited with {result.returncode} at step "
                        f"{_last(curve_steps) or start}; log: {result.log_path}")
  elif (runner.latest_checkpoint_step(job.model_dir) or 0) < steps:
    summary["status"] = "failed"
    summary["error"] = (f"training ended at checkpoint step "
                        f"{runner.latest_checkpoint_step(job.model_dir)}, not {steps}")
  else:
    summary["status"] = "done"
    write_json(done_path, summary)
  return summary


# The evaluation data's seed. Without one, seqio draws the random preprocessing of the validation
# split (span corruption's noise masks) anew in every process, so two evaluations of the same
# checkpoint differed (st_moe_small, bfloat16: -5.146 and -5.172 nats on 20 batches; with this
# seed -5.1739 both times). With it every evaluation of every run sees the same examples.
EVAL_DATA_SEED = "mesh_eval_dataset_fn.seed = 0"


class MissingCheckpointError(RuntimeError):
  """An evaluation that is not cached needs a checkpoint the run no longer has (or only in part)."""


def _evaluation(job: Job, name: str, eval_steps: int, gin_params: Sequence[str],
                eval_gin_files: Sequence[str], step):
  """(step, the bindings with EVAL_DATA_SEED first, cache key, cached result or None)."""
  step = runner.latest_checkpoint_step(job.model_dir) if step is None else step
  gin_params = [EVAL_DATA_SEED] + list(gin_params)
  key = {"step": step, "eval_steps": eval_steps, "gin_params": gin_params,
         "eval_gin_files": list(eval_gin_files)}
  cached = read_json(job.path(f"{name}.json"))
  if cached and all(cached.get(k) == v for k, v in key.items()):
    return step, gin_params, key, cached
  return step, gin_params, key, None


def _unreadable(job: Job, name: str, gin_params: Sequence[str], step):
  """The MissingCheckpointError of an evaluation at `step` whose checkpoint cannot be read, or None
  (gin_params: _evaluation's, EVAL_DATA_SEED first)."""
  if step is None:
    return None
  from st_moe.experiments import checkpoints  # pylint: disable=g-import-not-at-top
  reason = checkpoints.readable(join(job.model_dir, f"model.ckpt-{step}"))
  if reason is None:
    return None
  return MissingCheckpointError(
      f"[{job.name}] evaluation {name} ({' '.join(gin_params[1:]) or 'default settings'}) is "
      f"not cached and needs the step-{step} checkpoint of {job.model_dir}, which cannot be "
      f"read: {reason} (a run restored by tools/archive_runs.py keeps its results, not its "
      f"checkpoints). To evaluate it, move {job.model_dir} aside and rerun the same command: "
      "it trains the run again (same seed; equivalent, not bit-identical for a sparse model: "
      "README, 'One seed, one run').")


def missing_checkpoint(job: Job, name: str, *, eval_steps: int, gin_params: Sequence[str] = (),
                       eval_gin_files: Sequence[str] = ("perplexity_eval.gin",),
                       step=None) -> Optional[MissingCheckpointError]:
  """The error evaluate() with the same arguments would raise before running anything: the
  evaluation is not cached and the checkpoint it needs cannot be read. None when it is cached,
  when its checkpoint is readable, and when the folder has no checkpoint yet (nothing to check)."""
  step, gin_params, _, cached = _evaluation(job, name, eval_steps, gin_params, eval_gin_files,
                                            step)
  return None if cached is not None else _unreadable(job, name, gin_params, step)


def evaluate(job: Job, name: str, *, eval_steps: int, gin_params: Sequence[str] = (),
             eval_gin_files: Sequence[str] = ("perplexity_eval.gin",), step=None, show=print,
             parse: Callable[[str], Dict] = None) -> Dict:
  """Evaluates `job` at `step` (default: its last checkpoint) on the task's validation split.

  Args:
    job: the Job.
    name: names the result file <model_dir>/<name>.json and the log.
    eval_steps: batches evaluated (utils.run.perplexity_eval_steps).
    gin_params: more bindings (e.g. the eval capacity factor), after EVAL_DATA_SEED.
    eval_gin_files: the evaluation's run file(s), after the job's.
    step: the checkpoint's step.
    show: progress lines.
    parse: log path -> {metric: value}; default: the Estimator's last "Saving dict" line.

  Returns:
    {"step", "eval_steps", metric: value..., "command"}; cached for the same step and settings.

  Raises:
    MissingCheckpointError: not cached, and the checkpoint cannot be read (missing_checkpoint).
  """
  step, gin_params, key, cached = _evaluation(job, name, eval_steps, gin_params, eval_gin_files,
                                              step)
  if cached is not None:
    return cached
  error = _unreadable(job, name, gin_params, step)
  if error is not None:
    raise error
  path = job.path(f"{name}.json")
  show(f"[{job.name}] evaluating step {step} on {job.task}:validation ({name})")
  params = job.run_params() + ["utils.run.dataset_split = 'validation'",
                               f"utils.run.eval_checkpoint_step = {step}",
                               f"utils.run.perplexity_eval_steps = {eval_steps}"] + list(gin_params)
  result = runner.run(job.model_dir, job.run_files() + list(eval_gin_files), params,
                      tokens_per_step=1, label=name, show=show, extra_flags=job.extra_flags)
  if parse is None:
    found = runner.eval_results(result.log_path) if result.returncode == 0 else []
    metrics = dict(found[-1][1], step=found[-1][0]) if found else None
  else:
    metrics = parse(result.log_path) if result.returncode == 0 else None
  if not metrics:
    raise RuntimeError(f"[{job.name}] evaluation {name} failed (exit {result.returncode}); log: "
                       f"{result.log_path}")
  summary = dict(key, **metrics, command=runner.shell_quote(result.command))
  write_json(path, summary)
  return summary


def capacity_params(capacity_factor_eval=None, capacity_factor_train=None) -> List[str]:
  """Bindings of the sparse layers' capacity factors (the gin macros and SparseFFN's own)."""
  params = []
  for which, value in (("train", capacity_factor_train), ("eval", capacity_factor_eval)):
    if value is not None:
      params += [f"capacity_factor_{which} = {value}",
                 f"st_moe.SparseFFN.capacity_factor_{which} = {value}"]
  return params


# ---------------------------------------------------------------------------------------------
# Children: the tracer and the counter in a fresh Python, through the installed package.


def child_command(spec) -> List[str]:
  return [sys.executable, "-m", "st_moe.experiments.jobs", json.dumps(spec, sort_keys=True)]


def _die_with_parent():
  """A preexec_fn that has the child SIGKILLed when this process dies (Linux; else None), so that
  a killed demo or table leaves no tracer or counter behind. libc is loaded here, in the parent:
  the child, forked from a process with threads, only calls prctl and getppid before it execs."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  parent = os.getpid()

  def set_death_signal():
    prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != parent:  # the parent died before prctl took effect
      os._exit(1)  # pylint: disable=protected-access
  return set_death_signal


def _run_child(spec, what, show):
  cmd = child_command(spec)
  show(f"[{what}] {runner.shell_quote(cmd)}")
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env,
                        preexec_fn=_die_with_parent())
  if proc.returncode != 0:
    raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return cmd


def trace(job: Job, outputs: Dict[float, str], *, num_tokens: int, split="validation",
          batch_size=8, show=print) -> Dict[float, Dict]:
  """Routing traces of `job`'s last checkpoint, one per eval capacity factor (cached).

  Calls st_moe.analysis.tracing.trace / analyse / write_report in one child process for every
  factor not yet traced at this step.

  Args:
    job: the Job (a sparse model).
    outputs: {eval capacity factor: folder for routing.md, routing.json and the PNGs}.
    num_tokens: encoder tokens to trace.
    split: the task's split.
    batch_size: sequences per traced batch.
    show: progress lines.

  Returns:
    {factor: {"layers": routing.json's list, "markdown": routing.md's text, "command": str,
    "step": int}}.
  """
  step = runner.latest_checkpoint_step(job.model_dir)
  if step is None:
    raise FileNotFoundError(f"[{job.name}] no checkpoint in {job.model_dir} to trace")
  spec = {"op": "trace", "gin_files": list(job.gin_files), "gin_params": job.model_params(),
          "model_dir": job.model_dir, "checkpoint": job.path(f"model.ckpt-{step}"),
          "task": job.task, "split": split, "num_tokens": num_tokens, "batch_size": batch_size,
          "sequence_length": job.shape.sequence_length(), "outputs": []}
  meta = {cf: dict(step=step, task=job.task, split=split, num_tokens=num_tokens,
                   gin_params=job.model_params(), capacity_factor_eval=cf) for cf in outputs}
  def cached(cf):  # the meta file also records the command that wrote it
    recorded = read_json(join(outputs[cf], "trace_meta.json")) or {}
    return ({k: recorded.get(k) for k in meta[cf]} == meta[cf]
            and exists(join(outputs[cf], "routing.json")))
  todo = [cf for cf in outputs if not cached(cf)]
  command = None
  if todo:
    spec["outputs"] = [[cf, outputs[cf]] for cf in todo]
    show(f"[{job.name}] tracing routing at step {step} (eval capacity factor "
         f"{', '.join(f'{cf:g}' for cf in todo)})")
    command = runner.shell_quote(_run_child(spec, "trace", show))
    for cf in todo:
      write_json(join(outputs[cf], "trace_meta.json"), dict(meta[cf], command=command))
  found = {}
  for cf, out in outputs.items():
    recorded = read_json(join(out, "trace_meta.json"))
    found[cf] = {"layers": read_json(join(out, "routing.json")),
                 "markdown": read_text(join(out, "routing.md")),
                 "command": recorded.get("command") or command, "step": step}
  return found


def count(gin_files: Sequence[str], gin_params: Sequence[str], *, task: str,
          sequence_length: Dict[str, int], cache_path: str) -> Dict:
  """Parameters and FLOPs per token (model_graph.count's dict) at the task's vocabulary (cached)."""
  spec = {"op": "count", "gin_files": list(gin_files), "gin_params": list(gin_params),
          "task": task, "sequence_length": dict(sequence_length)}
  cached = read_json(cache_path)
  if cached and cached.get("spec") == spec:
    return cached["counts"]
  tmp = cache_path + ".child"
  _run_child(dict(spec, output=tmp), "count", lambda line: None)
  counts = read_json(tmp)
  _gfile().remove(tmp)
  write_json(cache_path, {"spec": spec, "counts": counts})
  return counts


def _trace_child(spec):
  from st_moe.analysis import tracing  # pylint: disable=g-import-not-at-top
  for cf, out_dir in spec["outputs"]:
    params = list(spec["gin_params"]) + capacity_params(capacity_factor_eval=cf)
    traces, vocabulary = tracing.trace(
        spec["gin_files"], params, spec["model_dir"], spec["task"], spec["split"],
        spec["num_tokens"], spec["batch_size"], spec["sequence_length"], spec["checkpoint"])
    summaries = [tracing.analyse(t, vocabulary) for t in traces]
    tracing.write_report(summaries, out_dir,
                         title=f"Routing of {spec['task']}:{spec['split']} at eval capacity "
                               f"factor {cf:g}")


def _count_child(spec):
  import seqio  # pylint: disable=g-import-not-at-top
  import st_moe.register  # pylint: disable=g-import-not-at-top,unused-import  (registers tasks)
  from st_moe.analysis import model_graph  # pylint: disable=g-import-not-at-top
  vocab = seqio.get_mixture_or_task(spec["task"]).output_features["targets"].vocabulary
  params = list(spec["gin_params"]) + [
      f"utils.run.sequence_length = {spec['sequence_length']!r}"]
  model_graph.parse_gin(spec["gin_files"], params)
  graph = model_graph.build(vocab_size=vocab.vocab_size, batch_size=1, mesh_shape="",
                            layout_rules="")
  write_json(spec["output"], model_graph.count(graph).as_dict())


def child_main(argv):
  """`python -m st_moe.experiments.jobs '<json spec>'`: runs one child op ("trace" or "count")."""
  if len(argv) != 2:
    raise SystemExit("usage: python -m st_moe.experiments.jobs '<json spec>'")
  spec = json.loads(argv[1])
  ops = {"trace": _trace_child, "count": _count_child}
  if spec.get("op") not in ops:
    raise SystemExit(f"op={spec.get('op')!r}: must be one of {', '.join(ops)}")
  ops[spec["op"]](spec)


# ---------------------------------------------------------------------------------------------
# Several jobs side by side.


def run_all(items: Sequence, prepare, jobs: int, show=print, tag=lambda item: item.name):
  """prepare(item, show) for every item, `jobs` at a time; the results in the items' order.

  A tiny run spends most of its wall time in one Python thread (building and lowering the mtf
  graph, writing checkpoints' meta graphs), so two runs side by side on two cores take little more
  than one. With jobs > 1 every line shown is prefixed with its item's tag; the first failure
  cancels the items not yet started and is raised once the running ones end.
  """
  if jobs <= 1 or len(items) <= 1:
    return [prepare(item, show) for item in items]
  lock = threading.Lock()

  def show_for(item):
    prefix = f"[{tag(item)}]"
    def show_line(line):
      with lock:
        show(line if line.startswith(prefix) else f"{prefix} {line}")
    return show_line

  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    futures = [pool.submit(prepare, item, show_for(item)) for item in items]
    try:
      return [f.result() for f in futures]
    except BaseException:
      for f in futures:
        f.cancel()
      raise


def mean_std(values):
  """(mean, population std) of the values that are not None, or (None, None)."""
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return None, None
  mean = sum(values) / len(values)
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


if __name__ == "__main__":
  child_main(sys.argv)
