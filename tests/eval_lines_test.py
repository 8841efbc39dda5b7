"""entry_point.read_eval_lines reads back one line per example of what mesh_tensorflow's eval wrote.

The predictions of an undertrained byte-vocabulary model hold any byte: CI once read 18
predictions for 16 examples because text mode turned decoded "\\r"s into line breaks. The
expected values are the examples as written, by hand; mtf's own writer writes them.
"""
import os
import tempfile

from absl.testing import absltest
import entry_point
from mesh_tensorflow.transformer import utils as mtf_utils


class ReadEvalLinesTest(absltest.TestCase):

  def test_control_bytes_stay_inside_their_example(self):
    examples = ["plain", "carriage\rreturn", "crlf\r\nend", "file\x1cseparator", "next\x85line",
                "form\x0cfeed", "", "new\nline"]
    path = os.path.join(tempfile.mkdtemp(), "task_5_predictions")
    mtf_utils.write_lines_to_file(examples, path)
    # mtf replaces "\n" inside an example with a space; every other byte survives.
    self.assertEqual(entry_point.read_eval_lines(path),
                     ["plain", "carriage\rreturn", "crlf\r end", "file\x1cseparator",
                      "next\x85line", "form\x0cfeed", "", "new line"])


if __name__ == "__main__":
  absltest.main()
