"""st-moe: ST-MoE (Zoph et al. 2022, arXiv 2202.08906) in Mesh TensorFlow.

Importing `st_moe` does nothing but define the package: no TensorFlow, no registration. The layout:

  st_moe/              the model: routing (router logits, top-k assignment, capacity), dispatch
                       (tokens to expert buffers and back), losses (balance, router z-loss), layers
                       (`SparseFFN`), stacking (dense-sparse stacks), norms, guard (the in-graph
                       check that keeps non-finite updates out of the weights), optimizers
                       (Adafactor with per-variable learning-rate multipliers)
  st_moe/register.py   the one registration point (gin reader, configurables, tasks, resource
                       variables): imported by every model and run gin file
  st_moe/gin_paths.py  where the gin files are; how gin finds them by bare name
  st_moe/analysis/     reading a model: its graph (params, FLOPs), mesh planning, routing traces and
                       their statistics, reports and pictures
  st_moe/experiments/  running models: t5_mesh_transformer runs, event files, divergence and collapse
                       rules, the demo, the paper's tables, benchmarks
  st_moe/tasks/        SeqIO tasks (the repository's tasks/ folder)
  st_moe/gin/          gin files (the repository's gin/ folder; installed copies)
"""
__version__ = "0.1.0"
