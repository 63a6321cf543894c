"""Test-only fault points: stop or kill the process at a named point of an operation.

``VIRTSHIFT_FAULT_STOP_AT=POINT`` makes the process stop itself (SIGSTOP) when
it reaches :func:`point` with that name.  The fault-matrix tests use it to kill
the Python process, or QEMU, at an exact moment of an operation, and then check
that the next call recovers.  Unset (always, outside tests) it costs one
environment lookup.

The points (where they are, what has happened by then):

* ``snapshot-before-transaction``: the overlays are planned and checked, QEMU was
  not asked yet;
* ``snapshot-after-transaction``: QEMU switched the disks, nothing is recorded yet;
* ``snapshot-before-metadata``: the live XML is saved, the snapshot metadata not;
* ``job-recorded``: a block job is recorded (state new), QEMU was not asked yet;
* ``job-started``: QEMU started the job, its running state is not recorded yet;
* ``pivot-sent``: ``block-job-complete`` was answered, its end not yet applied;
* ``job-pending``: a pull or commit waits at QEMU's ``pending``; its node is
  not flushed and ``job-finalize`` not sent yet;
* ``job-finalized``: ``job-finalize`` was answered (QEMU rewrote the backing
  file name above), the end is not applied yet.

``VIRTSHIFT_MIGRATE_CRASH_AFTER=STEP`` makes the process SIGKILL itself right
after ``migrate-storage`` journaled STEP (:func:`crash_after`; ``copy-layer`` for
the first copied layer), to test recovery at every step.

This module does nothing else: no other switch, no delay, no fault of its own.
"""

from __future__ import annotations

import logging
import os
import signal

__all__ = ["CRASH_ENV", "ENV", "crash_after", "point"]

#: The environment variable naming the point to stop at.
ENV = "VIRTSHIFT_FAULT_STOP_AT"
#: The environment variable naming the migrate-storage step to die after.
CRASH_ENV = "VIRTSHIFT_MIGRATE_CRASH_AFTER"


def point(name: str) -> None:
    """Stop this process (SIGSTOP) if ``VIRTSHIFT_FAULT_STOP_AT`` names ``name``."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGSTOP)


def crash_after(step: str) -> None:
    """Kill this process (SIGKILL) if ``VIRTSHIFT_MIGRATE_CRASH_AFTER`` names ``step``."""
    if os.environ.get(CRASH_ENV) == step:
        logging.getLogger("virtshift.migrate").warning("test switch: crashing after %s", step)
        os.kill(os.getpid(), signal.SIGKILL)
