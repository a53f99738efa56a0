"""The trainer's host-memory setting (qsearch.train.host_memory): freed blocks are kept for
reuse instead of being unmapped and faulted in again. Each case runs in a fresh interpreter,
because malloc settings are per process and cannot be taken back."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

ROUND = """
import ctypes, resource
from qsearch.train.host_memory import keep_freed_memory
state = keep_freed_memory()
libc = ctypes.CDLL(None)  # glibc's malloc, the one torch's CPU tensors come from
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
MiB = 1 << 20

def one_round():  # what a training step does to the heap: large blocks, then all freed
    blocks = [libc.malloc(8 * MiB) for _ in range(16)]
    for b in blocks:
        ctypes.memset(b, 1, 8 * MiB)
    for b in blocks:
        libc.free(b)

one_round(); one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    one_round()
print(state, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_round(setting: str) -> tuple[str, float]:
    env = {**os.environ, "QSEARCH_MALLOC_TUNING": setting}
    out = subprocess.run([sys.executable, "-c", ROUND], env=env, capture_output=True,
                         text=True, check=True, timeout=120).stdout.split()
    return out[-2], float(out[-1])


glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")


@glibc
def test_kept_memory_is_not_faulted_in_again_each_round():
    state, tuned = _faults_per_round("auto")
    off, default = _faults_per_round("0")
    assert (state, off) == ("tuned", "off")
    # 128 MiB touched per round is 32768 pages: with glibc's defaults they are given back
    # and faulted in again every round; kept, they are reused.
    assert default > 16000, default
    assert tuned < default / 10, (tuned, default)


@glibc
def test_the_trainer_applies_the_setting(tmp_path):
    code = ("from qsearch.config import parse_trial_config\n"
            "from qsearch.train import host_memory, train\n"
            "assert host_memory.applied() is None\n"
            "train(parse_trial_config({'epochs': 1, 'device': 'cpu', 'model': 'tiny-cnn',"
            " 'dataset': 'synthetic', 'warm_start': {'enabled': False},"
            " 'data': {'num_samples': 64, 'image_size': 8, 'channels': 1}}))\n"
            "print(host_memory.applied())\n")
    env = {**os.environ, "QSEARCH_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()
    assert out[-1] == "tuned"


def test_the_setting_reads_the_environment(monkeypatch):
    from qsearch.config import defaults

    monkeypatch.setenv("QSEARCH_MALLOC_TUNING", "0")
    assert defaults.malloc_tuning() == "off"
    monkeypatch.setenv("QSEARCH_MALLOC_TUNING", "")
    assert defaults.malloc_tuning() == "auto"
