"""FASTA -> token store preparation: splits, streaming, failures, the app."""

import gzip
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from launch_env import launch_env

from hybridna_jax import paths, tokenizer
from hybridna_jax.data import config as config_lib
from hybridna_jax.data import digests, fasta, prepare, store_writer
from hybridna_jax.data import store as store_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAMBDA = os.path.join(ROOT, "tests", "data", "lambda_virus.fa")


def _cfg(tmp_path, globs, **split):
  c = config_lib.default_data_config()
  c.fasta_globs = tuple(str(g) for g in globs)
  c.store_dir = str(tmp_path / "store")
  c.progress_seconds = 0.0
  for k, v in split.items():
    c.split[k] = v
  return c


def _genomes(tmp_path, count=5, records=3, seed=0, compress=None):
  """Writes genome files g0..g{count-1}; returns {source: {name: seq}}."""
  rng = np.random.default_rng(seed)
  out = {}
  for g in range(count):
    recs = [
      (f"chr{r}", "".join(rng.choice(list("ACGTN"), size=int(rng.integers(50, 400)))))
      for r in range(records)
    ]
    suffix = {None: ".fa", "gzip": ".fa.gz", "xz": ".fna.xz"}[compress]
    fasta.write_fasta(tmp_path / f"g{g}{suffix}", recs, compress=compress)
    out[f"g{g}"] = dict(recs)
  return out


def _contents(s, split):
  return {(r.source, r.name): tokenizer.decode(r.tokens) for r in s[split]}


def test_prepare_lambda(tmp_path):
  s = prepare.prepare_store(_cfg(tmp_path, [LAMBDA]))
  assert s.splits == ("train",) and s.sources == ("lambda_virus",)
  (record,) = list(s["train"])
  assert record.name == "gi|9626243|ref|NC_001416.1|"
  assert record.length == 48502
  ((_, want),) = fasta.read_fasta(LAMBDA)
  np.testing.assert_array_equal(record.tokens, want)


@pytest.mark.parametrize("compress", [None, "gzip", "xz"])
def test_split_by_named_sources(tmp_path, compress):
  genomes = _genomes(tmp_path, compress=compress)
  s = prepare.prepare_store(_cfg(tmp_path, [tmp_path / "g*"], val_sources=("g1", "g[34]")))
  train, val = _contents(s, "train"), _contents(s, "val")
  assert {src for src, _ in val} == {"g1", "g3", "g4"}
  assert {src for src, _ in train} == {"g0", "g2"}
  for split in (train, val):
    for (src, name), seq in split.items():
      assert seq == genomes[src][name]
  # Each source's records are contiguous and in file order.
  assert [r.source for r in s["val"]] == ["g1"] * 3 + ["g3"] * 3 + ["g4"] * 3
  assert [r.name for r in s["val"]][:3] == ["chr0", "chr1", "chr2"]


def test_source_fraction_is_stable_when_sources_are_added():
  """Adding genomes never moves an existing one between train and val (a
  resumed run would otherwise evaluate on genomes it trained on), except
  where too few sources make the rank decide."""
  names = [f"genome{i}" for i in range(60)]
  for seed in range(10):
    split = config_lib.default_data_config().split
    split.val_fraction, split.seed = 0.25, seed
    earlier = None
    for n in (2, 3, 5, 8, 13, 30, 60):
      rule = prepare.SplitRule(split, names[:n])
      val = {s for s in names[:n] if rule(s, "chr1") == prepare.VAL}
      assert 1 <= len(val) < n
      by_hash = sum(prepare._unit_hash(seed, s) < 0.25 for s in names[:n])
      if 0 < by_hash < n:
        assert len(val) == by_hash
        if earlier is not None and earlier[1]:
          assert val & set(names[: earlier[0]]) == earlier[2]
      earlier = (n, 0 < by_hash < n, val)


def test_split_by_records_and_fractions(tmp_path):
  _genomes(tmp_path, count=6, records=20)
  globs = [tmp_path / "*.fa"]
  s = prepare.prepare_store(_cfg(tmp_path, globs, val_records=("chr1?",)))
  assert {n for _, n in _contents(s, "val")} == {f"chr{i}" for i in range(10, 20)}
  assert not {n for _, n in _contents(s, "train")} & {f"chr{i}" for i in range(10, 20)}
  # A fraction of whole sources: those the seeded hash puts below 0.34.
  chosen = []
  for seed in (0, 1, 2):
    c = _cfg(tmp_path, globs, val_fraction=0.34, seed=seed)
    c.overwrite_store = True
    s = prepare.prepare_store(c)
    val_sources = {src for src, _ in _contents(s, "val")}
    rule = prepare.SplitRule(c.split, [f"g{i}" for i in range(6)])
    assert val_sources == {f"g{i}" for i in range(6) if rule(f"g{i}", "chr0") == prepare.VAL}
    assert 1 <= len(val_sources) <= 5
    assert not val_sources & {src for src, _ in _contents(s, "train")}
    assert s["val"].num_records == 20 * len(val_sources)
    chosen.append(val_sources)
  assert len({frozenset(c) for c in chosen}) > 1
  # A fraction of records: about 30% of the 120, stable for the seed.
  c = _cfg(tmp_path, globs, val_fraction=0.3, split_by="record")
  c.overwrite_store = True
  s = prepare.prepare_store(c)
  val = set(_contents(s, "val"))
  assert 20 <= len(val) <= 52
  assert not val & set(_contents(s, "train"))
  assert len(val) + len(_contents(s, "train")) == 120


def test_source_from_dir_and_record(tmp_path):
  for species in ("human", "mouse"):
    (tmp_path / species).mkdir()
    for chrom in ("chr1", "chr2"):
      fasta.write_fasta(tmp_path / species / f"{chrom}.fa", [(chrom, "ACGT" * 10)])
  c = _cfg(tmp_path, [tmp_path / "*" / "*.fa"], val_sources=("mouse",))
  c.source_from = "dir"
  s = prepare.prepare_store(c)
  assert [(r.source, r.name) for r in s["train"]] == [("human", "chr1"), ("human", "chr2")]
  assert [(r.source, r.name) for r in s["val"]] == [("mouse", "chr1"), ("mouse", "chr2")]
  # With source_from="file" the four files would give two "chr1" sources.
  c.source_from = "file"
  with pytest.raises(ValueError, match="both give source 'chr1'"):
    prepare.prepare_store(c)
  c = _cfg(tmp_path, [tmp_path / "human" / "*.fa"], val_records=("chr2",))
  c.source_from = "record"
  c.overwrite_store = True
  s = prepare.prepare_store(c)
  assert s.sources == ("chr1", "chr2")
  assert [r.source for r in s["val"]] == ["chr2"]


def test_bad_split_configs(tmp_path):
  _genomes(tmp_path, count=2)
  globs = [tmp_path / "*.fa"]
  with pytest.raises(ValueError, match=r"'nope' matches none of the sources"):
    prepare.prepare_store(_cfg(tmp_path, globs, val_sources=("nope",)))
  with pytest.raises(ValueError, match=r"\['chrX'\] matched no record"):
    prepare.prepare_store(_cfg(tmp_path, globs, val_records=("chrX",)))
  with pytest.raises(ValueError, match="every record went to validation"):
    prepare.prepare_store(_cfg(tmp_path, globs, val_sources=("*",)))
  with pytest.raises(ValueError, match="matches no file"):
    prepare.prepare_store(_cfg(tmp_path, [tmp_path / "*.fasta"]))
  with pytest.raises(ValueError, match="at least two sources"):
    prepare.prepare_store(_cfg(tmp_path, [tmp_path / "g0.fa"], val_fraction=0.5))
  assert not os.path.exists(tmp_path / "store")


def test_duplicate_record_names(tmp_path):
  (tmp_path / "a.fa").write_text(">x\nACGT\n>y\nAC\n>x\nGG\n")
  (tmp_path / "b.fa").write_text(">x\nACGT\n")  # another source: fine
  with pytest.raises(fasta.FastaFormatError) as e:
    prepare.prepare_store(_cfg(tmp_path, [tmp_path / "*.fa"]))
  message = str(e.value)
  assert message.startswith(f"{tmp_path / 'a.fa'} line 5: duplicate record name 'x' in source 'a'")
  assert f"first at {tmp_path / 'a.fa'} line 1" in message
  assert not os.path.exists(tmp_path / "store")


def test_failure_leaves_no_store(tmp_path):
  _genomes(tmp_path, count=3)
  (tmp_path / "g9.fa").write_text(">bad\nACGT\nACGU?\n")
  c = _cfg(tmp_path, [tmp_path / "*.fa"])
  with pytest.raises(
    fasta.FastaFormatError,
    match=r"g9.fa line 3: record "
    r"'bad', column 5: invalid nucleotide '\?'",
  ):
    prepare.prepare_store(c)
  assert not [p for p in os.listdir(tmp_path) if "store" in p]
  with pytest.raises(store_lib.StoreError):
    store_lib.TokenStore.open(c.store_dir)


def test_killed_preparation_leaves_no_store(tmp_path):
  # A process that dies mid-write (os._exit: no cleanup runs) leaves only a
  # hidden temporary directory, which readers never take for the store and
  # the next preparation removes.
  _genomes(tmp_path, count=3)
  c = _cfg(tmp_path, [tmp_path / "*.fa"])
  script = f"""
import os
from hybridna_jax.data import config, prepare, store_writer
calls = []
def dying_append(self, tokens):
  calls.append(1)
  if len(calls) == 4:
    os._exit(9)
  self._current.append(tokens)
store_writer.TokenStoreWriter.append = dying_append
c = config.default_data_config()
c.fasta_globs = ({str(tmp_path / '*.fa')!r},)
c.store_dir = {c.store_dir!r}
prepare.prepare_store(c)
"""
  run = subprocess.run(
    [sys.executable, "-c", script],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert run.returncode == 9, run.stderr
  leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".store.tmp-")]
  assert len(leftovers) == 1 and not os.path.exists(c.store_dir)
  assert os.listdir(tmp_path / leftovers[0])  # it had started writing
  with pytest.raises(store_lib.StoreError, match="no token store"):
    store_lib.TokenStore.open(c.store_dir)
  s = prepare.prepare_store(c)
  assert s["train"].num_records == 9
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".store")]


def test_rerun_reuses_store_and_detects_changed_inputs(tmp_path):
  _genomes(tmp_path, count=2)
  c = _cfg(tmp_path, [tmp_path / "*.fa"])
  created = prepare.prepare_store(c).manifest["created"]
  messages = []
  s = prepare.prepare_store(c, log=lambda m, *a: messages.append(m % a))
  assert s.manifest["created"] == created
  assert "is up to date" in messages[0] and len(messages) == 1
  open(os.path.join(c.store_dir, "train.index.npy"), "wb").close()  # cut off: rebuilt
  messages.clear()
  s = prepare.prepare_store(c, log=lambda m, *a: messages.append(m % a))
  assert "is damaged" in messages[0] and s["train"].num_records
  fasta.write_fasta(tmp_path / "g1.fa", [("chr0", "ACGTACGTAC")])
  with pytest.raises(store_lib.StoreError, match="prepared from other inputs"):
    prepare.prepare_store(c)
  c.overwrite_store = True
  s = prepare.prepare_store(c)
  assert s["train"].find("chr0", source="g1").length == 10


def test_a_moved_checkout_reuses_its_store(tmp_path):
  """The inputs and the store moved together (a renamed or copied
  checkout; review: refused as "prepared from other inputs"): the same
  files by name, size and modification time are the same inputs."""
  checkout = tmp_path / "checkout"
  os.makedirs(checkout / "genomes")
  _genomes(checkout / "genomes", count=2)
  c = _cfg(checkout, [checkout / "genomes" / "*.fa"])
  created = prepare.prepare_store(c).manifest["created"]
  os.rename(checkout, tmp_path / "moved")  # keeps modification times
  moved = tmp_path / "moved"
  c = _cfg(moved, [moved / "genomes" / "*.fa"])
  messages = []
  s = prepare.prepare_store(c, log=lambda m, *a: messages.append(m % a))
  assert "is up to date" in messages[0] and s.manifest["created"] == created
  fasta.write_fasta(moved / "genomes" / "g1.fa", [("chr0", "ACGTACGTAC")])  # changed: refused
  with pytest.raises(store_lib.StoreError, match="prepared from other inputs"):
    prepare.prepare_store(c)


def _edit_keeping_size(path):
  """Swaps two different bases of the file's first sequence line: the
  same size, other content, a new modification time."""
  lines = open(path).read().split("\n")
  line = lines[1]
  a = next(i for i in range(1, len(line)) if line[i] != line[0])
  lines[1] = line[a] + line[1:a] + line[0] + line[a + 1 :]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def test_inputs_copied_without_their_times_are_compared_by_content(tmp_path, caplog):
  """Copies that reset modification times (cp -r, gsutil cp, a download)
  keep their store when their bytes (SHA-256, recorded at preparation)
  are the same; an edit that keeps the size does not (review: unnoticed
  at training, refused or re-used by time alone at preparation)."""
  _genomes(tmp_path, count=2)
  c = _cfg(tmp_path, [tmp_path / "*.fa"])
  store = prepare.prepare_store(c)
  recorded = store.manifest["metadata"]["fingerprint"]["inputs"]
  with open(tmp_path / "g1.fa", "rb") as f:
    assert recorded[1]["sha256"] == hashlib.sha256(f.read()).hexdigest()  # as sha256sum
  os.utime(tmp_path / "g1.fa", ns=(1, 1))
  messages = []
  s = prepare.prepare_store(c, log=lambda m, *a: messages.append(m % a))
  assert "is up to date" in messages[0] and s.manifest["created"] == store.manifest["created"]
  _edit_keeping_size(tmp_path / "g1.fa")
  assert os.path.getsize(tmp_path / "g1.fa") == recorded[1]["size"]
  with pytest.raises(store_lib.StoreError, match=r"other inputs .*1 file \(g1.fa\) changed since"):
    prepare.prepare_store(c)
  # A store an earlier version prepared recorded no digests: a file of the
  # same size with another time is refused at preparation and trained on,
  # with a warning naming it, at training.
  manifest_path = os.path.join(c.store_dir, store_lib.MANIFEST)
  manifest = json.load(open(manifest_path))
  for f in manifest["metadata"]["fingerprint"]["inputs"]:
    del f["sha256"]
  with open(manifest_path, "w") as f:
    json.dump(manifest, f)
  with pytest.raises(
    store_lib.StoreError, match=r"1 file \(g1.fa\): the same size, another modification time"
  ):
    prepare.prepare_store(c)
  caplog.set_level("WARNING")
  prepare.check_store_matches(c)
  assert "input 1 file (g1.fa): the same size as when the store was prepared" in caplog.text


def test_an_edit_with_its_old_time_put_back_is_found_and_digests_are_kept(tmp_path, monkeypatch):
  """The inode change time, which no tool sets back, shows an edit whose
  modification time was restored (touch -r; review: trusted). Digests are
  kept per machine (data/digests.py), so that a copied corpus is read once,
  not at every training start on every host."""
  monkeypatch.setenv(digests.CACHE_ENV, str(tmp_path / "digests.json"))
  _genomes(tmp_path, count=2)
  g0, g1 = str(tmp_path / "g0.fa"), str(tmp_path / "g1.fa")
  c = _cfg(tmp_path, [tmp_path / "*.fa"])
  prepare.prepare_store(c)
  assert len(json.load(open(tmp_path / "digests.json"))) == 2
  os.utime(g1, ns=(1, 1))  # a copy that reset the times
  reads = []
  real = hashlib.file_digest
  monkeypatch.setattr(hashlib, "file_digest", lambda f, name: reads.append(f.name) or real(f, name))

  def new_process():
    digests._known.clear()  # pylint: disable=protected-access
    digests._loaded.clear()  # pylint: disable=protected-access

  for _ in range(2):
    new_process()
    prepare.check_store_matches(c)
    prepare.check_store_matches(c)
  assert reads == [g1]  # read once, then known in this process and the next
  before = os.stat(g0)
  _edit_keeping_size(g0)
  os.utime(g0, ns=(before.st_atime_ns, before.st_mtime_ns))
  assert os.stat(g0).st_mtime_ns == before.st_mtime_ns and os.path.getsize(g0) == before.st_size
  with pytest.raises(store_lib.StoreError, match=r"1 file \(g0.fa\) changed since"):
    prepare.check_store_matches(c)
  # An unwritable cache is warned about; the digests are computed all the same.
  monkeypatch.setenv(digests.CACHE_ENV, str(tmp_path / "g0.fa" / "digests.json"))
  new_process()
  with pytest.raises(store_lib.StoreError, match=r"1 file \(g0.fa\) changed since"):
    prepare.check_store_matches(c)


def test_preparation_reads_each_input_once_and_refuses_one_that_changes(tmp_path, monkeypatch):
  """The digest a store records comes from the read that tokenizes the file
  (review: a second, separate read), and a file rewritten during that read
  is refused, not recorded half old and half new."""
  _genomes(tmp_path, count=2)
  c = _cfg(tmp_path, [tmp_path / "*.fa"])
  monkeypatch.setattr(hashlib, "file_digest", lambda *a: pytest.fail("read again to hash"))
  store = prepare.prepare_store(c)
  for f in store.manifest["metadata"]["fingerprint"]["inputs"]:
    with open(f["path"], "rb") as fh:
      assert f["sha256"] == hashlib.sha256(fh.read()).hexdigest()
  real = store_writer.TokenStoreWriter.append

  def append_while_rewritten(self, tokens):
    os.utime(tmp_path / "g1.fa")  # another writer touches the input meanwhile
    return real(self, tokens)

  monkeypatch.setattr(store_writer.TokenStoreWriter, "append", append_while_rewritten)
  c.overwrite_store = True
  with pytest.raises(ValueError, match=r"g0.fa changed while it was being prepared|g1.fa changed"):
    prepare.prepare_store(c)
  assert store_lib.read_manifest(c.store_dir)["created"] == store.manifest["created"]  # kept


def test_inputs_of_one_name_in_several_directories_are_each_compared(tmp_path):
  """Record sources and genomes/*/sequence.fasta: files of one name are
  matched in path order (review: they collapsed into one, so an edit of
  the other went unnoticed, and a config naming one of them was refused
  for the wrong reason)."""
  for d, seq in (("a", "ACGTACGTAA"), ("b", "TTGCATGCAA")):
    os.makedirs(tmp_path / d)
    fasta.write_fasta(tmp_path / d / "x.fa", [(f"chr_{d}", seq)])
  c = _cfg(tmp_path, [tmp_path / "*" / "x.fa"])
  c.source_from = "record"
  c.split.val_fraction = 0.0
  prepare.prepare_store(c)
  prepare.check_store_matches(c)
  os.rename(tmp_path / "a", tmp_path / "z")  # now after b/: compared as a set, not in path order
  prepare.check_store_matches(c)
  os.rename(tmp_path / "z", tmp_path / "a")
  fasta.write_fasta(tmp_path / "a" / "x.fa", [("chr_a", "ACGTACGTAA" * 2)])
  with pytest.raises(store_lib.StoreError, match=r"1 file \(x.fa\) changed since"):
    prepare.check_store_matches(c)
  c.fasta_globs = (str(tmp_path / "b" / "x.fa"),)
  with pytest.raises(
    store_lib.StoreError, match=r"store 2 files \(x.fa, x.fa\), config 1 file \(x.fa\)"
  ):
    prepare.check_store_matches(c)


def test_training_refuses_a_store_of_other_data_than_its_config_names(tmp_path, caplog):
  """Review: train.py opened data.store_dir without a look at how it was
  prepared, so a run could train and validate on other data than its
  config.json records (other files, another validation split)."""
  _genomes(tmp_path, count=3)
  c = _cfg(tmp_path, [tmp_path / "g[01].fa"], val_sources=("g1",))
  prepare.prepare_store(c)
  prepare.check_store_matches(c)  # as prepared
  c.split.val_sources = ("g0",)
  with pytest.raises(store_lib.StoreError, match=r"split.val_sources: store \['g1'\], config"):
    prepare.check_store_matches(c)
  c.split.val_sources = ("g1",)
  c.fasta_globs = (str(tmp_path / "g*.fa"),)  # one genome more
  with pytest.raises(
    store_lib.StoreError,
    match=r"fasta_globs: store 2 files \(g0.fa, g1.fa\), config 3 files .*empty data.fasta_globs",
  ):
    prepare.check_store_matches(c)
  c.fasta_globs = (str(tmp_path / "g[01].fa"),)
  # The same files copied without their modification times (cp -r, a fresh
  # download; review: refused): their contents are compared, and match.
  os.utime(tmp_path / "g0.fa", ns=(1, 1))
  caplog.set_level("WARNING")
  prepare.check_store_matches(c)
  assert not caplog.text
  # An edit that keeps the size (review: unnoticed, as only sizes were
  # compared then) is refused, naming the file.
  _edit_keeping_size(tmp_path / "g0.fa")
  with pytest.raises(store_lib.StoreError, match=r"fasta_globs: 1 file \(g0.fa\) changed since"):
    prepare.check_store_matches(c)
  # Not checked: a store named without its inputs, or prepared from files
  # that are not on this machine (only the split is compared then).
  c.fasta_globs = ()
  prepare.check_store_matches(c)
  c.fasta_globs = (str(tmp_path / "elsewhere" / "*.fa"),)
  prepare.check_store_matches(c)
  c.split.val_sources = ("g0",)
  with pytest.raises(store_lib.StoreError, match="split.val_sources"):
    prepare.check_store_matches(c)


def _gcs_genomes(gcs, folder="genomes", **kwargs):
  """_genomes written as objects gs://bucket/<folder>/g*; returns their
  local directory in the fake's root and the genomes."""
  local = os.path.join(gcs.root, "bucket", folder)
  os.makedirs(local, exist_ok=True)
  return local, _genomes(pathlib.Path(local), **kwargs)


def test_a_store_prepares_from_gs_objects_as_from_local_copies(tmp_path, gcs, monkeypatch):
  """FASTA inputs on GCS (review of stop 37: local or mounted only): a gs://
  glob prepares the store that local copies of the objects give, with the
  same digests; the objects' generations tell a re-run that nothing
  changed, and a rewrite is compared by content."""
  monkeypatch.setenv(digests.CACHE_ENV, str(tmp_path / "digests.json"))
  local, _ = _gcs_genomes(gcs, folder="by_url", count=3, compress="gzip")
  c = _cfg(tmp_path / "from_gs", ["gs://bucket/by_url/g[0-2].fa.gz"], val_sources=("g1",))
  store = prepare.prepare_store(c)
  copies = tmp_path / "copies"
  shutil.copytree(local, copies)
  want = prepare.prepare_store(_cfg(copies, [copies / "*.fa.gz"], val_sources=("g1",)))
  for split in ("train", "val"):
    assert _contents(store, split) == _contents(want, split)
  recorded = store.manifest["metadata"]["fingerprint"]["inputs"]
  assert [f["path"] for f in recorded] == [f"gs://bucket/by_url/g{i}.fa.gz" for i in range(3)]
  assert [f["sha256"] for f in recorded] == [
    f["sha256"] for f in want.manifest["metadata"]["fingerprint"]["inputs"]
  ]
  assert all(f["generation"] for f in recorded)
  messages = []
  again = prepare.prepare_store(c, log=lambda m, *a: messages.append(m % a))
  assert "is up to date" in messages[0] and again.manifest["created"] == store.manifest["created"]
  # A rewrite with the same bytes is a new generation: read once, then known.
  g2 = os.path.join(local, "g2.fa.gz")
  shutil.copyfile(g2, g2 + ".tmp")
  os.replace(g2 + ".tmp", g2)
  os.utime(g2, ns=(1, 1))
  reads = []
  real = hashlib.file_digest
  monkeypatch.setattr(hashlib, "file_digest", lambda f, name: reads.append(1) or real(f, name))
  prepare.check_store_matches(c)
  prepare.check_store_matches(c)
  assert len(reads) == 1
  assert any(
    "gs-generation=1:gs://bucket/by_url/g2.fa.gz" in k
    for k in json.load(open(tmp_path / "digests.json"))
  )
  # Other bytes of the same size are refused, naming the object.
  with gzip.open(g2, "rt") as f:
    text = f.read()
  with gzip.open(g2, "wt") as f:
    f.write(text.replace(">chr0", ">chrX", 1))
  with pytest.raises(store_lib.StoreError, match=r"1 file \(g2.fa.gz\) changed since"):
    prepare.check_store_matches(c)


def test_an_object_rewritten_while_prepared_is_refused(tmp_path, gcs, monkeypatch):
  local, _ = _gcs_genomes(gcs, folder="rewritten", count=2)
  c = _cfg(tmp_path, ["gs://bucket/rewritten/**/*.fa"], split_by="record", val_fraction=0.0)
  listed = prepare.resolve_inputs

  def listed_then_rewritten(*args):
    files = listed(*args)
    os.utime(os.path.join(local, "g1.fa"), ns=(7, 7))  # a new generation
    return files

  monkeypatch.setattr(prepare, "resolve_inputs", listed_then_rewritten)
  with pytest.raises(ValueError, match=r"gs://bucket/rewritten/g1.fa changed while"):
    prepare.prepare_store(c)
  assert not store_lib.is_complete(c.store_dir)


def test_unreadable_input_urls_are_refused_in_one_line(tmp_path, gcs, monkeypatch):
  for globs, message in [
    (["s3://bucket/genomes/*.fa"], r"'s3://bucket/genomes/\*.fa': FASTA inputs may be local"),
    (["https://example.org/g.fa"], r"may be local paths, file:// or gs:// URLs"),
    (["gs://bucket/none/*.fa"], r"'gs://bucket/none/\*.fa' matches no file\.$"),
  ]:
    with pytest.raises(ValueError, match=message):
      prepare.prepare_store(_cfg(tmp_path, globs))

  def no_gcsfs(url):
    raise ImportError("Install gcsfs to access Google Storage")

  with monkeypatch.context() as m:
    m.setattr(paths, "object_filesystem", no_gcsfs)
    with pytest.raises(ValueError, match=r"needs gcsfs here .*pip install gcsfs, or copy"):
      prepare.prepare_store(_cfg(tmp_path, ["gs://bucket/genomes/*.fa"]))
  _genomes(tmp_path, count=1)
  url = (tmp_path / "g0.fa").as_uri()
  store = prepare.prepare_store(_cfg(tmp_path, [url]))
  assert store.manifest["metadata"]["fingerprint"]["inputs"][0]["path"] == str(tmp_path / "g0.fa")


def test_streaming_is_bounded_and_exact(tmp_path):
  # ~6 MB of sequence in a few long records and many short ones, prepared
  # with 64 KiB blocks: the tokens equal the one-shot encoding and peak
  # Python-tracked memory stays far below the input size.
  rng = np.random.default_rng(0)
  acgtn = np.frombuffer(b"ACGTNacgtn", np.uint8)
  lengths = [2_000_000, 3_000_000, 1_000_000] + [37] * 500 + [1_000_001]
  seqs = [acgtn[rng.integers(0, 10, n)].tobytes().decode() for n in lengths]
  records = [(f"r{i}", s) for i, s in enumerate(seqs)]
  fasta.write_fasta(tmp_path / "big.fa.gz", records, width=70, compress="gzip")
  c = _cfg(tmp_path, [tmp_path / "big.fa.gz"])
  c.prepare_block_bytes = 1 << 16
  tracemalloc.start()
  try:
    s = prepare.prepare_store(c)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 1_500_000, peak  # input: 7 MB of sequence
  train = s["train"]
  assert train.num_tokens == sum(lengths)
  for i, seq in enumerate(seqs):
    np.testing.assert_array_equal(train[i].tokens, tokenizer.encode_bytes(seq.encode()))


def test_prepare_data_app(tmp_path):
  store_dir = tmp_path / "store"
  workdir = tmp_path / "work"
  cmd = [
    sys.executable,
    os.path.join(ROOT, "launch", "prepare_data.py"),
    f"--config={os.path.join(ROOT, 'tests', 'data', 'lambda_config.py')}",
    f"--config.data.store_dir={store_dir}",
    f"--workdir={workdir}",
  ]
  env = launch_env(1)  # this tree's package, whatever the venv has installed
  run = subprocess.run(
    cmd + [f"--export_url={tmp_path / 'zarr'}"],
    capture_output=True,
    text=True,
    env=env,
    cwd=tmp_path,
    timeout=120,
    check=False,
  )
  assert run.returncode == 0, run.stderr
  assert "train: 1 records, 48502 tokens, 1 sources" in run.stdout
  assert "Mb/s" in run.stderr  # progress report
  summary = json.loads((workdir / "prepare_data.json").read_text())
  assert summary["splits"]["train"]["tokens"] == 48502
  assert store_lib.TokenStore.open(store_dir)["train"].num_tokens == 48502
  assert summary["export_url"] == f"file://{tmp_path / 'zarr'}"
  exported = store_lib.TokenStore.open(summary["export_url"])["train"]
  np.testing.assert_array_equal(
    exported.tokens[0:48502], store_lib.TokenStore.open(store_dir)["train"].tokens[:]
  )
  # Bad input: a clean one-line error naming the file and line, exit 1.
  bad = tmp_path / "bad.fa"
  bad.write_text(">a\nACGT\n>a\nAC\n")
  run = subprocess.run(
    cmd[:3]
    + [
      f"--config.data.fasta_globs=('{bad}',)",
      f"--config.data.store_dir={tmp_path / 'store2'}",
      f"--workdir={workdir}",
    ],
    capture_output=True,
    text=True,
    env=env,
    cwd=tmp_path,
    timeout=120,
    check=False,
  )
  assert run.returncode == 1
  assert f"{bad} line 3: duplicate record name 'a'" in run.stderr
  assert "Traceback" not in run.stderr
  assert not os.path.exists(tmp_path / "store2")


_SAVE_DIGESTS = """
import sys
from hybridna_jax.data import digests
worker = int(sys.argv[1])
for i in range(20):
  digests.remember(f"{worker}:{i}", f"{worker * 100 + i:064x}")
  digests.save()
"""


def test_processes_saving_digests_at_once_keep_each_others(tmp_path):
  """Review of stop 37: two processes that read, merged and replaced the
  cache file at once dropped each other's new entries."""
  cache = str(tmp_path / "digests.json")
  env = dict(os.environ, **{digests.CACHE_ENV: cache, "PYTHONPATH": ROOT})
  workers = [
    subprocess.Popen([sys.executable, "-c", _SAVE_DIGESTS, str(w)], env=env) for w in range(6)
  ]
  assert [p.wait(timeout=120) for p in workers] == [0] * 6
  assert len(json.load(open(cache))) == 6 * 20
