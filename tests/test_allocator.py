"""The launchers restart themselves once with glibc's malloc on huge pages
(`launch_utils.restart_with_huge_pages`) on CPU-only hosts, and only there."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from hybridna_jax import launch_utils

CPU_HOST = dict(libc=("glibc", "2.36"), thp_mode="madvise", accelerator=False)


@pytest.mark.parametrize(
  "environ,overrides,wanted",
  [
    ({}, {}, True),
    ({}, dict(thp_mode="always"), True),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, {}, False),  # the user's choice
    ({"GLIBC_TUNABLES": launch_utils.HUGE_PAGES_TUNABLE}, {}, False),  # restarted already
    ({launch_utils.HUGE_PAGES_ENV: "0"}, {}, False),
    ({launch_utils.HUGE_PAGES_ENV: "1"}, {}, True),
    ({}, dict(accelerator=True), False),
    ({}, dict(thp_mode="never"), False),
    ({}, dict(thp_mode=None), False),  # unknown: no /sys entry
    ({}, dict(libc=("glibc", "2.31")), False),  # no hugetlb tunable before 2.35
    ({}, dict(libc=("glibc", "2.40")), True),
    ({}, dict(libc=("", "")), False),  # musl or unknown
  ],
)
def test_restart_decision(environ, overrides, wanted):
  host = {**CPU_HOST, **overrides}
  assert launch_utils.huge_pages_restart_wanted(environ, **host) is wanted


PROGRAM = textwrap.dedent(
  """
  import os, sys
  print("imported", os.getpid(), flush=True)
  from absl import flags
  from hybridna_jax import launch_utils

  flags.DEFINE_multi_string("word", [], "kept across the restart")

  def main(argv):
    words = flags.FLAGS.word
    print("main", os.getpid(), os.environ.get("GLIBC_TUNABLES"), words, flush=True)

  launch_utils.run(main)
  """
)


def _run(tmp_path, **env_changes):
  script = tmp_path / "program.py"
  script.write_text(PROGRAM)
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update(JAX_PLATFORMS="cpu", **env_changes)
  out = subprocess.run(
    [sys.executable, "-u", str(script), "--word=one", "--word=two"],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  ).stdout.splitlines()
  return [line.split() for line in out]


def _host_takes_huge_pages() -> bool:
  mode = launch_utils.transparent_huge_pages_mode()
  return launch_utils.huge_pages_restart_wanted({}, platform.libc_ver(), mode, False)


@pytest.mark.skipif(not _host_takes_huge_pages(), reason="glibc < 2.35 or THP off here")
def test_a_launcher_restarts_once_with_the_setting(tmp_path):
  lines = _run(tmp_path)
  # Two starts in one process (execve keeps the pid), one main, with the
  # arguments and interpreter options kept.
  assert [line[0] for line in lines] == ["imported", "imported", "main"]
  assert len({line[1] for line in lines}) == 1
  assert lines[2][2:] == [launch_utils.HUGE_PAGES_TUNABLE, "['one',", "'two']"]


def test_no_restart_when_turned_off_or_already_set(tmp_path):
  off = _run(tmp_path, HYBRIDNA_HUGE_PAGES="0")
  assert [line[0] for line in off] == ["imported", "main"] and off[1][2] == "None"
  own = _run(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=2")
  assert [line[0] for line in own] == ["imported", "main"]
  assert own[1][2] == "glibc.malloc.arena_max=2"


@pytest.mark.parametrize("program", ["-", "-c"])
def test_no_restart_for_a_program_that_cannot_be_read_again(program, monkeypatch):
  # `python - < script.py` would re-run an emptied stdin and exit 0 unseen.
  monkeypatch.setattr(launch_utils, "huge_pages_restart_wanted", lambda *a: True)
  monkeypatch.setattr(sys, "argv", [program])
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("restarted"))
  launch_utils.restart_with_huge_pages()
