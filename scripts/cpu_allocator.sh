# Sourced by the CPU scripts: glibc's malloc backs large allocations with
# transparent huge pages. XLA:CPU takes each step's temporaries (2.46 GB for
# the demo's training step) from one allocation that glibc maps afresh at
# every step; in 4 KiB pages that was about 600,000 page faults a step, and
# the step ran about 1.5x faster with huge pages, at the same resident memory
# (benchmarks/RESULTS.md, "The allocator"). Needs glibc >= 2.35 and THP in
# "madvise" or "always" mode; elsewhere the setting does nothing. A
# GLIBC_TUNABLES already set is kept. The programs under launch/ set the same
# value themselves (launch_utils.restart_with_huge_pages); this covers the
# tests, the benchmarks and any other process the scripts start.
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}
