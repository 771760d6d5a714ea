"""Which worker this process is: its share of each global pool size, and the cancel keys it hands out."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

# A cancel key's process id is a positive int32 (libpq and drivers print it as the "backend pid").
MAX_PROCESS_ID = (1 << 31) - 1
# The control channel's one-line cancel request (proxy/control.py answers it, Runtime.forward_cancel sends it).
CANCEL_LINE = b"cancel %d %d\n"


def divide(total: int, count: int, index: int) -> int:
    """Worker `index`'s part of `total` split among `count` workers: evenly, the remainder one each to the
    lowest indexes, so the parts add up to exactly `total`."""
    if count <= 1:
        return total
    base, remainder = divmod(total, count)
    return base + (1 if index < remainder else 0)


def control_path(control_dir: str, index: int) -> str:
    """The Unix socket where worker `index` answers cancels, metrics and views for its supervisor."""
    return os.path.join(control_dir, f"worker-{index}.sock")


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """This process's place in its instance: worker `index` of `count` (0 of 1: a single process, no
    supervisor). `control_dir` holds every worker's control socket; `supervisor_pid` is the parent."""

    index: int = 0
    count: int = 1
    control_dir: str = ""
    supervisor_pid: int = 0

    @property
    def single(self) -> bool:
        return self.count <= 1

    def share(self, total: int) -> int:
        return divide(total, self.count, self.index)

    def owner_of(self, process_id: int) -> int:
        """The index of the worker that handed out a cancel key with this process id."""
        return process_id % self.count if self.count > 1 else 0

    def new_cancel_key(self) -> tuple[int, int]:
        """A (process id, secret) pair for BackendKeyData whose process id, mod count, is this worker's index,
        so any worker that receives the CancelRequest knows whom to forward it to."""
        secret = secrets.randbits(31) - (1 << 30)
        if self.count <= 1:
            return secrets.randbits(31), secret
        slots = MAX_PROCESS_ID // self.count  # process ids index, index + count, ... below MAX_PROCESS_ID
        return (1 + secrets.randbelow(slots - 1)) * self.count + self.index, secret

    def control_path(self, index: int) -> str:
        return control_path(self.control_dir, index)


SINGLE = WorkerRole()
