"""Streaming FASTA reader: formats, block boundaries and bad input."""

import bz2
import gzip
import hashlib
import lzma
import os
import random

import numpy as np
import pytest

from hybridna_jax import tokenizer
from hybridna_jax.data import fasta

LAMBDA = os.path.join(os.path.dirname(__file__), "data", "lambda_virus.fa")


def _random_records(seed=0, count=40, alphabet="ACGTNacgtnRYKM"):
  rng = random.Random(seed)
  return [
    (
      f"rec{i} some description {i}",
      "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 700))),
    )
    for i in range(count)
  ]


def _expected(records):
  return [(name.split()[0], tokenizer.encode_bytes(seq.encode())) for name, seq in records]


def _check(path, expected, **kwargs):
  got = fasta.read_fasta(path, **kwargs)
  assert [h.name for h, _ in got] == [n for n, _ in expected]
  for (_, tokens), (name, want) in zip(got, expected):
    np.testing.assert_array_equal(tokens, want, err_msg=name)


@pytest.mark.parametrize("block_size", [1, 2, 5, 61, 4096, 1 << 20])
def test_block_size_does_not_change_tokens(tmp_path, block_size):
  records = _random_records()
  path = tmp_path / "x.fa"
  fasta.write_fasta(path, records, width=61)
  _check(path, _expected(records), block_size=block_size)


@pytest.mark.parametrize("compress", ["gzip", "xz", "bzip2", "bgzip"])
def test_compressed_inputs(tmp_path, compress):
  records = _random_records(seed=1)
  plain = tmp_path / "x.fa"
  fasta.write_fasta(plain, records)
  data = plain.read_bytes()
  path = tmp_path / "x.fa.compressed"
  if compress == "gzip":
    path.write_bytes(gzip.compress(data))
  elif compress == "xz":
    path.write_bytes(lzma.compress(data))
  elif compress == "bzip2":
    path.write_bytes(bz2.compress(data))
  else:  # bgzip: many independent gzip members, cut at arbitrary bytes.
    cuts = [0, 1000, 1001, 5000, len(data)]
    path.write_bytes(b"".join(gzip.compress(data[a:b]) for a, b in zip(cuts[:-1], cuts[1:])))
  assert fasta.detect_compression(path) == ("gzip" if compress == "bgzip" else compress)
  _check(path, _expected(records), block_size=777)
  # The digest of the bytes as stored comes from the same read (prepare.py
  # records it), once the file was read to its end.
  reader = fasta.FastaReader(path, block_size=777, digest=True)
  items = iter(reader)
  next(items)
  assert reader.sha256 is None
  list(items)
  assert reader.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_bgzf_cut_between_blocks_is_warned_of(tmp_path, caplog):
  """A real BGZF file (pysam) cut after a whole block still decompresses,
  shorter: the missing end-of-file block is warned of, as htslib does."""
  import pysam  # pylint: disable=g-import-not-at-top

  records = _random_records(seed=2)
  plain = tmp_path / "x.fa"
  fasta.write_fasta(plain, records)
  whole = tmp_path / "x.fa.gz"
  pysam.tabix_compress(str(plain), str(whole))
  assert fasta.is_bgzip(whole) and fasta.has_bgzf_eof(whole)
  _check(whole, _expected(records), block_size=777)
  assert "end-of-file block" not in caplog.text
  cut = tmp_path / "cut.fa.gz"
  cut.write_bytes(whole.read_bytes()[: -len(fasta.BGZF_EOF)])
  fasta.read_fasta(cut)
  assert f"{cut}: no BGZF end-of-file block; the file may be truncated" in caplog.text


def test_lambda_phage():
  ((header, tokens),) = fasta.read_fasta(LAMBDA)
  assert header.name == "gi|9626243|ref|NC_001416.1|"
  assert header.description.startswith("Enterobacteria phage lambda")
  assert header.line == 1
  assert tokens.dtype == np.uint8 and tokens.size == 48502
  assert tokenizer.decode(tokens[:10]) == "GGGCGGCGAC"
  assert set(np.unique(tokens)) == {tokenizer.A, tokenizer.C, tokenizer.G, tokenizer.T}


def test_windows_line_endings_blank_lines_and_single_line_records(tmp_path):
  path = tmp_path / "crlf.fa"
  path.write_bytes(
    b">a first\r\nACGT\r\nacgn\r\n\r\n>b\r\n" + b"T" * 5000 + b"\r\n>c\r\nGG"
  )  # no final newline
  for block_size in (3, 64, 1 << 16):
    got = fasta.read_fasta(path, block_size=block_size)
    assert [(h.name, h.description, h.line) for h, _ in got] == [
      ("a", "first", 1),
      ("b", "", 5),
      ("c", "", 7),
    ]
    assert tokenizer.decode(got[0][1]) == "ACGTACGN"
    assert got[1][1].size == 5000
    assert tokenizer.decode(got[2][1]) == "GG"
  # Carriage returns alone (classic Mac OS) read as one header line: named.
  path.write_bytes(b">r1\rACGT\r>r2\rAC\r")
  for allow_empty in (False, True):
    with pytest.raises(fasta.FastaFormatError, match=r"line 1: line breaks are carriage returns"):
      fasta.read_fasta(path, allow_empty_records=allow_empty)
  path.write_bytes(b">a first\r\nACGT\r\nacgn\r\n\r\n>b\r\n" + b"T" * 5000 + b"\r\n>c\r\nGG")
  # The same file with a UTF-8 byte-order mark first (Windows editors).
  path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
  for block_size in (3, 1 << 16):
    got = fasta.read_fasta(path, block_size=block_size)
    assert [h.name for h, _ in got] == ["a", "b", "c"]
    assert tokenizer.decode(got[0][1]) == "ACGTACGN"


def test_streams_chunks_no_larger_than_a_block(tmp_path):
  path = tmp_path / "long.fa"
  fasta.write_fasta(path, [("chr", "ACGT" * 10000)], width=80)
  sizes = [
    item.size for item in fasta.iter_fasta(path, block_size=4096) if isinstance(item, np.ndarray)
  ]
  assert sum(sizes) == 40000 and max(sizes) <= 4096 and len(sizes) > 9


def _error(path, **kwargs) -> str:
  with pytest.raises(fasta.FastaFormatError) as e:
    fasta.read_fasta(path, **kwargs)
  return str(e.value)


@pytest.mark.parametrize("block_size", [4, 1 << 16])
def test_invalid_character_names_file_line_and_column(tmp_path, block_size):
  path = tmp_path / "bad.fa"
  path.write_bytes(b">a\nACGT\nACGT\n>b\nAAAA\nAAXA\n")
  message = _error(path, block_size=block_size)
  assert message.startswith(f"{path} line 6: record 'b', column 3: ")
  assert "invalid nucleotide 'X' at position 6" in message
  assert "replace it" in message


def test_digits_and_gt_inside_sequence_are_invalid(tmp_path):
  path = tmp_path / "bad.fa"
  path.write_bytes(b">a\nAC>GT\n")
  assert "line 2: record 'a', column 3" in _error(path)
  path.write_bytes(b">a\nACGT 12\n")
  assert "line 2: record 'a', column 6: invalid nucleotide '1'" in _error(path)


def test_header_without_sequence(tmp_path):
  path = tmp_path / "empty_record.fa"
  path.write_bytes(b">a\nACGT\n>b\n>c\nGG\n")
  message = _error(path)
  assert f"{path} line 3: header '>b' has no sequence" in message
  assert "allow_empty_records" in message
  got = fasta.read_fasta(path, allow_empty_records=True)
  assert [h.name for h, _ in got] == ["a", "c"]
  path.write_bytes(b">a\nACGT\n>last\n")
  assert "line 3: header '>last' has no sequence" in _error(path)


def test_empty_and_headerless_files(tmp_path):
  empty = tmp_path / "empty.fa"
  empty.write_bytes(b"")
  assert _error(empty) == (
    f"{empty}: the file is empty (0 bytes of text); remove it from the inputs or fetch it again."
  )
  empty_gz = tmp_path / "empty.fa.gz"
  empty_gz.write_bytes(gzip.compress(b""))
  assert "the file is empty" in _error(empty_gz)
  blank = tmp_path / "blank.fa"
  blank.write_bytes(b"\n\n")
  assert "no FASTA header" in _error(blank)
  seq_first = tmp_path / "seq_first.fa"
  seq_first.write_bytes(b"\nACGT\n>a\nAC\n")
  assert "line 2: sequence data before the first header" in _error(seq_first)
  nameless = tmp_path / "nameless.fa"
  nameless.write_bytes(b">a\nAC\n> \nAC\n")
  assert "line 3: header with no name" in _error(nameless)


@pytest.mark.parametrize("compress", ["gzip", "xz"])
def test_truncated_compressed_file(tmp_path, compress):
  records = _random_records(seed=2, count=200, alphabet="ACGT")
  plain = tmp_path / "x.fa"
  fasta.write_fasta(plain, records)
  data = plain.read_bytes()
  packed = gzip.compress(data) if compress == "gzip" else lzma.compress(data)
  path = tmp_path / f"cut.fa.{compress}"
  path.write_bytes(packed[: len(packed) // 2])
  message = _error(path, block_size=4096)
  assert message.startswith(f"{path} line ")
  assert f"the {compress} stream is truncated or corrupt" in message
  assert "fetch it again" in message
  # The reported line is where reading stopped: inside the file, not line 1.
  line = int(message.split(" line ")[1].split(":")[0])
  assert 1 < line < data.count(b"\n")


def test_zstd_is_refused(tmp_path):
  path = tmp_path / "x.fa.zst"
  path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 10)
  assert "zstd-compressed files are not supported" in _error(path)
