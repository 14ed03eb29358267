"""The benchmarks' shared timing helper (benchmarks/harness.py)."""

import subprocess
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


def test_plan_table_meshes_cover_every_device():
  # In a subprocess: the script defines absl flags at import.
  code = (
    "import sys, math; sys.argv = ['plan_table', '--max_tensor=8']; import plan_table; "
    "plan_table.FLAGS(sys.argv); "
    "cells = [('hybridna_7b', 4, 48), ('hybridna_7b', 4, 8), ('hybridna_7b', 4, 256), "
    "('hybridna_7b', 64, 64), ('hybridna_300m', 4, 256)]; "
    "print([plan_table._mesh(*cell) for cell in cells])"
  )
  bench = Path(__file__).resolve().parents[1] / "benchmarks"
  out = subprocess.run([sys.executable, "-c", code], cwd=bench, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  mesh = lambda f, c, t: {"data": 1, "fsdp": f, "context": c, "tensor": t}  # noqa: E731
  # Tensor divides the rest and the heads (7B: 8 key/value heads; the 300M's 4).
  assert out.stdout.strip() == str(
    [mesh(4, 3, 4), mesh(4, 1, 2), mesh(4, 8, 8), mesh(64, 1, 1), mesh(4, 16, 4)]
  )
