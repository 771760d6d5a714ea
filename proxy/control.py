"""A worker's control channel: a Unix socket where its supervisor and the other workers ask one question per
connection (a cancel to pass on, metrics text, an admin view, readiness) and read the answer until close."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import TYPE_CHECKING

from prometheus_client import generate_latest

from proxy import views
from proxy.admin import API_VIEWS, metrics_registry, shards_report
from proxy.errors import ProxyError

if TYPE_CHECKING:
    from proxy.runtime import Runtime

log = logging.getLogger("shardgate")

MAX_QUESTION_BYTES = 256
ASK_TIMEOUT_S = 5.0


class ControlServer:
    """Answers on `path` for one worker's runtime. Questions, one line each:
    `cancel PID SECRET` (a CancelRequest another worker received for a client of this one), `metrics`
    (Prometheus text), `view NAME` (an admin view's rows as JSON), `shards`, `prepared_transactions`, `ready`."""

    def __init__(self, runtime: Runtime, path: str) -> None:
        self.runtime = runtime
        self.path = path
        self.registry = metrics_registry(runtime)
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by a worker of this index that died
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), ASK_TIMEOUT_S)
            writer.write(await self.answer(line[:MAX_QUESTION_BYTES].decode("ascii", "replace").split()))
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        except Exception:  # a bug answering one question must not take the control socket down
            log.exception("event=control_error")
        finally:
            writer.close()

    async def answer(self, words: list[str]) -> bytes:
        rt = self.runtime
        match words:
            case ["cancel", process_id, secret_key]:
                rt.forward_cancel(int(process_id), int(secret_key))
                return b"ok\n"
            case ["metrics"]:
                return generate_latest(self.registry)
            case ["view", name] if name in API_VIEWS:
                return json.dumps(views.VIEWS[name](rt).records()).encode()
            case ["shards"]:
                return json.dumps(shards_report(rt)).encode()
            case ["prepared_transactions"]:
                try:
                    table = await views.prepared_transactions(rt)
                except ProxyError as exc:
                    return json.dumps({"error": exc.message}).encode()
                return json.dumps({"prepared_transactions": table.records()}).encode()
            case ["ready"]:
                return b"shutting down\n" if rt.shutting_down else b"ready\n"
        return b"unknown question\n"


async def ask(path: str, question: str, timeout_s: float = ASK_TIMEOUT_S) -> bytes:
    """Ask one worker one question; raises OSError or TimeoutError when it does not answer."""
    async def exchange() -> bytes:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(question.encode() + b"\n")
            return await reader.read()
        finally:
            writer.close()

    return await asyncio.wait_for(exchange(), timeout_s)
