"""A seeded training input: one seed fixes the data order and the initialisation of a run.

The stability study (tools/reproduce.py) compares variants seed by seed, so the same seed must give
the same data order in every variant. `seeded_train_dataset_fn` wraps T5's
`mesh_train_dataset_fn` (gin-configured as usual: mixture name, caching, packing) and passes the seed
to its SeqIO shuffle. It also sets the TensorFlow graph seed: the Estimator calls the input function in
the same graph as the model function, before any variable is created, so the variables'
initialisers draw from that seed too (mesh_tensorflow's RunConfig leaves tf_random_seed unset).

  utils.run.train_dataset_fn = @st_moe.seeded_train_dataset_fn
  st_moe.seeded_train_dataset_fn.seed = 1
"""
import gin
import tensorflow.compat.v1 as tf


@gin.configurable(module="st_moe")
def seeded_train_dataset_fn(sequence_length, vocabulary=None, dataset_split="train", seed=0,
                            **kwargs):
  """The training dataset of `mesh_train_dataset_fn`, shuffled with `seed`; sets the graph seed.

  Args:
    sequence_length: {"inputs": Li, "targets": Lt}.
    vocabulary: passed through.
    dataset_split: passed through.
    seed: a non-negative integer.
    **kwargs: passed through to mesh_train_dataset_fn (its other gin bindings apply as usual).

  Returns:
    the tf.data.Dataset of mesh_train_dataset_fn.
  """
  if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
    raise ValueError(f"st_moe.seeded_train_dataset_fn seed={seed!r}: must be an integer >= 0")
  from t5.models import mesh_transformer  # pylint: disable=g-import-not-at-top
  tf.random.set_random_seed(seed)
  return mesh_transformer.mesh_train_dataset_fn(
      sequence_length=sequence_length, vocabulary=vocabulary, dataset_split=dataset_split,
      seed=seed, **kwargs)
