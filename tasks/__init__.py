"""SeqIO tasks of st-moe (installed as `st_moe.tasks`); importing registers them all.

Registered (the table of tasks is in README.md): C4 span corruption, every downstream benchmark of the
paper (SuperGLUE, ARC, WinoGrande, ANLI R3, XSum, CNN/DailyMail, closed-book QA) with T5's
vocabulary, the embedded demo tasks with a local vocabulary (`st_moe_embedded_span_corruption` to
pretrain, `st_moe_embedded_pydoc_topic` to fine-tune and evaluate by decoding), the docs-corpus
task `st_moe_embedded_docs_span_corruption` with its own 8k vocabulary (`tasks/corpus.py`,
--scale=small), and the mixtures
`st_moe_pretrain`, `st_moe_super_glue`, `st_moe_finetune`. Importing twice is safe.

To run the same definitions with another vocabulary (tests, demo):
  st_moe.tasks.add_tasks(vocabulary, suffix="_local"); st_moe.tasks.add_mixtures("_local")
"""
from st_moe.tasks.families import add_mixtures
from st_moe.tasks.families import add_tasks
from st_moe.tasks.families import all_benchmarks
from st_moe.tasks.families import Benchmark
from st_moe.tasks.families import benchmarks
from st_moe.tasks.families import mixtures
from st_moe.tasks.families import remove
from st_moe.tasks.families import task_kwargs
from st_moe.tasks.families import task_name
from st_moe.tasks.sources import DatasetNotPreparedError
from st_moe.tasks.vocab import default_vocabulary
from st_moe.tasks.vocab import embedded_vocabulary

EMBEDDED_TASK = "st_moe_embedded_span_corruption"
EMBEDDED_DOWNSTREAM_TASK = "st_moe_embedded_pydoc_topic"
# The docs corpus (12.4 MB, its own 8k vocabulary): pretraining at --scale=small.
DOCS_TASK = "st_moe_embedded_docs_span_corruption"
TASKS = add_tasks()
MIXTURES = add_mixtures()
