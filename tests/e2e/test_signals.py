"""A prune killed mid-write leaves nothing behind: SIGTERM cleans up as Ctrl-C does (exit 143, one line),
and the temporary directory of a SIGKILLed run is removed by the next run of the same output.

The runs are real subprocesses of the CLI. To stop one while its artifact is half written, a small
driver slows the streaming safetensors writer down (a sleep after its first tensor) and writes a
marker file; the test waits for the marker, then sends the signal.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from tiny_models import make_tiny

DRIVER = """
import os, sys, time
from pathlib import Path
import sparsify.exporters.safetensors_io as io
add = io.ShardedWriter.add
def slow_add(self, name, tensor):
    add(self, name, tensor)
    marker = Path(os.environ["SPARSIFY_TEST_MARKER"])
    if not marker.exists():
        marker.write_text(str(self.out_dir))
        time.sleep(120)
io.ShardedWriter.add = slow_add
from sparsify.cli import main
sys.argv[0] = "sparsify"
main()
"""


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


def _env(**more) -> dict:
    return {**os.environ, "SPARSIFY_PROGRESS": "0", "HF_HUB_OFFLINE": "1", **more}


def _half_written(llama, out, tmp_path) -> subprocess.Popen:
    """A prune subprocess stopped in the middle of writing ``out`` (its temporary directory exists)."""
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "prune", str(llama), "-o", str(out), "--method", "magnitude",
                             "--scheme", "2:4"], env=_env(SPARSIFY_TEST_MARKER=str(marker)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the prune never started writing"
        time.sleep(0.2)
    assert list(out.parent.glob(f".{out.name}.tmp-*")), "no temporary directory while writing"
    return proc


def _leftovers(out) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") or p.name == out.name)


def test_sigterm_cleans_up_like_ctrl_c(llama, tmp_path):
    out = tmp_path / "out"
    proc = _half_written(llama, out, tmp_path)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1] == "error: terminated (SIGTERM); nothing was written"
    assert "Traceback" not in stderr
    assert _leftovers(out) == []


def test_next_run_removes_what_a_killed_run_left(llama, tmp_path):
    out = tmp_path / "out"
    proc = _half_written(llama, out, tmp_path)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.communicate(timeout=60)
    stale = _leftovers(out)
    assert len(stale) == 1 and stale[0].startswith(".out.tmp-")
    then = time.time() - 60  # an earlier run (the rule: unlocked and unchanged for STALE_AFTER_S)
    os.utime(out.parent / stale[0], (then, then))
    subprocess.run([sys.executable, "-m", "sparsify.cli", "prune", str(llama), "-o", str(out), "--method",
                    "magnitude", "--scheme", "2:4"], env=_env(), check=True, capture_output=True, timeout=300)
    assert _leftovers(out) == ["out"]
