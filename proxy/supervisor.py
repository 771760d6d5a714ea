"""The supervisor of `workers = N` (N > 1): starts the worker processes, restarts one that dies, passes
signals on to all, and owns the admin HTTP listener, answering for the whole instance from the workers'
control sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

from prometheus_client.metrics_core import Metric

from config.loader import ConfigError, load, split_address
from config.model import Config
from proxy import gather
from proxy.admin import API_VIEWS, CONTENT_TYPE_METRICS, AdminRequest
from proxy.app import remove_pid_file, write_pid_file
from proxy.control import ask
from proxy.worker_role import control_path

log = logging.getLogger("shardgate")

READY_TIMEOUT_S = 60.0  # a worker starts a Python process, probes the servers, reads the catalogs
READY_POLL_S = 0.1
QUICK_DEATH_S = 5.0  # a worker that dies this soon after starting is restarted after a pause
RESTART_PAUSE_S = 1.0
KILL_GRACE_S = 5.0  # past shutdown_timeout_s, a worker still running is killed


class Worker:
    """One worker process slot: its current process, when it started, whether it answered `ready`."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.started_at = 0.0


class Supervisor:
    """Runs the instance: `run` returns the exit code."""

    def __init__(self, config: Config) -> None:
        assert config.source_path is not None
        self.config = config
        self.path = config.source_path
        self.count = config.general.worker_count
        self.workers = [Worker(index) for index in range(self.count)]
        self.control_dir = tempfile.mkdtemp(prefix="shardgate-control-")
        self.restarts = 0
        self.stopping = False
        self.stopped = asyncio.Event()
        self.admin: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self) -> int:
        general = self.config.general
        log.info("event=supervisor_starting workers=%d address=%s", self.count, general.listen)
        try:
            for worker in self.workers:
                await self._spawn(worker)
            if not await self._all_ready():
                await self._stop_workers(signal.SIGTERM)
                return 1
            if general.admin_listen:
                host, port = split_address(general.admin_listen)
                loop = asyncio.get_running_loop()
                self.admin = await loop.create_server(lambda: InstanceAdmin(self), host, port, reuse_address=True,
                                                      reuse_port=True)
                log.info("event=admin_listening address=%s:%s token=%s workers=%d", host, port,
                         "required" if general.admin_token else "none", self.count)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._signal_stop, signal.SIGTERM)
            loop.add_signal_handler(signal.SIGUSR2, self._signal_stop, signal.SIGUSR2)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            for worker in self.workers:
                self._spawn_task(self._watch(worker))
            if general.pid_file:
                write_pid_file(general.pid_file)
            log.info("event=listening address=%s workers=%d pool_mode=%s", general.listen, self.count,
                     general.pool_mode)
            await self.stopped.wait()
            return 0
        finally:
            if self.admin is not None:
                self.admin.close()
            if general.pid_file:
                remove_pid_file(general.pid_file)
            shutil.rmtree(self.control_dir, ignore_errors=True)

    # ------------------------------------------------------------ worker processes

    async def _spawn(self, worker: Worker) -> None:
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.worker", "-c", self.path, "--index", str(worker.index),
            "--workers", str(self.count), "--control-dir", self.control_dir, "--supervisor", str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL)
        worker.started_at = time.monotonic()
        log.info("event=worker_started index=%d pid=%d", worker.index, worker.process.pid)

    async def _all_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        waiting = set(range(self.count))
        while waiting and time.monotonic() < deadline:
            for index in list(waiting):
                process = self.workers[index].process
                if process is None or process.returncode is not None:
                    log.error("event=worker_failed_at_start index=%d code=%s", index,
                              process.returncode if process else None)
                    return False
                if await self._ready(index):
                    waiting.discard(index)
            if waiting:
                await asyncio.sleep(READY_POLL_S)
        if waiting:
            log.error("event=workers_not_ready indexes=%s timeout_s=%s", sorted(waiting), READY_TIMEOUT_S)
        return not waiting

    async def _ready(self, index: int) -> bool:
        try:
            return await ask(control_path(self.control_dir, index), "ready", 2.0) == b"ready\n"
        except (OSError, TimeoutError):
            return False

    async def _watch(self, worker: Worker) -> None:
        """Restart the worker whenever its process ends, until the instance stops."""
        while True:
            process = worker.process
            assert process is not None
            code = await process.wait()
            if self.stopping:
                return
            self.restarts += 1
            log.error("event=worker_died index=%d pid=%d code=%d restarts=%d", worker.index, process.pid, code,
                      self.restarts)
            if time.monotonic() - worker.started_at < QUICK_DEATH_S:
                await asyncio.sleep(RESTART_PAUSE_S)  # a worker that cannot start must not spin
                if self.stopping:
                    return
            await self._spawn(worker)

    def _signal_stop(self, sig: signal.Signals) -> None:
        self._spawn_task(self.stop(sig))

    async def stop(self, sig: signal.Signals) -> None:
        """SIGTERM (drain, idle clients closed) or SIGUSR2 (drain, clients served until they leave) to every
        worker; a second SIGTERM during a SIGUSR2 drain is passed on too (it hurries the workers)."""
        if self.stopping:
            if sig == signal.SIGTERM:
                self._signal_all(signal.SIGTERM)
            return
        self.stopping = True
        log.info("event=shutdown_started workers=%d signal=%s", self.count, sig.name)
        await self._stop_workers(sig)
        log.info("event=shutdown_complete")
        self.stopped.set()

    async def _stop_workers(self, sig: signal.Signals) -> None:
        self.stopping = True
        self._signal_all(sig)
        processes = [w.process for w in self.workers if w.process is not None]
        timeout_s = self.config.general.shutdown_timeout_s + KILL_GRACE_S
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in processes)), timeout_s)
        except TimeoutError:
            for process in processes:
                if process.returncode is None:
                    log.error("event=worker_killed pid=%d after_s=%s", process.pid, timeout_s)
                    process.kill()
            await asyncio.gather(*(p.wait() for p in processes))

    def _signal_all(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                try:
                    worker.process.send_signal(sig)
                except ProcessLookupError:
                    pass

    def reload(self) -> None:
        """SIGHUP: every worker rereads the file (each logs what it applied or rejected); the supervisor keeps
        its copy for the admin token."""
        try:
            self.config = _keep_restart_keys(load(self.path), self.config)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("event=reload_problem path=%s problem=%r", self.path, problem)
        self._signal_all(signal.SIGHUP)
        log.info("event=reload_sent workers=%d", self.count)

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ the instance's admin answers

    async def ask_all(self, question: str) -> dict[int, bytes]:
        """Every live worker's answer (a worker that does not answer is left out)."""
        async def one(index: int) -> tuple[int, bytes | None]:
            try:
                return index, await ask(control_path(self.control_dir, index), question)
            except (OSError, TimeoutError):
                return index, None

        answers = await asyncio.gather(*(one(index) for index in range(self.count)))
        return {index: answer for index, answer in answers if answer is not None}

    async def metrics(self) -> bytes:
        answers = await self.ask_all("metrics")
        texts = {index: answer.decode() for index, answer in answers.items()}
        families = gather.merge_metrics(list(texts.values()))
        workers = Metric("shardgate_workers", "Worker processes configured", "gauge")
        workers.add_sample("shardgate_workers", {}, self.count)
        up = Metric("shardgate_worker_up", "1 when the worker answered this scrape", "gauge")
        clients = Metric("shardgate_worker_clients", "Client connections open per worker", "gauge")
        for index in range(self.count):
            up.add_sample("shardgate_worker_up", {"worker": str(index)}, 1 if index in texts else 0)
            if index in texts:
                value = gather.sample_value(texts[index], "shardgate_clients")
                clients.add_sample("shardgate_worker_clients", {"worker": str(index)}, value or 0.0)
        restarts = Metric("shardgate_worker_restarts", "Worker processes restarted after they died", "counter")
        restarts.add_sample("shardgate_worker_restarts_total", {}, self.restarts)
        return gather.render([*families, workers, up, clients, restarts])

    async def view(self, name: str) -> list[dict[str, Any]]:
        answers = await self.ask_all(f"view {name}")
        return gather.tag_rows({index: json.loads(answer) for index, answer in answers.items()})

    async def ready(self) -> bool:
        if self.stopping:
            return False
        answers = await self.ask_all("ready")
        return len(answers) == self.count and all(answer == b"ready\n" for answer in answers.values())


class InstanceAdmin(AdminRequest):
    """The admin HTTP listener of a supervised instance: the same paths as proxy/admin.py, each answered for
    every worker (metrics merged, view rows with a `worker` column)."""

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self.supervisor = supervisor

    def _admin_token(self) -> str:
        return self.supervisor.config.general.admin_token

    def _answer(self, path: str, *, head: bool) -> None:
        asyncio.get_running_loop().create_task(self._answer_all(path, head=head))

    async def _answer_all(self, path: str, *, head: bool) -> None:
        sup = self.supervisor
        try:
            if path == "/metrics":
                self._respond(200, CONTENT_TYPE_METRICS, await sup.metrics(), head=head)
            elif path.startswith("/api/") and path[5:] in API_VIEWS:
                name = path[5:]
                self._json({name: await sup.view(name)}, head=head)
            elif path == "/api/shards":
                answers = await sup.ask_all("shards")
                self._json(gather.sum_statements([json.loads(a) for _, a in sorted(answers.items())]), head=head)
            elif path == "/api/prepared_transactions":
                answers = await sup.ask_all("prepared_transactions")  # read from PostgreSQL: one worker is enough
                answer = json.loads(answers[min(answers)]) if answers else {"error": "no worker answered"}
                self._json(answer, status=503 if "error" in answer else 200, head=head)
            elif path == "/health":
                self._respond(200, "text/plain", b"ok\n", head=head)
            elif path == "/ready":
                if await sup.ready():
                    self._respond(200, "text/plain", b"ready\n", head=head)
                else:
                    self._respond(503, "text/plain", b"shutting down\n" if sup.stopping else b"workers not ready\n",
                                  head=head)
            else:
                self._respond(404, "text/plain", b"not found\n")
        except Exception:  # a bug in one answer must not leave the scraper hanging
            log.exception("event=admin_error path=%s", path)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    def _json(self, value: object, *, status: int = 200, head: bool = False) -> None:
        self._respond(status, "application/json", json.dumps(value, indent=2).encode() + b"\n", head=head)

def _keep_restart_keys(new: Config, running: Config) -> Config:
    """What only a restart changes (the ports, the worker count) stays as it runs."""
    kept = {key: getattr(running.general, key) for key in ("listen", "admin_listen", "workers", "pid_file")}
    return dataclasses.replace(new, general=dataclasses.replace(new.general, **kept))


async def supervise(config: Config) -> int:
    return await Supervisor(config).run()
