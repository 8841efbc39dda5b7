"""Shared test harness: a sparse FFN layer called in a fake transformer context, lowered on CPU.

What a mesh_tensorflow layer reads from `context.model` is four attributes (ensemble_dim, model_dim,
layout, mesh_shape, plus autoregressive for decoder layers), so tests build a
`transformer.Context` around a stand-in model instead of a whole Unitransformer:

  built = layer_harness.build(layers.SparseFFN(num_experts=4, hidden_size=4, group_size=8),
                              batch=2, length=8, d_model=6, padding={1: 6})
  out = layer_harness.run(built.graph, built.mesh, {"y": built.y})

Used by layers_test, mesh_test, upstream_parity_test and losses_test (and any new SparseFFN test).
Graph mode: the test module must bind setUpModule = graph_mode.enter.
"""
import dataclasses
import types
from typing import Dict, Optional

import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import transformer
import numpy as np
import tensorflow.compat.v1 as tf


def fake_model(model_dim, layout="", mesh_shape="", autoregressive=False):
  """The attributes of a Unitransformer that sparse and dense FFN layers read."""
  return types.SimpleNamespace(ensemble_dim=None, model_dim=model_dim, layout=layout,
                               mesh_shape=mesh_shape, autoregressive=autoregressive)


def fake_context(mesh, batch_dim, length_dim, model_dim, variable_dtype, mode="train",
                 sequence_id=None, layout="", mesh_shape="", autoregressive=False, losses="new"):
  """A transformer.Context around fake_model; losses="new" gives a fresh list (None: no list)."""
  return transformer.Context(
      model=fake_model(model_dim, layout, mesh_shape, autoregressive), mesh=mesh,
      batch_dims=[batch_dim], length_dim=length_dim, variable_dtype=variable_dtype, mode=mode,
      losses=[] if losses == "new" else losses, sequence_id=sequence_id)


def sequence_ids(mesh, batch_dim, length_dim, padding):
  """<int32>[batch, length] mtf tensor of ones, zero (padding) from padding[row] on in each row."""
  ids = np.ones((batch_dim.size, length_dim.size), np.int32)
  for row, start in padding.items():
    ids[row, start:] = 0
  return mtf.import_tf_tensor(mesh, tf.constant(ids), mtf.Shape([batch_dim, length_dim]))


@dataclasses.dataclass
class Built:
  """A layer called on a random input: graph, mesh, input variable x, output y, its context."""
  graph: mtf.Graph
  mesh: mtf.Mesh
  x: mtf.Tensor
  y: mtf.Tensor
  context: transformer.Context
  batch_dim: mtf.Dimension
  length_dim: mtf.Dimension
  model_dim: mtf.Dimension
  variable_dtype: mtf.VariableDType


def new_graph(seed):
  """Resets TF's default graph with `seed`; returns (mtf graph, mesh named "mesh")."""
  tf.reset_default_graph()
  tf.set_random_seed(seed)
  graph = mtf.Graph()
  return graph, mtf.Mesh(graph, "mesh")


def random_input(mesh, batch, length, d_model, activation_dtype=tf.float32):
  """x, a <float>[batch, length, d_model] variable (so its gradient exists, as inside a model).

  Returns:
    (x, batch_dim, length_dim, model_dim, variable_dtype)
  """
  batch_dim, length_dim = mtf.Dimension("batch", batch), mtf.Dimension("length", length)
  model_dim = mtf.Dimension("d_model", d_model)
  variable_dtype = mtf.VariableDType(tf.float32, tf.float32, activation_dtype)
  x = mtf.get_variable(mesh, "x", mtf.Shape([batch_dim, length_dim, model_dim]),
                       initializer=tf.random_normal_initializer(), dtype=variable_dtype)
  return x, batch_dim, length_dim, model_dim, variable_dtype


def build(layer, batch, length, d_model, mode="train", activation_dtype=tf.float32,
          padding: Optional[Dict[int, int]] = None, seed=3, layout="", mesh_shape="",
          autoregressive=False, scope="moe") -> Built:
  """Calls `layer` under `scope` on a random input in a fresh graph.

  Args:
    padding: {row: first padded position}; None: no sequence ids at all.
  """
  graph, mesh = new_graph(seed)
  x, batch_dim, length_dim, model_dim, variable_dtype = random_input(
      mesh, batch, length, d_model, activation_dtype)
  sequence_id = None if padding is None else sequence_ids(mesh, batch_dim, length_dim, padding)
  context = fake_context(mesh, batch_dim, length_dim, model_dim, variable_dtype, mode=mode,
                         sequence_id=sequence_id, layout=layout, mesh_shape=mesh_shape,
                         autoregressive=autoregressive)
  with tf.variable_scope(scope):
    y = layer.call(context, x)
  return Built(graph, mesh, x, y, context, batch_dim, length_dim, model_dim, variable_dtype)


def lower(graph, mesh, mesh_shape="", layout=""):
  """mtf.Lowering of `graph` on a placement mesh of mesh_shape's slices, all on the CPU."""
  shape = mtf.convert_to_shape(mesh_shape)
  mesh_impl = mtf.placement_mesh_impl.PlacementMeshImpl(
      shape=shape, layout=mtf.convert_to_layout_rules(layout), devices=[""] * max(1, shape.size))
  return mtf.Lowering(graph, {mesh: mesh_impl}, autostack=False)


def run(graph, mesh, fetch, assign=None, mesh_shape="", layout=""):
  """Lowers and runs once; fetch {key: mtf.Tensor or mtf.Variable}, assign {Variable: value}.

  Returns:
    {key: numpy value}; variables are read from their masters.
  """
  lowering = lower(graph, mesh, mesh_shape, layout)
  tf_fetch = {k: lowering.export_to_tf_tensor(v) if isinstance(v, mtf.Tensor) else v.get_master()
              for k, v in fetch.items()}
  assigns = [v.assign_to_master(tf.constant(value)) for v, value in (assign or {}).items()]
  with tf.Session() as sess:
    sess.run(tf.global_variables_initializer())
    sess.run(assigns)
    sess.run(lowering.copy_masters_to_slices())
    return sess.run(tf_fetch)
