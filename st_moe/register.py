"""The one registration point of st-moe: what the model and run gin files import.

`t5_mesh_transformer --gin_file=st_moe_32b.gin ...` needs no `--module_import`: every model gin file
(through `st_moe_common.gin`) and every run file of the project says `import st_moe.register`, and
importing this module registers, once per process:

  * gin: the project's file reader, so bare names resolve (`st_moe.gin_paths`);
  * the gin configurables the gin files name: `st_moe.SparseFFN`, `st_moe.sparse_layer_stack`,
    `st_moe.generated_layer_stack`, `st_moe.sublayer_rms_norm_no_scale`,
    `st_moe.seeded_train_dataset_fn`, `st_moe.GuardedOptimizer` (`st_moe.guard`: skips and counts
    training steps with a non-finite gradient or update, stops the run after K in a row),
    `st_moe.MultiplierAdafactor` (`st_moe.optimizers`: Adafactor with per-variable learning-rate
    multipliers, e.g. the experts' weights at a lower rate);
  * gin finalize hook `st_moe.guard.preflight`: before t5_mesh_transformer builds a graph, a batch
    size the mesh does not divide and an unreadable latest checkpoint are named with what to change;
  * the SeqIO tasks and mixtures of `st_moe.tasks`;
  * TF1 resource variables (`use_resource_variables`);
  * a CPU run's shorter start (`st_moe.cpu_startup`: input pipelines without AutoGraph, set by
    `gin/layouts/cpu.gin`; sessions without Grappler when gin or ST_MOE_META_OPTIMIZER=0 asks);
  * two runs of one seed on the CPU are the same run (`st_moe.determinism`: random ops seeded
    the same in every process, the global step read before its increment; patches
    `PlacementMeshImpl.random`, wraps `tpu_estimator_model_fn`);
  * loss and router summaries in the event files on the CPU as on a TPU (`st_moe.summaries`: wraps
    mesh_tensorflow's `tpu_estimator_model_fn`; `st_moe.event_summaries.enabled=False` turns it
    off);
  * whether a run writes its graph (`st_moe.graph_files`: graph.pbtxt, a .meta per checkpoint, the
    graph in the event files; `gin/layouts/cpu.gin` sets `st_moe.graph_files.write = False`).

Nothing else in the package has a process-wide side effect: importing a model module
(`st_moe.routing`, `st_moe.layers`) registers its gin configurables and nothing more.
`--module_import=st_moe.register` (or the older `--module_import=st_moe`) may still be given.
"""
import os

from st_moe import gin_paths

gin_paths.register()

# pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
import tensorflow.compat.v1 as tf

from st_moe import cpu_startup
from st_moe import determinism
from st_moe import graph_files
from st_moe import guard
from st_moe import layers
from st_moe import norms
from st_moe import optimizers
from st_moe import stacking
from st_moe import summaries
from st_moe.experiments import checkpoints  # @st_moe.not_optimizer_slot
from st_moe.experiments import seeding
from st_moe import tasks
# pylint: enable=g-import-not-at-top,wrong-import-position,unused-import

REF_VARIABLES_ENV = "ST_MOE_REF_VARIABLES"


def use_resource_variables():
  """Turns TF1 resource variables back on (t5_mesh_transformer's tf.disable_v2_behavior() turns
  them off), unless the environment sets ST_MOE_REF_VARIABLES=1. Returns whether they are on.

  Why: mesh_tensorflow's train op groups every variable's update with no ordering against the
  backward pass. With reference variables a read aliases the variable's buffer, so a gradient
  still being computed can see weights another update has already written, and two runs of the
  same seed on the CPU differ from the first update on (their step-1 Adafactor statistics differed
  by up to 3.5x here). Resource variables read a consistent snapshot: two runs of one seed are then
  bit-identical (ResumedRunTest in tests/reproduce_test.py), once `st_moe.determinism` also
  seeds mesh_tensorflow's random ops the same way in every process.
  """
  if os.environ.get(REF_VARIABLES_ENV) == "1":
    return tf.resource_variables_enabled()
  tf.enable_resource_variables()
  return True


use_resource_variables()
guard.install_preflight()
cpu_startup.install()
determinism.install()  # before summaries.install(): summaries' wrapper is the outer one
summaries.install()
graph_files.install()
