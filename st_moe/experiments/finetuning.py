"""Fine-tune a pretrained run and evaluate it by decoding: what the demo and the fine-tuning tables
(tools/reproduce.py finetune_*) share.

A fine-tuning job trains from the pretrained run's latest checkpoint (utils.run.init_checkpoint:
weights, optimizer slots unless filtered, and the global step, so `train_steps` counts on from the
checkpoint) through `t5_mesh_transformer` with finetune.gin, resuming from its own checkpoints
when interrupted; a second process decodes the validation split with eval.gin (greedy,
deterministic) at the last checkpoint, or at every fine-tuning checkpoint (the paper reports the
peak validation score over fine-tuning).
"""
import dataclasses
import functools
import math
import time
from typing import Dict, Sequence

from st_moe.experiments import divergence
from st_moe.experiments import jobs
from st_moe.experiments import runner

# The divergence rule judges the mean loss over the steps that see this many sequences
# (divergence.py, `smoothing`): a fine-tuning batch of 2-32 sequences with targets of a few tokens
# gives a per-step loss that moves by about a nat, the rule's own margin.
SMOOTHING_SEQUENCES = 256


def loss_smoothing(batch_size: int) -> int:
  """Steps whose mean loss the divergence rule judges at `batch_size` sequences per step."""
  return max(1, math.ceil(SMOOTHING_SEQUENCES / batch_size))


def decode_metrics_by_step(model_dir: str, task: str) -> Dict[int, Dict[str, float]]:
  """{step: {metric: value}} that eval.gin's decoding wrote for `task` (its event files)."""
  from st_moe.experiments import events  # pylint: disable=g-import-not-at-top
  return metrics_by_step(events.read_scalars(jobs.join(model_dir, "validation_eval")), task)


def metrics_by_step(scalars, task: str) -> Dict[int, Dict[str, float]]:
  """{step: {metric: value}} of the tags "eval/<task>/<metric>" in {tag: (steps, values)}; for a
  mixture, whose tasks write "eval/<task>_<member>/<metric>" (st_moe_super_glue ->
  st_moe_super_glue_boolq, ...), the metric is named "<member task>/<metric>"."""
  found = {}
  for tag, (steps, values) in scalars.items():
    if tag.startswith(f"eval/{task}/"):
      name = tag[len(f"eval/{task}/"):]
    elif tag.startswith(f"eval/{task}_"):
      name = tag[len("eval/"):]
    else:
      continue
    for step, value in zip(steps, values):
      found.setdefault(int(step), {})[name] = float(value)
  return found


def finetune(job: jobs.Job, decode_job: jobs.Job, pretrained_dir: str, steps: int, *,
             checkpoint_every: int, max_decode_length: int, decode_params: Sequence[str] = (),
             every_checkpoint: bool = False, show=print) -> Dict:
  """Fine-tunes `job` for `steps` steps from `pretrained_dir`'s latest checkpoint, then decodes.

  Args:
    job: the fine-tuning job (its gin files end in finetune.gin).
    decode_job: the same model_dir and task with the model's files alone (finetune.gin requires
      an init_checkpoint and binds training-only settings).
    pretrained_dir: the pretrained run's folder.
    steps: fine-tuning steps.
    checkpoint_every: steps between fine-tuning checkpoints.
    max_decode_length: Bitransformer.decode.max_decode_length (the targets' length).
    decode_params: more bindings of the decoding (e.g. its batch size).
    every_checkpoint: decode every checkpoint (eval_checkpoint_step = "all"), not only the last.
    show: progress lines.

  Returns:
    jobs.train's summary, with, when training worked, "decode" ({metric: value} at the last step,
    "step", "command"), "decode_by_step" ({step: {metric: value}} for the fine-tuning checkpoints:
    after the pretrained step), "pretrained_step" and "finetune_wall_seconds".
  """
  start = runner.latest_checkpoint_step(pretrained_dir)
  if start is None:
    raise ValueError(f"pretrained_dir={pretrained_dir!r}: holds no checkpoint to fine-tune from")
  clock = time.monotonic()
  monitor_factory = functools.partial(divergence.DivergenceMonitor,
                                      smoothing=loss_smoothing(job.shape.batch_size))
  summary = jobs.train(job, start + steps, checkpoint_every, show=show,
                       every=max(1, steps // 5), monitor_factory=monitor_factory,
                       init_checkpoint=jobs.join(pretrained_dir, f"model.ckpt-{start}"))
  if jobs.failed(summary):
    return summary
  step = runner.latest_checkpoint_step(job.model_dir)
  params = [f"Bitransformer.decode.max_decode_length = {max_decode_length}", *decode_params]
  if every_checkpoint:
    params.append("utils.run.eval_checkpoint_step = 'all'")

  def parse(log_path):
    del log_path
    by_step = {s: m for s, m in decode_metrics_by_step(job.model_dir, job.task).items()
               if s > start}
    return dict(by_step[step], step=step, by_step=by_step) if step in by_step else None

  decoded = jobs.evaluate(decode_job, "decode_all" if every_checkpoint else "decode",
                          eval_steps=1, eval_gin_files=("eval.gin",), show=show,
                          gin_params=params, parse=parse)
  by_step = {int(s): m for s, m in decoded.pop("by_step", {}).items()}  # JSON keys are strings
  summary["decode"] = decoded
  summary["decode_by_step"] = by_step
  summary["pretrained_step"] = start
  summary["finetune_wall_seconds"] = time.monotonic() - clock
  return summary


def decode_job_for(job: jobs.Job, gin_files: Sequence[str], gin_params: Sequence[str]) -> jobs.Job:
  """The decoding job of a fine-tuning job: same folder and task, the model's files and params."""
  return dataclasses.replace(job, gin_files=list(gin_files), gin_params=list(gin_params))
