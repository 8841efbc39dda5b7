"""A model's mtf graph from its gin files, built but never lowered; its parameters and FLOPs.

Shared by `tools/count_params.py` and `tools/plan_mesh.py`, and by the gin tests: it parses gin
files the way `t5_mesh_transformer` does (mesh_tensorflow's defaults.gin first, then the files and
bindings in order), calls the model on mtf inputs in a fresh `mtf.Graph`, and reads the variables'
shapes from `graph.all_variables`. Nothing is lowered, so nothing is allocated: building
ST-MoE-32B (269B parameters) takes a second.

Also home of `st_moe.generated_layer_stack`, the gin entry point through which a generated layer
stack (`st_moe.sparse_layer_stack`) replaces mesh_tensorflow's hand-listed `make_layer_stack`.

FLOPs per token (`flops_per_token`) are counted analytically from the variables' shapes, 2 FLOPs per
multiply-add, forward pass only, for one token through the encoder plus one token through the
decoder: every weight matrix is used once per token (2 x its size), an expert weight k times out of
E (2 x k x size / E), attention scores and their weighted sum 4 x key length x heads x d_kv per
attention layer, embedding lookups and norms 0. Per sequence (`flops_per_sequence`, the unit of the
paper's Table 11): inputs length x FLOPs per encoder token + targets length x FLOPs per decoder
token (the logits count in the decoder); ST-MoE-32B at 512 + 114 comes to 20.44T (paper 20.2T). The capacity factor is reported apart: expert
buffers hold cf x S slots per group of S tokens (cf x k x S with capacity_multiply_by_k), so the
experts compute on `expert_flops_at_train_capacity` per token whatever the routing.
"""
import collections
import dataclasses
import inspect
import os
from typing import Dict, List, Optional, Sequence

import gin
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import transformer
from mesh_tensorflow.transformer import utils as mtf_utils
import tensorflow.compat.v1 as tf

from st_moe import gin_paths

# T5's SentencePiece vocabulary (cc_all.32000) plus 100 sentinel ids; padded to 32128 rows.
T5_VOCAB_SIZE = 32100
DEFAULT_SEQUENCE_LENGTH = {"inputs": 512, "targets": 114}
COMPONENTS = ("embeddings", "attention", "dense_ffn", "experts", "router", "layer_norm")


def mtf_defaults_gin():
  """mesh_tensorflow's defaults.gin, which t5_mesh_transformer parses before any --gin_file."""
  return os.path.join(os.path.dirname(transformer.__file__), "gin", "defaults.gin")


def t5_gin_dir():
  """t5's gin folder (t5/models/gin), found without importing t5; None if t5 is absent."""
  return gin_paths.t5_gin_dir()


def parse_gin(gin_files: Sequence[str], gin_params: Sequence[str] = (), finalize=False,
              skip_unknown=False):
  """Clears gin, parses defaults.gin then `gin_files` and `gin_params`, as t5_mesh_transformer does.

  Bare names resolve through the project's gin reader (st_moe.gin_paths): our folders first, then
  t5's, as in t5_mesh_transformer. `skip_unknown=True` skips bindings of configurables that no
  imported module registers (e.g. t5's dataset functions in a run's operative_config.gin).
  """
  gin.clear_config()
  gin_paths.register()
  gin.parse_config_file(mtf_defaults_gin())
  gin.parse_config_files_and_bindings(list(gin_files), list(gin_params), finalize_config=finalize,
                                      skip_unknown=skip_unknown)


def query(selector, default=None):
  """The value bound to `selector` (a bare name is a macro; macros resolved), or `default`."""
  if "." not in selector and not selector.startswith("%"):
    selector = "%" + selector
  try:
    value = gin.query_parameter(selector)
  except ValueError:
    return default
  for _ in range(10):  # a macro may be bound to another macro
    if isinstance(value, gin.config.ConfigurableReference) and value.configurable.name in (
        "gin.macro", "macro"):
      value = gin.query_parameter("%" + value.scoped_selector.rsplit("/", 1)[0])
    else:
      break
  return value


def gin_mesh_and_layout(mesh_shape=None, layout_rules=None):
  """mesh_shape and layout_rules: the arguments if given, else utils.run's gin bindings.

  A mesh_shape bound to a function call (defaults.gin's `@tpu_mesh_shape()`, which needs a TPU
  topology) counts as unset: one core.
  """
  if mesh_shape is None:
    mesh_shape = query("utils.run.mesh_shape", "")
    if not isinstance(mesh_shape, (str, list, tuple, mtf.Shape)):
      mesh_shape = ""
  if layout_rules is None:
    layout_rules = query("utils.run.layout_rules", "")
  return mtf.convert_to_shape(mesh_shape), mtf.convert_to_layout_rules(layout_rules)


@dataclasses.dataclass
class ModelGraph:
  """A built, unlowered model graph.

  Attributes:
    graph: the mtf.Graph.
    mesh_shape, layout_rules: the mtf.Shape and mtf.LayoutRules it was built for.
    model: the transformer.Bitransformer (or Unitransformer).
    variables: {name: mtf.Shape} of every variable, in creation order.
    batch_size: sequences in the batch it was built with.
    sequence_length: {"inputs": int, "targets": int}.
    loss: the scalar training loss (mtf.Tensor).
  """
  graph: mtf.Graph
  mesh_shape: mtf.Shape
  layout_rules: mtf.LayoutRules
  model: object
  variables: Dict[str, mtf.Shape]
  batch_size: int
  sequence_length: Dict[str, int]
  loss: mtf.Tensor

  def activations(self):
    """Every tensor the forward graph produces: list of mtf.Tensor."""
    return [t for op in self.graph.operations for t in op.outputs]


def build(vocab_size=T5_VOCAB_SIZE, batch_size=None, sequence_length=None, mesh_shape=None,
          layout_rules=None, mode="train", packed=True) -> ModelGraph:
  """Builds the configured model's training graph (forward + losses) without lowering it.

  Args:
    vocab_size: input and output vocabulary size before padding to Unitransformer.vocab_divisor.
    batch_size: sequences; default: the number utils.run would use for the bound batch_size
      (mtf's default ("tokens_per_replica", 2048) if unbound).
    sequence_length: {"inputs", "targets"} lengths; default: utils.run.sequence_length if bound,
      else 512 / 114 (span corruption).
    mesh_shape, layout_rules: default: utils.run's bindings (see gin_mesh_and_layout).
    mode: "train" or "eval" (chooses e.g. the capacity factor).
    packed: feed sequence ids and positions, as t5_mesh_transformer does for packed examples.

  Returns:
    a ModelGraph.
  """
  mesh_shape, layout_rules = gin_mesh_and_layout(mesh_shape, layout_rules)
  if sequence_length is None:
    sequence_length = query("utils.run.sequence_length", None) or DEFAULT_SEQUENCE_LENGTH
  if isinstance(sequence_length, int):
    sequence_length = {"inputs": sequence_length, "targets": sequence_length}
  sequence_length = {k: int(sequence_length[k]) for k in ("inputs", "targets")}
  if batch_size is None:
    method_and_value = query("utils.run.batch_size", ("tokens_per_replica", 2048))
    batch_size = (method_and_value if isinstance(method_and_value, int) else
                  mtf_utils.compute_batch_size(sequence_length, mesh_shape, layout_rules,
                                               tuple(method_and_value)))
  model_type = query("utils.run.model_type", "bitransformer")
  if model_type != "bitransformer":
    raise ValueError(f"utils.run.model_type={model_type!r}: st_moe models are encoder-decoders; "
                     "use 'bitransformer'")
  with tf.Graph().as_default():
    model = mtf_utils.build_model(model_type=model_type, input_vocab_size=vocab_size,
                                  output_vocab_size=vocab_size, layout_rules=layout_rules,
                                  mesh_shape=mesh_shape)
    graph = mtf.Graph()
    mesh = mtf.Mesh(graph, "my_mesh")
    batch_dim = mtf.Dimension("batch", batch_size)
    features = {}
    for key, length in sequence_length.items():
      shape = mtf.Shape([batch_dim, mtf.Dimension("length", length)])
      names = [key] + ([key + "_segmentation", key + "_position"] if packed else [])
      for name in names:
        features[name] = mtf.import_fully_replicated(
            mesh, tf.ones(shape.to_integer_list, tf.int32), shape, name=name)
    _, loss = model.call_simple(
        inputs=features["inputs"], targets=features["targets"], compute_loss=True, mode=mode,
        variable_dtype=mtf_utils.get_variable_dtype(),
        encoder_sequence_id=features.get("inputs_segmentation"),
        decoder_sequence_id=features.get("targets_segmentation"),
        encoder_position=features.get("inputs_position"),
        decoder_position=features.get("targets_position"))
  variables = collections.OrderedDict((v.name, v.shape) for v in graph.all_variables)
  return ModelGraph(graph, mesh_shape, layout_rules, model, variables, batch_size,
                    sequence_length, loss)


def component(name, shape, experts_dim_name="experts"):
  """The component a variable belongs to (one of COMPONENTS), from its name and dimensions."""
  lowered = name.lower()
  if "/router/" in lowered or lowered.endswith("/router"):
    return "router"
  if any(d.name == experts_dim_name for d in shape.dims):
    return "experts"
  # Norms first: a sublayer's pre-norm lives in its scope, e.g. .../self_attention/rms_norm/scale.
  if "rms_norm" in lowered or "layer_norm" in lowered:
    return "layer_norm"
  if "embedding" in lowered or "/logits/" in lowered:
    return "embeddings"
  if "attention" in lowered:
    return "attention"
  if "densereludense" in lowered:
    return "dense_ffn"
  raise ValueError(f"variable {name} {shape}: cannot tell its component (one of {COMPONENTS}); "
                   "update st_moe.analysis.model_graph.component")


@dataclasses.dataclass
class Counts:
  """Parameters and forward FLOPs per token of a model (see the module docstring)."""
  total_params: int
  params: Dict[str, int]
  flops_per_token: int
  flops: Dict[str, int]
  flops_per_token_encoder: int
  flops_per_token_decoder: int
  flops_per_sequence: int
  num_selected_experts: Optional[int]
  num_experts: Optional[int]
  capacity_factor_train: Optional[float]
  capacity_factor_eval: Optional[float]
  expert_flops_at_train_capacity: Optional[int]
  sequence_length: Dict[str, int]
  variables: int

  def as_dict(self):
    return dataclasses.asdict(self)


def _sparse_settings():
  """(k, E, cf_train, cf_eval, multiply_by_k) of st_moe.SparseFFN: gin's, else the layer's."""
  from st_moe import layers  # pylint: disable=g-import-not-at-top
  defaults = {name: p.default for name, p in inspect.signature(layers.SparseFFN).parameters.items()}
  get = lambda k: query("st_moe.SparseFFN." + k, defaults[k])
  return (get("num_selected_experts"), get("num_experts"), get("capacity_factor_train"),
          get("capacity_factor_eval"), get("capacity_multiply_by_k"))


def count(model_graph: ModelGraph) -> Counts:
  """Parameters per component and forward FLOPs per token (encoder token + decoder token)."""
  lengths = model_graph.sequence_length
  params = {c: 0 for c in COMPONENTS}
  flops = {c: 0 for c in COMPONENTS}
  flops["attention_scores"] = 0
  flops["logits"] = 0
  has_experts = any(component(n, s) == "experts" for n, s in model_graph.variables.items())
  k = num_experts = cf_train = cf_eval = None
  expert_capacity_flops = None
  if has_experts:
    k, num_experts, cf_train, cf_eval, multiply_by_k = _sparse_settings()
    expert_capacity_flops = 0
  by_stack = {"encoder": 0, "decoder": 0}
  for name, shape in model_graph.variables.items():
    comp = component(name, shape)
    size = shape.size
    params[comp] += size
    # The logits are computed per decoder token; every other weight belongs to its stack's scope.
    stack = "decoder" if name.startswith("decoder/") or "/logits/" in name.lower() else "encoder"
    before = sum(flops.values())
    if comp == "embeddings":
      if "/logits/" in name.lower():
        flops["logits"] += 2 * size
    elif comp == "experts":
      experts = shape.get_dim_by_name("experts").size
      flops["experts"] += 2 * k * size // experts
      expert_capacity_flops += int(2 * cf_train * (k if multiply_by_k else 1) * size / experts)
    elif comp == "attention":
      if name.endswith("relative_attention_bias"):
        continue
      flops["attention"] += 2 * size
      if name.endswith("/q"):
        model_dim = [d for d in shape.dims if d.name == "d_model"]
        heads_times_kv = size // model_dim[0].size
        stack_len = lengths["targets"] if name.startswith("decoder/") else lengths["inputs"]
        key_len = lengths["inputs"] if "encdec" in name.lower() else stack_len
        flops["attention_scores"] += 4 * key_len * heads_times_kv
    elif comp in ("dense_ffn", "router"):
      flops[comp] += 2 * size
    by_stack[stack] += sum(flops.values()) - before
  return Counts(
      total_params=sum(params.values()), params=params,
      flops_per_token=sum(flops.values()), flops=flops,
      flops_per_token_encoder=by_stack["encoder"], flops_per_token_decoder=by_stack["decoder"],
      flops_per_sequence=(by_stack["encoder"] * lengths["inputs"]
                          + by_stack["decoder"] * lengths["targets"]),
      num_selected_experts=k, num_experts=num_experts,
      capacity_factor_train=cf_train, capacity_factor_eval=cf_eval,
      expert_flops_at_train_capacity=expert_capacity_flops,
      sequence_length=dict(lengths), variables=len(model_graph.variables))


def variable_shapes(model_graph: ModelGraph) -> Dict[str, List[List]]:
  """{variable name: [[dim name, size], ...]}: the checkpoint layout, JSON-ready."""
  return {name: [[d.name, d.size] for d in shape.dims]
          for name, shape in model_graph.variables.items()}
