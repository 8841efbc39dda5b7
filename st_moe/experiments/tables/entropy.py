"""Router entropy per sparse layer (ST-MoE, arXiv 2202.08906, Table 14) and the encoder experts'
specialisation (Table 13).

Table 14 is the router entropy of the span-corruption sentinel tokens; the all-token entropy stands
beside it. Table 13 lists, per category (sentinels, punctuation, conjunctions and articles, verbs,
visual descriptions, proper names, numbers), the encoder layers with an expert specialised in it;
ours marks, per encoder sparse layer, the expert whose share of that category is furthest above the
category's share of all tokens (st_moe.analysis.routing_stats.specialized_experts: at least 2x and
20% of the expert's tokens). Verbs, proper names and visual descriptions are found by word lists and
spelling, not a tagger (routing_stats.word_class).

The traced model is the capacity table's run at train capacity factor 1.25 (the same run folder,
trained once for both tables), traced at eval capacity factor 2.0 by st_moe.analysis.tracing: the
trace is cached in the run's folder and shared with the capacity table's eval-2.0 column.
"""
import math

from st_moe.analysis import reporting
from st_moe.analysis import routing_stats as rs
from st_moe.experiments import jobs
from st_moe.experiments.tables import capacity
from st_moe.experiments.tables import common

# Table 14 (sentinel tokens): ST-MoE-32B-like model, 32 experts, 6 sparse layers per stack.
PAPER_ENTROPY = {"encoder": [2.2, 1.8, 1.6, 1.7, 1.7, 1.2], "decoder": [3.4] * 6,
                 "uniform": math.log(32)}
# Table 13: the encoder layers where the paper found an expert specialised in each category.
PAPER_SPECIALISATION = {rs.SENTINEL: "1, 4, 6", rs.PUNCTUATION: "2, 6",
                        rs.CONJ_ARTICLE: "3, 6", rs.VERB: "1", rs.VISUAL: "0",
                        rs.PROPER_NAME: "1", rs.NUMBER: "1"}
CATEGORIES = tuple(c for c in rs.TOKEN_CLASSES if c != rs.OTHER)
TRAIN_CF = 1.25  # the default model's train capacity factor
STACKS = ("encoder", "decoder")
HEADERS = ["sparse layer", "encoder sentinels (ours)", "encoder all tokens (ours)",
           "decoder sentinels (ours)", "decoder all tokens (ours)", "encoder sentinels (paper)",
           "decoder sentinels (paper)", "encoder sentinels / ln E (ours / paper)",
           "decoder sentinels / ln E (ours / paper)"]
ENTROPIES = ("sentinel_router_entropy", "router_entropy")


def by_stack(per_seed, key="router_entropy"):
  """{stack: [per sparse layer: [layer[key] per seed, None where a seed has no such token]]}."""
  found = {stack: [] for stack in STACKS}
  for i, layer in enumerate(per_seed[0]):
    found[layer["stack"]].append([layers[i].get(key) for layers in per_seed])
  return found


def _cell(values):
  values = [v for v in values if v is not None]
  if not values:
    return None
  return common.pm(values, 2) if len(values) > 1 else round(values[0], 3)


def rows(per_seed):
  """Table 14's rows: one per sparse layer index, then the uniform bound."""
  stacks = {key: by_stack(per_seed, key) for key in ENTROPIES}
  uniform = per_seed[0][0]["uniform_entropy"]
  n = max(len(v) for v in stacks["router_entropy"].values())
  found = []
  for j in range(max(n, 6)):
    row = [j + 1]
    for stack in STACKS:
      for key in ENTROPIES:
        layers = stacks[key][stack]
        row.append(_cell(layers[j]) if j < len(layers) else None)
    for stack in STACKS:
      row.append(PAPER_ENTROPY[stack][j] if j < 6 else None)
    for stack in STACKS:  # sentinel entropy / ln E, ours then the paper's
      layers = stacks["sentinel_router_entropy"][stack]
      value = jobs.mean_std(layers[j])[0] if j < len(layers) else None
      mine = "-" if value is None else f"{value / uniform:.2f}"
      paper = f"{PAPER_ENTROPY[stack][j] / PAPER_ENTROPY['uniform']:.2f}" if j < 6 else "-"
      row.append(f"{mine} / {paper}")
    found.append(row)
  found.append(["uniform bound (ln E)", round(uniform, 3), round(uniform, 3), round(uniform, 3),
                round(uniform, 3), round(PAPER_ENTROPY["uniform"], 2),
                round(PAPER_ENTROPY["uniform"], 2), "1 / 1", "1 / 1"])
  return found


def strongest_specialist(layer, category):
  """(expert, share, base rate) of the expert most specialised in `category` in one traced layer's
  summary (st_moe.analysis.tracing.analyse), or None."""
  found = [s for s in layer["specialized"] if s["class"] == category]
  if not found:
    return None
  best = max(found, key=lambda s: s["share"] / s["base_rate"])
  return best["expert"], best["share"], best["base_rate"]


def specialisation_rows(per_seed):
  """Table 13's grid: one row per category, one column per encoder sparse layer, then the paper's
  layers. A cell: how many seeds have a specialised expert there, and seed 0's strongest."""
  encoder = [i for i, layer in enumerate(per_seed[0]) if layer["stack"] == "encoder"]
  found = []
  for category in CATEGORIES:
    row = [category]
    for i in encoder:
      best = [strongest_specialist(layers[i], category) for layers in per_seed]
      seeds = sum(b is not None for b in best)
      first = next((b for b in best if b is not None), None)
      if first is None:
        row.append("-")
        continue
      text = f"expert {first[0]}: {100 * first[1]:.0f}% vs {100 * first[2]:.0f}%"
      row.append(text if len(per_seed) == 1 else f"{seeds}/{len(per_seed)} seeds; {text}")
    found.append(row + [PAPER_SPECIALISATION[category]])
  return found, len(encoder)


def enrichment_grid(layers):
  """<[category][encoder layer]> the largest share / base rate over one seed's experts (NaN, a
  blank cell, where the category does not occur): how far the most specialised expert stands above
  the base rate."""
  grid = []
  encoder = [l for l in layers if l["stack"] == "encoder"]
  for category in CATEGORIES:
    t = rs.TOKEN_CLASSES.index(category)
    row = []
    for layer in encoder:
      rate = layer["base_rates"][t]
      row.append(max(shares[t] for shares in layer["class_shares"]) / rate if rate > 0
                 else float("nan"))
    grid.append(row)
  return grid


def table(config: common.Config, show=print):
  """Traces the default model's seeds and writes the entropy table; returns its path."""
  out = jobs.join(config.out, "entropy")
  runs = [capacity.make_run(config, TRAIN_CF, seed) for seed in range(config.seeds)]

  def prepare(run, show_line):
    common.train(run, config, show_line)
    if run.diverged:
      return None
    return common.trace(run, config, [common.DEFAULT_EVAL_CF],
                        show_line)[common.DEFAULT_EVAL_CF]["layers"]

  per_seed = [layers for layers in jobs.run_all(runs, prepare, config.jobs, show) if layers]
  if not per_seed:
    raise RuntimeError("entropy: every run diverged; nothing to trace")
  if any("sentinel_router_entropy" not in layer for layers in per_seed for layer in layers):
    raise RuntimeError(
        "entropy: a cached trace (<run>/trace_cf2/routing.json) predates the sentinel entropy; "
        "delete the run's trace_cf2 folder and rerun to trace it again")
  uniform = per_seed[0][0]["uniform_entropy"]

  def over_ln_e(key):
    stacks = by_stack(per_seed, key)
    means = {s: [(jobs.mean_std(v)[0] or 0.0) / uniform for v in stacks[s]] for s in STACKS}
    spreads = {s: [jobs.mean_std(v)[1] / uniform
                   if sum(x is not None for x in v) > 1 else 0.0 for v in stacks[s]]
               for s in STACKS}
    return means, spreads

  sentinels, sentinel_spread = over_ln_e("sentinel_router_entropy")
  everything, everything_spread = over_ln_e("router_entropy")
  paper = {s: [v / PAPER_ENTROPY["uniform"] for v in PAPER_ENTROPY[s]] for s in STACKS}
  reporting.plot_entropy_bars(
      {"ours, sentinels": sentinels, "ours, all tokens": everything,
       "paper, sentinels (ST-MoE-32B-like, 32 experts)": paper},
      jobs.join(out, "entropy.png"), "Router entropy / ln E per sparse layer",
      errors=({"ours, sentinels": sentinel_spread, "ours, all tokens": everything_spread}
              if len(per_seed) > 1 else None))
  special, n_encoder = specialisation_rows(per_seed)
  grid = enrichment_grid(per_seed[0])
  reporting.plot_heatmap(
      grid, list(CATEGORIES), [f"encoder sparse layer {j + 1}" for j in range(n_encoder)],
      jobs.join(out, "specialisation.png"),
      "Table 13 (seed 0): the top expert's share / base rate",
      value_format="{:.1f}x", vmin=0.0, colorbar_label="the expert's share / the base rate")
  n = max(len(v) for v in by_stack(per_seed).values())
  num_sentinels = sum(layer["num_sentinels"] for layer in per_seed[0] if layer["stack"] == "encoder")
  intro = (f"Scale `{config.scale}` ({per_seed[0][0]['num_experts']} experts, {n} sparse layers "
           f"per stack), {config.seeds} seed(s), {config.steps} steps; the traced model is the "
           f"capacity table's run at train capacity factor {TRAIN_CF:g} (same run folder), traced "
           f"on {config.trace_tokens} validation tokens at eval capacity factor "
           f"{common.DEFAULT_EVAL_CF:g} by st_moe.analysis.tracing. Router entropy: mean over "
           "tokens of the entropy of the router's softmax over experts (nats), bounded by ln E; "
           "the paper's Table 14 takes the span-corruption sentinel tokens only "
           f"({num_sentinels // max(1, n)} per encoder layer in seed 0's trace here), the all-token "
           "entropy is beside it. Paper: ST-MoE-32B-like model, 32 experts, 6 sparse layers per "
           "stack (ln 32 = 3.47). Values: mean +- sample std over seeds.")
  spec_headers = (["category"] + [f"encoder sparse layer {j + 1} (ours)" for j in range(n_encoder)]
                  + ["layers (paper)"])
  extra = "\n".join([
      "![entropy](entropy.png)", "",
      "## Table 13: encoder expert specialisation", "",
      "Per category and encoder sparse layer: the expert whose first-choice tokens hold the "
      "largest share of the category relative to its share of all traced tokens, when that share "
      "is at least 2x the base rate and 20% of the expert's tokens "
      "(routing_stats.specialized_experts); with several seeds, how many seeds have such an expert "
      "and the first one's. Verbs, proper names and visual descriptions come from word lists and "
      "spelling (routing_stats.word_class), not a tagger. The paper's column is the layers its "
      "Table 13 names.", "",
      reporting.markdown_table(spec_headers, special), "",
      "![specialisation](specialisation.png)"])
  return common.write_table(out, "entropy", HEADERS, rows(per_seed), intro, runs, extra)
