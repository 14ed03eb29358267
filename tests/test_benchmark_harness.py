"""The benchmarks' shared timing helper (benchmarks/harness.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import interleaved_seconds  # noqa: E402


def test_interleaved_seconds_alternates_blocks():
  calls = []
  fns = [lambda: calls.append("ours"), lambda: calls.append("torch")]
  times = interleaved_seconds(fns, rounds=3, iters=2, warmup=1)
  ours, torch = ["ours"] * 3, ["torch"] * 3  # a warm-up and 2 timed calls
  assert calls == ours + torch + torch + ours + ours + torch
  assert [len(t) for t in times] == [6, 6]
  assert all(s >= 0 for t in times for s in t)
