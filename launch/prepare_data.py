r"""Prepares a token store from FASTA files: the data step of the main job.

    python launch/prepare_data.py --config=configs/demo.py --workdir=runs/demo

Reads `config.data` (see hybridna_jax/data/config.py): `fasta_globs`,
`source_from`, `split` and `store_dir`; any field can be overridden, e.g.
`--config.data.store_dir=/data/store`. Writes the store atomically, reports
progress as it goes, and writes a summary to <workdir>/prepare_data.json.
Running it again with unchanged inputs re-uses the store.

    # ... or write it straight to object storage as zarr v3 (gs://, s3://, file://)
    python launch/prepare_data.py --config=configs/demo.py --workdir=runs/demo \
        --config.data.store_dir=gs://bucket/stores/demo

    # ... or export a local store as zarr v3 (or file://, a local path)
    python launch/prepare_data.py --config=configs/demo.py --workdir=runs/demo \
        --export_url=gs://bucket/stores/demo
    # then train from it: --config.data.store_dir=gs://bucket/stores/demo
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from hybridna_jax import launch_utils, paths
from hybridna_jax.data import prepare, store_writer
from hybridna_jax.data import store as store_lib

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Job config file: configs/<file>.py[:variant]."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory for the run's outputs (here: the summary)."
)
_EXPORT_URL = flags.DEFINE_string(
  "export_url",
  None,
  "Also write the store as zarr v3 through tensorstore to this kvstore URL (gs://, s3://, "
  "file://, or a local path); data.store_dir may then name the URL (http(s):// to read).",
)
flags.mark_flags_as_required(["config", "workdir"])


def summary(store) -> dict:
  return {
    "store_dir": store.path if store_lib.is_url(store.path) else os.path.abspath(store.path),
    "sources": list(store.sources),
    "splits": {
      name: {
        "records": store[name].num_records,
        "tokens": store[name].num_tokens,
        "per_source": store[name].info["per_source"],
      }
      for name in store.splits
    },
  }


def main(argv):
  del argv  # flags only (launch_utils.run)
  config = _CONFIG.value
  if "data" not in config:
    raise app.UsageError(f"the config has no `data` field; it has {sorted(config.keys())}.")
  paths.checkpoint_path(_WORKDIR.value)  # an unsupported --workdir fails before the work
  if _EXPORT_URL.value and store_lib.is_url(config.data.store_dir):
    raise app.UsageError(
      f"--export_url with data.store_dir={config.data.store_dir}: the store is already written "
      "to a URL; drop --export_url."
    )
  try:
    store = prepare.prepare_store(config.data)
    result = summary(store)
    if _EXPORT_URL.value:
      result["export_url"] = store_writer.export_zarr(
        store, _EXPORT_URL.value, overwrite=bool(config.data.overwrite_store)
      )
      logging.info("Exported the store to %s", result["export_url"])
  except ValueError as e:  # Bad input or config: the message says it all.
    logging.error("prepare_data failed: %s", e)
    sys.exit(1)
  path = paths.write_json(paths.join(_WORKDIR.value, "prepare_data.json"), result)
  logging.info("Wrote %s", path)
  for name, split in result["splits"].items():
    print(
      f"{name}: {split['records']} records, {split['tokens']} tokens, "
      f"{len(split['per_source'])} sources"
    )


if __name__ == "__main__":
  launch_utils.run(main)
