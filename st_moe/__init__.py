"""st-moe: ST-MoE (Zoph et al. 2022, arXiv 2202.08906) in Mesh TensorFlow.

Importing this package (as `t5_mesh_transformer --module_import=st_moe` does) registers:
  * the project's gin folder on gin's search path, so `--gin_file=st_moe_32b.gin` resolves by name;
  * the gin-configurable layers and helpers of `st_moe`;
  * the SeqIO tasks of `st_moe.tasks`;
  * resource variables (see `use_resource_variables`).
"""
import os

import gin
import tensorflow.compat.v1 as tf

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def gin_dir():
  """The folder holding the project's gin files.

  Installed with `pip install .`, gin/ is copied into the package as `st_moe/gin`; in a source
  checkout (or an editable install) it is the repository's top-level `gin/`.
  """
  installed = os.path.join(_PACKAGE_DIR, "gin")
  if os.path.isdir(installed):
    return installed
  return os.path.join(os.path.dirname(_PACKAGE_DIR), "gin")


def gin_search_paths():
  """gin_dir() and each of its subfolders (models/, layouts/, runs/): bare names resolve."""
  root = gin_dir()
  paths = [root]
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    sub = os.path.join(root, name)
    if os.path.isdir(sub):
      paths.append(sub)
  return paths


def register_gin_search_paths():
  for path in gin_search_paths():
    gin.add_config_file_search_path(path)


register_gin_search_paths()


def use_resource_variables():
  """Turns TF1 resource variables back on (t5_mesh_transformer's tf.disable_v2_behavior() turns
  them off), unless the environment sets ST_MOE_REF_VARIABLES=1. Returns whether they are on.

  Why: mesh_tensorflow's train op groups every variable's update with no ordering against the
  backward pass. With reference variables a read aliases the variable's buffer, so a gradient
  still being computed can see weights another update has already written, and two runs of the
  same seed on the CPU differ from the first update on (their step-1 Adafactor statistics differed
  by up to 3.5x here). Resource variables read a consistent snapshot: two runs of one seed are then
  bit-identical (SameSeedSameRunTest in tests/reproduce_test.py). Not fixed here: Adafactor's decay
  rate reads the global step unordered with its increment, a smaller race (README, "One seed, one
  run").
  """
  if os.environ.get("ST_MOE_REF_VARIABLES") == "1":
    return tf.resource_variables_enabled()
  tf.enable_resource_variables()
  return True


use_resource_variables()

# Gin configurables of the sparse layers: st_moe.SparseFFN, st_moe.sparse_layer_stack.
from st_moe import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from st_moe import dispatch  # pylint: disable=g-import-not-at-top,wrong-import-position
from st_moe import routing  # pylint: disable=g-import-not-at-top,wrong-import-position
from st_moe import layers  # pylint: disable=g-import-not-at-top,wrong-import-position
from st_moe import stacking  # pylint: disable=g-import-not-at-top,wrong-import-position

# SeqIO tasks and mixtures (tasks/, installed as st_moe.tasks): `--module_import=st_moe` registers them.
from st_moe import tasks  # pylint: disable=g-import-not-at-top,wrong-import-position
