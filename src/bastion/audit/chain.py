"""Tamper evidence for the audit log: hash-chained, signed seals over what a store wrote (ADR 32).

A *writer* (one SQLite data directory, or one PostgreSQL store instance)
keeps one chain of *seals*.  A seal covers the items the writer stored in one
transaction, in order: an inserted event as ``["i", id, digest]`` (the digest
of the event's JSON document exactly as stored, so the link costs one hash
over bytes the store serialised anyway) and a completion as ``["c", id,
success, error, duration_ms]`` (the outcome itself: small, and kept even when
a later completion replaces it in the row).  A seal's hash is

    sha256(prev || [writer, seq, time_us, kind, payload] as JSON || items)

with ``prev`` the hash of the writer's previous seal (32 zero bytes for its
first), so changing, removing or reordering anything sealed breaks every
later link.  Some seals are *signed* (``sig``: the cluster's JWT key over
``SIGNED_PREFIX || hash``): periodically, when a writer opens and closes,
and when retention prunes (then ``payload`` names, per writer, the last
pruned seal and its hash: the anchor the remaining chain starts from).
Without the key nobody can rewrite the chain up to a signed seal.

``Verifier`` checks seals and stored rows against each other and lists
every break, earliest first.  This module does no I/O; the stores read and
write the seals (``sqlite_store``, ``pg_store``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

__all__ = [
    "GENESIS",
    "Break",
    "Chain",
    "Seal",
    "Verifier",
    "VerifyReport",
    "checker_of",
    "completion_item",
    "event_digest",
    "insert_item",
    "signer_of",
]

#: The ``prev`` of a writer's first seal.
GENESIS: Final = bytes(32)
#: What a signature covers, before the seal's hash (so a seal signature is never
#: mistaken for any other signature made with the same key).
SIGNED_PREFIX: Final = b"bastion-audit-seal/1\x00"
#: Kinds of seal.
SEAL, OPEN, CLOSE, PRUNE = "seal", "open", "close", "prune"

#: Signs ``data``; returns the signature.
Signer = Callable[[bytes], bytes]
#: ``True`` if ``sig`` is a valid signature of ``data``.
Checker = Callable[[bytes, bytes], bool]


def event_digest(text: str) -> str:
    """The digest of an event's stored JSON document (128 bits of sha256, hex)."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def insert_item(event_id: str, text: str) -> list[Any]:
    return ["i", event_id, event_digest(text)]


def completion_item(event_id: str, success: bool, error: str, duration_ms: float | None) -> list[Any]:
    return ["c", event_id, bool(success), error, duration_ms]


class Seal(NamedTuple):
    """One link of a writer's chain, as stored."""

    writer: int
    seq: int
    time_us: int
    kind: str
    prev: bytes
    #: JSON array of items (see the module doc).
    items: bytes
    #: JSON: "" for plain seals; the anchors of a prune; the predecessor of an open.
    payload: str
    sig: bytes | None

    def hash(self) -> bytes:
        header = orjson.dumps([self.writer, self.seq, self.time_us, self.kind, self.payload])
        return hashlib.sha256(self.prev + header + self.items).digest()


class Chain:
    """A writer's chain head: builds the next seal.  Not thread-safe; one owner at a time."""

    def __init__(
        self, writer: int, seq: int = 0, head: bytes = GENESIS, signer: Signer | None = None
    ) -> None:
        self.writer = writer
        self.seq = seq
        self.head = head
        self.signer = signer

    def next(
        self,
        items: Sequence[list[Any]],
        time_us: int,
        *,
        kind: str = SEAL,
        payload: str = "",
        sign: bool = False,
    ) -> Seal:
        """The seal after the head (the head does not move: call ``advance`` once it is stored)."""
        seal = Seal(self.writer, self.seq + 1, time_us, kind, self.head, orjson.dumps(items), payload, None)
        if sign and self.signer is not None:
            seal = seal._replace(sig=self.signer(SIGNED_PREFIX + seal.hash()))
        return seal

    def advance(self, seal: Seal) -> None:
        self.seq, self.head = seal.seq, seal.hash()


# -- keys -----------------------------------------------------------------------------


def signer_of(private_key_pem: bytes) -> Signer:
    """A ``Signer`` with a PEM private key (EC P-256: ECDSA-SHA256, or Ed25519)."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign
    if isinstance(key, ec.EllipticCurvePrivateKey):
        ec_key = key
        return lambda data: ec_key.sign(data, ec.ECDSA(hashes.SHA256()))
    raise TypeError(f"cannot sign audit seals with a {type(key).__name__}")


def checker_of(public_key_pem: bytes) -> Checker:
    """The ``Checker`` of ``signer_of``'s signatures, from the PEM public key."""
    key = serialization.load_pem_public_key(public_key_pem)

    def check(data: bytes, sig: bytes) -> bool:
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(sig, data)
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
            else:
                return False
        except InvalidSignature:
            return False
        return True

    return check


# -- verifying --------------------------------------------------------------------------


class Break(NamedTuple):
    """Something that does not verify: where (time, the event id or seal) and what."""

    time_us: int
    event_id: str
    reason: str


class Row(NamedTuple):
    """A stored event row, as ``Verifier.check_row`` reads it."""

    id: str
    time_us: int
    type: str
    user: str
    app: str
    session_id: str
    success: bool
    error: str
    duration_ms: float | None
    text: str
    #: The ``tool`` column (ADR 35; None where the store has none): checked like the others,
    #: so an edited one cannot hide a row from ``search --tool``.
    tool: str | None = None


@dataclass
class Verifier:
    """Checks seals (``add_seals``, each writer's in seq order) then rows (``check_row``), then ``finish``.

    ``since_us``: seals before it are not read (the first one read is trusted
    as the chain's start) and rows before it are not checked.  ``checker``:
    signatures are checked with it (``None``: not checked, only counted).
    Where pruned chains start again is read from the newest prune seal's
    anchors (``prune_anchors``).
    """

    checker: Checker | None
    since_us: int | None = None
    #: Rows whose store seq is at most this were written before the chain existed.
    legacy_seq: int = 0
    #: Rows whose store seq is at most this were stored before the ``tool`` column (left empty).
    tool_base: int = 0
    breaks: list[Break] = field(default_factory=list)
    seals: int = 0
    signed: int = 0
    events: int = 0
    legacy: int = 0
    #: Per writer: its last seal (seq, time_us, kind, signed).
    tails: dict[int, tuple[int, int, str, bool]] = field(default_factory=dict)
    # First insert digest per event id (and its seal's time); outcomes, last per id.
    _inserted: dict[str, tuple[str, int, tuple[int, int, int]]] = field(default_factory=dict)
    # Breaks with their place in the chain (writer, seq, item), to order those of one time.
    _found: list[tuple[tuple[int, int, int], Break]] = field(default_factory=list)
    _outcomes: dict[str, tuple[tuple[int, int, int], list[Any]]] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)
    _anchors: dict[int, tuple[tuple[int, int, int], int, bytes]] = field(default_factory=dict)
    _heads: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    _first_seq: dict[int, tuple[int, bytes, int]] = field(default_factory=dict)

    def add_seals(self, seals: Iterable[Seal]) -> None:
        for seal in seals:
            self._add(seal)

    def _add(self, seal: Seal) -> None:
        self.seals += 1
        w = seal.writer
        h = seal.hash()
        head = self._heads.get(w)
        try:
            items = orjson.loads(seal.items)
            # Each item a list: ["i", id, digest] or ["c", id, success, error, duration_ms].
            ok = isinstance(items, list) and all(
                isinstance(i, list) and len(i) == (3 if i[:1] == ["i"] else 5) and i[0] in ("i", "c")
                for i in items
            )
        except orjson.JSONDecodeError:
            ok = False
        if not ok:
            items = []
        # A seal's breaks are named after its first event.
        where = str(items[0][1]) if items else f"(seal {w}/{seal.seq})"
        if not ok:
            self._break(seal.time_us, where, f"seal {seal.seq} of writer {w}: items unreadable")
        if head is None:
            self._first_seq[w] = (seal.seq, seal.prev, seal.time_us)
        elif seal.seq != head[0] + 1:
            self._break(seal.time_us, where, f"seals {head[0] + 1}..{seal.seq - 1} of writer {w} are missing")
        elif seal.prev != head[1]:
            self._break(seal.time_us, where, f"seal {seal.seq} of writer {w} does not follow seal {head[0]}")
        self._heads[w] = (seal.seq, h)
        if seal.sig is not None:
            self.signed += 1
            if self.checker is not None and not self.checker(SIGNED_PREFIX + h, seal.sig):
                self._break(seal.time_us, where, f"seal {seal.seq} of writer {w}: bad signature")
        elif seal.kind != SEAL and self.checker is not None:
            self._break(seal.time_us, where, f"{seal.kind} seal {seal.seq} of writer {w} is not signed")
        self.tails[w] = (seal.seq, seal.time_us, seal.kind, seal.sig is not None)
        if seal.kind == PRUNE and (seal.sig is not None or self.checker is None):
            try:
                for writer, seq, prev in orjson.loads(seal.payload):
                    old = self._anchors.get(int(writer))
                    key = (seal.time_us, w, seal.seq)
                    if old is None or old[0] < key:  # the newest prune says where chains start
                        self._anchors[int(writer)] = (key, int(seq), bytes.fromhex(prev))
            except (orjson.JSONDecodeError, TypeError, ValueError):
                self._break(seal.time_us, where, f"prune seal {seal.seq} of writer {w}: bad anchors")
        for n, item in enumerate(items):
            kind, eid = item[0], str(item[1])
            if kind == "i":
                self._inserted.setdefault(eid, (str(item[2]), seal.time_us, (w, seal.seq, n)))
            else:
                order = (seal.time_us, seal.seq, n)
                last = self._outcomes.get(eid)
                if last is None or last[0] < order:
                    self._outcomes[eid] = (order, item[2:5])

    def check_row(self, row: Row, seq: int) -> None:
        """Check one stored row against what the seals say of it."""
        self._seen.add(row.id)
        if self.since_us is not None and row.time_us < self.since_us:
            return
        self.events += 1
        sealed = self._inserted.get(row.id)
        if sealed is None:
            if seq <= self.legacy_seq:
                self.legacy += 1
                return
            self._break(
                row.time_us, row.id, "stored but not in any seal (inserted behind the writer's back?)"
            )
            return
        # Breaks of sealed events are placed where they were sealed.
        at, pos = sealed[1], sealed[2]
        if event_digest(row.text) != sealed[0]:
            self._break(at, row.id, "its stored document differs from the one sealed", pos)
            return
        try:
            doc = orjson.loads(row.text)
        except orjson.JSONDecodeError:
            self._break(at, row.id, "its stored document does not parse", pos)
            return
        columns: tuple[str, ...] = (row.id, row.type, row.user, row.app, row.session_id)
        expected: tuple[str, ...] = (
            str(doc.get("id", "")),
            str(doc.get("event", "")),
            str(doc.get("user", "")),
            str(doc.get("app", "")),
            str(doc.get("session_id", "")),
        )
        if row.tool is not None and seq > self.tool_base:
            columns, expected = (*columns, row.tool), (*expected, str(doc.get("tool", "")))
        if not _same_columns(columns, expected):
            self._break(at, row.id, "its indexed columns differ from its sealed document", pos)
            return
        outcome = self._outcomes.get(row.id)
        want = (
            outcome[1]
            if outcome is not None
            else [bool(doc.get("success")), str(doc.get("error", "")), doc.get("duration_ms")]
        )
        if [bool(row.success), row.error, row.duration_ms] != [bool(want[0]), want[1] or "", want[2]]:
            self._break(at, row.id, "its outcome differs from the one sealed", pos)

    def finish(self) -> list[Break]:
        """After every row: sealed events not stored, chains whose start is missing.

        Returns every break, earliest first.
        """
        for eid, (_, time_us, pos) in self._inserted.items():
            if eid not in self._seen and (self.since_us is None or time_us >= self.since_us):
                self._break(time_us, eid, "sealed but no longer stored (deleted?)", pos)
        if self.since_us is None:
            for w, (seq, prev, time_us) in self._first_seq.items():
                anchor = self._anchors.get(w)
                if anchor is not None:
                    if (seq, prev) != (anchor[1] + 1, anchor[2]):
                        self._break(
                            time_us, f"(seal {w}/{seq})", f"writer {w} does not start where pruning left it"
                        )
                elif seq != 1 or prev != GENESIS:
                    self._break(time_us, f"(seal {w}/{seq})", f"seals 1..{seq - 1} of writer {w} are missing")
        self._found.sort(key=lambda f: (f[1].time_us, f[0]))
        self.breaks = [b for _, b in self._found]
        return self.breaks

    def _break(self, time_us: int, event_id: str, reason: str, pos: tuple[int, int, int] = (0, 0, 0)) -> None:
        self._found.append((pos, Break(time_us, event_id, reason)))


class VerifyReport:
    """What ``verify_files`` found: the breaks (earliest first) and counts."""

    def __init__(self, verifier: Verifier, breaks: list[Break], journaled: int) -> None:
        self.breaks = breaks
        self.seals = verifier.seals
        self.signed = verifier.signed
        self.events = verifier.events
        self.legacy = verifier.legacy
        #: Items journaled and not yet indexed (not sealed yet: they will be when indexed).
        self.journaled = journaled
        #: Per writer: its last seal (seq, time_us, kind, signed).
        self.tails = verifier.tails

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.breaks,
            "events": self.events,
            "seals": self.seals,
            "signed_seals": self.signed,
            "unsealed_legacy_events": self.legacy,
            "journaled_not_yet_sealed": self.journaled,
            "breaks": [
                {"event_id": b.event_id, "time_us": b.time_us, "reason": b.reason} for b in self.breaks
            ],
        }


def _same_columns(columns: tuple[str, ...], expected: tuple[str, ...]) -> bool:
    if columns == expected:
        return True
    # Stores keep text columns storable (lone surrogates and, in PostgreSQL, NUL replaced).
    return all(
        c == e or c == e.encode("utf-8", "replace").decode().replace("\x00", "\ufffd")
        for c, e in zip(columns, expected, strict=True)
    )


def prune_anchors(heads: dict[int, tuple[int, bytes]]) -> str:
    """The payload of a prune seal: per writer, the last pruned seal and its hash."""
    return orjson.dumps([[w, seq, h.hex()] for w, (seq, h) in sorted(heads.items())]).decode()
