"""Training reuses freed memory: a large tensor freed and allocated again is not page-faulted in
afresh each step (glibc, in a child process: the setting lasts for the process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource, sys
import torch
from ratchet.training import reuse_freed_memory

def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.empty(12 * 2**20).fill_(2.0)  # 48 MB, like MiniLM's word-embedding gradient
    del y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = [faults_of_a_step() for _ in range(6)][-3:]
took = reuse_freed_memory()
# The first few blocks on the heap are mapped once (each freed block is a little smaller than
# the aligned request that follows, until neighbours merge); then the same block is reused.
reused = [faults_of_a_step() for _ in range(12)][-3:]
print(json.dumps({"default": default, "took": took, "reused": reused}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_gradient_sized_block_is_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items()
           if k != "LD_PRELOAD" and not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["took"] is True
    assert min(seen["default"]) > 10_000  # 48 MB of fresh 4 KB pages, every step again
    assert max(seen["reused"]) < 500


def test_a_preloaded_allocator_is_left_alone():
    env = {**os.environ, "LD_PRELOAD": ""}
    out = subprocess.run([sys.executable, "-c", "from ratchet.training import "
                          "reuse_freed_memory as r; print(r())"], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
