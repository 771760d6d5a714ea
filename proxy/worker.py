"""One worker process of a supervised instance: the usual App on its own SO_REUSEPORT listener, plus the
control socket its supervisor and the other workers reach it on (`python -m proxy.worker`, started by
proxy/supervisor.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from config.loader import ConfigError, load
from proxy.app import App
from proxy.control import ControlServer
from proxy.process import install_event_loop, setup_logging
from proxy.worker_role import WorkerRole

log = logging.getLogger("shardgate")

PARENT_CHECK_INTERVAL_S = 1.0


async def serve_worker(app: App) -> None:
    runtime, role = app.runtime, app.runtime.role
    await app.start()
    control = ControlServer(runtime, role.control_path(role.index))
    await control.start()
    # the admin console's RELOAD and SHUTDOWN speak for the instance: the supervisor passes them to every worker
    own_reload = runtime.reload_config

    def reload_instance() -> str | None:
        problems = own_reload() if own_reload is not None else None
        if problems is None:
            os.kill(role.supervisor_pid, signal.SIGHUP)
        return problems

    runtime.reload_config = reload_instance
    runtime.request_shutdown = lambda: os.kill(role.supervisor_pid, signal.SIGTERM)
    runtime.spawn(_watch_supervisor(app))
    log.info("event=worker_ready index=%d workers=%d pid=%d", role.index, role.count, os.getpid())
    try:
        await app.stopped.wait()
    finally:
        control.close()


async def _watch_supervisor(app: App) -> None:
    """A worker whose supervisor is gone (killed) drains like on SIGTERM instead of holding the port."""
    while not app.runtime.shutting_down:
        await asyncio.sleep(PARENT_CHECK_INTERVAL_S)
        if os.getppid() != app.runtime.role.supervisor_pid:
            log.warning("event=supervisor_gone pid=%d", app.runtime.role.supervisor_pid)
            await app.shutdown()
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardgate-worker", description="one worker of a Shardgate instance")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--control-dir", required=True)
    parser.add_argument("--supervisor", type=int, required=True, help="the supervisor's pid")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    setup_logging(config.general.log_level, config.general.log_format, worker=args.index)
    install_event_loop()
    role = WorkerRole(args.index, args.workers, args.control_dir, args.supervisor)
    try:
        asyncio.run(serve_worker(App(config, role)))
    except (ValueError, OSError) as exc:  # key or certificate files that cannot be used, a port taken
        log.error("event=start_failed error=%r", str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
