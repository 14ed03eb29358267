#!/usr/bin/env bash
# Fetches real bacterial and phage genomes from Debian packages and prepares
# a train/val token store from them, holding out one strain per species.
#
#   bash scripts/fetch_example_genomes.sh [CACHE_DIR]     (default ./data_cache)
#
# Packages (downloaded with `apt-get download`, never installed; unpacked
# with `dpkg-deb -x`): ragout-examples (E. coli, H. pylori, S. aureus,
# V. cholerae strains), kleborate-examples (Klebsiella pneumoniae, xz) and
# bowtie2-examples (lambda phage). Idempotent: a second run re-uses the
# downloaded packages, the unpacked files and the prepared store.
# Needs apt-get and dpkg-deb (Debian/Ubuntu); run `apt-get update` first if
# apt-get cannot find the packages.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${1:-./data_cache}
if [ -n "${PYTHON:-}" ]; then :
elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
else PYTHON=python3; fi
PACKAGES="ragout-examples kleborate-examples bowtie2-examples"

mkdir -p "$CACHE/debs" "$CACHE/extracted"
for pkg in $PACKAGES; do
  deb=$(ls "$CACHE"/debs/"${pkg}"_*.deb 2>/dev/null | head -n 1 || true)
  if [ -n "$deb" ]; then
    echo "[fetch] $pkg: re-using $deb"
  else
    echo "[fetch] $pkg: apt-get download"
    if ! (cd "$CACHE/debs" && apt-get download "$pkg"); then
      echo "[fetch] apt-get download $pkg failed; run 'apt-get update' (as root) and retry." >&2
      exit 1
    fi
    deb=$(ls "$CACHE"/debs/"${pkg}"_*.deb | head -n 1)
    echo "[fetch] $pkg: downloaded $deb ($(du -h "$deb" | cut -f1))"
  fi
  dest="$CACHE/extracted/$pkg"
  if [ -f "$dest/.complete" ]; then
    echo "[fetch] $pkg: re-using unpacked files in $dest"
  else
    rm -rf "$dest" "$dest.partial"
    dpkg-deb -x "$deb" "$dest.partial"
    touch "$dest.partial/.complete"
    mv "$dest.partial" "$dest"
    echo "[fetch] $pkg: unpacked into $dest"
  fi
done

exec "$PYTHON" scripts/example_genomes.py --cache_dir="$CACHE" "${@:2}"
