"""Process-wide settings of the ftwt command (run in child processes: they change the process for good)."""
import subprocess
import sys

import pytest

# 20 "steps" that each allocate three 48 MiB activations and free them; count the minor page faults. By
# default glibc maps blocks this large afresh every time (12,288 pages each); kept, they are reused.
_CHILD = """
import resource, sys, torch
from ftwt_cli.runtime import keep_freed_memory
ok = keep_freed_memory() if sys.argv[1] == "keep" else None
def step():
    bufs = [torch.empty(12 << 20).fill_(1) for _ in range(3)]
step(); step()                                # warm up: the heap grows once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str):
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True).stdout
    ok, faults = out.split()
    return ok, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_refaulting_activations():
    ok, kept = _faults("keep")
    _, default = _faults("default")
    assert ok == "True"
    assert default > 20 * 12_288        # at least one buffer's pages faulted in again every step
    # at most a one-off growth of the heap (seen: 0, 1 or 3 buffers' worth after warm-up, depending on where
    # glibc places the blocks), never a refault per step: that would be 60 buffers' worth, as by default
    assert kept <= 2 * 3 * 12_288


def test_keep_freed_memory_is_idempotent_and_the_cli_calls_it():
    from typer.testing import CliRunner

    from ftwt_cli import runtime
    from ftwt_cli.cli import app
    assert CliRunner().invoke(app, ["info", "--help"]).exit_code == 0
    assert runtime._done == sys.platform.startswith("linux")
    assert runtime.keep_freed_memory() == runtime._done
