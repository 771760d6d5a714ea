"""`shardgate restart -c FILE`: a rolling restart of one instance. A new instance binds the same ports
(SO_REUSEPORT) while the old one still serves; once the new one has written its pid to general.pid_file
(it is ready), the old one is told to drain and exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack

from config.loader import ConfigError, load

READY_TIMEOUT_S = 90.0
POLL_S = 0.1
EXIT_GRACE_S = 10.0


def read_pid(path: str) -> int | None:
    try:
        with open(path) as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def running_instance(pid_file: str) -> int | None:
    """The pid in `pid_file` when that process runs and is a Shardgate (a stale file names a dead or an
    unrelated process)."""
    pid = read_pid(pid_file)
    if pid is None or pid == os.getpid() or not alive(pid):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            command = file.read().split(b"\0")
    except OSError:
        return pid  # no /proc: trust the file
    return pid if b"proxy" in command or any(part.endswith(b"shardgate") for part in command) else None


def restart(config_path: str, log_path: str | None = None, *, close_idle: bool = False, wait: bool = True) -> int:
    try:
        config = load(config_path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    pid_file = config.general.pid_file
    if not pid_file:
        print(f"{config_path}: general.pid_file: required by shardgate restart (it is how the running instance "
              f"is found and how the new one says it is ready)", file=sys.stderr)
        return 1
    old_pid = running_instance(pid_file)  # never signal what a stale file names
    replacing = ["--replacing", str(old_pid)] if old_pid is not None else []
    with ExitStack() as stack:
        output = stack.enter_context(open(log_path, "ab")) if log_path else None
        new = subprocess.Popen([sys.executable, "-m", "proxy", "-c", config_path, *replacing],
                               stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while read_pid(pid_file) != new.pid:
        if new.poll() is not None:
            print(f"the new instance exited with code {new.returncode} before it was ready; the running one "
                  f"(pid {old_pid}) is left as it was", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            new.send_signal(signal.SIGTERM)
            print(f"the new instance (pid {new.pid}) was not ready after {READY_TIMEOUT_S:.0f}s: stopped it; the "
                  f"running one (pid {old_pid}) is left as it was", file=sys.stderr)
            return 1
        time.sleep(POLL_S)
    if old_pid is None:
        print(f"started pid {new.pid} (no instance was running)")
        return 0
    os.kill(old_pid, signal.SIGTERM if close_idle else signal.SIGUSR2)
    if not wait:
        print(f"restarting: new pid {new.pid} serves, old pid {old_pid} drains")
        return 0
    wait_s = config.general.shutdown_timeout_s + EXIT_GRACE_S
    deadline = time.monotonic() + wait_s
    while alive(old_pid) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if alive(old_pid):
        print(f"new pid {new.pid} serves; old pid {old_pid} still draining after {wait_s:.0f}s", file=sys.stderr)
        return 1
    print(f"restarted: new pid {new.pid} serves, old pid {old_pid} drained and exited")
    return 0
