"""Reading a model: its mtf graph built but never lowered (parameters, FLOPs), mesh planning,
routing traces and their numpy statistics, markdown tables and pictures."""
