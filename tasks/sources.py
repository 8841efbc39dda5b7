"""Data sources: TFDS with a clear "not prepared" error, and the embedded pydoc corpus."""
from typing import Optional

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from st_moe.tasks import vocab


class DatasetNotPreparedError(RuntimeError):
  """A task's TFDS data set is not prepared in the TFDS data directory."""


class PreparedTfdsDataSource(seqio.TfdsDataSource):
  """A `seqio.TfdsDataSource` that reads prepared data only and says how to prepare it.

  seqio's source calls `tfds.load(download=True)`, which here fails deep inside TFDS (no network,
  or C4's Beam pipeline). This one reads with `read_only=True` and turns "not prepared" into a
  `DatasetNotPreparedError` naming the builder, its version, the data directory searched and the
  commands that fix it.
  """

  def __init__(self, tfds_name: str, splits=None, caching_permitted: bool = True):
    """Initializes the source.

    Args:
      tfds_name: "builder/config:version", e.g. "super_glue/boolq:1.0.2".
      splits: None (all the builder's splits), an iterable of split names, or a dict mapping
        canonical split names to TFDS splits (e.g. {"train": "train_xl"}).
      caching_permitted: whether seqio may cache this source.
    """
    if ":" not in tfds_name:
      raise ValueError(f"tfds_name={tfds_name!r}: pin the version, as in 'xsum:1.1.0'.")
    super().__init__(tfds_name=tfds_name, splits=splits, caching_permitted=caching_permitted,
                     read_only=True)

  def not_prepared_message(self, split: str, cause: str = "") -> str:
    """The error text: builder and version, data directory searched, how to prepare it."""
    name = self.tfds_dataset.name
    data_dir = self.tfds_dataset.data_dir or tfds.core.constants.DATA_DIR
    builder = name.split(":")[0]
    return (
        f"TFDS data set '{name}' (split '{split}') is not prepared in the TFDS data directory "
        f"'{data_dir}'. Prepare it once with\n"
        f"  tfds build {name} --data_dir=DIR\n"
        f"(or tfds.builder('{name}', data_dir=DIR).download_and_prepare()) "
        "and point the run at DIR with --t5_tfds_data_dir=DIR (t5_mesh_transformer) or "
        "seqio.set_tfds_data_dir_override(DIR)."
        + (" C4 is built with Apache Beam (tfds build c4/en --beam_pipeline_options=...); see "
           "the TFDS catalog page of c4." if builder.startswith("c4") else "")
        + (f"\nTFDS said: {cause}" if cause else ""))

  def get_dataset(self, split: Optional[str] = None, shuffle: bool = True,
                  seed: Optional[int] = None, shard_info=None, **kwargs) -> tf.data.Dataset:
    split = split or tfds.Split.TRAIN
    try:
      return super().get_dataset(split=split, shuffle=shuffle, seed=seed,
                                 shard_info=shard_info, **kwargs)
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
      # TFDS raises AssertionError("Dataset ...: could not find data in ...") when unprepared.
      first_line = str(e).strip().split("\n")[0]
      raise DatasetNotPreparedError(self.not_prepared_message(split, first_line)) from None

  def num_input_examples(self, split: str) -> Optional[int]:
    try:
      return super().num_input_examples(split)
    except KeyError as e:  # info.splits is empty: nothing prepared.
      raise DatasetNotPreparedError(self.not_prepared_message(split, str(e))) from None


def _embedded_dataset_fn(split: str, shuffle_files: bool = False,
                         seed: Optional[int] = None) -> tf.data.Dataset:
  del shuffle_files, seed  # one file per split; examples are shuffled by the task.
  return tf.data.Dataset.from_tensor_slices({"text": vocab.embedded_texts(split)})


def embedded_source() -> seqio.DataSource:
  """The embedded corpus: `pydoc_data.topics`, 70 train and 8 validation documents (78 distinct)."""
  return seqio.FunctionDataSource(
      _embedded_dataset_fn, splits=["train", "validation"],
      num_input_examples={s: len(vocab.embedded_texts(s)) for s in ("train", "validation")})
