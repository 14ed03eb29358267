r"""Whole-call-set variant scoring: variants/s and peak RSS by call-set size.

    python benchmarks/variant_scoring.py                       # 10k and 100k
    python benchmarks/variant_scoring.py --counts=10000,100000,1000000

For each count, writes a sorted synthetic bgzip VCF (+ tabix index) of that
many variants over the lambda phage genome (tests/data/lambda_virus.fa,
bgzipped with .fai: 80% SNVs, 10% insertions and 10% deletions of 1-8 bases,
1 in 20 sites with two ALT alleles), then scores it in a fresh process with
`callsets.score_callset` (the tiny config, random weights, --window nt
windows, TSV + annotated .vcf.gz) and reports that process's wall time,
variants/s and peak RSS (ru_maxrss). The goal: peak RSS flat, within 10%,
from 100k to 1M variants. Record results in benchmarks/RESULTS.md.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment  # noqa: E402

_COUNTS = flags.DEFINE_list("counts", ["10000", "100000"], "Variants per call set.")
_WINDOW = flags.DEFINE_integer("window", 128, "Variant window (nt).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Scorer batch size (windows per call).")
_CHUNK = flags.DEFINE_integer("chunk_records", 2048, "Records per chunk.")
_RC = flags.DEFINE_bool("rc_average", False, "Score both strands.")
_CHILD = flags.DEFINE_string("child", None, "Internal: score this VCF and print JSON.")
_REF = flags.DEFINE_string("ref", None, "Internal: the bgzip reference.")

LAMBDA = ROOT / "tests" / "data" / "lambda_virus.fa"


def write_vcf(path: str, name: str, genome: str, count: int, seed: int = 0) -> None:
  """A sorted VCF of `count` variants (module docstring), written in blocks."""
  rng = np.random.default_rng(seed)
  sites = count  # more than needed: sites with two alleles count twice
  positions = np.sort(rng.integers(20, len(genome) - 20, sites))
  other = {"A": "C", "C": "G", "G": "T", "T": "A"}
  written = 0
  with open(path, "w") as f:
    f.write(
      "##fileformat=VCFv4.2\n"
      f"##contig=<ID={name},length={len(genome)}>\n"
      "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
    )
    lines = []
    for pos in positions:
      if written >= count:
        break
      pos = int(pos)
      base = genome[pos - 1]
      u = rng.random()
      if u < 0.1:
        ins = "".join(rng.choice(list("ACGT"), int(rng.integers(1, 9))))
        ref, alt = base, base + ins
      elif u < 0.2:
        ref, alt = genome[pos - 1 : pos + int(rng.integers(1, 9))], base
      elif u < 0.25 and written + 2 <= count:
        ref, alt = base, f"{other[base]},{other[other[base]]}"
      else:
        ref, alt = base, other[base]
      written += alt.count(",") + 1
      lines.append(f"{name}\t{pos}\tv{written}\t{ref}\t{alt}\t.\tPASS\t.\n")
      if len(lines) == 10000:
        f.writelines(lines)
        lines = []
    f.writelines(lines)


def child(vcf: str, ref: str) -> None:
  """Scores `vcf` in this process; prints one JSON line."""
  from hybridna_jax import scoring
  from hybridna_jax.config import ModelConfig, load_config
  from hybridna_jax.model import create_model
  from hybridna_jax.scoring import callsets

  cfg = ModelConfig.from_config(load_config(str(ROOT / "configs" / "tiny.py")).model)
  window = _WINDOW.value
  scorer = scoring.Scorer(
    create_model(cfg, seed=0), context=window, batch_size=_BATCH.value, min_bucket=window
  )
  out = vcf + ".tsv"
  start = time.perf_counter()
  summary = callsets.score_callset(
    scorer,
    vcf,
    ref,
    out,
    window=window,
    rc_average=_RC.value,
    annotated=vcf + ".scored.vcf.gz",
    chunk_records=_CHUNK.value,
  )
  seconds = time.perf_counter() - start
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(
    json.dumps(
      {"scored": summary.scored, "seconds": seconds, "peak_rss_mb": peak_mb},
    )
  )


def main(argv):
  del argv
  if _CHILD.value:
    child(_CHILD.value, _REF.value)
    return
  import pysam

  from hybridna_jax import tokenizer
  from hybridna_jax.data import fasta

  print(environment())
  print(
    f"window {_WINDOW.value}, batch {_BATCH.value}, chunk {_CHUNK.value} records, "
    f"rc_average {_RC.value}, tiny config (random weights), CPU"
  )
  ((header, tokens),) = fasta.read_fasta(str(LAMBDA))
  genome = tokenizer.decode(tokens)
  with tempfile.TemporaryDirectory() as tmp:
    ref = os.path.join(tmp, "lambda.fa.gz")
    pysam.tabix_compress(str(LAMBDA), ref)
    pysam.faidx(ref)
    print("| variants | wall s | variants/s | peak RSS MiB |")
    print("|---------:|-------:|-----------:|-------------:|")
    for count in map(int, _COUNTS.value):
      plain = os.path.join(tmp, f"v{count}.vcf")
      write_vcf(plain, header.name, genome, count)
      vcf = plain + ".gz"
      pysam.tabix_compress(plain, vcf, force=True)
      pysam.tabix_index(vcf, preset="vcf", force=True)
      os.remove(plain)
      env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
      flags_ = [
        f"--window={_WINDOW.value}",
        f"--batch_size={_BATCH.value}",
        f"--chunk_records={_CHUNK.value}",
        f"--rc_average={_RC.value}",
      ]
      proc = subprocess.run(
        [sys.executable, __file__, f"--child={vcf}", f"--ref={ref}", *flags_],
        env=env,
        capture_output=True,
        text=True,
        check=False,
      )
      if proc.returncode:
        sys.exit(f"child for {count} variants failed:\n{proc.stderr[-3000:]}")
      result = json.loads(proc.stdout.strip().splitlines()[-1])
      if result["scored"] != count:
        sys.exit(f"scored {result['scored']} of {count} variants; see {vcf}.tsv.skipped.tsv")
      rate = result["scored"] / result["seconds"]
      print(
        f"| {result['scored']:,} | {result['seconds']:.1f} | {rate:,.0f} | "
        f"{result['peak_rss_mb']:,.0f} |",
        flush=True,
      )
      for name in os.listdir(tmp):
        if name.startswith(f"v{count}."):
          os.remove(os.path.join(tmp, name))


if __name__ == "__main__":
  app.run(main)
