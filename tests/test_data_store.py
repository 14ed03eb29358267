"""Token store: round trip, atomic writes, refusal of incomplete stores."""

import os
import pickle

import numpy as np
import pytest

from hybridna_jax import tokenizer
from hybridna_jax.data import store as store_lib
from hybridna_jax.data import store_writer


def _write(path, records, **kwargs):
  """records: [(split, name, source, [chunks...])]."""
  with store_writer.TokenStoreWriter(path, **kwargs) as w:
    for split, name, source, chunks in records:
      w.begin_record(split, name, source)
      for c in chunks:
        w.append(np.asarray(c, np.uint8))
    return w.commit(metadata={"note": "test"})


def _tokens(s):
  return tokenizer.encode_bytes(s.encode())


def test_round_trip(tmp_path):
  path = tmp_path / "store"
  s = _write(
    path,
    [
      ("train", "chr1", "human", [_tokens("ACGT"), _tokens("NNA")]),
      ("val", "plasmid", "ecoli", [_tokens("GG")]),
      ("train", "chr2", "human", [_tokens("T")]),
      ("train", "chr1", "mouse", [_tokens("CCCC")]),
    ],
  )
  assert s.splits == ("train", "val")
  assert s.sources == ("human", "ecoli", "mouse")
  reopened = store_lib.TokenStore.open(path)
  train = reopened["train"]
  assert len(train) == 3 and train.num_tokens == 12
  np.testing.assert_array_equal(train.offsets, [0, 7, 8])
  np.testing.assert_array_equal(train.lengths, [7, 1, 4])
  r = train[0]
  assert (r.name, r.source, r.split, r.offset, r.length) == ("chr1", "human", "train", 0, 7)
  assert tokenizer.decode(r.tokens) == "ACGTNNA"
  assert isinstance(train.tokens, np.memmap)
  assert tokenizer.decode(train.find("chr1", source="mouse").tokens) == "CCCC"
  with pytest.raises(KeyError, match="pass source="):
    train.find("chr1")
  np.testing.assert_array_equal(train.source_token_counts(), [8, 0, 4])
  assert [x.name for x in reopened["val"]] == ["plasmid"]
  info = reopened.manifest["splits"]["train"]["per_source"]
  assert info["human"] == {"records": 2, "tokens": 8, "n_tokens": 2}
  assert reopened.manifest["metadata"] == {"note": "test"}
  # Pickles as its path: the copy reopens the memory map.
  clone = pickle.loads(pickle.dumps(reopened))
  assert tokenizer.decode(clone["train"][2].tokens) == "CCCC"
  assert len(pickle.dumps(reopened)) < 500


def test_many_records_grow_the_index(tmp_path):
  records = [("train", f"r{i}", f"s{i % 3}", [_tokens("AC" * (i % 5 + 1))]) for i in range(3000)]
  s = _write(tmp_path / "store", records)
  train = s["train"]
  assert len(train) == 3000
  assert train[2999].name == "r2999" and train[2999].source == "s2"
  assert train[2999].length == 2 * (2999 % 5 + 1)
  assert train.offsets[-1] + train.lengths[-1] == train.num_tokens


def test_failed_write_leaves_nothing(tmp_path):
  path = tmp_path / "store"
  with pytest.raises(RuntimeError):
    with store_writer.TokenStoreWriter(path) as w:
      w.begin_record("train", "a", "s")
      w.append(_tokens("ACGT"))
      raise RuntimeError("input broke")
  assert os.listdir(tmp_path) == []


def test_reader_refuses_incomplete_store(tmp_path):
  path = tmp_path / "store"
  _write(path, [("train", "a", "s", [_tokens("ACGT")])])
  os.remove(path / store_lib.MANIFEST)
  with pytest.raises(store_lib.StoreError, match="not a complete token store"):
    store_lib.TokenStore.open(path)
  with pytest.raises(store_lib.StoreError, match="no token store"):
    store_lib.TokenStore.open(tmp_path / "missing")


def test_reader_detects_truncated_tokens(tmp_path):
  path = tmp_path / "store"
  _write(path, [("train", "a", "s", [_tokens("ACGT")])])
  with open(path / "train.tokens", "r+b") as f:
    f.truncate(2)
  with pytest.raises(store_lib.StoreError, match="corrupt"):
    store_lib.TokenStore.open(path)


@pytest.mark.parametrize("damaged, size", [("train.index.npy", 0), ("train.index.npy", 5)])
def test_damaged_index_is_named_and_seen_by_verify(tmp_path, damaged, size):
  path = tmp_path / "store"
  _write(path, [("train", "a", "s", [_tokens("ACGT")])])
  with open(path / damaged, "r+b") as f:  # a copy cut off
    f.truncate(size)
  match = rf"^{path / damaged}: not a readable record index .*prepare the store again"
  with pytest.raises(store_lib.StoreError, match=match):
    store_lib.TokenStore.open(path)
  assert "not a readable record index" in store_lib.verify(path)


def test_damaged_manifest_is_named(tmp_path):
  path = tmp_path / "store"
  _write(path, [("train", "a", "s", [_tokens("ACGT")])])
  manifest = path / store_lib.MANIFEST
  manifest.write_bytes(manifest.read_bytes()[:30])
  for read in (store_lib.TokenStore.open, store_lib.read_manifest):
    with pytest.raises(store_lib.StoreError, match=rf"^{manifest}: not valid JSON"):
      read(path)
  assert "not valid JSON" in store_lib.verify(path)


def test_killed_writer_leftovers_are_ignored_and_cleaned(tmp_path):
  path = tmp_path / "store"
  # A temporary directory of a writer that died (pid far beyond pid_max).
  stale = tmp_path / ".store.tmp-999999999-abcd"
  stale.mkdir()
  (stale / "train.tokens").write_bytes(b"\x05" * 10)
  with pytest.raises(store_lib.StoreError):
    store_lib.TokenStore.open(path)
  _write(path, [("train", "a", "s", [_tokens("AC")])])
  assert sorted(os.listdir(tmp_path)) == ["store"]


def test_overwrite(tmp_path):
  path = tmp_path / "store"
  _write(path, [("train", "a", "s", [_tokens("AC")])])
  with pytest.raises(store_lib.StoreError, match="already holds a token store"):
    store_writer.TokenStoreWriter(path)
  s = _write(path, [("train", "b", "s", [_tokens("GGG")])], overwrite=True)
  assert s["train"][0].name == "b" and s["train"].num_tokens == 3
  assert sorted(os.listdir(tmp_path)) == ["store"]


def test_overwrite_never_replaces_a_folder_that_is_not_a_store(tmp_path):
  # data.store_dir pointed at the genomes: refused, even with overwrite,
  # and nothing there changes.
  genomes = tmp_path / "genomes"
  genomes.mkdir()
  (genomes / "g.fa").write_text(">a\nACGT\n")
  (genomes / "notes.txt").write_text("mine")
  for overwrite in (False, True):
    with pytest.raises(store_lib.StoreError, match="is not a token store; choose a new or empty"):
      store_writer.TokenStoreWriter(genomes, overwrite=overwrite)
  assert sorted(os.listdir(genomes)) == ["g.fa", "notes.txt"]
  assert sorted(os.listdir(tmp_path)) == ["genomes"]
