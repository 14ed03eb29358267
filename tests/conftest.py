"""Test set-up: 8 fake CPU devices (sharding tests), fp32 matmuls on CPU,
unoptimised machine code, and a per-session compilation cache (shared by
pytest-xdist's workers and the launchers the tests start).

The suite's time goes mostly to XLA:CPU compiles of tiny programs, not to
running them. Two settings cut it, neither changing what a test computes:
- `--xla_backend_optimization_level=0` skips LLVM's optimisation of the
  generated code: a tiny train step compiles 35-40% faster and gives the
  same losses to the last digit (launch/train.py on configs/tiny.py).
- Many tests build the same jitted programs afresh (a model init, a train
  step for the same config), so the session shares compiled executables
  through JAX's persistent cache in a temporary directory (cold at the
  start of every session, so CI sees the same). Subprocesses inherit both
  through the environment (see launch_env.py)."""

import copy
import os
import tempfile

# Must happen before jax initialises its backends (and reads its options).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
# One cache for the session: pytest-xdist's workers inherit the directory
# the controller made (and removes at exit) through the environment.
if "HYBRIDNA_TEST_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.TemporaryDirectory(prefix="hybridna-jax-test-cache-")
  os.environ["HYBRIDNA_TEST_CACHE_DIR"] = _CACHE.name
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["HYBRIDNA_TEST_CACHE_DIR"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
# Input digests (data/digests.py) are remembered there too, not in ~/.cache.
os.environ["HYBRIDNA_DIGEST_CACHE"] = os.path.join(
  os.environ["HYBRIDNA_TEST_CACHE_DIR"], "input_sha256.json"
)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Also set here in case a plugin imported jax before the environment was set.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

import fake_gcs  # noqa: E402
import pytest  # noqa: E402

from hybridna_jax import tokenizer  # noqa: E402

LAMBDA_FASTA = os.path.join(os.path.dirname(__file__), "data", "lambda_virus.fa")


@pytest.fixture(scope="session")
def lambda_store(tmp_path_factory):
  """A token store of the lambda phage split into two records: lambda_a
  (40,000 nt, train) and lambda_b (8,502 nt, val). Returns the data config."""
  from hybridna_jax.config import base_config  # pylint: disable=g-import-not-at-top
  from hybridna_jax.data import fasta, prepare  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("lambda")
  ((_, tokens),) = fasta.read_fasta(LAMBDA_FASTA)
  seq = tokenizer.decode(tokens)
  path = root / "lambda_split.fa"
  fasta.write_fasta(path, [("lambda_a", seq[:40000]), ("lambda_b", seq[40000:])])
  data = base_config().data
  data.fasta_globs = (str(path),)
  data.store_dir = str(root / "store")
  data.source_from = "record"
  data.split.val_records = ("lambda_b",)
  prepare.prepare_store(data, log=lambda *a, **k: None)
  return data


@pytest.fixture
def tiny_config(lambda_store):
  """The tiny model on the lambda store: two short stages, no eval/plot."""
  from hybridna_jax.config import load_config  # pylint: disable=g-import-not-at-top

  cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
  # A copy: a ConfigDict assigned into another is shared, and a test that set
  # cfg.data.store_dir would change the session store for the tests after it.
  cfg.data = copy.deepcopy(lambda_store)
  cfg.mesh.num_devices = 1
  t = cfg.train
  t.stages = ((32, 4, 4), (64, 4, 2))
  t.warmup_steps = 2
  t.log_every = 2
  t.eval_every = 0
  t.checkpoint_every = 2
  t.keep_best = False
  t.plot = False
  t.async_checkpoints = False
  return cfg


@pytest.fixture(scope="session")
def tiny_run(lambda_store, tmp_path_factory):
  """A run directory written by `loop.train` on all 8 fake devices (mesh
  data 2 x fsdp 2 x tensor 2): a 2-layer tiny model (Mamba2, attention)
  trained 2 steps at 64 tokens, one checkpoint. For restore, scoring and
  evaluation tests."""
  from hybridna_jax.config import load_config  # pylint: disable=g-import-not-at-top
  from hybridna_jax.train import loop  # pylint: disable=g-import-not-at-top

  cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
  cfg.model.n_layers, cfg.model.attn_period, cfg.model.attn_offset = 2, 2, 1
  cfg.data = copy.deepcopy(lambda_store)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.num_devices = 2, 2, 2, 0
  t = cfg.train
  t.stages = ((64, 2, 4),)
  t.warmup_steps = 1
  t.log_every = 1
  t.eval_every = 0
  t.checkpoint_every = 2
  t.keep_best = False
  t.plot = False
  t.async_checkpoints = False
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  loop.train(cfg, workdir)
  return workdir


@pytest.fixture
def lowers_for_cuda_here(monkeypatch):
  """Lets a test lower Pallas Triton kernels for CUDA (jax.export) on a
  machine without a GPU. jax >= 0.11 asks the local GPU for its compute
  capability while lowering; without one it is told an H100's (sm_90), the
  GPU the device check runs on. jax 0.10 lowers without asking."""
  if jax.default_backend() == "gpu":
    return
  try:
    from jax._src.pallas.triton import gpu_info  # pylint: disable=g-import-not-at-top
    from jax._src.pallas.triton import pallas_call_registration as registration  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  if hasattr(registration, "gpu_info_lib"):
    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(registration.gpu_info_lib, "get_gpu_info", lambda: h100)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
  root = tmp_path_factory.mktemp("gcs")
  (root / "bucket").mkdir()
  server = fake_gcs.FakeGCS(str(root))
  yield server
  server.close()


@pytest.fixture
def gcs(gcs_server, monkeypatch):
  """gs://bucket/... served from a local directory (tests/fake_gcs.py) for
  this test."""
  fake_gcs.install(monkeypatch, gcs_server)
  return gcs_server
