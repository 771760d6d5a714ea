"""Command line: `shardgate -c FILE` runs the proxy, `check` validates a config, `restart` replaces a running
instance, `quickstart` runs a demo topology."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from config.loader import ConfigError, check, load
from proxy.process import install_event_loop, setup_logging


def run(config_path: str, replacing: int | None = None) -> int:
    from proxy.app import serve
    from proxy.restart import running_instance

    try:
        config = load(config_path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    # the ports are SO_REUSEPORT: a second instance would not fail to bind, it would share them silently
    other = running_instance(config.general.pid_file) if config.general.pid_file else None
    if other is not None and other != replacing:
        print(f"{config_path}: general.pid_file {config.general.pid_file}: instance pid {other} is running with "
              f"this file; `shardgate restart -c {config_path}` replaces it", file=sys.stderr)
        return 1
    setup_logging(config.general.log_level, config.general.log_format)
    install_event_loop()
    if config.general.worker_count > 1:  # a supervisor and its worker processes; 1 stays this one process
        from proxy.supervisor import supervise

        return asyncio.run(supervise(config))
    try:
        asyncio.run(serve(config))
    except ValueError as exc:  # key files named by [jwt] that cannot be used
        logging.getLogger("shardgate").error("event=start_failed error=%r", str(exc))
        return 1
    except OSError as exc:
        logging.getLogger("shardgate").error("event=start_failed error=%r", str(exc))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardgate", description="PostgreSQL pooler and router")
    parser.add_argument("-c", "--config", help="path to shardgate.toml")
    parser.add_argument("--replacing", type=int, default=None, help=argparse.SUPPRESS)  # set by `restart`
    sub = parser.add_subparsers(dest="command")
    check_parser = sub.add_parser("check", help="validate a config file and print every problem")
    check_parser.add_argument("-c", "--config", dest="check_config", required=True)
    quick = sub.add_parser("quickstart", help="start a throwaway local PostgreSQL primary + replica behind the proxy")
    quick.add_argument("--port", type=int, default=6432, help="proxy port (default 6432)")
    quick.add_argument("--dir", default=None, help="where to put the throwaway servers (default: a temp dir)")
    quick.add_argument("--pool-mode", default="transaction", choices=("session", "transaction", "statement"))
    two_phase = sub.add_parser("2pc", help="list the in-doubt two-phase commit transactions, or resolve one")
    two_phase.add_argument("-c", "--config", dest="twophase_config", required=True)
    two_phase.add_argument("action", choices=("list", "commit", "rollback"))
    two_phase.add_argument("gid", nargs="?", help="the global id of a prepared part (commit, rollback)")
    restart = sub.add_parser("restart", help="replace the running instance (general.pid_file) without losing a "
                             "query: start a new one on the same port, wait until it is ready, drain the old one")
    restart.add_argument("-c", "--config", dest="restart_config", required=True)
    restart.add_argument("--log", default=None, help="append the new instance's output to this file (default: "
                         "where this command's output goes)")
    restart.add_argument("--close-idle", action="store_true", help="stop the old instance with SIGTERM (idle "
                         "clients closed at once) instead of SIGUSR2 (clients served until they leave)")
    restart.add_argument("--no-wait", action="store_true", help="return once the old instance is told to drain")
    args = parser.parse_args(argv)

    if args.command == "check":
        problems = check(args.check_config)
        if problems:
            for problem in problems:
                print(problem)
            print(f"{len(problems)} problem(s) in {args.check_config}", file=sys.stderr)
            return 1
        print(f"{args.check_config}: OK")
        return 0
    if args.command == "2pc":
        if args.action != "list" and not args.gid:
            parser.error(f"2pc {args.action} needs the gid of a prepared part (see: shardgate 2pc list)")
        try:
            config = load(args.twophase_config)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        from proxy.twophase.cli import main as two_phase_main

        return two_phase_main(config, args.action, args.gid)
    if args.command == "restart":
        from proxy.restart import restart as rolling_restart

        return rolling_restart(args.restart_config, args.log, close_idle=args.close_idle,
                               wait=not args.no_wait)
    if args.command == "quickstart":
        from proxy.quickstart import quickstart

        return quickstart(args.port, args.dir, args.pool_mode)
    if not args.config:
        parser.error("the proxy needs a config: shardgate -c shardgate.toml (or: shardgate quickstart)")
    return run(args.config, args.replacing)


if __name__ == "__main__":
    sys.exit(main())
