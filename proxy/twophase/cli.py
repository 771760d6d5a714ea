"""`shardgate 2pc list | commit GID | rollback GID`: the in-doubt transactions of every shard, resolved by hand."""

from __future__ import annotations

import asyncio
import sys

from config.model import Config
from proxy.errors import ProxyError
from proxy.runtime import Runtime
from proxy.twophase import recovery


async def _run(config: Config, action: str, gid: str | None) -> int:
    runtime = Runtime(config)
    probes = [c.probe_once() for c in runtime.clusters.values()
              if len(c.servers) > 1 or c.servers[0].config.role == "auto"]
    if probes:
        await asyncio.gather(*probes, return_exceptions=True)
    tp = runtime.twophase
    try:
        if action == "list":
            parts = await recovery.list_in_doubt(tp)
            print(f"{'database':<16} {'shard':>5} {'age_s':>9} {'decision':<9} {'owner':<16} gid")
            for part in parts:
                print(f"{part.database:<16} {part.shard:>5} {part.age_s:>9.1f} {part.decision or '-':<9} "
                      f"{part.owner:<16} {part.gid}")
            print(f"({len(parts)} prepared transaction part{'s' if len(parts) != 1 else ''})")
            return 0
        assert gid is not None
        print(await recovery.resolve(tp, gid, "commit" if action == "commit" else "abort"))
        return 0
    except (ProxyError, LookupError, TimeoutError, OSError) as exc:
        print(f"shardgate 2pc {action}: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return 1
    finally:
        tp.close()
        for cluster in runtime.clusters.values():
            cluster.close()


def main(config: Config, action: str, gid: str | None) -> int:
    return asyncio.run(_run(config, action, gid))
