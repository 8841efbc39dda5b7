"""Router entropy per sparse layer (ST-MoE, arXiv 2202.08906, Sec. 7 and Table 14's measure).

The traced model is the capacity table's run at train capacity factor 1.25 (the same run folder,
trained once for both tables), traced at eval capacity factor 2.0 by st_moe.analysis.tracing: the
trace is cached in the run's folder and shared with the capacity table's eval-2.0 column.
"""
import math

from st_moe.analysis import reporting
from st_moe.experiments import jobs
from st_moe.experiments.tables import capacity
from st_moe.experiments.tables import common

PAPER_ENTROPY = {"encoder": [2.2, 1.8, 1.6, 1.7, 1.7, 1.2], "decoder": [3.4] * 6,
                 "uniform": math.log(32)}
TRAIN_CF = 1.25  # the default model's train capacity factor
STACKS = ("encoder", "decoder")
HEADERS = ["sparse layer", "encoder (ours)", "decoder (ours)", "encoder (paper)",
           "decoder (paper)", "encoder / ln E (ours / paper)", "decoder / ln E (ours / paper)"]


def by_stack(per_seed):
  """{stack: [per sparse layer: [router entropy per seed]]} from the seeds' routing.json lists."""
  found = {stack: [] for stack in STACKS}
  for i, layer in enumerate(per_seed[0]):
    found[layer["stack"]].append([layers[i]["router_entropy"] for layers in per_seed])
  return found


def rows(per_seed):
  """The table's rows: one per sparse layer index, then the uniform bound."""
  stacks = by_stack(per_seed)
  uniform = per_seed[0][0]["uniform_entropy"]
  n = max(len(v) for v in stacks.values())
  found = []
  for j in range(max(n, 6)):
    row = [j + 1]
    for stack in STACKS:
      if j < len(stacks[stack]):
        vals = stacks[stack][j]
        row.append(common.pm(vals, 2) if len(vals) > 1 else round(vals[0], 3))
      else:
        row.append(None)
    for stack in STACKS:
      row.append(PAPER_ENTROPY[stack][j] if j < 6 else None)
    for stack in STACKS:  # entropy / ln E, ours then the paper's
      mine = (f"{jobs.mean_std(stacks[stack][j])[0] / uniform:.2f}"
              if j < len(stacks[stack]) else "-")
      paper = f"{PAPER_ENTROPY[stack][j] / PAPER_ENTROPY['uniform']:.2f}" if j < 6 else "-"
      row.append(f"{mine} / {paper}")
    found.append(row)
  found.append(["uniform bound (ln E)", round(uniform, 3), round(uniform, 3),
                round(PAPER_ENTROPY["uniform"], 2), round(PAPER_ENTROPY["uniform"], 2),
                "1 / 1", "1 / 1"])
  return found


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
  stacks = by_stack(per_seed)
  uniform = per_seed[0][0]["uniform_entropy"]
  ours = {s: [jobs.mean_std(v)[0] / uniform for v in stacks[s]] for s in STACKS}
  spread = {s: [jobs.mean_std(v)[1] / uniform for v in stacks[s]] for s in STACKS}
  paper = {s: [v / PAPER_ENTROPY["uniform"] for v in PAPER_ENTROPY[s]] for s in STACKS}
  reporting.plot_entropy_bars(
      {"ours": ours, "paper (ST-MoE-32B-like, 32 experts)": paper},
      jobs.join(out, "entropy.png"), "Router entropy / ln E per sparse layer",
      errors={"ours": spread} if len(per_seed) > 1 else None)
  n = max(len(v) for v in stacks.values())
  intro = (f"Scale `{config.scale}` ({per_seed[0][0]['num_experts']} experts, {n} sparse layers "
           f"per stack), {config.seeds} seed(s), {config.steps} steps; the traced model is the "
           f"capacity table's run at train capacity factor {TRAIN_CF:g} (same run folder), traced "
           f"on {config.trace_tokens} validation tokens at eval capacity factor "
           f"{common.DEFAULT_EVAL_CF:g} by st_moe.analysis.tracing. Router entropy: mean over "
           "tokens of the entropy of the router's softmax over experts (nats), bounded by ln E. "
           "Paper: ST-MoE-32B-like model, 32 experts, 6 sparse layers per stack (ln 32 = 3.47).")
  return common.write_table(out, "entropy", HEADERS, rows(per_seed), intro, runs,
                            "![entropy](entropy.png)")
