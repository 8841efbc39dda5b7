"""`make demo`: pretrain a tiny ST-MoE and its FLOP-matched dense twin on the CPU, evaluate, trace.

The stages are st_moe.experiments.demo's (count, train, evaluate, trace, report); this file only
reads the flags. Rerunning resumes: finished stages are skipped, interrupted training continues
from its checkpoint. Exits 1 when a model diverged or its training failed, naming it on the last
line.

  python tools/demo.py [--out=demo_out] [--train_steps=N] [--gin_param='num_experts = 8' ...]
"""
import time

from absl import app
from absl import flags

from st_moe.experiments import demo
from st_moe.experiments import jobs
from st_moe.experiments import runner

FLAGS = flags.FLAGS
_DEFAULT = demo.DemoConfig()
flags.DEFINE_string("out", "demo_out", "Output folder (checkpoints, report); gs:// works.")
flags.DEFINE_integer("train_steps", _DEFAULT.train_steps, "Training steps of each model.")
flags.DEFINE_integer("batch_size", _DEFAULT.shape.batch_size, "Sequences per batch.")
flags.DEFINE_integer("inputs_length", _DEFAULT.shape.inputs_length, "Encoder length.")
flags.DEFINE_integer("targets_length", _DEFAULT.shape.targets_length, "Decoder length.")
flags.DEFINE_integer("eval_steps", _DEFAULT.eval_steps, "Batches of the validation split.")
flags.DEFINE_integer("trace_tokens", _DEFAULT.trace_tokens, "Tokens the routing tracer reads.")
flags.DEFINE_integer("checkpoint_every", _DEFAULT.checkpoint_every,
                     "Steps between checkpoints (resume granularity).")
flags.DEFINE_float("capacity_factor_eval", _DEFAULT.capacity_factor_eval,
                   "Evaluation capacity factor of the sparse layers (evaluation and trace).")
flags.DEFINE_string("task", _DEFAULT.task, "SeqIO task to train and evaluate on.")
flags.DEFINE_list("models", list(_DEFAULT.models), "Model gin files (without .gin).")
flags.DEFINE_string("finetune_task", _DEFAULT.finetune_task,
                    "Downstream task each pretrained model is fine-tuned on and evaluated on by "
                    "decoding; '' skips fine-tuning.")
flags.DEFINE_integer("finetune_steps", _DEFAULT.finetune_steps, "Fine-tuning steps per model.")
flags.DEFINE_integer("finetune_batch_size", _DEFAULT.finetune_shape.batch_size,
                     "Sequences per fine-tuning batch.")
flags.DEFINE_integer("finetune_inputs_length", _DEFAULT.finetune_shape.inputs_length,
                     "Encoder length in fine-tuning.")
flags.DEFINE_integer("finetune_targets_length", _DEFAULT.finetune_shape.targets_length,
                     "Decoder length in fine-tuning (and the decoding length).")
flags.DEFINE_float("finetune_learning_rate", _DEFAULT.finetune_learning_rate,
                   "Constant fine-tuning learning rate.")
if "gin_param" not in FLAGS:
  flags.DEFINE_multi_string("gin_param", [], "A gin binding for every run (repeatable), e.g. "
                            "--gin_param='num_experts = 8'.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: the demo takes flags only")
  config = demo.DemoConfig(
      out=FLAGS.out, train_steps=FLAGS.train_steps,
      shape=jobs.Shape(FLAGS.batch_size, FLAGS.inputs_length, FLAGS.targets_length),
      eval_steps=FLAGS.eval_steps, trace_tokens=FLAGS.trace_tokens,
      checkpoint_every=FLAGS.checkpoint_every, capacity_factor_eval=FLAGS.capacity_factor_eval,
      task=FLAGS.task, models=tuple(FLAGS.models), gin_params=tuple(FLAGS.gin_param or ()),
      finetune_task=FLAGS.finetune_task, finetune_steps=FLAGS.finetune_steps,
      finetune_shape=jobs.Shape(FLAGS.finetune_batch_size, FLAGS.finetune_inputs_length,
                                FLAGS.finetune_targets_length),
      finetune_learning_rate=FLAGS.finetune_learning_rate)
  try:
    config.validate()
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  start = time.monotonic()
  result = demo.run(config, show=lambda line: print(line, flush=True))
  print("\n" + result.table)
  print(result.routing_md)
  print(f"report: {result.report_path}  ({runner.format_seconds(time.monotonic() - start)})",
        flush=True)
  if result.failures:
    print("demo FAILED: " + "; ".join(result.failures), flush=True)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
