"""GUE-style CSV task folders."""

import numpy as np
import pytest

from hybridna_jax import tokenizer
from hybridna_jax.data import tasks


def _folder(tmp_path, files):
  for name, text in files.items():
    (tmp_path / name).write_bytes(text.encode() if isinstance(text, str) else text)
  return tmp_path


GOOD = {
  "train.csv": "sequence,label\nACGTACGT,0\nacgtnn,1\nTTTT,2\n",
  "dev.csv": "sequence,label\nGGGG,1\n",
  "test.csv": "sequence,label\nCCCC,0\nAAAA,2\n\n",
}


def test_load_task(tmp_path):
  task = tasks.load_csv_task(_folder(tmp_path, GOOD))
  assert set(task) == {"train", "dev", "test"}
  seqs, labels = task["train"]
  assert seqs == ["ACGTACGT", "ACGTNN", "TTTT"]
  assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2]
  tokens = task["train"].tokens()
  np.testing.assert_array_equal(tokens[1], tokenizer.encode("ACGTNN"))
  assert task["train"].tokens(add_bos=True)[2][0] == tokenizer.BOS
  assert task["test"].sequences == ["CCCC", "AAAA"]
  assert tasks.num_classes(task) == 3


def test_windows_line_endings_bom_extra_columns_and_regression(tmp_path):
  text = "\ufeffid,Sequence,label\r\n1,ACGT,0.5\r\n2,GG,-1.25\r\n"
  files = {f"{s}.csv": text for s in tasks.SPLITS}
  task = tasks.load_csv_task(_folder(tmp_path, files))
  assert task["dev"].sequences == ["ACGT", "GG"]
  assert task["dev"].labels.dtype == np.float32
  np.testing.assert_allclose(task["dev"].labels, [0.5, -1.25])
  with pytest.raises(ValueError, match="regression"):
    tasks.num_classes(task)


@pytest.mark.parametrize(
  "text, line, message",
  [
    ("sequence,label\nACGT,0\nACXT,1\n", 3, "sequence: invalid nucleotide 'X' at position 2"),
    ("sequence,label\nACGT,0\nACGé,1\n", 3, "sequence: invalid nucleotide 'É' at position 3"),
    ("sequence,label\nACGT,0\n,1\n", 3, "empty sequence"),
    ("sequence,label\nACGT,0\nAC,1,7\n", 3, "3 fields, the header has 2"),
    # An unclosed quote swallows the rows after it: named where it opens
    # (review of stop 37: named at the file's last line).
    (
      'sequence,label\nACGT,0\n"ACGA,1\nACGG,1\nACGC,0\n',
      3,
      "1 fields, the header has 2; a quote opened here runs on to line 5; close or remove it.",
    ),
    ("seq,label\nACGT,0\n", 1, "lacks a 'sequence' or 'label' column"),
    ("sequence,label\nACGT,0\n\nACGT,cat\n", 4, "label 'cat' is not a number"),
    # A missing label (pandas writes "nan"), among class ids or regression targets.
    (
      "sequence,label\nACGT,0\nACGT,nan\n",
      3,
      "label 'nan' is not a finite number; write a class id (or a number, for regression) "
      "there, or remove the row.",
    ),
    ("sequence,label\nACGT,0.5\nACGT,-inf\n", 3, "label '-inf' is not a finite number"),
  ],
)
def test_errors_name_file_and_line(tmp_path, text, line, message):
  files = dict(GOOD, **{"dev.csv": text})
  with pytest.raises(tasks.TaskFormatError) as e:
    tasks.load_csv_task(_folder(tmp_path, files))
  assert str(e.value).startswith(f"{tmp_path / 'dev.csv'} line {line}: ")
  assert message in str(e.value)


def test_missing_and_empty_files(tmp_path):
  files = dict(GOOD)
  del files["test.csv"]
  with pytest.raises(FileNotFoundError, match="test.csv: no such file"):
    tasks.load_csv_task(_folder(tmp_path, files))
  (tmp_path / "test.csv").write_text("")
  with pytest.raises(tasks.TaskFormatError, match="test.csv: the file is empty"):
    tasks.load_csv_task(tmp_path)
  (tmp_path / "test.csv").write_text("sequence,label\n")
  with pytest.raises(tasks.TaskFormatError, match="no examples"):
    tasks.load_csv_task(tmp_path)
  with pytest.raises(FileNotFoundError):
    tasks.load_csv_task(tmp_path / "nope")
