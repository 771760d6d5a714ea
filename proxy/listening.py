"""One session's LISTENs in the pooled modes: its channels on the notification hub, its transaction's
reservations, and the notifications that wait for it to be idle."""

from __future__ import annotations

from collections.abc import Callable

from proxy.notify import Listener, NotifyHub
from proxy.session_state import LISTEN_KINDS, Effect

# Notifications kept for a client inside a long transaction, in bytes; past this it is closed (54000), as
# the memory they take is not bounded otherwise.
MAX_PENDING_NOTIFICATION_BYTES = 64 << 20
LISTENING_KINDS = LISTEN_KINDS | {"discard_all"}  # DISCARD ALL runs UNLISTEN * too


class Listening:
    """The channels a client listens to (registered at commit, as PostgreSQL does), the ones its open
    transaction has reserved on the hub, and what was notified while it was busy."""

    def __init__(self, hub_of: Callable[[], NotifyHub], client: Listener) -> None:
        self._hub_of = hub_of  # the primary's hub, found at the first LISTEN (raises ProxyError: no primary)
        self.hub: NotifyHub | None = None
        self.client = client
        self.channels: set[str] = set()
        self.reserved: list[str] = []
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    def hub_now(self) -> NotifyHub:
        hub = self.hub
        if hub is None:
            hub = self.hub = self._hub_of()
        return hub

    def reserve(self, effects: tuple[Effect, ...] | list[Effect]) -> frozenset[str]:
        """The channels a LISTEN names, held on the hub until the transaction ends; returns them."""
        channels = frozenset(e.name for e in effects if e.kind == "listen")
        if channels:
            hub = self.hub_now()
            for channel in channels:
                hub.reserve(channel)
                self.reserved.append(channel)
        return channels

    def release(self) -> None:
        """The transaction ended: what it reserved is registered (`apply`) or dropped."""
        hub = self.hub
        reserved, self.reserved = self.reserved, []
        if hub is not None:
            for channel in reserved:
                hub.release(channel)

    def apply(self, effects: tuple[Effect, ...] | list[Effect]) -> None:
        """Committed LISTEN / UNLISTEN statements, in order."""
        for effect in effects:
            kind = effect.kind
            if kind == "listen":
                if effect.name not in self.channels:
                    self.hub_now().add(self.client, effect.name)
                    self.channels.add(effect.name)
            elif kind == "unlisten":
                if effect.name in self.channels and self.hub is not None:
                    self.channels.discard(effect.name)
                    self.hub.remove(self.client, effect.name)
            elif kind in ("unlisten_all", "discard_all"):
                self._unlisten_all()

    def _unlisten_all(self) -> None:
        hub = self.hub
        channels, self.channels = self.channels, set()
        if hub is not None:
            for channel in channels:
                hub.remove(self.client, channel)

    def close(self) -> None:
        """The client is gone."""
        self.pending = []
        self.pending_bytes = 0
        self.release()
        self._unlisten_all()
