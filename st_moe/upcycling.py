"""Sparse upcycling: an ST-MoE checkpoint made from a dense T5.1.1 checkpoint.

Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055) initialises a mixture-of-experts
model from a trained dense one: every expert of a sparse layer is a copy of the dense FFN it
replaces, the router is new, every other parameter (and optionally its optimizer state) is copied.
`tools/upcycle.py` is the command line; this module plans and writes the checkpoint.

Names. A Mesh-TF dense checkpoint with T5.1.1's names (`t5.1.1.*.gin`: mesh_tensorflow's
hand-listed layer stack) numbers the sub-layers of a block:
  encoder/block_003/layer_000/SelfAttention/q, encoder/block_003/layer_001/rms_norm/scale,
  encoder/block_003/layer_001/DenseReluDense/wi_0/kernel,
  decoder/block_003/layer_001/EncDecAttention/k
while the generated ST-MoE stack (st_moe.stacking) names them:
  encoder/block_003/self_attention/SelfAttention/q, encoder/block_003/sparse_ffn/rms_norm/scale,
  encoder/block_003/sparse_ffn/SparseFFN/wi_0/kernel <[experts, d_model, expert_hidden]>,
  encoder/block_003/sparse_ffn/SparseFFN/router/kernel, encoder/block_003/extra_dense_ffn_after/...
Neither numbering is assumed. Both variable lists (the dense one from the checkpoint, the sparse one
from the model's gin files, built but never lowered: st_moe.analysis.model_graph) are parsed into
`<stack>/block_<b>/<sub-layer>/[<Class>/]<variable>`; within a block, a sparse sub-layer takes the
dense sub-layer of the same class (SelfAttention, EncDecAttention, DenseReluDense). Its sparse FFN
(the sub-layer whose variables carry the experts dimension) and its extra dense FFNs take the
block's DenseReluDense. Variables outside the blocks (shared/embedding, <stack>/rms_norm/scale,
decoder/logits/kernel) keep their names.

Values. Sparse FFN: each expert weight <[experts, ...]> is the dense weight tiled over experts; its
pre-norm scale is the dense FFN's; the router kernel <[d_model, experts_unsplit]> is drawn from
normal(0, router_init_stddev) of that layer (what SparseFFN's initialiser does). With identical
experts and renormalised gates (the k gates of a token sum to one, k > 1) a token that no expert
drops gets exactly the dense FFN's output, whatever the router says (at k = 1 the gate is the raw
router probability p, so it gets p times the dense FFN's output).
Extra dense FFN (ST-MoE's dense FFN after each sparse one), `extra_dense_ffn`:
  "identity" (default): pre-norm scale, wi_0 and wi_1 copied from the block's dense FFN, output
     kernel wo zero. The sub-layer adds 0 to its residual, so the upcycled model computes the dense
     model's function, as upcycling intends (its point is to start from the dense model's quality).
     wo still learns from the first step: its gradient h^T dL/dy is not zero because the hidden
     activations h of the copied wi are not (a zero wi as well would leave both gradients zero).
     With Adafactor's multiply_by_parameter_scale the update of a zero kernel is scaled by
     epsilon2 = 1e-3 rather than by its RMS, so it takes ~1/learning_rate steps to grow to a
     normal scale; the experts and everything else train at full speed meanwhile.
  "copy": all of the block's dense FFN copied. Every weight starts trained, but the block applies
     the dense FFN twice (through the experts, then again on their output), so the model no
     longer computes the dense model's function and the first steps have to recover from that.
Optimizer state (`optimizer_slots`): "tile" (default) copies each parameter's Adafactor slots
(<name>_slot_vr / _slot_vc / _slot_v / _slot_m) with it, tiled over experts for expert weights
(the paper copies the optimizer state optionally); an extra dense FFN's slots are those of the FFN
it copies (its zero output kernel's too); the router's slots start at zero, as Adafactor creates
them. "drop" writes no slot: Adafactor starts every accumulator at zero.
Step (`step`): "keep" (default) writes the dense checkpoint's global_step, so learning rate and
Adafactor decay schedules continue where the dense run stopped (train_steps counts from there:
1000000 + N for the public T5.1.1 checkpoints); an integer writes that step instead (0 restarts
the schedules: pretrain_c4.gin's warm-up then holds the learning rate at 0.01 for 10k steps).

Checks, all before anything is written: the stacks' numbers of blocks (layers), every variable's
shape against its source's (d_model, d_ff, heads x d_kv, heads through relative_attention_bias,
vocabulary rows), every slot's shape against what Adafactor creates for the sparse variable, and
that every dense parameter is used. A failure is an `UpcycleError` naming the variable and both
shapes.

Writing: tensors go out in shards of at most `shard_bytes` (tf.raw_ops.SaveV2, then
MergeV2Checkpoints), so a model larger than memory can be written; every path goes through
TensorFlow's file systems, so gs:// works for reading and writing.
"""
import dataclasses
import json
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

EXTRA_DENSE_FFN = ("identity", "copy")
OPTIMIZER_SLOTS = ("tile", "drop")
SLOT_SUFFIXES = ("_slot_vr", "_slot_vc", "_slot_v", "_slot_m")  # mesh_tensorflow Adafactor
GLOBAL_STEP = "global_step"
DENSE_FFN_CLASS = "DenseReluDense"
OUTPUT_KERNEL = "wo/kernel"  # DenseReluDense's output projection
_BLOCK_RE = re.compile(r"^(?P<stack>[^/]+)/block_(?P<block>\d+)/(?P<sub>[^/]+)/(?P<rest>.+)$")
_NORM_PREFIXES = ("rms_norm/", "layer_norm/")


class UpcycleError(ValueError):
  """A dense checkpoint and a sparse model that cannot be upcycled into each other."""


@dataclasses.dataclass
class Sublayer:
  """One sub-layer of a block: `<stack>/block_<b>/<name>/`, its class and its variables."""
  stack: str
  block: int
  name: str  # "layer_001" (T5.1.1) or "sparse_ffn" (generated stack)
  cls: Optional[str] = None  # "SelfAttention", "DenseReluDense", "SparseFFN", ...
  variables: Dict[str, str] = dataclasses.field(default_factory=dict)  # key -> full name


@dataclasses.dataclass
class Entry:
  """How one variable of the sparse checkpoint is made.

  how: "copy" (the source's value), "tile" (the source's value repeated over the experts axis),
    "zeros", or "router" (normal(0, stddev)).
  """
  name: str
  shape: List[int]
  dtype: tf.DType
  how: str
  source: Optional[str] = None  # the dense variable (also for "zeros": shapes and slots)
  experts_axis: Optional[int] = None
  stddev: Optional[float] = None

  def as_dict(self):
    d = dataclasses.asdict(self)
    d["dtype"] = self.dtype.name
    return d


@dataclasses.dataclass
class Plan:
  """The whole sparse checkpoint, variable by variable; nothing read or written yet."""
  entries: List[Entry]
  step: int
  notes: List[str]

  def counts(self):
    out = {}
    for e in self.entries:
      kind = "slot " + e.how if _is_slot(e.name) else e.how
      out[kind] = out.get(kind, 0) + 1
    return out


def _is_slot(name):
  return name.endswith(SLOT_SUFFIXES)


def _split_slot(name):
  for suffix in SLOT_SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)], suffix
  return name, None


def _key(sub, rest):
  """A variable's name in its sub-layer, without the class: 'q', 'wi_0/kernel', 'rms_norm/scale'."""
  if rest.startswith(_NORM_PREFIXES):
    return rest, None
  cls, _, key = rest.partition("/")
  return key, cls


def parse_blocks(names: Sequence[str]) -> Tuple[Dict[Tuple[str, int], List[Sublayer]], List[str]]:
  """Groups variable names into blocks and sub-layers.

  Returns:
    ({(stack, block): [Sublayer, ...] in the order first seen}, [names outside any block]).
  """
  blocks, others = {}, []
  for name in names:
    m = _BLOCK_RE.match(name)
    if not m:
      others.append(name)
      continue
    stack, block, sub, rest = m["stack"], int(m["block"]), m["sub"], m["rest"]
    subs = blocks.setdefault((stack, block), [])
    found = [s for s in subs if s.name == sub]
    sublayer = found[0] if found else Sublayer(stack, block, sub)
    if not found:
      subs.append(sublayer)
    key, cls = _key(sub, rest)
    if cls is not None:
      if sublayer.cls not in (None, cls):
        raise UpcycleError(f"{name}: sub-layer {stack}/block_{block:03d}/{sub} holds variables of "
                           f"two classes, {sublayer.cls} and {cls}")
      sublayer.cls = cls
    sublayer.variables[key] = name
  return blocks, others


def _fmt(shape):
  return "[" + ", ".join(str(s) for s in shape) + "]"


def _mismatch(target, target_shape, source, source_shape, what=""):
  return UpcycleError(
      f"cannot upcycle {target} {_fmt(target_shape)} from {source} {_fmt(source_shape)}{what}: "
      "the sparse model's sizes (d_model, d_ff, heads x d_kv, layers, vocabulary) must be the "
      "dense checkpoint's; set them with --gin_param (e.g. d_ff = ...) or --vocab_size")


def _stack_blocks(blocks, stack):
  return sorted(b for s, b in blocks if s == stack)


def _sparse_sublayer(sub, sparse_vars, experts_dim_name):
  return any(any(d.name == experts_dim_name for d in sparse_vars[n][0].dims)
             for n in sub.variables.values())


def plan(dense_shapes: Dict[str, List[int]], sparse_vars, router_stddevs: Dict[str, float],
         adafactor=None, extra_dense_ffn="identity", optimizer_slots="tile", step="keep",
         dense_step=None, experts_dim_name="experts") -> Plan:
  """Decides the source and treatment of every sparse variable; raises before anything is written.

  Args:
    dense_shapes: {name: shape} of the dense checkpoint (tf.train.list_variables).
    sparse_vars: {name: (mtf.Shape, master tf.DType)} of the sparse model, in creation order.
    router_stddevs: {"<stack>/<sub-layer name>": router_init_stddev} of each sparse layer.
    adafactor: a mesh_tensorflow AdafactorOptimizer whose `_factored_dims` says which slots the
      sparse run creates (needed with optimizer_slots="tile").
    extra_dense_ffn: "identity" or "copy" (module docstring).
    optimizer_slots: "tile" or "drop".
    step: "keep" or an int >= 0.
    dense_step: the dense checkpoint's global_step (None if it has none).
    experts_dim_name: the experts dimension's name (SparseFFN.experts_dim_name).

  Returns:
    a Plan.

  Raises:
    UpcycleError: on any mismatch (naming the variable and both shapes) or a bad setting.
  """
  if extra_dense_ffn not in EXTRA_DENSE_FFN:
    raise UpcycleError(f"extra_dense_ffn={extra_dense_ffn!r}: expected one of {EXTRA_DENSE_FFN}")
  if optimizer_slots not in OPTIMIZER_SLOTS:
    raise UpcycleError(f"optimizer_slots={optimizer_slots!r}: expected one of {OPTIMIZER_SLOTS}")
  notes = []
  if step == "keep":
    if dense_step is None:
      notes.append("the dense checkpoint has no global_step: writing step 0")
    step_value = int(dense_step or 0)
  elif isinstance(step, int) and not isinstance(step, bool) and step >= 0:
    step_value = step
  else:
    raise UpcycleError(f"step={step!r}: expected 'keep' or an integer >= 0")

  dense_params = [n for n in dense_shapes if not _is_slot(n) and n != GLOBAL_STEP]
  dense_slots = {}
  for n in dense_shapes:
    base, suffix = _split_slot(n)
    if suffix and base in dense_shapes:
      dense_slots.setdefault(base, []).append(suffix)
    elif suffix:
      dense_params.append(n)  # a variable that merely ends like a slot
  d_blocks, d_others = parse_blocks(dense_params)
  s_blocks, s_others = parse_blocks([n for n in sparse_vars if n != GLOBAL_STEP])
  if not d_blocks:
    raise UpcycleError("the dense checkpoint has no <stack>/block_NNN/ variables: not a Mesh-TF "
                       "transformer checkpoint (expected e.g. encoder/block_000/layer_000/...)")

  for stack in sorted({s for s, _ in d_blocks} | {s for s, _ in s_blocks}):
    nd, ns = _stack_blocks(d_blocks, stack), _stack_blocks(s_blocks, stack)
    if nd != ns:
      raise UpcycleError(
          f"{stack}: the dense checkpoint has {len(nd)} blocks ({stack}/block_NNN), the sparse "
          f"model {len(ns)}: set num_layers = {len(nd)} (and a num_sparse_layers dividing it)")

  sources = {}  # target name -> (how, source name)
  for (stack, block), subs in s_blocks.items():
    d_subs = d_blocks[(stack, block)]
    where = f"{stack}/block_{block:03d}"
    by_class = {}
    for d in d_subs:
      by_class.setdefault(d.cls, []).append(d)
    sparse_subs = [s for s in subs if _sparse_sublayer(s, sparse_vars, experts_dim_name)]
    for sub in subs:
      is_sparse = sub in sparse_subs
      is_extra = not is_sparse and bool(sparse_subs) and sub.cls == DENSE_FFN_CLASS
      cls = DENSE_FFN_CLASS if (is_sparse or is_extra) else sub.cls
      candidates = by_class.get(cls, [])
      if len(candidates) != 1:
        raise UpcycleError(
            f"{where}/{sub.name} ({sub.cls}): the dense checkpoint's {where} has "
            f"{len(candidates)} sub-layers of class {cls} ({[d.name for d in d_subs]} are "
            f"{[d.cls for d in d_subs]}); expected exactly one to copy from")
      src = candidates[0]
      for key, name in sub.variables.items():
        shape = sparse_vars[name][0]
        if is_sparse and key in src.variables and any(d.name == experts_dim_name
                                                      for d in shape.dims):
          sources[name] = ("tile", src.variables[key])
        elif key in src.variables:
          zero = is_extra and extra_dense_ffn == "identity" and key == OUTPUT_KERNEL
          sources[name] = ("zeros" if zero else "copy", src.variables[key])
        elif is_sparse and "router" in key:
          sources[name] = ("router", None)
        else:
          raise UpcycleError(
              f"{name} {_fmt(shape.to_integer_list)}: no counterpart in the dense checkpoint's "
              f"{where}/{src.name} ({src.cls}: {sorted(src.variables)})")
  for name in s_others:
    if name not in dense_shapes:
      raise UpcycleError(f"{name} {_fmt(sparse_vars[name][0].to_integer_list)}: not in the dense "
                         f"checkpoint (its variables outside the blocks: {sorted(d_others)})")
    sources[name] = ("copy", name)

  used = {src for _, src in sources.values() if src}
  unused = sorted(set(dense_params) - used)
  if unused:
    raise UpcycleError(f"dense checkpoint variables the sparse model has no place for: {unused} "
                       "(the function would change); check the model's structure")

  entries = []
  for name, (mtf_shape, dtype) in sparse_vars.items():
    if name == GLOBAL_STEP:
      continue
    how, src = sources[name]
    target = mtf_shape.to_integer_list
    entry = Entry(name, target, dtype, how, src)
    if how == "router":
      sub = "/".join(name.split("/")[:3])
      if sub not in router_stddevs:
        raise UpcycleError(f"{name}: no router_init_stddev known for sparse layer {sub} "
                           f"(known: {sorted(router_stddevs)})")
      entry.stddev = float(router_stddevs[sub])
    elif how == "tile":
      entry.experts_axis = [d.name for d in mtf_shape.dims].index(experts_dim_name)
      reduced = target[:entry.experts_axis] + target[entry.experts_axis + 1:]
      if reduced != list(dense_shapes[src]):
        raise _mismatch(name, target, src, dense_shapes[src], " (every expert is a copy)")
    elif target != list(dense_shapes[src]):
      raise _mismatch(name, target, src, dense_shapes[src])
    entries.append(entry)

  if optimizer_slots == "tile":
    if not dense_slots:
      notes.append("the dense checkpoint has no optimizer slots: none written")
    slot_entries = []
    for entry in entries:
      if entry.source is None or entry.source not in dense_slots:
        continue
      mtf_shape = sparse_vars[entry.name][0]
      expected = _adafactor_slot_shapes(adafactor, mtf_shape)
      for suffix in dense_slots[entry.source]:
        slot, src_slot = entry.name + suffix, entry.source + suffix
        src_shape = list(dense_shapes[src_slot])
        if suffix not in expected:
          raise UpcycleError(
              f"cannot tile optimizer slot {src_slot} {_fmt(src_shape)} into {slot}: Adafactor "
              f"creates {sorted(entry.name + s for s in expected)} for {entry.name} "
              f"{_fmt(entry.shape)} (factored differently); use --optimizer_slots=drop")
        slot_dims = expected[suffix]
        target = [d.size for d in slot_dims]
        if entry.how == "tile":
          axis = [d.name for d in slot_dims].index(experts_dim_name)
          if target[:axis] + target[axis + 1:] != src_shape:
            raise _mismatch(slot, target, src_slot, src_shape, " (optimizer slot, tiled)")
          slot_entries.append(Entry(slot, target, tf.float32, "tile", src_slot, axis))
        else:
          if target != src_shape:
            raise _mismatch(slot, target, src_slot, src_shape, " (optimizer slot)")
          slot_entries.append(Entry(slot, target, tf.float32, "copy", src_slot))
    entries.extend(slot_entries)
  return Plan(entries, step_value, notes)


def _adafactor_slot_shapes(adafactor, mtf_shape):
  """{slot suffix: [mtf.Dimension]} that mesh_tensorflow's Adafactor creates for a variable."""
  if adafactor is None:
    raise UpcycleError("optimizer_slots='tile' needs the sparse run's Adafactor settings")
  factored = adafactor._factored_dims(mtf_shape)  # pylint: disable=protected-access
  out = {}
  if factored:
    d0, d1 = factored
    out["_slot_vr"] = (mtf_shape - d0).dims
    out["_slot_vc"] = (mtf_shape - d1).dims
  else:
    out["_slot_v"] = mtf_shape.dims
  if getattr(adafactor, "_beta1", 0.0):
    out["_slot_m"] = mtf_shape.dims
  return out


def _value(entry, reader, seed, index):
  """The numpy value of one entry (reads its source only now)."""
  np_dtype = entry.dtype.as_numpy_dtype
  if entry.how == "router":
    rng = np.random.default_rng([seed, index])
    return rng.normal(0.0, entry.stddev, entry.shape).astype(np.float32).astype(np_dtype)
  if entry.how == "zeros":
    return np.zeros(entry.shape, np_dtype)
  value = np.asarray(reader.get_tensor(entry.source))
  if value.dtype != np_dtype:
    value = value.astype(np.float32).astype(np_dtype)
  if entry.how == "tile":
    value = np.broadcast_to(np.expand_dims(value, entry.experts_axis), entry.shape)
  return np.ascontiguousarray(value)


def write(plan_: Plan, reader, prefix, seed=0, shard_bytes=1 << 30):
  """Writes the planned checkpoint at `prefix` (e.g. gs://bucket/dir/model.ckpt-1000000).

  Runs in a graph of its own (works in eager and in TF1 graph mode); tensors are fed shard by
  shard, so memory holds at most `shard_bytes` of them.

  Args:
    plan_: from `plan`.
    reader: a tf.train.CheckpointReader of the dense checkpoint.
    prefix: the checkpoint prefix to write (.index and .data-* files).
    seed: seeds the routers' initialisers (per variable).
    shard_bytes: bytes of tensors per temporary shard.
  """
  shards, current, size = [], [], 0
  for i, e in enumerate(plan_.entries):
    nbytes = int(np.prod(e.shape, dtype=np.int64)) * e.dtype.size
    if current and size + nbytes > shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((i, e))
    size += nbytes
  shards.append(current)
  tmp = prefix + "_upcycle_tmp"
  parts = []
  with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    for n, shard in enumerate(shards):
      names = [e.name for _, e in shard]
      holders = [tf.compat.v1.placeholder(e.dtype, e.shape) for _, e in shard]
      feed = {h: _value(e, reader, seed, i) for h, (i, e) in zip(holders, shard)}
      if n == len(shards) - 1:
        names.append(GLOBAL_STEP)
        holders.append(tf.constant(plan_.step, tf.int64))
      part = f"{tmp}/part-{n:05d}"
      sess.run(tf.raw_ops.SaveV2(prefix=part, tensor_names=names,
                                 shape_and_slices=[""] * len(names), tensors=holders), feed)
      parts.append(part)
      del feed
    sess.run(tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=parts, destination_prefix=prefix,
                                           delete_old_dirs=True))
  if tf.io.gfile.exists(tmp):
    tf.io.gfile.rmtree(tmp)


def write_manifest(plan_: Plan, path, dense_checkpoint, settings):
  """A JSON record of the upcycling: settings and, per variable, its source and treatment."""
  record = {"dense_checkpoint": dense_checkpoint, "settings": settings, "step": plan_.step,
            "notes": plan_.notes, "counts": plan_.counts(),
            "variables": [e.as_dict() for e in plan_.entries]}
  with tf.io.gfile.GFile(path, "w") as f:
    json.dump(record, f, indent=1)


def router_stddevs_of(model) -> Dict[str, float]:
  """{"<stack>/<sub-layer name>": router_init_stddev} of every sparse layer of a Bitransformer."""
  out = {}
  for stack in ("encoder", "decoder"):
    unitransformer = getattr(model, stack, None)
    if unitransformer is None:
      continue
    for layer in unitransformer.layer_stack.layers:
      if hasattr(layer, "router_init_stddev") and layer.name:
        out[f"{stack}/{layer.name}"] = layer.router_init_stddev
  return out


def resolve_checkpoint(path):
  """A checkpoint prefix: `path` itself, or the latest checkpoint of the directory `path`."""
  if tf.io.gfile.exists(path + ".index"):
    return path
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest:
      return latest
  raise UpcycleError(f"--dense_checkpoint={path!r}: neither a checkpoint prefix (no {path}.index) "
                     "nor a directory with a checkpoint; e.g. "
                     "gs://t5-data/pretrained_models/t5.1.1.large/model.ckpt-1000000")


def sparse_variables(gin_files, gin_params=(), vocab_size=32100):
  """The sparse model's variables and routers' stddevs, from its gin files (graph never lowered).

  Returns:
    ({name: (mtf.Shape, master tf.DType)} in creation order, {sparse layer: router_init_stddev},
     a mesh_tensorflow AdafactorOptimizer configured by the same gin bindings).
  """
  from mesh_tensorflow import optimize  # pylint: disable=g-import-not-at-top
  from st_moe.analysis import model_graph  # pylint: disable=g-import-not-at-top
  model_graph.parse_gin(gin_files, gin_params)
  # One device, a small batch: names and shapes depend on neither (the layout is for training).
  graph = model_graph.build(vocab_size=vocab_size, batch_size=4,
                            sequence_length={"inputs": 16, "targets": 16}, mesh_shape="",
                            layout_rules="")
  variables = {v.name: (v.shape, v.master_dtype) for v in graph.graph.all_variables}
  return variables, router_stddevs_of(graph.model), optimize.AdafactorOptimizer()


def upcycle(dense_checkpoint, gin_files, out_dir, gin_params=(), vocab_size=32100,
            extra_dense_ffn="identity", optimizer_slots="tile", step="keep", seed=0,
            overwrite=False, shard_bytes=1 << 30, dry_run=False):
  """Reads a dense checkpoint, writes `<out_dir>/model.ckpt-<step>` of the sparse model.

  Every check runs before anything is written (module docstring). Also writes
  `<out_dir>/upcycle.json` (settings and, per variable, its source and treatment).

  Args:
    dense_checkpoint: a checkpoint prefix or a directory (its latest checkpoint); gs:// works.
    gin_files, gin_params: the sparse model (e.g. ["st_moe_l.gin"]), as for t5_mesh_transformer.
    out_dir: where to write; gs:// works.
    vocab_size: the sparse model's vocabulary before padding (T5's: 32100 -> 32128 rows).
    extra_dense_ffn, optimizer_slots, step, seed: see the module docstring and `plan`.
    overwrite: replace an existing checkpoint of that step in out_dir.
    shard_bytes: see `write`.
    dry_run: check and plan only (reads the dense checkpoint's variable list, writes nothing).

  Returns:
    (the checkpoint prefix written, or that would be written; the Plan).
  """
  dense_checkpoint = resolve_checkpoint(dense_checkpoint)
  reader = tf.compat.v1.train.NewCheckpointReader(dense_checkpoint)
  # The reader directly (tf.train.list_variables / load_checkpoint probe for directories, which
  # some file systems answer oddly).
  dense_shapes = dict(sorted(reader.get_variable_to_shape_map().items()))
  dense_step = (int(reader.get_tensor(GLOBAL_STEP)) if reader.has_tensor(GLOBAL_STEP) else None)
  variables, stddevs, adafactor = sparse_variables(gin_files, gin_params, vocab_size)
  the_plan = plan(dense_shapes, variables, stddevs, adafactor, extra_dense_ffn=extra_dense_ffn,
                  optimizer_slots=optimizer_slots, step=step, dense_step=dense_step)
  prefix = f"{out_dir.rstrip('/')}/model.ckpt-{the_plan.step}"
  if tf.io.gfile.exists(prefix + ".index") and not overwrite:
    raise UpcycleError(f"{prefix} exists: choose another --out, or pass --overwrite")
  if dry_run:
    return prefix, the_plan
  tf.io.gfile.makedirs(out_dir)
  write(the_plan, reader, prefix, seed=seed, shard_bytes=shard_bytes)
  write_manifest(the_plan, f"{out_dir.rstrip('/')}/upcycle.json", dense_checkpoint, {
      "gin_files": list(gin_files), "gin_params": list(gin_params), "vocab_size": vocab_size,
      "extra_dense_ffn": extra_dense_ffn, "optimizer_slots": optimizer_slots, "step": step,
      "seed": seed})
  return prefix, the_plan
