"""`make demo`: pretrain a tiny ST-MoE and its FLOP-matched dense twin on the CPU, evaluate, trace.

Everything runs through the same entry point users run on TPU (`t5_mesh_transformer
--module_import=st_moe ...`), on the embedded span-corruption task over Python's own pydoc text, so
nothing is downloaded. Steps:
  1. count parameters and FLOPs/token of both models (tools/count_params.py);
  2. train `st_moe_tiny` and `dense_tiny` on the same data for the same steps, showing progress
     (step, loss, router z-loss, fraction of tokens dropped, tokens/s); a diverged run is stopped and
     reported;
  3. evaluate both on the validation split (negative log perplexity) at eval capacity factor 2.0;
  4. trace the sparse model's routing (tools/trace_routing.py);
  5. write <out>/report.md with the table, loss curves and routing heat maps (PNG).
Rerunning resumes: finished steps are skipped, interrupted training continues from its checkpoint.

  python tools/demo.py [--out=demo_out] [--train_steps=N]
"""
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from st_moe.experiments import divergence  # pylint: disable=g-import-not-at-top,wrong-import-position
from st_moe.analysis import reporting  # pylint: disable=g-import-not-at-top,wrong-import-position
from st_moe.experiments import runner  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("out", os.path.join(REPO, "demo_out"), "Output folder (checkpoints, report).")
flags.DEFINE_integer("train_steps", 400, "Training steps of each model.")
flags.DEFINE_integer("batch_size", 16, "Sequences per batch.")
flags.DEFINE_integer("inputs_length", 128, "Encoder length.")
flags.DEFINE_integer("targets_length", 32, "Decoder length.")
flags.DEFINE_integer("eval_steps", 10, "Batches of the validation split to evaluate.")
flags.DEFINE_integer("trace_tokens", 2048, "Tokens the routing tracer reads.")
flags.DEFINE_integer("checkpoint_every", 100, "Steps between checkpoints (resume granularity).")
flags.DEFINE_float("eval_capacity_factor", 2.0, "Capacity factor of the sparse model in evaluation.")
flags.DEFINE_string("task", "st_moe_embedded_span_corruption", "SeqIO task to train and evaluate on.")
flags.DEFINE_list("models", ["st_moe_tiny", "dense_tiny"], "Model gin files (without .gin).")
flags.DEFINE_list("extra_gin_param", [], "More gin bindings for every run (tests use this).")

SPARSE_MODEL = "st_moe_tiny"


def sequence_length():
  return {"inputs": FLAGS.inputs_length, "targets": FLAGS.targets_length}


def common_gin_params():
  return [
      f"MIXTURE_NAME='{FLAGS.task}'",
      f"utils.run.batch_size=('sequences_per_batch', {FLAGS.batch_size})",
      f"utils.run.sequence_length={sequence_length()!r}",
  ] + list(FLAGS.extra_gin_param)


def gin_files(model):
  return ["dataset.gin", f"{model}.gin", "cpu.gin"]


def train_gin_params():
  return common_gin_params() + [
      f"utils.run.train_steps={FLAGS.train_steps}",
      f"utils.run.save_checkpoints_steps={FLAGS.checkpoint_every}",
      f"utils.run.iterations_per_loop={FLAGS.checkpoint_every}",
      "st_moe.SparseFFN.print_metrics=True",
  ]


def eval_gin_params(step):
  return common_gin_params() + [
      "utils.run.dataset_split='validation'",
      f"utils.run.eval_checkpoint_step={step}",
      f"utils.run.perplexity_eval_steps={FLAGS.eval_steps}",
      f"st_moe.SparseFFN.capacity_factor_eval={FLAGS.eval_capacity_factor}",
  ]


def vocab_size():
  """Size of the task's vocabulary (the embedded task's is small: this dominates tiny models)."""
  import seqio  # pylint: disable=g-import-not-at-top
  import st_moe.register  # pylint: disable=g-import-not-at-top,unused-import  (registers the tasks)
  return seqio.get_mixture_or_task(FLAGS.task).output_features["targets"].vocabulary.vocab_size


def count_params(model, cache_path):
  """total params and FLOPs/token (at the demo's lengths) from tools/count_params.py --json.

  Cached in `cache_path` together with the count's arguments; reused only for the same arguments.
  """
  args = [f"--gin_file={model}.gin", f"--vocab_size={vocab_size()}",
          f"--gin_param=utils.run.sequence_length={sequence_length()!r}"]
  args += [f"--gin_param={p}" for p in FLAGS.extra_gin_param]
  cached = runner.read_json(cache_path)
  if cached and cached.get("args") == args:
    return cached["counts"]
  cmd = [sys.executable, os.path.join(REPO, "tools", "count_params.py"), "--json"] + args
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"count_params failed for {model}:\n{proc.stderr[-3000:]}")
  counts = json.loads(proc.stdout.strip().splitlines()[-1])
  runner.write_json(cache_path, {"args": args, "counts": counts})
  return counts




def train(model, model_dir):
  """Trains to FLAGS.train_steps, resuming; returns a summary dict (cached once finished)."""
  done_path = os.path.join(model_dir, "train_done.json")
  done = runner.read_json(done_path)
  if done and done.get("train_steps") == FLAGS.train_steps:
    print(f"[{model}] already trained to step {FLAGS.train_steps} (delete {done_path} to retrain)")
    return done
  start_step = runner.latest_checkpoint_step(model_dir) or 0
  print(f"[{model}] training steps {start_step + 1}..{FLAGS.train_steps}"
        + (" (resuming from its checkpoint)" if start_step else ""), flush=True)
  result = runner.run(
      model_dir, gin_files(model), train_gin_params(),
      tokens_per_step=runner.tokens_per_step(FLAGS.batch_size, sequence_length()),
      label=model, every=max(1, FLAGS.train_steps // 20),
      monitor=divergence.DivergenceMonitor(),
      show=lambda line: print(line, flush=True))
  summary = {
      "train_steps": FLAGS.train_steps,
      "returncode": result.returncode,
      "diverged": result.diverged.reason if result.diverged else None,
      "final_train_loss": result.losses[-1] if result.losses else None,
      "tokens_per_second": result.tokens_per_second,
      "router_z_loss": result.router["z_loss"][-1] if result.router["z_loss"] else None,
      "fraction_dropped": result.router["dropped"][-1] if result.router["dropped"] else None,
      "seconds": result.seconds,
      "command": runner.shell_quote(result.command),
  }
  if result.ok:
    runner.write_json(done_path, summary)
  elif result.diverged:
    print(f"[{model}] diverged: {result.diverged.reason}; reported, not continued", flush=True)
  else:
    raise RuntimeError(f"[{model}] training failed (exit {result.returncode}); log: "
                       f"{result.log_path}")
  return summary


def evaluate(model, model_dir):
  """neg_log_perplexity on the validation split at the last checkpoint (cached)."""
  step = runner.latest_checkpoint_step(model_dir)
  cached = runner.read_json(os.path.join(model_dir, "eval.json"))
  if cached and cached.get("step") == step:
    return cached
  print(f"[{model}] evaluating step {step} on {FLAGS.task}:validation", flush=True)
  result = runner.run(model_dir, gin_files(model) + ["perplexity_eval.gin"],
                      eval_gin_params(step), tokens_per_step=1, label="eval",
                      show=lambda line: print(line, flush=True))
  found = runner.eval_results(result.log_path)
  if result.returncode != 0 or not found:
    raise RuntimeError(f"[{model}] evaluation failed; log: {result.log_path}")
  summary = {"step": found[-1][0], **found[-1][1], "command": runner.shell_quote(result.command)}
  runner.write_json(os.path.join(model_dir, "eval.json"), summary)
  return summary


def trace(model_dir, out_dir):
  """Routing trace of the sparse model (tools/trace_routing.py); returns its markdown."""
  md_path = os.path.join(out_dir, "routing.md")
  step = runner.latest_checkpoint_step(model_dir)
  meta = runner.read_json(os.path.join(out_dir, "trace_meta.json"))
  if not (meta and meta.get("step") == step and os.path.exists(md_path)):
    cmd = [sys.executable, os.path.join(REPO, "tools", "trace_routing.py"),
           f"--gin_file={SPARSE_MODEL}.gin", "--gin_file=cpu.gin", f"--model_dir={model_dir}",
           f"--task={FLAGS.task}", "--split=validation", f"--num_tokens={FLAGS.trace_tokens}",
           f"--inputs_length={FLAGS.inputs_length}", f"--targets_length={FLAGS.targets_length}",
           f"--capacity_factor={FLAGS.eval_capacity_factor}", f"--out={out_dir}"] + [f"--gin_param={p}" for p in FLAGS.extra_gin_param]
    print("[trace] " + runner.shell_quote(cmd), flush=True)
    subprocess.run(cmd, check=True)
    runner.write_json(os.path.join(out_dir, "trace_meta.json"), {"step": step})
  with open(md_path) as f:
    text = f.read()
  # The report sits one folder up: point its image links into the routing folder.
  return text.replace("](", "](" + os.path.basename(out_dir) + "/")


def write_report(out, counts, trained, evals, routing_md):
  rows = []
  for model in FLAGS.models:
    c, t, e = counts[model], trained[model], evals.get(model, {})
    rows.append([model, f"{c['total_params']:,}", f"{c['flops_per_token']:,}",
                 t.get("final_train_loss"), e.get("neg_log_perplexity"),
                 t.get("tokens_per_second") and round(t["tokens_per_second"]),
                 "diverged" if t.get("diverged") else "ok"])
  table = reporting.markdown_table(
      ["model", "params", "FLOPs/token", "final train loss",
       "validation neg. log perplexity (per token)", "train tokens/s", "run"], rows)
  curves = {m: runner.steps_and_losses(os.path.join(out, m)) for m in FLAGS.models}
  reporting.plot_curves(curves, os.path.join(out, "loss_curves.png"),
                        f"Training loss on {FLAGS.task}")
  lines = [
      "# st-moe demo report", "",
      f"Task `{FLAGS.task}` (train / validation), {FLAGS.train_steps} steps of "
      f"{FLAGS.batch_size} x ({FLAGS.inputs_length} + {FLAGS.targets_length}) tokens per model, "
      f"on the CPU. Evaluation at capacity factor {FLAGS.eval_capacity_factor}.", "",
      table, "![loss curves](loss_curves.png)", "",
      "## Routing of the sparse model", "", routing_md, "",
      "## Command lines", "",
  ]
  for model in FLAGS.models:
    lines += [f"- train {model}: `{trained[model]['command']}`"]
    if model in evals:
      lines += [f"- evaluate {model}: `{evals[model]['command']}`"]
  path = os.path.join(out, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path, table


def main(argv):
  del argv
  start = time.monotonic()
  out = os.path.abspath(FLAGS.out)
  os.makedirs(out, exist_ok=True)
  print(f"st-moe demo: output in {out}", flush=True)
  counts = {}
  for model in FLAGS.models:
    counts[model] = count_params(model, os.path.join(out, f"{model}.count.json"))
    print(f"[{model}] {counts[model]['total_params']:,} parameters, "
          f"{counts[model]['flops_per_token']:,} FLOPs/token", flush=True)
  trained, evals = {}, {}
  for model in FLAGS.models:
    model_dir = os.path.join(out, model)
    trained[model] = train(model, model_dir)
    if not trained[model].get("diverged"):
      evals[model] = evaluate(model, model_dir)
  routing_md = "(the sparse model diverged; no routing trace)"
  if SPARSE_MODEL in evals:
    routing_md = trace(os.path.join(out, SPARSE_MODEL), os.path.join(out, "routing"))
  path, table = write_report(out, counts, trained, evals, routing_md)
  print("\n" + table)
  print(routing_md)
  print(f"report: {path}  ({runner.format_seconds(time.monotonic() - start)})")


if __name__ == "__main__":
  app.run(main)
