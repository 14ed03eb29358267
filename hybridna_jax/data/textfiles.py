"""Line-numbered text inputs: the lines of plain or compressed text files,
and CSV rows under a header.

    for number, line in text_lines("clinvar.vcf.gz"): ...

    rows = csv_rows("train.csv", error=TaskFormatError,
                    expected="a 'sequence,label' header")
    header_line, names = next(rows)        # the header, names stripped
    for line, fields in rows: ...          # every non-blank row after it

The task, design and variant readers all read through here, so they accept
the same files (gzip, bgzip, xz or bzip2; a UTF-8 byte-order mark; Windows
line endings; blank lines) and their errors name physical line numbers.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterator

from hybridna_jax.data import fasta

# (path, line or None, message) -> the exception to raise, e.g. TaskFormatError.
ErrorType = Callable[[str, int | None, str], Exception]


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
  """(1-based line number, line without its line break) of a UTF-8 text
  file, plain or compressed (`fasta.open_decompressed`); a byte-order mark
  is dropped and undecodable bytes read as U+FFFD."""
  stream, raw, _ = fasta.open_decompressed(path)
  try:
    with io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="") as text:
      for number, line in enumerate(text, 1):
        yield number, line.rstrip("\r\n")
  finally:
    raw.close()


def csv_rows(
  path: str | os.PathLike,
  *,
  error: ErrorType,
  expected: str,
  comment: str | None = None,
  check_width: bool = True,
) -> Iterator[tuple[int, list[str]]]:
  """(line number, fields) of a CSV file's header, then of each row.

  Blank rows (no field with text) and, with `comment`, lines starting with
  it are skipped. The header's names come stripped; row fields as written.
  The line number is the physical line a row starts on (a quoted field
  may run over several).

  Raises (through `error(path, line, message)`):
    an empty file ("the file is empty; expected <expected>."), and with
    `check_width` a row with more or fewer fields than the header.
  """
  path = os.fspath(path)
  number = 0  # the last line read
  start = None  # the first line of the row being read

  def lines():
    nonlocal number, start
    for number, line in text_lines(path):  # noqa: B007 (sets the nonlocal line number)
      if comment is None or not line.startswith(comment):
        start = number if start is None else start
        yield line

  width = None
  for row in csv.reader(lines()):
    first, start = start, None  # csv.reader reads no line past a row's end
    if not row or all(not c.strip() for c in row):
      continue  # Blank lines, e.g. a trailing one.
    if width is None:
      width = len(row)
      yield first, [c.strip() for c in row]
    elif check_width and len(row) != width:
      fix = (
        f"a quote opened here runs on to line {number}; close or remove it"
        if number > first
        else "check for stray commas or quotes"
      )
      raise error(path, first, f"{len(row)} fields, the header has {width}; {fix}.")
    else:
      yield first, row
  if width is None:
    raise error(path, None, f"the file is empty; expected {expected}.")
