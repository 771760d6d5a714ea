"""A git worktree of another revision in a temporary directory, to run that revision's Shardgate beside ours.

Only the proxy runs from the worktree (bench.services.Shardgate with `source_tree`); the bench
driver is always the current tree's.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from bench.services import REPO_ROOT, ServiceError

GIT_TIMEOUT_S = 60.0


def _git(*args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S
    )
    if result.returncode != 0:
        raise ServiceError(f"git {' '.join(args)} failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()


class Worktree:
    """`git worktree add --detach <tmp>/tree REV` on entry, `git worktree remove --force` on exit."""

    def __init__(self, revision: str) -> None:
        self.revision = revision
        self.commit = _git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
        self.short_commit = _git("rev-parse", "--short", self.commit)
        self.parent: Path | None = None
        self.path = Path()

    @property
    def label(self) -> str:
        """How reports name the revision: the short commit, after the name given when that is a ref."""
        if self.commit.startswith(self.revision.lower()):
            return self.short_commit
        return f"{self.revision} ({self.short_commit})"

    def __enter__(self) -> Worktree:
        self.parent = Path(tempfile.mkdtemp(prefix=f"shardgate-{self.short_commit}-"))
        self.path = self.parent / "tree"  # git creates the directory itself
        try:
            _git("worktree", "add", "--detach", str(self.path), self.commit)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def remove(self) -> None:
        if self.parent is None:
            return
        removed = False
        if self.path.exists():
            try:
                _git("worktree", "remove", "--force", str(self.path))
                removed = True
            except (ServiceError, OSError, subprocess.SubprocessError):
                pass
        shutil.rmtree(self.parent, ignore_errors=True)
        if not removed:  # the directory is gone now: make git forget its record of it
            subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "prune"], capture_output=True,
                           timeout=GIT_TIMEOUT_S, check=False)  # fmt: skip
        self.parent = None
