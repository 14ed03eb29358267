"""Grain pipeline: windows, batch contract, sampling, sharding, checkpoints."""

import collections
import functools
import os
import threading
import time

import numpy as np
import pytest

from hybridna_jax import tokenizer
from hybridna_jax.data import config as config_lib
from hybridna_jax.data import pipeline, prepare, sampling, store_writer
from hybridna_jax.data import store as store_lib
from hybridna_jax.data import windows as windows_lib

A, C, G, T, N = (tokenizer.A, tokenizer.C, tokenizer.G, tokenizer.T, tokenizer.N)
LAMBDA = os.path.join(os.path.dirname(__file__), "data", "lambda_virus.fa")


def _store(path, records):
  """records: [(split, source, name, uint8 tokens)] -> store path."""
  with store_writer.TokenStoreWriter(path) as w:
    for split, source, name, tokens in records:
      w.begin_record(split, name, source)
      w.append(np.asarray(tokens, np.uint8))
    w.commit()
  return str(path)


def _cfg(store_dir, **overrides):
  c = config_lib.default_data_config()
  c.store_dir = str(store_dir)
  c.read_threads = 0
  for k, v in overrides.items():
    c[k] = v
  return c


def _random_tokens(rng, n, alphabet=(A, C, G, T)):
  return np.asarray(alphabet, np.uint8)[rng.integers(0, len(alphabet), n)]


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory):
  """Three sources of different sizes, short and long records, in train;
  two records in val."""
  rng = np.random.default_rng(0)
  records = []
  for s, (count, lo, hi) in enumerate([(40, 5, 90), (3, 500, 3000), (10, 1, 300)]):
    for r in range(count):
      records.append(("train", f"src{s}", f"r{r}", _random_tokens(rng, int(rng.integers(lo, hi)))))
  records.append(("val", "held", "v0", _random_tokens(rng, 1000, (A, C, G, T, N))))
  records.append(("val", "held", "v1", _random_tokens(rng, 37)))
  return _store(tmp_path_factory.mktemp("mixed") / "store", records)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _rows(batches, key):
  return np.concatenate([b[key] for b in batches])


def _check_contract(batch, batch_size, seq_len, mask_n=True):
  assert set(batch) == {"inputs", "targets", "segment_ids", "loss_mask"}
  for k, dtype in (
    ("inputs", np.int32),
    ("targets", np.int32),
    ("segment_ids", np.int32),
    ("loss_mask", np.float32),
  ):
    assert batch[k].dtype == dtype and batch[k].shape == (batch_size, seq_len), k
  inputs, targets = batch["inputs"], batch["targets"]
  seg, mask = batch["segment_ids"], batch["loss_mask"]
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  # Real tokens have segment ids >= 1, padding 0, and ids never go back.
  np.testing.assert_array_equal(seg > 0, inputs != tokenizer.PAD)
  assert np.all(np.diff(seg, axis=1)[seg[:, 1:] > 0] >= 0)
  last = T if mask_n else N
  want = (
    (seg[:, 1:] == seg[:, :-1])
    & (seg[:, :-1] > 0)
    & (targets[:, :-1] >= A)
    & (targets[:, :-1] <= last)
  )
  np.testing.assert_array_equal(mask[:, :-1], want.astype(np.float32))
  assert np.all(mask[:, -1] <= (seg[:, -1] > 0))


def test_window_index():
  starts = np.array([0, 1, 3, 13, 24])
  ends = starts + np.array([1, 2, 10, 11, 25])
  sources = np.array([0, 0, 1, 0, 1])
  train = windows_lib.WindowIndex(starts, ends, sources, length=11, stride=10, align_end=True)
  # Sorted by source: segments 0, 1, 3 (source 0), then 2, 4 (source 1).
  assert len(train) == 0 + 1 + 1 + 1 + 3
  assert [train.window(i) for i in range(len(train))] == [
    (1, 3),
    (13, 24),
    (3, 13),
    (24, 35),
    (34, 45),
    (38, 49),
  ]
  np.testing.assert_array_equal(train.source_ranges(3), [[0, 2], [2, 6], [6, 6]])
  evaluation = windows_lib.WindowIndex(starts, ends, sources, length=11, stride=10, align_end=False)
  assert [evaluation.window(i) for i in range(len(evaluation))] == [
    (1, 3),
    (13, 24),
    (3, 13),
    (24, 35),
    (34, 45),
    (44, 49),
  ]


def test_train_batches_contract_and_determinism(mixed_store):
  c = _cfg(mixed_store)
  it = pipeline.train_batches(c, seq_len=64, batch_size=8, seed=1)
  batches = _take(it, 20)
  for b in batches:
    _check_contract(b, 8, 64)
  again = _take(pipeline.train_batches(c, seq_len=64, batch_size=8, seed=1), 20)
  for x, y in zip(batches, again):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  other = _take(pipeline.train_batches(c, seq_len=64, batch_size=8, seed=2), 20)
  assert not np.array_equal(_rows(batches, "inputs"), _rows(other, "inputs"))


def _runs_store(tmp_path, lengths, split="train"):
  """Records of one repeated nucleotide each, cycling A C G T, so record
  boundaries are exactly where the token changes."""
  records = [
    (split, "s", f"r{i}", np.full(n, (A, C, G, T)[i % 4], np.uint8)) for i, n in enumerate(lengths)
  ]
  return _store(tmp_path / "store", records)


@pytest.mark.parametrize("packing", [True, False])
def test_windows_cross_records_only_when_packing(tmp_path, packing):
  rng = np.random.default_rng(1)
  store_dir = _runs_store(tmp_path, rng.integers(3, 70, 300))
  c = _cfg(store_dir, packing=packing, reverse_complement_prob=0.5)
  batches = _take(pipeline.train_batches(c, seq_len=50, batch_size=4, seed=0), 25)
  for b in batches:
    _check_contract(b, 4, 50)
    inputs, seg = b["inputs"], b["segment_ids"]
    window = np.concatenate([inputs, b["targets"][:, -1:]], axis=1)
    changes = (window[:, 1:] != window[:, :-1])[:, :-1]
    real = seg[:, 1:] > 0
    # Segment ids change exactly where the record (its nucleotide) changes.
    np.testing.assert_array_equal((np.diff(seg, axis=1) != 0)[real], changes[real])
    if packing:
      assert inputs.min() > 0  # packed windows of long sources: no padding
    else:
      assert seg.max() == 1
  if packing:
    assert max(b["segment_ids"].max() for b in batches) > 3
  else:
    assert min(b["segment_ids"].min() for b in batches) == 0  # padded


def test_reverse_complement(mixed_store):
  def windows(prob):
    c = _cfg(mixed_store, reverse_complement_prob=prob)
    bs = _take(pipeline.train_batches(c, seq_len=40, batch_size=4, seed=5), 6)
    return [np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in bs], bs

  plain, _ = windows(0.0)
  flipped, batches = windows(1.0)
  for p, f in zip(plain, flipped):
    np.testing.assert_array_equal(f, tokenizer.reverse_complement_tokens(p))
  for b in batches:
    _check_contract(b, 4, 40)
  half, _ = windows(0.5)
  same = [np.array_equal(h[i], p[i]) for h, p in zip(half, plain) for i in range(4)]
  assert 0 < sum(same) < len(same)


def test_mostly_n_windows_are_skipped(tmp_path):
  rng = np.random.default_rng(2)
  good = _random_tokens(rng, 2000)
  gappy = good.copy()
  gappy[::10] = N  # 10% N
  assembly_gap = np.full(2000, N, np.uint8)
  assembly_gap[:300] = _random_tokens(rng, 300)  # 85% N
  store_dir = _store(
    tmp_path / "store",
    [
      ("train", "s", "good", good),
      ("train", "s", "gappy", gappy),
      ("train", "s", "gap", assembly_gap),
    ],
  )

  def n_fractions(max_n):
    c = _cfg(store_dir, max_n_fraction=max_n, packing=False)
    rows = _rows(_take(pipeline.train_batches(c, seq_len=99, batch_size=10, seed=0), 12), "inputs")
    return (rows == N).mean(axis=1)

  kept = n_fractions(0.5)
  assert kept.max() <= 0.5 and np.any((kept > 0.05) & (kept < 0.15))
  assert n_fractions(1.0).max() > 0.5


def test_loss_mask_and_n(tmp_path):
  store_dir = _store(
    tmp_path / "store",
    [
      ("train", "s", "a", np.array([A, C, N, G, T], np.uint8)),
      ("train", "s", "b", np.array([G, G], np.uint8)),
    ],
  )
  c = _cfg(store_dir, reverse_complement_prob=0.0, max_n_fraction=1.0)
  # The one window of 7 tokens: both records, packed.
  b = next(pipeline.train_batches(c, seq_len=6, batch_size=1, seed=0))
  np.testing.assert_array_equal(b["inputs"][0], [A, C, N, G, T, G])
  np.testing.assert_array_equal(b["targets"][0], [C, N, G, T, G, G])
  np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 1, 1, 2])
  np.testing.assert_array_equal(b["loss_mask"][0], [1, 0, 1, 1, 0, 1])
  c.mask_n_in_loss = False
  b = next(pipeline.train_batches(c, seq_len=6, batch_size=1, seed=0))
  np.testing.assert_array_equal(b["loss_mask"][0], [1, 1, 1, 1, 0, 1])
  # A longer context than the store holds is refused, not padded.
  with pytest.raises(ValueError, match="seq_len 8 needs windows of 9 tokens"):
    next(pipeline.train_batches(c, seq_len=8, batch_size=1, seed=0))


def test_source_weights(tmp_path):
  # Sources of 100k, 10k and 1k tokens, told apart by their nucleotide.
  store_dir = _store(
    tmp_path / "store",
    [
      ("train", "big", "x", np.full(100_000, A, np.uint8)),
      ("train", "mid", "x", np.full(10_000, C, np.uint8)),
      ("train", "small", "x", np.full(1_000, G, np.uint8)),
    ],
  )

  def shares(**overrides):
    c = _cfg(store_dir, reverse_complement_prob=0.0, **overrides)
    first = _rows(
      _take(pipeline.train_batches(c, seq_len=99, batch_size=50, seed=0), 20), "inputs"
    )[:, 0]
    counts = collections.Counter(first.tolist())
    return np.array([counts[A], counts[C], counts[G]]) / first.size

  np.testing.assert_allclose(shares(), np.array([100, 10, 1]) / 111, atol=0.02)
  np.testing.assert_allclose(shares(source_temperature=1e9), [1 / 3] * 3, atol=0.05)
  flat = np.sqrt([100, 10, 1])
  np.testing.assert_allclose(shares(source_temperature=2.0), flat / flat.sum(), atol=0.03)
  np.testing.assert_allclose(
    shares(source_weights=("big=0", "s*=3")), [0, 10 / 13, 3 / 13], atol=0.04
  )
  with pytest.raises(ValueError, match="matches none of the sources"):
    shares(source_weights=("nope=1",))
  for bad in ("big=nan", "big=inf", "big=-1", "big"):
    with pytest.raises(ValueError, match="with a finite weight >= 0"):
      shares(source_weights=(bad,))


def test_source_schedule_exact_shares():
  sched = sampling.SourceSchedule([0.5, 0.3, 0.2], seed=0, period=1000)
  picks = [sched[g] for g in range(3000)]
  counts = collections.Counter(s for s, _ in picks)
  assert [counts[i] for i in range(3)] == [1500, 900, 600]
  # Each source's stream is consumed in order, without gaps or repeats.
  for s in range(3):
    assert [k for t, k in picks if t == s] == list(range(counts[s]))


def test_permute_is_a_keyed_bijection():
  for n in (1, 2, 3, 5, 17, 100, 1000, 4097):
    for key in (0, 12345):
      assert sorted(sampling.permute(i, n, key) for i in range(n)) == list(range(n))
  orders = {tuple(sampling.permute(i, 50, key) for i in range(50)) for key in range(5)}
  assert len(orders) == 5 and tuple(range(50)) not in orders


def test_each_epoch_visits_every_window_once():
  ranges = np.array([[0, 7], [7, 107]])
  sampler = sampling.WindowSampler(ranges, np.array([7.0, 100.0]), seed=4, rc_prob=0.5)
  picks = [sampler.map(g) for g in range(107 * 3)]
  windows = [w for w, _ in picks]
  small = [w for w in windows if w < 7]
  large = [w for w in windows if w >= 7]
  # Source shares are exact over the schedule period (2**20); over this
  # short stretch they are close.
  assert abs(len(small) - 21) <= 8
  for stream, first, size in ((small, 0, 7), (large, 7, 100)):
    for e in range(len(stream) // size):
      epoch = stream[e * size : (e + 1) * size]
      assert sorted(epoch) == list(range(first, first + size))
    assert stream[:size] != stream[size : 2 * size]  # reshuffled per epoch
  flips = [f for _, f in picks]
  assert 0.35 < np.mean(flips) < 0.65


def test_hosts_read_disjoint_interleaved_shards(mixed_store):
  # Host h's stream is every third window of the single-host stream,
  # augmentation included (without filtering, which drops windows per host).
  c = _cfg(mixed_store, max_n_fraction=1.0)
  single = _rows(_take(pipeline.train_batches(c, seq_len=32, batch_size=1, seed=7), 30), "inputs")
  hosts = [
    _rows(
      _take(
        pipeline.train_batches(c, seq_len=32, batch_size=1, seed=7, shard_index=h, shard_count=3),
        10,
      ),
      "inputs",
    )
    for h in range(3)
  ]
  for h in range(3):
    np.testing.assert_array_equal(hosts[h], single[h::3])


def _same_batches(got, want, rows=slice(None), columns=slice(None)):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    for k in w:
      np.testing.assert_array_equal(g[k], w[k][rows, columns], k)


def test_a_stream_starts_at_any_batch_under_any_layout_and_worker_count(mixed_store):
  """How a resumed run reads on: global batch t is a pure function of
  (seed, t), so a stream started at batch 5 -- whole, by rows and columns,
  in worker processes, or per host -- continues the uninterrupted one."""
  c = _cfg(mixed_store, reverse_complement_prob=0.5)
  kwargs = dict(seq_len=48, batch_size=4, seed=11)
  reference = _take(pipeline.train_batches(c, **kwargs), 9)
  _same_batches(_take(pipeline.train_batches(c, start_batch=5, **kwargs), 4), reference[5:])
  layout = dict(rows=[1, 3], columns=(8, 48))
  part = _take(pipeline.train_batches(c, start_batch=5, **layout, **kwargs), 4)
  _same_batches(part, reference[5:], [1, 3], slice(8, 48))
  it = pipeline.train_batches(
    _cfg(mixed_store, reverse_complement_prob=0.5, num_workers=2), start_batch=5, **kwargs
  )
  try:
    _same_batches(_take(it, 4), reference[5:])
  finally:
    it.close()
  host = dict(seq_len=48, batch_size=2, seed=11, shard_index=1, shard_count=2)
  _same_batches(
    _take(pipeline.train_batches(c, start_batch=3, **host), 2),
    _take(pipeline.train_batches(c, **host), 5)[3:],
  )
  with pytest.raises(ValueError, match="start_batch must be >= 0"):
    pipeline.train_batches(c, start_batch=-1, **kwargs)


def test_worker_processes_checkpoint_and_give_the_same_batches(mixed_store):
  """Batches of 2 and 3 workers are those of the main process (workers were
  dealt positions and batched every W-th), and their state resumes them."""
  kwargs = dict(seq_len=32, batch_size=2, seed=3)
  main_process = _take(pipeline.train_batches(_cfg(mixed_store), **kwargs), 7)
  for workers in (3, 2):
    c = _cfg(mixed_store, num_workers=workers)
    it = pipeline.train_batches(c, **kwargs)
    try:
      first = _take(it, 3)
      state = it.get_state()
      want = _take(it, 4)
    finally:
      it.close()
    for x, y in zip(main_process, first + want):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
  for b in want:
    _check_contract(b, 2, 32)
  it = pipeline.train_batches(c, **kwargs)
  try:
    it.set_state(state)
    got = _take(it, 4)
  finally:
    it.close()
  for x, y in zip(want, got):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("packing", [False, True])
def test_eval_covers_every_target_once(mixed_store, packing):
  c = _cfg(mixed_store, eval_packing=packing)
  val = store_lib.TokenStore.open(mixed_store)["val"]
  batches = list(pipeline.eval_batches(c, seq_len=64, batch_size=3))
  assert batches and all(b["inputs"].shape == (3, 64) for b in batches)
  for b in batches:
    _check_contract(b, 3, 64)
  # Input positions whose target is in the same record.
  pair = _rows(batches, "targets") != tokenizer.PAD
  inputs = _rows(batches, "inputs")[pair]
  targets = _rows(batches, "targets")[pair]
  mask = _rows(batches, "loss_mask")[pair]
  records = [val[i].tokens for i in range(len(val))]
  if not packing:
    # Reading the windows in order gives back each record, once.
    np.testing.assert_array_equal(inputs, np.concatenate([r[:-1] for r in records]))
    np.testing.assert_array_equal(targets, np.concatenate([r[1:] for r in records]))
  # Every token after a record's first is a target exactly once, and the
  # loss counts exactly the non-N ones.
  scored = np.sort(targets[mask > 0])
  want = np.concatenate([r[1:] for r in records])
  np.testing.assert_array_equal(scored, np.sort(want[want != N]))
  assert (
    list(pipeline.eval_batches(c, seq_len=64, batch_size=3))[0]["inputs"].tobytes()
    == batches[0]["inputs"].tobytes()
  )


def test_eval_hosts_get_equal_batch_counts(mixed_store):
  c = _cfg(mixed_store)
  single = _rows(list(pipeline.eval_batches(c, seq_len=16, batch_size=4)), "inputs")
  per_host = [
    list(pipeline.eval_batches(c, seq_len=16, batch_size=4, shard_index=h, shard_count=3))
    for h in range(3)
  ]
  assert len({len(p) for p in per_host}) == 1
  real = [r for r in single if r.any()]
  for h in range(3):
    rows = [r for r in _rows(per_host[h], "inputs") if r.any()]
    np.testing.assert_array_equal(np.array(rows), np.array(real[h::3]))


def test_eval_max_windows_spreads_over_the_split(mixed_store):
  c = _cfg(mixed_store)
  every = [
    r for r in _rows(list(pipeline.eval_batches(c, seq_len=16, batch_size=4)), "inputs") if r.any()
  ]
  c.eval_max_windows = 5
  some = [
    r for r in _rows(list(pipeline.eval_batches(c, seq_len=16, batch_size=4)), "inputs") if r.any()
  ]
  assert len(every) > 10 and len(some) == 5
  want = [every[k * len(every) // 5] for k in range(5)]
  np.testing.assert_array_equal(np.array(some), np.array(want))
  assert some[-1].tobytes() != every[4].tobytes()  # not just the first five


def test_lambda_end_to_end(tmp_path):
  c = config_lib.default_data_config()
  c.fasta_globs = (LAMBDA,)
  c.store_dir = str(tmp_path / "store")
  c.split.val_records = ("*",)
  with pytest.raises(ValueError, match="every record went to validation"):
    prepare.prepare_store(c)
  c.split.val_records = ()
  prepare.prepare_store(c)
  b = next(pipeline.train_batches(c, seq_len=1024, batch_size=2, seed=0))
  _check_contract(b, 2, 1024)
  assert b["loss_mask"].sum() == 2 * 1024
  with pytest.raises(KeyError, match="split 'val' not in the store"):
    pipeline.eval_batches(c, seq_len=1024, batch_size=2)
  (batches) = list(pipeline.eval_batches(c, split="train", seq_len=8192, batch_size=2))
  assert len(batches) == 3  # ceil(48501 / 8192) = 6 windows
  assert sum(b["loss_mask"].sum() for b in batches) == 48501


@pytest.fixture(scope="module")
def gappy_packed_store(tmp_path_factory):
  """Packed records of one source with document boundaries inside windows,
  and assembly gaps (mostly-N stretches) that the N check replaces."""
  rng = np.random.default_rng(5)
  records = []
  for r in range(30):
    tokens = _random_tokens(rng, int(rng.integers(3, 60)))
    if r % 7 == 3:
      tokens[: int(0.8 * tokens.size)] = N
    records.append(("train", "s", f"r{r}", tokens))
  for r in range(9):
    records.append(("val", "v", f"v{r}", _random_tokens(rng, int(rng.integers(5, 80)))))
  return _store(tmp_path_factory.mktemp("gappy") / "store", records)


def test_window_slices_equal_slices_of_the_whole_window(gappy_packed_store):
  store = store_lib.TokenStore.open(gappy_packed_store)
  index = windows_lib.WindowIndex(
    *windows_lib.split_segments(store["train"], True), length=17, stride=5, align_end=True
  )
  whole = windows_lib.WindowReader(store.path, "train", index)
  for i in range(len(index)):
    forward = whole.map(i)
    flipped = whole.map((i, True))
    rc = windows_lib.reverse_complement_window(forward)
    for k in ("tokens", "marks"):
      np.testing.assert_array_equal(flipped[k], rc[k])
    for flip, full in ((False, forward), (True, flipped)):
      for a, b in ((0, 5), (3, 9), (8, 17), (16, 17), (1, 17)):
        part = windows_lib.WindowReader(store.path, "train", index, (a, b)).map((i, flip))
        np.testing.assert_array_equal(part["tokens"], full["tokens"][a:b])
        np.testing.assert_array_equal(part["marks"], full["marks"][a:b])
        n = windows_lib.window_length(full)
        want = int(np.count_nonzero(full["marks"][:a] == windows_lib.DOC_START)) if a < n else 0
        assert int(part["prior"]) == want, (i, flip, a, b)


@pytest.mark.parametrize("rc", [0.0, 0.5])
def test_layout_pieces_assemble_the_global_batch(gappy_packed_store, rc):
  # Four hosts: rows {0, 1} or {2, 3} of each global batch of 4, columns
  # [0, 8) or [8, 24): each loads exactly its piece of the same global batch,
  # with the N check (max_n_fraction 0.5) and packing on.
  c = _cfg(gappy_packed_store, reverse_complement_prob=rc, packing=True, max_n_fraction=0.5)
  kw = dict(seq_len=24, batch_size=4, seed=3)
  full = _take(pipeline.train_batches(c, **kw), 6)
  assert any(np.any(b["segment_ids"] > 1) for b in full)  # boundaries inside rows
  for b in full:
    _check_contract(b, 4, 24)
    frac = ((b["inputs"] == N) & (b["segment_ids"] > 0)).sum(1) / (b["segment_ids"] > 0).sum(1)
    assert frac.max() <= 0.55  # mostly-N windows were replaced, not kept
  for rows in ([0, 1], [2, 3], [1]):
    for columns in ((0, 8), (8, 24), (0, 24)):
      pieces = _take(pipeline.train_batches(c, rows=rows, columns=columns, **kw), 6)
      for piece, whole in zip(pieces, full):
        for k in whole:
          np.testing.assert_array_equal(piece[k], whole[k][rows, columns[0] : columns[1]], k)
  ev = dict(seq_len=16, batch_size=4)
  whole_eval = list(pipeline.eval_batches(c, **ev))
  assert len(whole_eval) > 1
  for rows, columns in (([0, 1], (0, 4)), ([2, 3], (4, 16))):
    pieces = list(pipeline.eval_batches(c, rows=rows, columns=columns, **ev))
    assert len(pieces) == len(whole_eval)
    for piece, whole in zip(pieces, whole_eval):
      for k in whole:
        np.testing.assert_array_equal(piece[k], whole[k][rows, columns[0] : columns[1]], k)


def test_layout_iterator_resumes_exactly(gappy_packed_store):
  c = _cfg(gappy_packed_store, reverse_complement_prob=0.5)
  kw = dict(seq_len=24, batch_size=4, seed=1, rows=[2, 3], columns=(12, 24))
  reference = _take(pipeline.train_batches(c, **kw), 7)
  it = pipeline.train_batches(c, **kw)
  _take(it, 3)
  state = it.get_state()
  resumed = pipeline.train_batches(c, **kw)
  resumed.set_state(state)
  for got, want in zip(_take(resumed, 4), reference[3:]):
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_layout_arguments_are_checked(gappy_packed_store):
  c = _cfg(gappy_packed_store)
  with pytest.raises(ValueError, match="sorted distinct row ids"):
    pipeline.train_batches(c, seq_len=8, batch_size=2, seed=0, rows=[1, 2])
  with pytest.raises(ValueError, match="columns"):
    pipeline.train_batches(c, seq_len=8, batch_size=2, seed=0, rows=[0], columns=(4, 9))
  with pytest.raises(ValueError, match="not both"):
    pipeline.train_batches(c, seq_len=8, batch_size=2, seed=0, rows=[0], shard_count=2)


@pytest.mark.parametrize("rc", [0.0, 1.0])
def test_empty_records_do_not_shift_slice_segment_ids(tmp_path, rc):
  # TokenStoreWriter accepts a zero-length record: its offset is that of the
  # next record, one document boundary, which a column slice counted twice.
  rng = np.random.default_rng(0)
  records = [
    ("train", "s", name, _random_tokens(rng, n))
    for name, n in [("r0", 5), ("e0", 0), ("r1", 20), ("e1", 0), ("e2", 0), ("r2", 30)]
  ]
  c = _cfg(_store(tmp_path / "store", records), packing=True, reverse_complement_prob=rc)
  kw = dict(seq_len=16, batch_size=2, seed=0)
  full = _take(pipeline.train_batches(c, **kw), 12)
  assert any(np.any(b["segment_ids"] > 1) for b in full)  # boundaries inside rows
  for b in full:
    _check_contract(b, 2, 16)
  for columns in ((8, 16), (3, 11), (15, 16)):
    pieces = _take(pipeline.train_batches(c, rows=[0, 1], columns=columns, **kw), 12)
    for piece, whole in zip(pieces, full):
      for k in whole:
        np.testing.assert_array_equal(piece[k], whole[k][:, columns[0] : columns[1]], k)


class _ConcurrentReads:
  """store.read_ranges that records how many calls run at once; the first
  `wait_for` calls off the main thread wait (up to `timeout` s) until that
  many have started."""

  def __init__(self, wait_for: int, timeout: float = 20.0):
    self.read = store_lib.read_ranges
    self.barrier = threading.Barrier(wait_for, timeout=timeout)
    self.lock = threading.Lock()
    self.active = self.peak = 0

  def __call__(self, tokens, ranges):
    with self.lock:
      self.active += 1
      self.peak = max(self.peak, self.active)
    try:
      if threading.current_thread() is not threading.main_thread() and not self.barrier.broken:
        try:
          self.barrier.wait()
        except threading.BrokenBarrierError:
          pass
      return self.read(tokens, ranges)
    finally:
      with self.lock:
        self.active -= 1


@pytest.mark.parametrize("max_n_fraction", [1.0, 0.5])
def test_read_threads_read_training_batches_concurrently(
  gappy_packed_store, monkeypatch, max_n_fraction
):
  # data.read_threads overlap the waits of slow storage: the reads of
  # several training batches are in flight at once (they ran one after
  # another on the main thread), and the batches are those of no threads.
  c = _cfg(gappy_packed_store, max_n_fraction=max_n_fraction)
  kw = dict(seq_len=24, batch_size=4, seed=3, rows=[1, 2], columns=(4, 20), start_batch=2)
  want = _take(pipeline.train_batches(c, **kw), 8)
  reads = _ConcurrentReads(wait_for=3)
  monkeypatch.setattr(store_lib, "read_ranges", reads)
  c = _cfg(gappy_packed_store, max_n_fraction=max_n_fraction, read_threads=3)
  got = _take(pipeline.train_batches(c, **kw), 8)
  assert reads.peak >= 3 and not reads.barrier.broken
  for g, w in zip(got, want):
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], k)


_READ_BATCH = windows_lib.ReadBatch.__call__


def _batches_read_after_one(make_iterable, monkeypatch) -> int:
  """How many batches (ReadBatch calls) `make_iterable()` has read by the time
  its prefetch threads go idle after the first batch is taken."""
  lock = threading.Lock()
  started, running = [0], [0]
  read = _READ_BATCH

  def counting(self, items):
    with lock:
      started[0] += 1
      running[0] += 1
    try:
      return read(self, items)
    finally:
      with lock:
        running[0] -= 1

  monkeypatch.setattr(windows_lib.ReadBatch, "__call__", counting)
  it = iter(make_iterable())
  next(it)
  # Idle: nothing running and no new read for a while (at most 10 s).
  for _ in range(50):
    before = started[0]
    time.sleep(0.2)
    with lock:
      if started[0] == before and not running[0]:
        break
  it.close()
  return started[0]


def test_prefetch_holds_a_few_whole_batches(tmp_path, monkeypatch):
  # The prefetch buffer counts whole batches: data.prefetch_buffer_size 0
  # picks about two, and at least one per reader thread. It held max(2 B, 16)
  # eval batches (GBs at long contexts).
  rng = np.random.default_rng(0)
  records = [("train", "s", "t", _random_tokens(rng, 5000))]
  records.append(("val", "s", "v", _random_tokens(rng, 90_000)))
  path = _store(tmp_path / "store", records)
  kw = dict(seq_len=64, batch_size=16)
  for threads, most in ((2, 3), (4, 5)):
    c = _cfg(path, read_threads=threads)
    made = _batches_read_after_one(functools.partial(pipeline.eval_batches, c, **kw), monkeypatch)
    assert 1 <= made <= most, (threads, made)
    train = functools.partial(pipeline.train_batches, c, seed=0, **kw)
    made = _batches_read_after_one(train, monkeypatch)
    assert 1 <= made <= most, (threads, made)
