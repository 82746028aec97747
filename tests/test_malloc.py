"""dfl.malloc.keep_freed_memory: freed blocks are reused without page faults (each run in its own process)."""

import json
import platform
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# Allocate, touch and free a 48 MB block again and again (like an activation buffer per training
# step); report the page faults of the last five times. (With the setting the heap grows for the
# first few, until freed blocks have merged into one the aligned allocation fits.)
SCRIPT = """
import json, resource, sys
import torch
from dfl.malloc import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def cycle():
    t = torch.empty(12 * 2**20)
    t.fill_(1.0)
    del t
for _ in range(15):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults():
    default, kept = run("default"), run("keep")
    # glibc's default maps a 48 MB block fresh each time: ~12 000 faults (4 KB pages) per cycle
    assert default["faults"] > 5 * 1000
    assert kept["applied"] is True
    assert kept["faults"] < 200


def test_the_training_configs_turn_it_on():
    from omegaconf import OmegaConf

    for name in ("train", "pretrain"):
        assert OmegaConf.load(REPO / "conf" / f"{name}.yaml").keep_freed_memory is True
