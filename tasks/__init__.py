"""SeqIO tasks of st-moe (installed as `st_moe.tasks`)."""
