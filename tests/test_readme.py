"""The README's Python examples run as written, in order, as one session."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs(capsys, monkeypatch):
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  assert blocks, "README has no python example"
  monkeypatch.chdir(ROOT)
  session = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), session)  # pylint: disable=exec-used
  out = capsys.readouterr().out
  bits = float(re.search(r"bits per nucleotide: ([0-9.]+)", out).group(1))
  assert 5.0 < bits < 9.0  # untrained: about log2(128) = 7
  if "scorer" in session:  # the scoring example
    assert session["ll"].mean.shape == (2,)
    assert session["embeddings"].shape == (1, session["cfg"].d_model)
