"""Client session state (settings, SQL prepared statements, pins) tracked so it survives transaction pooling."""

from __future__ import annotations

import itertools
import re
from collections import OrderedDict
from dataclasses import dataclass

from proxy.protocol.sqltext import quote_ident, quote_literal
from routing.classify import StatementKind, classify
from routing.classify import split_statements as routing_split_statements

# Cheap test run once per Query, a few C-level calls on the bytes off the wire; only a hit pays for the
# statement splitter. A false hit costs time, never correctness. Statement heads are compared on their
# first three letters; leading comments count as a hit (they may hide a SET).
_STATEFUL_HEADS = frozenset((b"set", b"res", b"dis", b"dea", b"pre", b"lis", b"unl", b"dec", b"cre", b"exe",
                             b"exp"))
# the same heads in every letter case, so that text starting with a letter needs no lowering
_STATEFUL_HEADS_ANY_CASE = frozenset(
    bytes(letters) for head in _STATEFUL_HEADS
    for letters in itertools.product(*((c, c ^ 0x20) for c in head))
)
_COMMENT_HEADS = (b"--", b"/*")
_BEFORE_HEAD = frozenset(b" \t\r\n\f\v-/")  # first bytes that need the careful head test


def _stateful_head(statement: bytes) -> bool:
    head = statement.lstrip()[:3].lower()
    return head in _STATEFUL_HEADS or head.startswith(_COMMENT_HEADS)


def _may_change_state(sql: bytes) -> bool:
    # bytes.partition, not find or `in`: find parses its arguments the slow way, and `in` first tries its
    # argument as an int; partition copies nothing when the separator is missing or last
    if sql[:3] in _STATEFUL_HEADS_ANY_CASE:
        return True
    if sql and sql[0] in _BEFORE_HEAD and _stateful_head(sql):
        return True
    if sql.partition(b"(")[1]:  # set_config(...) and pg_advisory_lock(...) can sit anywhere in a statement
        low = sql.lower()
        if low.find(b"set_config") != -1 or low.find(b"advisory_lock") != -1:
            return True
    after_first = sql.partition(b";")[2]  # empty with no semicolon or only a last one
    if not after_first or not after_first.strip():
        return False
    return any(_stateful_head(part) for part in sql.split(b";")[1:])


_SET = re.compile(
    r"set\s+(?:(session)\s+|(local)\s+)?(?:(time\s+zone)|(names)|(schema)|([\w.\"]+)\s*(?:=|\bto\b))\s*(.*)",
    re.IGNORECASE | re.DOTALL,
)
# SET ROLE takes no `=` or TO; SET LOCAL ROLE lasts one transaction
_SET_ROLE = re.compile(r"set\s+(?:session\s+|(local)\s+)?role\s+(.+?)\s*$", re.IGNORECASE | re.DOTALL)
# other SET forms without `=` or TO that end with their transaction (anything else unknown pins)
_SET_IN_TRANSACTION = re.compile(r"set\s+(?:local|transaction|constraints)\s", re.IGNORECASE)
_RESET = re.compile(r"reset\s+(all|[\w.\"]+)\s*$", re.IGNORECASE)
_PREPARE_TRANSACTION = re.compile(r"prepare\s+transaction\b", re.IGNORECASE)
_PREPARE = re.compile(r"prepare\s+(?!transaction\b)([\w\"]+)", re.IGNORECASE)
_DEALLOCATE = re.compile(r"deallocate\s+(?:prepare\s+)?(all|[\w\"]+)\s*$", re.IGNORECASE)
# EXECUTE name, EXPLAIN [ANALYZE] [VERBOSE] EXECUTE name, EXPLAIN (options) EXECUTE name: group 1 is the name
EXECUTE_NAME = re.compile(
    r"(?:explain\s*(?:\([^)]*\)\s*|(?:analy[sz]e\s+)?(?:verbose\s+)?))?execute\s+(\"(?:[^\"]|\"\")+\"|\w+)",
    re.IGNORECASE,
)
DEALLOCATE_NAME = _DEALLOCATE
# set_config with its name, value and is_local written out (is_local true lasts one transaction)
_SET_CONFIG = re.compile(
    r"set_config\s*\(\s*'((?:[^']|'')*)'\s*,\s*'((?:[^']|'')*)'\s*,\s*(false|true)\s*\)", re.IGNORECASE
)
_SET_CONFIG_CALL = re.compile(r"set_config\s*\(", re.IGNORECASE)
_PIN = re.compile(
    r"^\s*(?:declare\b.*\bwith\s+hold\b|create\s+(?:global\s+|local\s+)?temp(?:orary)?\b)"
    r"|pg_advisory_lock(?:_shared)?\s*\(|pg_try_advisory_lock(?:_shared)?\s*\(",
    re.IGNORECASE | re.DOTALL,
)
_ALIASES = {"time zone": "timezone", "names": "client_encoding", "schema": "search_path"}


@dataclass(frozen=True, slots=True)
class Effect:
    """One change to session state. kind: set | reset | reset_all | prepare | deallocate | discard_all | pin;
    listen | unlisten (a channel) | unlisten_all (answered with the notification hub, see proxy/notify.py);
    prepare_transaction (PREPARE TRANSACTION: no state, but refused when pooled); execute (no change: a
    statement named by SQL, which may be one of the client's protocol-level ones)."""

    kind: str
    name: str = ""
    value: str = ""


def _normalise_name(name: str) -> str:
    if name.startswith('"') and name.endswith('"'):
        return name[1:-1].replace('""', '"')
    return name.lower()


normalise_name = _normalise_name


def split_statements(sql: str) -> list[str]:
    """Top-level statements (the router's splitter), leading comments and whitespace removed."""
    return [s for s in (_strip_comments(piece) for piece in routing_split_statements(sql)) if s]


def _strip_comments(statement: str) -> str:
    text = statement.strip()
    while text.startswith("--") or text.startswith("/*"):
        if text.startswith("--"):
            end = text.find("\n")
            text = "" if end == -1 else text[end + 1 :].strip()
        else:
            end = text.find("*/")
            text = "" if end == -1 else text[end + 2 :].strip()
    return text


def _statement_effects(statement: str) -> list[Effect]:
    keyword = statement[:12].lower()
    if keyword.startswith("set"):
        match = _SET.match(statement)
        if not match:
            return _other_set(statement)
        if match.group(2):  # SET LOCAL lasts one transaction: nothing to carry over
            return []
        if match.group(6):
            name = _normalise_name(match.group(6))
        else:
            alias = (match.group(3) or match.group(4) or match.group(5)).lower()
            name = _ALIASES["time zone" if alias.startswith("time") else alias]
        value = match.group(7).strip()
        if name in ("transaction", "session"):
            return []
        if value.lower() == "default":
            return [Effect("reset", name)]
        return [Effect("set", name, value)]
    if keyword.startswith("reset"):
        match = _RESET.match(statement)
        if not match:
            return []
        target = match.group(1)
        return [Effect("reset_all")] if target.lower() == "all" else [Effect("reset", _normalise_name(target))]
    if keyword.startswith("discard"):
        return [Effect("discard_all")] if statement.split()[-1].lower() == "all" else []
    if keyword.startswith("deallocate"):
        match = _DEALLOCATE.match(statement)
        if not match:
            return []
        target = match.group(1)
        return [Effect("deallocate", "" if target.lower() == "all" else _normalise_name(target))]
    if keyword.startswith(("execute", "explain")):
        named = EXECUTE_NAME.match(statement)
        return [Effect("execute", _normalise_name(named.group(1)))] if named else []
    if keyword.startswith("prepare"):
        if _PREPARE_TRANSACTION.match(statement):
            return [Effect("prepare_transaction")]  # refused when pooled (see proxy.guard)
        match = _PREPARE.match(statement)
        return [Effect("prepare", _normalise_name(match.group(1)), statement)] if match else []
    if keyword.startswith(("listen", "unlisten")):
        listening = _listen_effects(statement)
        if listening is not None:
            return listening
    written_out = _SET_CONFIG.findall(statement)
    effects = [Effect("set", name.replace("''", "'").lower(), quote_literal(value.replace("''", "'")))
               for name, value, is_local in written_out if is_local.lower() == "false"]
    if _PIN.search(statement):
        effects.append(Effect("pin", value=statement.split()[0].upper()))
    elif len(_SET_CONFIG_CALL.findall(statement)) > len(written_out):
        # set_config whose name, value or is_local the text does not spell out (a bind parameter, a
        # column): what it leaves on the session is unknown, so the client keeps its server
        effects.append(Effect("pin", value="SET_CONFIG"))
    return effects


LISTEN_KINDS = frozenset(("listen", "unlisten", "unlisten_all"))


def _listen_effects(statement: str) -> list[Effect] | None:
    """LISTEN and UNLISTEN in the forms the proxy reads (None: not LISTEN or UNLISTEN at all). A LISTEN it
    cannot read (a U&"..." channel, say) pins the client: its server runs it; an UNLISTEN it cannot read goes
    to the server, where it is harmless."""
    found = classify(statement)
    if found.kind is StatementKind.LISTEN:
        return [Effect("listen", found.name)] if found.name is not None else [Effect("pin", value="LISTEN")]
    if found.kind is StatementKind.UNLISTEN:
        if found.value == "*":
            return [Effect("unlisten_all")]
        return [Effect("unlisten", found.name)] if found.name is not None else []
    return None


def listen_substitute(sql: bytes) -> bytes:
    """The text a server runs for a client's statements with a LISTEN among them: each LISTEN channel is
    sent as UNLISTEN channel, which answers the same way (an error in an aborted transaction, none else)
    and leaves the pooled server listening to nothing; the proxy's notification hub does the listening."""
    pieces = []
    for piece in routing_split_statements(sql.decode("utf-8", "replace")):
        statement = _strip_comments(piece)
        if statement[:6].lower() == "listen":
            found = classify(statement)
            if found.kind is StatementKind.LISTEN and found.name is not None:
                piece = "UNLISTEN " + quote_ident(found.name)
        pieces.append(piece)
    return ";".join(pieces).encode("utf-8")


def listen_only_tags(sql: bytes) -> tuple[str, ...] | None:
    """The command tags of a text made only of LISTEN and UNLISTEN statements in the forms the proxy reads
    (what it answers itself), else None."""
    tags = []
    for statement in split_statements(sql.decode("utf-8", "replace")):
        effects = _listen_effects(statement)
        if not effects or effects[0].kind not in LISTEN_KINDS:
            return None
        tags.append("LISTEN" if effects[0].kind == "listen" else "UNLISTEN")
    return tuple(tags) or None


def _other_set(statement: str) -> list[Effect]:
    """SET forms without `=` or TO: ROLE is tracked like a setting; SET SESSION AUTHORIZATION, SESSION
    CHARACTERISTICS, XML OPTION or anything else not known to end with the transaction pins the client."""
    role = _SET_ROLE.match(statement)
    if role:
        if role.group(1):
            return []
        value = role.group(2)
        if not value.startswith("'"):
            value = quote_literal(_normalise_name(value))
        return [Effect("set", "role", value)]
    if _SET_IN_TRANSACTION.match(statement) or not statement[3:4].isspace():
        return []
    return [Effect("pin", value="SET")]


class EffectScanner:
    """Statement text -> effects, cached by text so the same statement is never analysed twice."""

    def __init__(self, cache_size: int = 2048) -> None:
        self._cache: OrderedDict[bytes, tuple[Effect, ...]] = OrderedDict()
        self._parsed: dict[bytes, tuple[Effect, ...]] = {}
        self._cache_size = cache_size

    def parsed_effects(self, sql: bytes) -> tuple[Effect, ...]:
        """Effects of a Parse message's statement text. Such texts repeat (parameters are bound apart), so
        every answer is kept, the empty ones too; the table starts over when full."""
        found = self._parsed.get(sql)
        if found is None:
            found = self.effects(sql)
            if len(self._parsed) >= self._cache_size:
                self._parsed.clear()
            self._parsed[sql] = found
        return found

    def effects(self, sql: bytes) -> tuple[Effect, ...]:
        """Effects of a statement's UTF-8 text as it came off the wire (no decode unless it may matter)."""
        if not _may_change_state(sql):
            return ()
        cached = self._cache.get(sql)
        if cached is not None:
            self._cache.move_to_end(sql)
            return cached
        text = sql.decode("utf-8", "replace")
        found = tuple(e for statement in split_statements(text) for e in _statement_effects(statement))
        self._cache[sql] = found
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return found


@dataclass(slots=True)
class SessionState:
    """What a client expects of its session: settings (name -> SQL value text) and SQL prepared statements."""

    startup: dict[str, str]
    settings: dict[str, str]
    prepared: dict[str, str]
    # JWT claims: (SQL that sets them, SQL that clears them); empty for password clients
    claims: tuple[str, str] = ("", "")

    @classmethod
    def from_startup(cls, parameters: dict[str, str]) -> SessionState:
        startup = {name: quote_literal(value) for name, value in parameters.items()}
        return cls(startup, dict(startup), {})

    def apply(self, effects: tuple[Effect, ...] | list[Effect]) -> bool:
        """Apply effects; True when the client must stay on its server (LISTEN, advisory lock, ...)."""
        pin = False
        for effect in effects:
            kind = effect.kind
            if kind == "set":
                self.settings[effect.name] = effect.value
            elif kind == "reset":
                if effect.name in self.startup:
                    self.settings[effect.name] = self.startup[effect.name]
                else:
                    self.settings.pop(effect.name, None)
            elif kind == "reset_all":
                self.settings = dict(self.startup)
            elif kind == "prepare":
                self.prepared[effect.name] = effect.value
            elif kind == "deallocate":
                if effect.name:
                    self.prepared.pop(effect.name, None)
                else:
                    self.prepared.clear()
            elif kind == "discard_all":
                self.settings = dict(self.startup)
                self.prepared.clear()
            elif kind == "pin":
                pin = True
        return pin

    def snapshot(self) -> ServerState:
        return tuple(sorted(self.settings.items())), tuple(sorted(self.prepared.items())), self.claims


def server_state_after(current: ServerState, effects: tuple[Effect, ...] | list[Effect]) -> ServerState:
    """A server session's state after the client's effects ran on it.

    RESET and DISCARD take a pooled server back to its own defaults, not to the client's startup values
    (the server never saw the client's startup packet); the next checkout replays what differs.
    """
    server = SessionState({}, dict(current[0]), dict(current[1]), current[2])
    server.apply(effects)
    return tuple(sorted(server.settings.items())), tuple(sorted(server.prepared.items())), server.claims


ServerState = tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...], tuple[str, str]]
EMPTY_SERVER_STATE: ServerState = ((), (), ("", ""))


def sync_sql(wanted: ServerState, current: ServerState) -> str:
    """SQL that turns a server session in state `current` into `wanted` ('' when they match)."""
    if wanted == current:
        return ""
    parts: list[str] = []
    wanted_settings, wanted_prepared = dict(wanted[0]), dict(wanted[1])
    current_settings, current_prepared = dict(current[0]), dict(current[1])
    # The role decides which settings a SET may change (superuser-only ones, GRANT SET ON PARAMETER), as it
    # did when the client ran them before its SET ROLE: the server's role goes first, the client's last.
    # A JWT client's claims may switch the role too: the previous client's are cleared first, ours set last.
    wanted_claims, current_claims = wanted[2], current[2]
    if wanted_claims != current_claims and current_claims[1]:
        parts.append(current_claims[1])
    wanted_role = wanted_settings.pop("role", None)
    current_role = current_settings.pop("role", None)
    if current_role is not None and (current_role != wanted_role or current_settings != wanted_settings):
        parts.append("RESET role")
        current_role = None
    for name in current_settings:
        if name not in wanted_settings:
            parts.append(f"RESET {quote_ident(name)}")
    for name, value in wanted_settings.items():
        if current_settings.get(name) != value:
            parts.append(f"SET {quote_ident(name)} = {value}")
    if wanted_role is not None and wanted_role != current_role:
        parts.append(f"SET role = {wanted_role}")
    for name, text in current_prepared.items():
        if wanted_prepared.get(name) != text:
            parts.append(f"DEALLOCATE {quote_ident(name)}")
    for name, text in wanted_prepared.items():
        if current_prepared.get(name) != text:
            parts.append(text)
    if wanted_claims != current_claims:
        parts.append(wanted_claims[0])
    return ";".join(part for part in parts if part)
