r"""Parameters and forward FLOPs (per token and per sequence) of a model, from its gin files.

Builds the model's mtf graph exactly as t5_mesh_transformer would (mesh_tensorflow's defaults.gin,
then the gin files and bindings) but never lowers it, so nothing is allocated; reads the variables'
shapes from the graph. See st_moe/analysis/model_graph.py for what is counted. FLOPs per sequence
are at --inputs_length + --targets_length tokens, 512 + 114 by default: the unit of the paper's
Table 11 (ST-MoE-32B 20.2T, ST-MoE-L 645B). Runs on a CPU in seconds.

  python tools/count_params.py --gin_file=st_moe_32b.gin
  python tools/count_params.py --gin_file=st_moe_l.gin --json
  python tools/count_params.py --gin_file=st_moe_tiny.gin --gin_param="num_experts = 8"
"""
import json
import sys

from absl import app
from absl import flags
from absl import logging

from st_moe.analysis import model_graph

FLAGS = flags.FLAGS


def _define_flags():
  # mesh_tensorflow.transformer.utils (imported by model_graph) defines --gin_file/--gin_param.
  if "gin_file" not in FLAGS:
    flags.DEFINE_multi_string("gin_file", None, "Gin file (bare names resolve in gin/).")
  if "gin_param" not in FLAGS:
    flags.DEFINE_multi_string("gin_param", None, "Gin binding, e.g. 'num_experts = 8'.")
  flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
  flags.DEFINE_integer("vocab_size", model_graph.T5_VOCAB_SIZE,
                       "Vocabulary size before padding (T5 SentencePiece + 100 sentinels).")
  flags.DEFINE_integer("inputs_length", model_graph.DEFAULT_SEQUENCE_LENGTH["inputs"],
                       "Encoder tokens per sequence (the paper's FLOPs/seq: 512).")
  flags.DEFINE_integer("targets_length", model_graph.DEFAULT_SEQUENCE_LENGTH["targets"],
                       "Decoder tokens per sequence (the paper's FLOPs/seq: 114).")
  flags.DEFINE_integer("batch_size", 1, "Sequences in the graph built (counts do not depend on "
                       "it; the routing group size is clipped to the tokens).")


_define_flags()


def _fmt(n):
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3f}{unit}"
  return str(n)


def report(counts):
  """The human-readable table."""
  lines = [f"total parameters: {counts.total_params:,} ({_fmt(counts.total_params)})"]
  for name, value in counts.params.items():
    share = 100.0 * value / max(1, counts.total_params)
    lines.append(f"  {name:<18} {value:>18,}  {share:5.1f}%")
  lines.append(f"forward FLOPs per token (encoder + decoder token, sequence lengths "
               f"{counts.sequence_length}): {counts.flops_per_token:,} "
               f"({_fmt(counts.flops_per_token)})")
  for name, value in counts.flops.items():
    lines.append(f"  {name:<18} {value:>18,}")
  lengths = counts.sequence_length
  lines.append(f"forward FLOPs per sequence ({lengths['inputs']} + {lengths['targets']} tokens): "
               f"{counts.flops_per_sequence:,} ({_fmt(counts.flops_per_sequence)}) = "
               f"{lengths['inputs']} x {_fmt(counts.flops_per_token_encoder)} per encoder token + "
               f"{lengths['targets']} x {_fmt(counts.flops_per_token_decoder)} per decoder token")
  if counts.num_experts:
    lines.append(f"experts: {counts.num_experts} per sparse layer, FLOPs counted at k = "
                 f"{counts.num_selected_experts} experts per token")
    lines.append(f"capacity factor: train {counts.capacity_factor_train}, eval "
                 f"{counts.capacity_factor_eval}; expert buffers at the train capacity compute "
                 f"{counts.expert_flops_at_train_capacity:,} FLOPs per token")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if not FLAGS.gin_file:
    raise app.UsageError("--gin_file is required: a model file, e.g. --gin_file=st_moe_32b.gin")
  model_graph.parse_gin(FLAGS.gin_file, FLAGS.gin_param or [])
  for name in ("inputs_length", "targets_length", "batch_size", "vocab_size"):
    if getattr(FLAGS, name) < 1:
      raise app.UsageError(f"--{name}={getattr(FLAGS, name)}: must be >= 1")
  graph = model_graph.build(vocab_size=FLAGS.vocab_size, batch_size=FLAGS.batch_size,
                            sequence_length={"inputs": FLAGS.inputs_length,
                                             "targets": FLAGS.targets_length},
                            mesh_shape="", layout_rules="")
  counts = model_graph.count(graph)
  if FLAGS.json:
    print(json.dumps(counts.as_dict(), sort_keys=True))
  else:
    print(report(counts))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
