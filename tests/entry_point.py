"""The real `t5_mesh_transformer` console script for tests: its path, its environment, and the tiny
training command most end-to-end tests start from (st_moe_tiny + cpu.gin + pretrain_c4.gin on the
byte-vocabulary task of tests/testing_tasks.py, checkpoints every 2 steps)."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINT = os.path.join(os.path.dirname(sys.executable), "t5_mesh_transformer")


def env():
  """The environment of a child run: tests/ on PYTHONPATH (for testing_tasks only; the project
  itself comes from the installed package), TensorFlow's C++ logging quieter."""
  child = dict(os.environ)
  child["PYTHONPATH"] = os.pathsep.join(
      [os.path.join(REPO, "tests")] + [p for p in [child.get("PYTHONPATH")] if p])
  child["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return child


# The end-to-end tests check plumbing (training, resuming, evaluating, decoding, reporting), not the
# model, and build st_moe_tiny (and dense_tiny) smaller than its 4 + 4 layers. Most of a
# t5_mesh_transformer process after its imports is mtf lowering the graph, which grows with the
# layers: a 4-step tiny run took 40.4 s with 4 + 4 layers and 25.8 s with 2 + 2 (2-core AVX2
# machine, 2026-12-05), and on the same machine later 31.5 and 31.1 s with 2 + 2 against 26.7 and
# 25.8 s with 1 + 1 (tiny_command with `utils.run.train_steps = 4` run alone, the two alternating).
# ONE_LAYER: one layer per stack, and it is sparse (self-attention, the sparse FFN and the extra
# dense FFN after it; decoder: and encoder-decoder attention): what most plumbing tests build.
# TWO_LAYERS: a dense layer and a sparse one per stack (every 2nd sparse, as in the full model),
# for tests that need both kinds of layer (upcycling), whose measured numbers were taken at it
# (ResumedRunTest, the learning-rate-1000 run), or whose model must learn something (decoding_test:
# at 1 + 1 its reverse-task model decoded no first token right, and the test failed).
ONE_LAYER = ("num_layers = 1", "num_sparse_layers = 1")
TWO_LAYERS = ("num_layers = 2", "num_sparse_layers = 1")


def tiny_command(model_dir, *gin_params, module_imports=("testing_tasks",)):
  """t5_mesh_transformer on st_moe_tiny (1 + 1 layers, ONE_LAYER) + cpu + pretrain_c4 and the
  tests' byte task."""
  return [ENTRY_POINT, *[f"--module_import={m}" for m in module_imports],
          f"--model_dir={model_dir}",
          "--gin_file=st_moe_tiny.gin", "--gin_file=cpu.gin", "--gin_file=pretrain_c4.gin",
          "--gin_param=MIXTURE_NAME = 'st_moe_test_bytes_span_corruption'",
          "--gin_param=utils.run.sequence_length = {'inputs': 64, 'targets': 16}",
          "--gin_param=utils.run.batch_size = ('sequences_per_batch', 4)",
          "--gin_param=utils.run.save_checkpoints_steps = 2",
          "--gin_param=utils.run.iterations_per_loop = 2",
          *[f"--gin_param={p}" for p in (*ONE_LAYER, *gin_params)]]


def read_eval_lines(path):
  """The lines mesh_tensorflow's eval wrote to a predictions or targets file: one per example.

  mtf writes `str(line).replace("\\n", " ") + "\\n"` per example. Read without newline
  translation (`newline=""`): text mode would turn a decoded "\\r" into a line break, and an
  undertrained byte-vocabulary model does decode to "\\r". Split at "\\n" only, not splitlines(),
  which also splits at \\x0b, \\x0c, \\x1c-\\x1e and \\x85.
  """
  with open(path, newline="") as f:
    return f.read().split("\n")[:-1]
