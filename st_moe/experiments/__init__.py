"""Running models through t5_mesh_transformer: runs and their event files, the divergence and
collapse rules, the demo, the paper's tables, benchmarks."""
