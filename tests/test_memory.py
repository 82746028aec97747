"""dfl.memory: glibc keeps freed buffers, so a training step's activations stop page-faulting."""

import platform
import subprocess
import sys

import pytest

from tests.conftest import REPO

# a training step's pattern: activations kept for the backward pass, then all freed; faults per step
STEPS = """
import ctypes, resource, sys, torch
from dfl.memory import M_MMAP_THRESHOLD, keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:  # every buffer mmapped and returned on free (glibc's default threshold, without its adaptation)
    assert ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1
def step():
    saved = [torch.ones(12000, 64)]  # 3 MiB each
    for _ in range(15):
        saved.append(saved[-1] + 1)
    del saved
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    def faults(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", STEPS, mode], cwd=REPO, capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    pages = 16 * 768  # 16 buffers of 3 MiB touched per step
    assert faults("return") > 0.9 * pages  # the measurement sees buffers faulted in afresh
    assert faults("keep") < 0.1 * pages  # kept: reused without faults
