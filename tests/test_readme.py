"""The README's Python example runs as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs(capsys, monkeypatch):
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  assert blocks, "README has no python example"
  monkeypatch.chdir(ROOT)
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used
  out = capsys.readouterr().out
  bits = float(re.search(r"bits per nucleotide: ([0-9.]+)", out).group(1))
  assert 5.0 < bits < 9.0     # untrained: about log2(128) = 7
