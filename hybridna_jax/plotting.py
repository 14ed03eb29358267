"""Matplotlib for the reports: a headless pyplot, and saving a figure.

    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ...
    return plotting.save(fig, path, dpi=120)

Matplotlib is imported on first use only, so modules that can plot cost
nothing to import where no plot is drawn.
"""

from __future__ import annotations

import os

from hybridna_jax import paths


def pyplot():
  """matplotlib.pyplot on the Agg backend (files only: runs need no display)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def save(fig, path: str, **savefig_kwargs) -> str:
  """Lays out `fig`, writes it to `path` (`savefig_kwargs` such as dpi go to
  `fig.savefig`) and closes it, so long runs do not hold figures. A gs://
  `path` is rendered locally and copied (`paths.staged`). Returns path as a
  string."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig.tight_layout()
  with paths.staged(path) as local:
    fig.savefig(local, **savefig_kwargs)
  plt.close(fig)
  return os.fspath(path)
