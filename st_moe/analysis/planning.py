"""Mesh planning: does a layout split a model evenly, and how much of a TPU core does it need?

Works on a built, unlowered `st_moe.analysis.model_graph.ModelGraph`: for every variable and every tensor the
forward graph produces, each dimension a layout rule splits over a mesh dimension must be divisible
by that mesh dimension's size (`check_layout` raises `LayoutError` naming the dimension otherwise);
then per-core bytes are summed from the slice shapes:

  * parameters: the float32 slices training keeps on the cores (utils.get_variable_dtype's
    slice_dtype); the bfloat16 master copies live on the hosts;
  * gradients: one float32 slice per parameter (they exist together during the update);
  * Adafactor state: factored second moments (a row and a column vector over the two largest
    dimensions if the second is >= 128, else a full-size accumulator), no momentum (beta1 = 0);
  * the largest activation of one training (micro)batch.

`fits` compares their sum with the core memory: a lower bound on what a step needs (XLA keeps
more activations alive for the backward pass), useful to rule layouts out, not to promise a fit.
"""
import dataclasses
from typing import Dict, List, Optional, Tuple

import mesh_tensorflow as mtf

from st_moe.analysis import model_graph as model_graph_lib

GIB = 2 ** 30
TPU_V3_CORE_GIB = 16.0
_FLOAT32_BYTES = 4


class LayoutError(ValueError):
  """A layout rule splits a tensor dimension that its mesh dimension does not divide."""


def _mesh_dim_of(layout_rules, mesh_shape, dim) -> Optional[mtf.Dimension]:
  axis = layout_rules.tensor_dimension_to_mesh_axis(dim, mesh_shape)
  return None if axis is None else mesh_shape.dims[axis]


def layout_problems(shape: mtf.Shape, layout_rules, mesh_shape, what: str) -> List[str]:
  """Messages for every dimension of `shape` the layout cannot split (empty if none)."""
  problems = []
  try:
    layout_rules.tensor_layout(shape, mesh_shape)
  except ValueError:
    used = {}
    for dim in shape.dims:
      mesh_dim = _mesh_dim_of(layout_rules, mesh_shape, dim)
      if mesh_dim is not None:
        used.setdefault(mesh_dim.name, []).append(dim.name)
    for mesh_name, dims in used.items():
      if len(dims) > 1:
        problems.append(
            f"dimensions {dims} of {what} {shape} are all split over mesh dimension "
            f"'{mesh_name}' by the layout rules; a tensor may split only one dimension over a "
            "mesh dimension: change the rules")
  for dim in shape.dims:
    mesh_dim = _mesh_dim_of(layout_rules, mesh_shape, dim)
    if mesh_dim is not None and dim.size % mesh_dim.size:
      divisors = [d for d in range(1, dim.size + 1) if dim.size % d == 0 and d <= mesh_dim.size]
      problems.append(
          f"dimension '{dim.name}' (size {dim.size}) of {what} {shape} is split over mesh "
          f"dimension '{mesh_dim.name}' of size {mesh_dim.size} (layout rule "
          f"{dim.name}:{mesh_dim.name}), which does not divide it: use a mesh dimension whose "
          f"size divides {dim.size} (e.g. {divisors[-1]}), a '{dim.name}' that "
          f"{mesh_dim.size} divides, or no rule for '{dim.name}'")
  return problems


def check_layout(graph: "model_graph_lib.ModelGraph", include_activations=True):
  """Raises LayoutError naming each dimension the layout cannot split.

  Args:
    graph: a built ModelGraph (its mesh_shape and layout_rules are checked).
    include_activations: also check every tensor of the forward graph (batch, length, groups...).
  """
  problems = []
  seen = set()
  for name, shape in graph.variables.items():
    for p in layout_problems(shape, graph.layout_rules, graph.mesh_shape, f"variable {name}"):
      key = p.split(" of ")[0]
      if key not in seen:
        seen.add(key)
        problems.append(p)
  if include_activations:
    for tensor in graph.activations():
      for p in layout_problems(tensor.shape, graph.layout_rules, graph.mesh_shape,
                               f"tensor {tensor.name}"):
        key = p.split(" of ")[0]
        if key not in seen:
          seen.add(key)
          problems.append(p)
  if problems:
    raise LayoutError(f"layout_rules '{graph.layout_rules}' on mesh_shape '{graph.mesh_shape}' "
                      f"cannot split this model:\n  " + "\n  ".join(problems))


def slice_size(shape: mtf.Shape, layout_rules, mesh_shape) -> int:
  """Elements of one core's slice of a tensor of `shape`."""
  size = 1
  for dim in shape.dims:
    mesh_dim = _mesh_dim_of(layout_rules, mesh_shape, dim)
    size *= dim.size // (mesh_dim.size if mesh_dim is not None else 1)
  return size


def adafactor_state_shapes(shape: mtf.Shape, factored=True, min_dim_size_to_factor=128):
  """Shapes of mesh_tensorflow AdafactorOptimizer's second-moment slots for a variable (beta1=0)."""
  dims = list(shape.dims)
  if factored and len(dims) >= 2:
    largest = sorted(dims, key=lambda d: -d.size)
    if largest[1].size >= min_dim_size_to_factor:
      return [shape - largest[0], shape - largest[1]]
  return [shape]


@dataclasses.dataclass
class Plan:
  """Per-core memory of a model on a mesh (bytes), see the module docstring."""
  mesh_shape: str
  layout_rules: str
  num_cores: int
  batch_size: int
  num_microbatches: int
  microbatch_size: int
  param_bytes: int
  gradient_bytes: int
  adafactor_bytes: int
  largest_activation_bytes: int
  largest_activation: str
  total_bytes: int
  core_memory_bytes: int
  fits: bool
  num_experts: Optional[int]
  experts_per_core: Optional[int]
  experts_split_over: Optional[str]

  def as_dict(self):
    return dataclasses.asdict(self)


def experts_per_core(graph, experts_dim_name="experts") -> Tuple[Optional[int], Optional[int],
                                                                  Optional[str]]:
  """(experts per layer, experts per core, mesh dimension they split over) or Nones if dense."""
  for shape in graph.variables.values():
    for dim in shape.dims:
      if dim.name == experts_dim_name:
        mesh_dim = _mesh_dim_of(graph.layout_rules, graph.mesh_shape, dim)
        if mesh_dim is None:
          return dim.size, dim.size, None
        return dim.size, dim.size // mesh_dim.size, mesh_dim.name
  return None, None, None


def plan(graph, batch_size: int, num_microbatches: int = 1,
         core_memory_gib: float = TPU_V3_CORE_GIB) -> Plan:
  """Checks the layout and sums per-core bytes.

  Args:
    graph: a ModelGraph built with the microbatch (batch_size // num_microbatches sequences).
    batch_size: sequences per training step.
    num_microbatches: how many serial microbatches a step runs (utils.serialize_num_microbatches).
    core_memory_gib: memory of one core.

  Returns:
    a Plan.

  Raises:
    LayoutError: naming each dimension the layout cannot split.
  """
  check_layout(graph)
  rules, mesh = graph.layout_rules, graph.mesh_shape
  params = sum(slice_size(s, rules, mesh) for s in graph.variables.values()) * _FLOAT32_BYTES
  adafactor = sum(slice_size(slot, rules, mesh)
                  for s in graph.variables.values()
                  for slot in adafactor_state_shapes(s)) * _FLOAT32_BYTES
  largest, largest_name = 0, ""
  for tensor in graph.activations():
    size = slice_size(tensor.shape, rules, mesh) * tensor.dtype.size
    if size > largest:
      largest, largest_name = size, f"{tensor.name} {tensor.shape} {tensor.dtype.name}"
  total = 2 * params + adafactor + largest
  memory = int(core_memory_gib * GIB)
  num_experts, per_core, split_over = experts_per_core(graph)
  return Plan(
      mesh_shape=str(mesh), layout_rules=str(rules), num_cores=mesh.size, batch_size=batch_size,
      num_microbatches=num_microbatches, microbatch_size=graph.batch_size, param_bytes=params,
      gradient_bytes=params, adafactor_bytes=adafactor, largest_activation_bytes=largest,
      largest_activation=largest_name, total_bytes=total, core_memory_bytes=memory,
      fits=total <= memory, num_experts=num_experts, experts_per_core=per_core,
      experts_split_over=split_over)


def run_batch(sequence_length: Dict[str, int], mesh_shape, layout_rules,
              batch_size: Optional[int] = None) -> Tuple[int, int]:
  """(sequences per step, serial microbatches) as utils.run computes them from gin."""
  from mesh_tensorflow.transformer import utils as mtf_utils  # pylint: disable=g-import-not-at-top
  if batch_size is None:
    method_and_value = model_graph_lib.query("utils.run.batch_size", ("tokens_per_replica", 2048))
    batch_size = (method_and_value if isinstance(method_and_value, int) else
                  mtf_utils.compute_batch_size(sequence_length, mesh_shape, layout_rules,
                                               tuple(method_and_value)))
  batch_dim = mtf.Dimension("batch", batch_size)
  problems = layout_problems(mtf.Shape([batch_dim]), layout_rules, mesh_shape,
                             "the batch (utils.run.batch_size)")
  if problems:
    raise LayoutError(problems[0])
  num_microbatches = mtf_utils.serialize_num_microbatches(batch_dim, sequence_length, mesh_shape,
                                                          layout_rules)
  return batch_size, num_microbatches
