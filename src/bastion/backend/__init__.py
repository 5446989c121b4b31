"""The storage interface every service uses, and how to open one.

A backend is an ordered key-value store with revisions (like etcd): every
write gets a new cluster-wide revision, items carry the revision of their
last write, ``update`` is a compare-and-swap on that revision, and ``watch``
yields the ordered stream of changes after a revision.  Keys are ``/``-paths
such as ``/roles/editor``.  Values are bytes (resources are stored as JSON).

Implementations: ``sqlite`` (default, embedded) and ``postgres`` (several proxies on one database).
Both must pass ``tests/unit/backend/test_contract.py`` unchanged.

This module must not import anything above ``bastion.errors``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Item:
    """One stored value.  ``revision`` is 0 for an item not yet written."""

    key: str
    value: bytes
    revision: int = 0
    expires: datetime | None = None


class EventType(StrEnum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Event:
    """A change, in revision order.  For DELETE, ``item.value`` is empty."""

    type: EventType
    item: Item

    @property
    def revision(self) -> int:
        return self.item.revision


class Backend(Protocol):
    """The async storage contract.

    * ``get``: the live item, or ``NotFoundError`` (expired items are absent).
    * ``create``: ``AlreadyExistsError`` if a live item has the key.
    * ``update``: only if the stored revision equals ``expected_revision``;
      ``NotFoundError`` if absent, ``ConflictError`` if it changed.
    * ``put``: create or overwrite unconditionally.
    * ``delete``: ``NotFoundError`` if absent; with ``expected_revision``,
      ``ConflictError`` if it changed.
    * ``list``: live items whose key starts with ``prefix``, sorted by key.
    * ``current_revision``: the newest revision written (0 when empty).
    * ``watch``: changes with revision > ``from_revision``, in order, as they
      happen, until the iterator is closed; ``WatchExpiredError`` if changes
      after ``from_revision`` were already compacted away (re-list, then
      watch from the revision the list was read at).
    """

    async def get(self, key: str) -> Item: ...

    async def create(self, item: Item) -> Item: ...

    async def update(self, item: Item, expected_revision: int) -> Item: ...

    async def put(self, item: Item) -> Item: ...

    async def delete(self, key: str, expected_revision: int | None = None) -> None: ...

    async def list(self, prefix: str) -> list[Item]: ...

    async def current_revision(self) -> int: ...

    def watch(self, from_revision: int) -> AsyncIterator[Event]: ...

    async def close(self) -> None: ...
