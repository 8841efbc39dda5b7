"""Reproduce the paper's tables (ST-MoE, arXiv 2202.08906): stability study, capacity, entropy
(Tables 13 and 14), sparse against dense, top_k (Table 8), dense_ffn (Table 16), expert_bias
(Table 17), and the fine-tuning studies finetune_protocol (Table 20, Figure 6), finetune_params
(Figure 5), finetune_dropout (Figure 4) and finetune_aux (Table 5).

  python tools/reproduce.py stability --scale=tiny --seeds=3 --out=reproduction_out
  python tools/reproduce.py capacity  --scale=tiny --out=reproduction_out
  python tools/reproduce.py entropy   --scale=tiny --out=reproduction_out
  python tools/reproduce.py sparse_vs_dense --scale=small --out=reproduction_out
  python tools/reproduce.py expert_bias --scale=small --seeds=3 --out=reproduction_out
  python tools/reproduce.py top_k --scale=small --out=reproduction_out
  python tools/reproduce.py finetune_protocol --scale=small --out=reproduction_out
  python tools/reproduce.py stability --scale=l --tpu=NAME --gcp_project=P --tpu_zone=Z \
      --out=gs://bucket/repro --steps=... (TPU pod; --tpu* flags go to t5_mesh_transformer)

The tables are st_moe.experiments.tables'; this file only reads the flags. Each table is written to
<out>/<table>/<table>.{md,csv,png} with <table>_commands.md (the gin files and exact command lines of
every run). Runs live in <out>/runs/<run id>; rerunning skips finished runs and resumes unfinished
ones. Diverged runs are stopped, listed as diverged and not evaluated. At scale `tiny` the tables
run on the CPU with st_moe_tiny.gin and the run files gin/runs/stability_tiny.gin (constant learning
rate 1.0, to make the baseline unstable) and gin/runs/reproduce_tiny.gin (the default schedule); at
scale `small` with st_moe_small.gin / dense_small.gin on the docs corpus, also on the CPU.
"""
import time

from absl import app
from absl import flags

from st_moe.experiments import jobs
from st_moe.experiments import runner
from st_moe.experiments import tables
from st_moe.experiments.tables import common
from st_moe.experiments.tables import stability

FLAGS = flags.FLAGS
flags.DEFINE_enum("scale", "tiny", list(common.SCALES), "Model scale.")
flags.DEFINE_integer("seeds", None, "Seeds per variant (default: 3 for stability, 1 otherwise).")
flags.DEFINE_integer("baseline_seeds", None, "stability: seeds of the baseline (default: twice "
                     "--seeds, as the paper's Table 3: 6 against 3).")
flags.DEFINE_integer("steps", None, "Training steps per run (default: 200 at tiny scale).")
flags.DEFINE_string("out", "reproduction_out", "Output folder (gs:// works).")
flags.DEFINE_integer("batch_size", None, "Sequences per batch (default: 16 at tiny scale).")
flags.DEFINE_integer("inputs_length", None, "Encoder length (default: 64 at tiny scale).")
flags.DEFINE_integer("targets_length", None, "Decoder length (default: 16 at tiny scale).")
flags.DEFINE_integer("eval_steps", None, "Validation batches per evaluation (default: 5).")
flags.DEFINE_integer("checkpoint_every", None, "Steps between checkpoints (resume granularity).")
flags.DEFINE_integer("jobs", None, "Runs trained at once, each its own t5_mesh_transformer process "
                     "(default: 1; for stability 2 at tiny scale on a machine with 2+ cores). "
                     "capacity's step-time column compares runs, so it trains one at a time.")
flags.DEFINE_string("task", None, "SeqIO task to train and evaluate on (default per scale: tiny "
                    "st_moe_embedded_span_corruption, small st_moe_embedded_docs_span_corruption, "
                    "l and 32b st_moe_pretrain).")
flags.DEFINE_integer("trace_tokens", 2048, "Tokens the routing tracer reads (capacity, entropy).")
flags.DEFINE_list("variants", list(stability.VARIANTS), "Stability variants to run.")
flags.DEFINE_list("capacity_factors_train", ["1.0", "1.25", "2.0"],
                  "Capacity table: the train capacity factors (capacity_factor_train).")
flags.DEFINE_list("capacity_factors_eval", ["1.0", "1.25", "2.0"],
                  "Capacity table: the eval capacity factors (capacity_factor_eval).")
flags.DEFINE_integer("finetune_steps", None, "Fine-tuning tables: steps per fine-tuning run "
                     "(default: 100 at tiny scale, 300 at small).")
flags.DEFINE_integer("finetune_checkpoints", None, "Fine-tuning tables: checkpoints per run, each "
                     "decoded (the table reports the peak; default 3).")
flags.DEFINE_multi_string("rows", [], "Ablation and fine-tuning tables: only this row "
                          "(repeatable; an ablation row brings its baseline row), labelled as in "
                          "the table's .md, e.g. --rows='top-3 / 2 / 3' or "
                          "--rows='sparse / 0.001 / 262k / 8 x 200 / kept'.")
if "gin_param" not in FLAGS:
  flags.DEFINE_multi_string("gin_param", [], "A gin binding for every run (repeatable), e.g. "
                            "--gin_param='num_experts = 8'.")
flags.DEFINE_string("tpu", None, "TPU name (scales l, 32b), passed to t5_mesh_transformer.")
flags.DEFINE_string("gcp_project", None, "GCP project of the TPU.")
flags.DEFINE_string("tpu_zone", None, "Zone of the TPU.")


def _floats(name, values):
  try:
    return tuple(float(v) for v in values)
  except ValueError as e:
    raise app.UsageError(f"--{name}={','.join(values)}: must be numbers, e.g. 1.0,1.25,2.0") from e


def config_from_flags(table):
  tpu_flags = tuple(f"--{name}={getattr(FLAGS, name)}"
                    for name in ("tpu", "gcp_project", "tpu_zone") if getattr(FLAGS, name))
  return common.config_for(
      table, FLAGS.scale, out=jobs.abspath(FLAGS.out), seeds=FLAGS.seeds,
      baseline_seeds=FLAGS.baseline_seeds, steps=FLAGS.steps,
      batch_size=FLAGS.batch_size, inputs_length=FLAGS.inputs_length,
      targets_length=FLAGS.targets_length, eval_steps=FLAGS.eval_steps,
      checkpoint_every=FLAGS.checkpoint_every, jobs=FLAGS.jobs, task=FLAGS.task,
      trace_tokens=FLAGS.trace_tokens, variants=tuple(FLAGS.variants),
      capacity_factors_train=_floats("capacity_factors_train", FLAGS.capacity_factors_train),
      capacity_factors_eval=_floats("capacity_factors_eval", FLAGS.capacity_factors_eval),
      gin_params=tuple(FLAGS.gin_param or ()), tpu_flags=tpu_flags,
      finetune_steps=FLAGS.finetune_steps, finetune_checkpoints=FLAGS.finetune_checkpoints,
      rows=tuple(FLAGS.rows or ()))


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f"give one TABLE: one of {', '.join(tables.TABLES)}")
  table = argv[1]
  config = config_from_flags(table)
  try:
    tables.validate(table, config)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  start = time.monotonic()
  path = tables.run_table(table, config, show=lambda line: print(line, flush=True))
  print("\n" + jobs.read_text(path))
  print(f"{table}: {path}  ({runner.format_seconds(time.monotonic() - start)})", flush=True)


if __name__ == "__main__":
  app.run(main)
