"""The vLLM runtime's engine priority on CPU: which processes it finds and what it sets."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from haif.runtimes.vllm import descendants, lower_priority

# A parent that starts a child with two extra threads; each prints its pid.
_TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import os, threading, time
for _ in range(2):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print(os.getpid(), flush=True)
time.sleep(60)
'''], stdout=subprocess.PIPE, text=True)
print(child.stdout.readline().strip(), flush=True)
time.sleep(60)
"""


def _nice_of_threads(pid: int) -> list[int]:
    return [os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


@pytest.fixture
def tree() -> Iterator[tuple[int, int]]:
    parent = subprocess.Popen([sys.executable, "-c", _TREE], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        yield parent.pid, child
    finally:
        for pid in descendants(parent.pid):
            os.kill(pid, 9)
        parent.kill()
        parent.wait()


def test_descendants_are_children_and_their_children(tree: tuple[int, int]) -> None:
    parent, child = tree
    assert descendants(parent) == {child}
    assert {parent, child} <= descendants(os.getpid())
    assert descendants(child) == set()


def test_every_thread_of_the_given_processes_is_lowered_and_no_other(tree: tuple[int, int]) -> None:
    parent, child = tree
    own = os.getpriority(os.PRIO_PROCESS, 0)
    target = min(own + 7, 19)
    changed = lower_priority({child}, target)
    assert changed == len(_nice_of_threads(child)) >= 3  # main thread and the two it started
    assert _nice_of_threads(child) == [target] * changed
    assert _nice_of_threads(parent) == [own] * len(_nice_of_threads(parent))
    assert os.getpriority(os.PRIO_PROCESS, 0) == own


def test_processes_gone_meanwhile_are_skipped() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert lower_priority({gone.pid}, 19) == 0
