"""The paper's tables (ST-MoE, arXiv 2202.08906): stability study, capacity factors, routing entropy
(Tables 13 and 14), sparse against dense, the ablations top_k (Table 8), dense_ffn (Table 16)
and expert_bias (Table 17), and the fine-tuning studies (finetune.py: Tables 20 and 5, Figures 4-6).

Library side of `tools/reproduce.py`: one module per table family (stability, capacity, entropy,
sparse_vs_dense) over common.py (settings, runs, output files), all run through
st_moe.experiments.jobs.

  from st_moe.experiments import tables
  path = tables.run_table("capacity", tables.Config(out="reproduction_out"))
"""
from st_moe.experiments.tables import ablations
from st_moe.experiments.tables import capacity
from st_moe.experiments.tables import common
from st_moe.experiments.tables import entropy
from st_moe.experiments.tables import finetune
from st_moe.experiments.tables import sparse_vs_dense
from st_moe.experiments.tables import stability

Config = common.Config
TABLES = {"stability": stability.table, "capacity": capacity.table, "entropy": entropy.table,
          "sparse_vs_dense": sparse_vs_dense.table}
# Tables 8, 16 and 17: one row per setting (st_moe.experiments.tables.ablations).
TABLES.update({name: (lambda config, show=print, name=name: ablations.table(name, config, show))
               for name in ablations.TABLES})
# The fine-tuning studies: cells fine-tuned from the pretrained sparse_vs_dense runs.
TABLES.update({name: (lambda config, show=print, name=name: finetune.table(name, config, show))
               for name in finetune.TABLES})


def validate(table, config: Config):
  """Raises ValueError naming the first setting that cannot work (before anything runs)."""
  if table not in TABLES:
    raise ValueError(f"TABLE={table!r}: must be one of {', '.join(TABLES)}")
  common.validate_common(config)
  if table == "stability":
    stability.validate(config)
  if table in finetune.TABLES:
    finetune.validate(table, config)
  elif table in ablations.TABLES:
    ablations.selected(table, config)
  elif config.rows:
    raise ValueError(f"--rows={','.join(config.rows)!r}: {table} runs all its rows; --rows "
                     f"selects rows of {', '.join(list(ablations.TABLES) + list(finetune.TABLES))}")


def run_table(table, config: Config, show=print):
  """Runs (or resumes) every run of `table` and writes its files; returns the markdown's path."""
  validate(table, config)
  return TABLES[table](config, show)
