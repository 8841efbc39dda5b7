"""Routing tracer: which experts each token goes to, layer by layer, in a trained ST-MoE.

Builds the model from its gin files exactly as `t5_mesh_transformer` would (st_moe.analysis.model_graph),
feeds it examples of a SeqIO task, restores a checkpoint, and reads every SparseFFN's
RoutingRecord (st_moe.layers.routing_records). The analysis is st_moe.analysis.routing_stats; the report
(markdown, JSON, PNG heat maps) follows the paper's qualitative routing analysis (ST-MoE,
arXiv 2202.08906, Sec. 7): routing entropy per sparse layer against ln E, what kinds of tokens each
encoder expert takes, and which experts specialise.

Dimensions: B sequences, L length, K choices per token, E experts, N traced tokens.
"""
import dataclasses
import json
import os
from typing import Dict, Optional

import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import utils as mtf_utils
import numpy as np
import tensorflow.compat.v1 as tf

from st_moe import layers
from st_moe.analysis import model_graph
from st_moe.analysis import reporting
from st_moe.analysis import routing_stats as rs


@dataclasses.dataclass
class LayerTrace:
  """What one sparse layer did with the traced tokens (non-padding tokens only)."""
  name: str
  stack: str  # "encoder" or "decoder"
  num_experts: int
  token_ids: np.ndarray  # <int32>[N] the token each position carries into this layer
  expert_index: np.ndarray  # <int32>[N, K]
  gates: np.ndarray  # <float32>[N, K]
  kept: np.ndarray  # <bool>[N, K]
  router_probs: np.ndarray  # <float32>[N, E]
  # The layer's own summaries (fraction_dropped, entropy, ...), averaged over the batches run,
  # which may hold tokens beyond the traced ones (the rest of the last row, padding rows).
  layer_metrics: Dict[str, float]
  sequence_length: Optional[Dict[str, int]] = None  # the lengths the model was run at


OPERATIVE_CONFIG = "operative_config.gin"
# The second-expert policy the tracer evaluates with: "threshold" keeps a second choice iff its gate
# exceeds the layer's threshold, so the same checkpoint and tokens give the same trace every time
# ("random", the models' evaluation default, samples that decision).
DETERMINISTIC_SECOND_POLICY = "threshold"


def _stack_of(name):
  return "decoder" if name.startswith("decoder") else "encoder"


def load_examples(task_name, split, sequence_length, num_tokens, batch_size, seed=0):
  """Padded, unpacked examples until `num_tokens` encoder tokens are read, padded to whole batches.

  Reads no example beyond the one that reaches `num_tokens`; rows added to fill the last batch are
  all padding. `seed` fixes the task's random preprocessing (span corruption draws its spans).

  Returns:
    (inputs <int32>[B_total, Li], targets <int32>[B_total, Lt], vocabulary)
  """
  import seqio  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset(sequence_length, split=split, shuffle=False, seed=seed, use_cached=False,
                        try_in_mem_cache=False)
  inputs, targets = [], []
  total = 0
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  for ex in tfds.as_numpy(ds):  # eager or, in a TF1 graph-mode process, through a session
    row_in = np.zeros(sequence_length["inputs"], np.int32)
    row_tg = np.zeros(sequence_length["targets"], np.int32)
    x = ex["inputs"][:sequence_length["inputs"]]
    y = ex["targets"][:sequence_length["targets"]]
    row_in[:len(x)] = x
    row_tg[:len(y)] = y
    inputs.append(row_in)
    targets.append(row_tg)
    total += int(np.count_nonzero(row_in))
    if total >= num_tokens:
      break
  if not inputs:
    raise ValueError(f"task {task_name!r} split {split!r} gave no examples")
  while len(inputs) % batch_size:  # pad to whole batches with empty rows (all padding)
    inputs.append(np.zeros(sequence_length["inputs"], np.int32))
    targets.append(np.zeros(sequence_length["targets"], np.int32))
  vocabulary = task.output_features["inputs"].vocabulary
  return np.stack(inputs), np.stack(targets), vocabulary


def traced_masks(inputs, targets, num_tokens):
  """Which positions are traced: the first `num_tokens` non-padding encoder tokens, row by row.

  Args:
    inputs: <int32>[B, Li]; targets: <int32>[B, Lt] (0 is padding).
    num_tokens: encoder tokens to trace.

  Returns:
    (encoder mask <bool>[B, Li], decoder mask <bool>[B, Lt]): the decoder positions traced are the
    non-padding targets of the rows whose encoder tokens are traced (a row cut by the budget
    counts as traced).
  """
  nonpad = inputs != 0
  order = np.cumsum(nonpad.reshape(-1)).reshape(inputs.shape)  # 1-based index among tokens
  encoder = nonpad & (order <= num_tokens)
  decoder = (targets != 0) & encoder.any(axis=1, keepdims=True)
  return encoder, decoder


def model_dir_config(model_dir):
  """The operative_config.gin t5_mesh_transformer wrote to `model_dir`, or None if there is none."""
  if not model_dir:
    return None
  path = os.path.join(model_dir, OPERATIVE_CONFIG)
  return path if tf.io.gfile.exists(path) else None


def checkpoint_to_trace(model_dir, checkpoint_path=None):
  """`checkpoint_path`, or the latest checkpoint in `model_dir`.

  Raises:
    FileNotFoundError: neither.
  """
  checkpoint_path = checkpoint_path or tf.train.latest_checkpoint(model_dir)
  if checkpoint_path is None:
    raise FileNotFoundError(f"--model_dir={model_dir}: no checkpoint there to trace")
  return checkpoint_path


def trace(gin_files, gin_params, model_dir, task_name, split="validation", num_tokens=2048,
          batch_size=8, sequence_length=None, checkpoint_path=None,
          second_policy_eval=DETERMINISTIC_SECOND_POLICY, seed=0):
  """Runs the model over `num_tokens` encoder tokens of the task; one LayerTrace per sparse call.

  `trace_checkpoints` (see there for the arguments) at `checkpoint_path`, by default the latest
  checkpoint in `model_dir`. Returns (list of LayerTrace, the task's vocabulary).

  Raises:
    FileNotFoundError: no checkpoint.
  """
  traces, vocabulary = trace_checkpoints(
      gin_files, gin_params, model_dir, task_name,
      [checkpoint_to_trace(model_dir, checkpoint_path)], split=split,
      num_tokens=num_tokens, batch_size=batch_size, sequence_length=sequence_length,
      second_policy_eval=second_policy_eval, seed=seed)
  return traces[0], vocabulary


def trace_checkpoints(gin_files, gin_params, model_dir, task_name, checkpoint_paths,
                      split="validation", num_tokens=2048, batch_size=8, sequence_length=None,
                      second_policy_eval=DETERMINISTIC_SECOND_POLICY, seed=0):
  """The same tokens traced at each of `checkpoint_paths`: one graph, one read of the task, one
  session that restores the checkpoints in turn.

  The model is the one `model_dir/operative_config.gin` describes (t5_mesh_transformer writes it),
  with `gin_files` and `gin_params` parsed on top (e.g. a CPU layout for a TPU-trained model);
  without an operative config, `gin_files` alone.

  Args:
    gin_files: more gin files (bare names resolve as in t5_mesh_transformer); may be empty when
      `model_dir` holds an operative config.
    gin_params: gin bindings, parsed last.
    model_dir: the trained model's folder.
    task_name, split: the SeqIO task (or mixture) and split to read.
    num_tokens: encoder tokens (non-padding) to trace; decoder tokens are those of the same rows.
    batch_size: sequences per batch run.
    sequence_length: {"inputs", "targets"}; default: utils.run.sequence_length of the gin config.
    checkpoint_paths: checkpoints of the model (paths without their suffix), traced in turn.
    second_policy_eval: bound to st_moe.SparseFFN.second_policy_eval (None: keep the model's);
      the default, "threshold", makes the trace deterministic.
    seed: seed of the task's random preprocessing (the same seed reads the same tokens).

  Returns:
    (one list of LayerTrace per checkpoint, the task's vocabulary).

  Raises:
    ValueError: no gin configuration, no sequence length, num_tokens < 1, no checkpoint given, a
      model without st_moe.SparseFFN layers.
  """
  checkpoint_paths = list(checkpoint_paths)
  if not checkpoint_paths:
    raise ValueError("checkpoint_paths=[]: give at least one checkpoint to trace")
  if num_tokens < 1:
    raise ValueError(f"num_tokens={num_tokens}: trace at least 1 token")
  operative = model_dir_config(model_dir)
  files = ([operative] if operative else []) + list(gin_files or [])
  if not files:
    raise ValueError(f"model_dir={model_dir!r} has no {OPERATIVE_CONFIG} and no gin file was "
                     "given: give the model's gin files, e.g. --gin_file=st_moe_tiny.gin")
  params = list(gin_params or [])
  if second_policy_eval is not None:
    params.append(f"st_moe.SparseFFN.second_policy_eval = {second_policy_eval!r}")
  # An operative config may name t5's dataset functions; the tracer does not need them.
  model_graph.parse_gin(files, params, skip_unknown=bool(operative))
  import st_moe.tasks  # pylint: disable=g-import-not-at-top,unused-import
  if sequence_length is None:
    sequence_length = model_graph.query("utils.run.sequence_length", None)
  if not sequence_length:
    raise ValueError(f"no sequence length: utils.run.sequence_length is not bound in {files}; "
                     "give --inputs_length and --targets_length (or the run's gin file)")
  if isinstance(sequence_length, int):
    sequence_length = {"inputs": sequence_length, "targets": sequence_length}
  sequence_length = {k: int(sequence_length[k]) for k in ("inputs", "targets")}
  inputs, targets, vocabulary = load_examples(task_name, split, sequence_length, num_tokens,
                                              batch_size, seed=seed)
  encoder_mask, decoder_mask = traced_masks(inputs, targets, num_tokens)
  mesh_shape, layout_rules = model_graph.gin_mesh_and_layout()
  per_checkpoint = []
  graph_tf = tf.Graph()
  with graph_tf.as_default():
    model = mtf_utils.build_model(
        model_type="bitransformer", input_vocab_size=vocabulary.vocab_size,
        output_vocab_size=vocabulary.vocab_size, layout_rules=layout_rules,
        mesh_shape=mesh_shape)
    graph = mtf.Graph()
    mesh = mtf.Mesh(graph, "my_mesh")
    batch_dim = mtf.Dimension("batch", batch_size)
    tf_in = tf.placeholder(tf.int32, [batch_size, sequence_length["inputs"]])
    tf_tg = tf.placeholder(tf.int32, [batch_size, sequence_length["targets"]])
    feats = {}
    for key, tensor, length in (("inputs", tf_in, sequence_length["inputs"]),
                                ("targets", tf_tg, sequence_length["targets"])):
      shape = mtf.Shape([batch_dim, mtf.Dimension("length", length)])
      feats[key] = mtf.import_fully_replicated(mesh, tensor, shape, name=key)
      feats[key + "_segmentation"] = mtf.import_fully_replicated(
          mesh, tf.cast(tf.not_equal(tensor, 0), tf.int32), shape, name=key + "_segmentation")
    model.call_simple(
        inputs=feats["inputs"], targets=feats["targets"], compute_loss=True, mode="eval",
        variable_dtype=mtf_utils.get_variable_dtype(),
        encoder_sequence_id=feats["inputs_segmentation"],
        decoder_sequence_id=feats["targets_segmentation"])
    records = layers.routing_records(graph)
    if not records:
      raise ValueError(f"gin files {list(gin_files)} build a model with no st_moe.SparseFFN layer: "
                       "nothing to trace")
    mesh_impl = mtf.placement_mesh_impl.PlacementMeshImpl(
        mesh_shape, layout_rules, [""] * mesh_shape.size)
    lowering = mtf.Lowering(graph, {mesh: mesh_impl})
    fetches = []
    for r in records:
      item = {"expert_index": r.expert_index, "gates": r.gates, "kept": r.kept,
              "router_probs": r.router_probs}
      for key, value in r.metrics.items():
        item["metric/" + key] = value
      fetches.append({k: lowering.export_to_tf_tensor(v) for k, v in item.items()})
    saver = tf.train.Saver(var_list=[v for v in tf.global_variables()
                                     if not v.name.startswith("global_step")])
    with tf.Session() as sess:
      for checkpoint_path in checkpoint_paths:
        saver.restore(sess, checkpoint_path)
        sess.run(lowering.copy_masters_to_slices())
        per_layer = {}
        per_checkpoint.append(per_layer)
        _run_batches(sess, fetches, records, (tf_in, tf_tg), inputs, targets,
                     (encoder_mask, decoder_mask), batch_size, per_layer)
  return [_layer_traces(records, per_layer, sequence_length) for per_layer in per_checkpoint], \
      vocabulary


def _run_batches(sess, fetches, records, placeholders, inputs, targets, row_masks, batch_size,
                 per_layer):
  """Runs the traced rows batch by batch; appends each sparse layer's values to `per_layer`."""
  tf_in, tf_tg = placeholders
  encoder_mask, decoder_mask = row_masks
  for start in range(0, len(inputs), batch_size):
    batch_in = inputs[start:start + batch_size]
    batch_tg = targets[start:start + batch_size]
    masks = {"encoder": encoder_mask[start:start + batch_size],
             "decoder": decoder_mask[start:start + batch_size]}
    values = sess.run(fetches, {tf_in: batch_in, tf_tg: batch_tg})
    # The decoder at position t reads the previous target token (0 at t = 0).
    dec_in = np.concatenate([np.zeros_like(batch_tg[:, :1]), batch_tg[:, :-1]], axis=1)
    for r, v in zip(records, values):
      stack = _stack_of(r.name)
      tokens = batch_in if stack == "encoder" else dec_in
      mask = masks[stack]
      acc = per_layer.setdefault(r.name, {"stack": stack, "tokens": [], "metrics": {}})
      acc["tokens"].append(tokens[mask])
      for key, arr in v.items():
        if key.startswith("metric/"):
          acc["metrics"].setdefault(key[len("metric/"):], []).append(float(arr))
        else:
          acc.setdefault(key, []).append(arr[mask])


def _layer_traces(records, per_layer, sequence_length):
  """One LayerTrace per sparse layer from the values `_run_batches` collected."""
  traces = []
  for r in records:
    acc = per_layer[r.name]
    traces.append(LayerTrace(
        name=r.name, stack=acc["stack"], num_experts=r.router_probs.shape[-1].size,
        token_ids=np.concatenate(acc["tokens"]).astype(np.int32),
        expert_index=np.concatenate(acc["expert_index"]).astype(np.int32),
        gates=np.concatenate(acc["gates"]).astype(np.float32),
        kept=np.concatenate(acc["kept"]) > 0.5,
        router_probs=np.concatenate(acc["router_probs"]).astype(np.float32),
        layer_metrics={k: float(np.mean(v)) for k, v in acc["metrics"].items()},
        sequence_length=dict(sequence_length)))
  return traces


def pieces_and_sentinels(token_ids, vocabulary):
  """The vocabulary's spelling of each id, and whether it is a span-corruption sentinel."""
  base = vocabulary.vocab_size - getattr(vocabulary, "extra_ids", 0)
  cache = {}
  pieces = []
  for t in token_ids.tolist():
    if t not in cache:
      if t >= base:
        cache[t] = f"<extra_id_{vocabulary.vocab_size - 1 - t}>"
      else:
        tokenizer = getattr(vocabulary, "tokenizer", None)
        cache[t] = tokenizer.id_to_piece(t) if tokenizer is not None else vocabulary.decode([t])
    pieces.append(cache[t])
  return pieces, np.asarray(token_ids) >= base


def analyse(layer: LayerTrace, vocabulary, top_n=6):
  """Summary dict of one layer's routing (JSON-ready)."""
  pieces, sentinels = pieces_and_sentinels(layer.token_ids, vocabulary)
  classes = rs.classify_tokens(pieces, sentinels)
  top1 = layer.expert_index[:, 0]
  counts = rs.class_counts(top1, classes, layer.num_experts)
  shares = rs.class_shares(counts)
  summary = {
      "name": layer.name, "stack": layer.stack, "num_experts": layer.num_experts,
      "num_tokens": int(layer.token_ids.size),
      "sequence_length": layer.sequence_length,
      "uniform_entropy": rs.uniform_entropy(layer.num_experts),
      "router_entropy": rs.mean_router_entropy(layer.router_probs),
      # Table 14's measure: the router entropy of the span-corruption sentinels only.
      "sentinel_router_entropy": rs.mean_entropy_where(layer.router_probs, sentinels),
      "num_sentinels": int(np.sum(sentinels)),
      # Median over tokens of ln p(first) - ln p(second): how far routing is from a tie. None for
      # a one-expert layer (a dense FFN written as a sparse layer: there is no second choice).
      "top2_log_margin_median": (float(np.median(rs.top2_log_margin(layer.router_probs)))
                                 if layer.num_experts >= 2 else None),
      "load_entropy": rs.load_entropy(top1, layer.num_experts),
      "fraction_dropped": rs.dropped_fraction(layer.kept),
      "expert_load": rs.expert_load(top1, layer.num_experts).tolist(),
      "class_counts": counts.tolist(),
      "class_shares": shares.tolist(),
      "base_rates": rs.base_rates(classes).tolist(),
      "specialized": [dict(zip(("expert", "class", "share", "base_rate"), s))
                      for s in rs.specialized_experts(counts)],
      "top_tokens": rs.top_tokens(top1, pieces, layer.num_experts, n=top_n),
      "layer_metrics": layer.layer_metrics,
  }
  return summary


def add_agreement(summaries, traces, other_traces, other_checkpoint):
  """Adds to each layer's summary the fraction of its tokens whose first expert is the same in
  `other_traces` (the same tokens traced at `other_checkpoint`): how much of the routing changed
  between two checkpoints of a run."""
  if [t.name for t in traces] != [t.name for t in other_traces]:
    raise ValueError(f"checkpoint {other_checkpoint} has sparse layers "
                     f"{[t.name for t in other_traces]}, this trace {[t.name for t in traces]}: "
                     "compare checkpoints of the same model")
  for s, t, o in zip(summaries, traces, other_traces):
    if not np.array_equal(t.token_ids, o.token_ids):
      raise ValueError(f"{t.name}: the traces at the two checkpoints read different tokens; "
                       "trace both with the same --task, --split, --seed and --num_tokens")
    s["compare_checkpoint"] = other_checkpoint
    s["same_first_expert"] = rs.first_expert_agreement(t.expert_index[:, 0], o.expert_index[:, 0])


def _short(name):
  parts = [p for p in name.split("/") if p.startswith(("block_", "layer_"))]
  return f"{_stack_of(name)} " + "/".join(parts) if parts else name


def write_report(summaries, out_dir, title="Routing trace"):
  """routing.md, routing.json and one heat map PNG per layer (plus an entropy chart) in out_dir."""
  tf.io.gfile.makedirs(out_dir)
  with tf.io.gfile.GFile(os.path.join(out_dir, "routing.json"), "w") as f:
    json.dump(summaries, f, indent=1)
  compared = bool(summaries) and "same_first_expert" in summaries[0]
  rows = []
  for s in summaries:
    rows.append([_short(s["name"]), s["num_tokens"], s["router_entropy"],
                 s.get("sentinel_router_entropy"), s["uniform_entropy"],
                 s["top2_log_margin_median"], s["load_entropy"], 100 * s["fraction_dropped"],
                 len(s["specialized"])])
    if "same_first_expert" in s:
      rows[-1].append(100 * s["same_first_expert"])
  lines = [f"### {title}", "",
           "Router entropy: mean over tokens of the entropy of the router's distribution over "
           "experts (nats, bounded by ln E), over all tokens and over the span-corruption "
           "sentinels only (the paper's Table 14 measures sentinels). Load entropy: entropy of how "
           "tokens spread over experts by first choice. Token classes are the paper's Table 13 "
           "categories; verbs, proper names and visual descriptions are told by word lists and "
           "spelling, not by a tagger (st_moe.analysis.routing_stats.word_class). Margin: median "
           "over tokens of ln p(first expert) - ln p(second), the gap between the two largest "
           "router logits (near 0: small updates move tokens between experts)."
           + (f" Same first expert: % of the tokens whose first expert is the same at "
              f"{summaries[0]['compare_checkpoint']}." if compared else ""), "",
           reporting.markdown_table(
               ["sparse layer", "tokens", "router entropy (all tokens)",
                "router entropy (sentinels)", "ln E", "margin (median)", "load entropy",
                "dropped %", "specialised experts"]
               + (["same first expert %"] if compared else []), rows)]
  for i, s in enumerate(summaries):
    png = f"layer_{i:02d}_{s['stack']}_classes.png"
    reporting.plot_routing_heatmap(
        s["class_shares"], s["base_rates"], rs.TOKEN_CLASSES, os.path.join(out_dir, png),
        f"{_short(s['name'])}: each expert's tokens by class")
    lines += [f"#### {_short(s['name'])}", "",
              "base rates: " + ", ".join(f"{c} {100 * r:.0f}%" for c, r in
                                         zip(rs.TOKEN_CLASSES, s["base_rates"])), ""]
    expert_rows = []
    special = {}
    for sp in s["specialized"]:
      special.setdefault(sp["expert"], []).append(f"{sp['class']} ({100 * sp['share']:.0f}% vs "
                                                   f"{100 * sp['base_rate']:.0f}%)")
    for e in range(s["num_experts"]):
      expert_rows.append([e, f"{100 * s['expert_load'][e]:.1f}%",
                          " ".join(f"`{p}`x{c}" for p, c in s["top_tokens"][e]),
                          "; ".join(special.get(e, []))])
    lines += [reporting.markdown_table(["expert", "load", "most frequent tokens", "specialises in"],
                                       expert_rows), f"![classes]({png})", ""]
  # entropy / ln E is undefined for a one-expert layer (ln 1 = 0): its bar is left empty.
  by_stack = {stack: [s["router_entropy"] / s["uniform_entropy"] if s["uniform_entropy"] > 0
                      else float("nan") for s in summaries if s["stack"] == stack]
              for stack in reporting.STACKS}
  if any(s["uniform_entropy"] > 0 for s in summaries):
    reporting.plot_entropy_bars({"router entropy / ln E": by_stack},
                                os.path.join(out_dir, "entropy.png"),
                                "Routing entropy per sparse layer (1 = uniform over the experts)")
    lines.insert(5, "![entropy](entropy.png)\n")
  text = "\n".join(lines) + "\n"
  with tf.io.gfile.GFile(os.path.join(out_dir, "routing.md"), "w") as f:
    f.write(text)
  return text
