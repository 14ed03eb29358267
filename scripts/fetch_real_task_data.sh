#!/usr/bin/env bash
# Fetches the Debian packages behind the real tasks (scripts/make_real_tasks.py)
# and the pybedtools wheel holding the Bushey 2009 insulator peaks:
#
#   bash scripts/fetch_real_task_data.sh [CACHE_DIR]     (default ./data_cache)
#
# augustus-doc (dm3 chr2R, genes.gb) and r-bioc-biostrings
# (dm3_upstream2000.fa.gz) are downloaded with `apt-get download`, never
# installed, and unpacked with `dpkg-deb -x` into CACHE_DIR/extracted/<package>;
# pybedtools==0.12.1 is downloaded (not installed) into CACHE_DIR/wheels.
# Idempotent. Run `apt-get update` first if apt-get cannot find the packages.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${1:-./data_cache}
if [ -n "${PYTHON:-}" ]; then :
elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
else PYTHON=python3; fi
mkdir -p "$CACHE/debs" "$CACHE/extracted" "$CACHE/wheels"
for pkg in augustus-doc r-bioc-biostrings; do
  deb=$(ls "$CACHE"/debs/"${pkg}"_*.deb 2>/dev/null | head -n 1 || true)
  if [ -z "$deb" ]; then
    echo "[fetch] $pkg: apt-get download"
    (cd "$CACHE/debs" && apt-get download "$pkg") || {
      echo "[fetch] apt-get download $pkg failed; run 'apt-get update' (as root) and retry." >&2
      exit 1
    }
    deb=$(ls "$CACHE"/debs/"${pkg}"_*.deb | head -n 1)
  fi
  dest="$CACHE/extracted/$pkg"
  if [ ! -f "$dest/.complete" ]; then
    rm -rf "$dest" "$dest.partial"
    dpkg-deb -x "$deb" "$dest.partial"
    touch "$dest.partial/.complete"
    mv "$dest.partial" "$dest"
  fi
  echo "[fetch] $pkg: $dest"
done
if ! ls "$CACHE"/wheels/pybedtools-0.12.1-*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip download -q pybedtools==0.12.1 --no-deps -d "$CACHE/wheels"
fi
echo "[fetch] pybedtools wheel: $(ls "$CACHE"/wheels/pybedtools-0.12.1-*.whl)"
