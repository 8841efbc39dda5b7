"""`make demo`: pretrain a tiny ST-MoE and its FLOP-matched dense twin on the CPU, evaluate, trace.

Library side of `tools/demo.py`. Every model trains through the entry point users run on TPU
(`t5_mesh_transformer`, via st_moe.experiments.jobs), on the embedded span-corruption task over
Python's own pydoc text, so nothing is downloaded. Stages:
  1. count parameters and FLOPs/token of every model (st_moe.analysis.model_graph, in a child);
  2. train each model on the same data for the same steps, showing progress (step, loss, router
     z-loss, fraction of tokens dropped, tokens/s); a diverged or collapsed run is stopped, marked
     and not evaluated, and the demo fails at the end naming it;
  3. evaluate each model on the validation split (negative log perplexity) at the eval capacity
     factor;
  4. trace the sparse model's routing (st_moe.analysis.tracing, in a child);
  5. fine-tune each pretrained model on the embedded downstream task `st_moe_embedded_pydoc_topic`
     (which help() topic a passage is from; 4 balanced classes, so a constant answer scores 25.0)
     with finetune.gin from its pretrained checkpoint, and evaluate it by decoding with eval.gin
     (greedy, deterministic: st_moe.SparseFFN.second_policy_eval, capacity_factor_decode);
  6. write <out>/report.md with the tables, loss curves and routing heat maps (PNG).
Rerunning resumes: finished stages are skipped, interrupted training continues from its checkpoint.
"""
import dataclasses
import os
from typing import Dict, List, Sequence, Tuple

from st_moe.analysis import reporting
from st_moe.experiments import finetuning
from st_moe.experiments import jobs
from st_moe.experiments import runner

DEFAULT_TASK = "st_moe_embedded_span_corruption"
DEFAULT_MODELS = ("st_moe_tiny", "dense_tiny")
FINETUNE_TASK = "st_moe_embedded_pydoc_topic"
# finetune.gin's constant 1e-3 (the paper's, at 65k tokens per batch) needs ~600 steps at tiny scale
# (80.6% after 600); 1e-2 gets there in ~100 (90.3% after 100, 94.4% after 300; tasks/pydoc_topic.py).
FINETUNE_LEARNING_RATE = 1e-2


@dataclasses.dataclass
class DemoConfig:
  """What the demo runs (tools/demo.py's flags)."""
  out: str = "demo_out"
  train_steps: int = 400
  shape: jobs.Shape = jobs.Shape(batch_size=16, inputs_length=128, targets_length=32)
  eval_steps: int = 10
  trace_tokens: int = 2048
  checkpoint_every: int = 100
  capacity_factor_eval: float = 2.0
  task: str = DEFAULT_TASK
  models: Tuple[str, ...] = DEFAULT_MODELS
  gin_params: Tuple[str, ...] = ()
  finetune_task: str = FINETUNE_TASK  # "" skips fine-tuning
  finetune_steps: int = 100
  finetune_shape: jobs.Shape = jobs.Shape(batch_size=16, inputs_length=128, targets_length=8)
  finetune_learning_rate: float = FINETUNE_LEARNING_RATE

  def validate(self):
    """Raises ValueError naming the first flag that cannot work (before anything runs)."""
    self.shape.validate()
    for name, value, low in (("--train_steps", self.train_steps, 1),
                             ("--eval_steps", self.eval_steps, 1),
                             ("--trace_tokens", self.trace_tokens, 1),
                             ("--checkpoint_every", self.checkpoint_every, 1),
                             ("--finetune_steps", self.finetune_steps, 1)):
      if not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")
    if not self.capacity_factor_eval > 0:
      raise ValueError(f"--capacity_factor_eval={self.capacity_factor_eval!r}: must be > 0, "
                       "e.g. 2.0")
    if self.finetune_task:
      self.finetune_shape.validate()
    if not self.finetune_learning_rate > 0:
      raise ValueError(f"--finetune_learning_rate={self.finetune_learning_rate!r}: must be > 0, "
                       f"e.g. {FINETUNE_LEARNING_RATE}")
    if not self.models:
      raise ValueError(f"--models={','.join(self.models)!r}: give at least one model gin file, "
                       f"e.g. {','.join(DEFAULT_MODELS)}")


@dataclasses.dataclass
class DemoResult:
  report_path: str
  table: str
  routing_md: str
  failures: List[str]  # one line per diverged or failed model; empty when all went well


def job_for(config: DemoConfig, model: str) -> jobs.Job:
  return jobs.Job(name=model, model_dir=jobs.join(config.out, model),
                  gin_files=[f"{model}.gin", "cpu.gin"], gin_params=list(config.gin_params),
                  task=config.task, shape=config.shape)


def finetune_job_for(config: DemoConfig, model: str) -> jobs.Job:
  return jobs.Job(
      name=f"{model}_finetune", model_dir=jobs.join(config.out, f"{model}_finetune"),
      gin_files=[f"{model}.gin", "cpu.gin", "finetune.gin"],
      gin_params=list(config.gin_params) + [
          "learning_rate_schedules.constant_learning_rate.learning_rate = "
          f"{config.finetune_learning_rate}"],
      task=config.finetune_task, shape=config.finetune_shape)


def finetune(config: DemoConfig, model: str, pretrained_dir: str, show=print) -> Dict:
  """Fine-tunes one pretrained model on config.finetune_task and evaluates it by decoding.

  Returns the training summary with "decode" ({metric: value, "step", "command"}) when it worked.
  """
  job = finetune_job_for(config, model)
  # Decoding reads the fine-tuned folder with the model's files alone (finetune.gin would require
  # an init_checkpoint and set training-only bindings).
  decode_job = finetuning.decode_job_for(job, [f"{model}.gin", "cpu.gin"], config.gin_params)
  return finetuning.finetune(
      job, decode_job, pretrained_dir, config.finetune_steps,
      checkpoint_every=config.finetune_steps,
      max_decode_length=config.finetune_shape.targets_length,
      # the whole validation split (72 examples) in one decoding batch
      decode_params=["utils.run.batch_size = ('sequences_per_batch', 72)"], show=show)


def _failure(model, summary):
  if summary.get("status") == "diverged":
    return f"{model} diverged at step {summary.get('diverged_step')}: {summary.get('diverged')}"
  return f"{model} failed: {summary.get('error')}"


def run(config: DemoConfig, show=print) -> DemoResult:
  """Counts, trains, evaluates and traces every model; writes the report. Never raises for a
  diverged or crashed training: it is listed in DemoResult.failures."""
  config.validate()
  config = dataclasses.replace(config, out=jobs.abspath(config.out))
  show(f"st-moe demo: output in {config.out}")
  job = {model: job_for(config, model) for model in config.models}
  counts = {}
  for model in config.models:
    counts[model] = jobs.count(job[model].gin_files, job[model].model_params(), task=config.task,
                               sequence_length=config.shape.sequence_length(),
                               cache_path=jobs.join(config.out, f"{model}.count.json"))
    show(f"[{model}] {counts[model]['total_params']:,} parameters, "
         f"{counts[model]['flops_per_token']:,} FLOPs/token")
  trained, evals, failures = {}, {}, []
  for model in config.models:
    trained[model] = jobs.train(job[model], config.train_steps, config.checkpoint_every,
                                show=show, every=max(1, config.train_steps // 20))
    if jobs.failed(trained[model]):
      failures.append(_failure(model, trained[model]))
      continue
    evals[model] = jobs.evaluate(
        job[model], "eval", eval_steps=config.eval_steps, show=show,
        gin_params=jobs.capacity_params(capacity_factor_eval=config.capacity_factor_eval))
  sparse = [m for m in config.models if counts[m].get("num_experts")]
  routing = []
  for i, model in enumerate(sparse):
    folder = "routing" if i == 0 else f"routing_{model}"
    if model not in evals:
      routing.append(f"(`{model}` {trained[model]['status']}: no routing trace)")
      continue
    found = jobs.trace(job[model], {config.capacity_factor_eval: jobs.join(config.out, folder)},
                       num_tokens=config.trace_tokens, show=show)
    # The report sits one folder up: point the trace's image links into its folder.
    routing.append(found[config.capacity_factor_eval]["markdown"].replace("](", f"]({folder}/"))
    trained[model]["trace_command"] = found[config.capacity_factor_eval]["command"]
  routing_md = "\n".join(routing) or "(no sparse model: no routing trace)"
  tuned = {}
  if config.finetune_task:
    for model in config.models:
      if model not in evals:
        continue
      tuned[model] = finetune(config, model, job[model].model_dir, show=show)
      if jobs.failed(tuned[model]):
        failures.append(_failure(f"{model} (fine-tuning)", tuned[model]))
  path, table = write_report(config, counts, trained, evals, routing_md, failures, tuned)
  return DemoResult(path, table, routing_md, failures)


def finetune_table(config: DemoConfig, tuned) -> str:
  """Markdown: decoded validation metric per model, its trivial baseline, steps and time."""
  from st_moe.tasks import pydoc_topic  # pylint: disable=g-import-not-at-top
  baseline = pydoc_topic.MAJORITY_ACCURACY if config.finetune_task == FINETUNE_TASK else None
  rows = []
  for model, t in tuned.items():
    d = t.get("decode", {})
    rows.append([model, d.get("accuracy"), baseline, config.finetune_steps,
                 t.get("final_train_loss"),
                 runner.format_seconds(t["finetune_wall_seconds"])
                 if t.get("finetune_wall_seconds") else None,
                 "ok" if t.get("status") == "done" else t.get("status")])
  return reporting.markdown_table(
      ["model", "validation accuracy (decoded)", "trivial baseline (constant answer)",
       "fine-tuning steps", "final fine-tuning loss", "time (fine-tune + decode)", "run"], rows,
      float_format="{:.4g}")


def write_report(config: DemoConfig, counts, trained, evals, routing_md, failures, tuned=None):
  """<out>/report.md and loss_curves.png; returns (path, the markdown table)."""
  rows = []
  for model in config.models:
    c, t, e = counts[model], trained[model], evals.get(model, {})
    tps = t.get("tokens_per_second")
    rows.append([model, f"{c['total_params']:,}", f"{c['flops_per_token']:,}",
                 t.get("final_train_loss"), e.get("neg_log_perplexity"),
                 round(tps) if tps else None,
                 "ok" if t["status"] == "done" else t["status"]])
  table = reporting.markdown_table(
      ["model", "params", "FLOPs/token", "final train loss",
       "validation neg. log perplexity (per token)", "train tokens/s", "run"], rows)
  curves = {m: runner.steps_and_losses(job_for(config, m).model_dir) for m in config.models}
  # Validation points: the evaluation's loss per target token (-neg_log_perplexity) at its step.
  validation = {m: ([evals[m]["step"]], [-evals[m]["neg_log_perplexity"]]) for m in evals
                if evals[m].get("neg_log_perplexity") is not None}
  reporting.plot_loss_curves(curves, jobs.join(config.out, "loss_curves.png"),
                             f"Training loss on {config.task} (points: validation)",
                             validation=validation)
  shape = config.shape
  lines = [
      "# st-moe demo report", "",
      f"Task `{config.task}` (train / validation), {config.train_steps} steps of "
      f"{shape.batch_size} x ({shape.inputs_length} + {shape.targets_length}) tokens per model, "
      f"on the CPU. Evaluation at capacity factor {config.capacity_factor_eval:g}.", "",
      table, ""]
  if failures:
    lines += ["**Failed runs** (stopped, not evaluated):", ""] + [f"- {f}" for f in failures]
    lines += [""]
  lines += ["![loss curves](loss_curves.png)", "",
            "## Routing of the sparse model", "", routing_md, ""]
  if tuned:
    fshape = config.finetune_shape
    ft_curves = {m: runner.steps_and_losses(finetune_job_for(config, m).model_dir) for m in tuned}
    reporting.plot_loss_curves(ft_curves, jobs.join(config.out, "finetune_curves.png"),
                               f"Fine-tuning loss on {config.finetune_task}")
    lines += ["## Fine-tuning and decoding", "",
              f"Each pretrained model fine-tuned on `{config.finetune_task}` with finetune.gin "
              f"(constant learning rate {config.finetune_learning_rate:g}, dropout 0.1) for "
              f"{config.finetune_steps} steps of {fshape.batch_size} x ({fshape.inputs_length} + "
              f"{fshape.targets_length}) tokens from its last pretraining checkpoint, then "
              "evaluated by greedy decoding (eval.gin) on the validation split: accuracy = "
              "exact match of the decoded topic name.", "",
              finetune_table(config, tuned), "", "![fine-tuning loss](finetune_curves.png)", ""]
  lines += ["## Command lines", ""]
  for model in config.models:
    lines += [f"- train {model}: `{trained[model]['command']}`"]
    if model in evals:
      lines += [f"- evaluate {model}: `{evals[model]['command']}`"]
    if trained[model].get("trace_command"):
      lines += [f"- trace {model}: `{trained[model]['trace_command']}`"]
    if tuned and model in tuned:
      lines += [f"- fine-tune {model}: `{tuned[model]['command']}`"]
      if tuned[model].get("decode"):
        lines += [f"- decode {model}: `{tuned[model]['decode']['command']}`"]
  path = jobs.join(config.out, "report.md")
  jobs.write_text(path, "\n".join(lines) + "\n")
  return path, table
