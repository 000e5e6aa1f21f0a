"""The webhook outbox: deliveries kept durably until answered, apart from the job.

A job that ends with a ``callback_url`` puts one :class:`Delivery` here (the
job id, the URL, the exact body bytes, when the job ended and how many
attempts were made) before its first attempt. It stays until a 2xx answer,
a refused URL or the end of the retry window, whatever happens to the job
(retention may delete it long before) or to the process (a restart, a
``kill -9``): the next sender to start takes it up. Delivery is therefore at
least once; receivers deduplicate by the delivery id.

A sender takes due deliveries with :meth:`Outbox.claim_due`, which counts the
attempt durably before it is made, makes the attempt, and then either removes
the delivery or schedules the next attempt (:meth:`Outbox.retry_at`).

Two outboxes, like the job stores:

- :class:`FileOutbox` (the in-process mode): ``data_dir/webhooks/{id}.json``,
  each written to a temporary file, fsynced and renamed, so a restart never
  reads a torn one. One process owns the folder, so a claim is only kept in
  memory; a delivery claimed when the process died is due at once on the
  next start.
- :class:`RedisOutbox` (the distributed mode): a hash per delivery,
  ``{prefix}webhook:{id}``, and one sorted set, ``{prefix}webhooks``, of
  delivery ids scored by when each is next due. Every API node and worker
  polls the set. A claim (one Lua script, so atomic) moves the delivery's
  score to the end of a lease and stores a fresh lease token in its hash;
  only the holder of that token can schedule or remove it afterwards. A
  sender that dies mid-attempt leaves the lease to run out, after which any
  other sender takes the delivery up; in the normal case (attempts end well
  within the lease) no two senders ever work on one delivery at once.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import uuid
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiofiles.os
import redis.asyncio as aioredis
import structlog

from clipservice.jobs.store import TMP_MARKER, _unlink_quiet, _write_atomic

log = structlog.get_logger(__name__)

# Delivery ids name files: nothing that could leave the folder.
_DELIVERY_ID_RE = re.compile(r"^[0-9A-Za-z_-]{1,100}$")

T = TypeVar("T")


@dataclass(frozen=True)
class Delivery:
    """One webhook delivery: what to POST where, and how far it has got.

    ``attempts`` counts the attempts made or begun (the current one included,
    once claimed); ``next_at_s`` is when the next one is due (epoch seconds).
    ``lease`` is the token of the claim that returned it (Redis only).
    """

    delivery_id: str
    job_id: str
    url: str
    body: bytes
    ended_at_s: float
    attempts: int = 0
    next_at_s: float = 0.0
    lease: str = ""

    def __post_init__(self) -> None:
        if not _DELIVERY_ID_RE.fullmatch(self.delivery_id):
            raise ValueError(f"bad delivery id {self.delivery_id!r}")

    def to_record(self) -> dict[str, str]:
        """The stored fields, as strings (a Redis hash; the file holds the same keys)."""
        return {
            "delivery_id": self.delivery_id,
            "job_id": self.job_id,
            "url": self.url,
            # Our bodies are JSON, so UTF-8: the text round-trips to the same bytes.
            "body": self.body.decode("utf-8"),
            "ended_at_s": repr(self.ended_at_s),
            "attempts": str(self.attempts),
            "next_at_s": repr(self.next_at_s),
        }

    @classmethod
    def from_record(cls, record: dict[str, str], lease: str = "") -> Delivery:
        return cls(
            delivery_id=record["delivery_id"],
            job_id=record["job_id"],
            url=record["url"],
            body=record["body"].encode("utf-8"),
            ended_at_s=float(record["ended_at_s"]),
            attempts=int(record["attempts"]),
            next_at_s=float(record["next_at_s"]),
            lease=lease,
        )


class Outbox(Protocol):
    """Where deliveries wait between attempts (local files, or Redis)."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def add(self, delivery: Delivery) -> bool:
        """Store a new delivery, durably; False (and nothing changed) if its id is there already."""
        ...

    async def claim_due(self, now_s: float, limit: int, lease_s: float) -> list[Delivery]:
        """Take up to ``limit`` deliveries due at ``now_s`` for one attempt each.

        Each comes back with its attempt count already bumped and stored, and
        is held by this caller for ``lease_s`` (or until it is scheduled again
        or removed).
        """
        ...

    async def retry_at(self, delivery: Delivery, next_at_s: float) -> bool:
        """Give a claimed delivery back, due at ``next_at_s``; False if the claim was lost."""
        ...

    async def remove(self, delivery: Delivery) -> bool:
        """Drop a claimed delivery (answered, refused or given up); False if the claim was lost."""
        ...

    async def next_due_s(self) -> float | None:
        """When the earliest unclaimed delivery is due (or a lease runs out); None if none."""
        ...

    async def count(self) -> int:
        """Deliveries waiting or in flight."""
        ...


class FileOutbox:
    """Deliveries as JSON files in one folder, owned by one process, cached in memory."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._deliveries: dict[str, Delivery] = {}
        self._claimed: set[str] = set()
        # Writes outlive a cancelled caller; close() waits for them.
        self._writes: set[asyncio.Future[Any]] = set()

    def _path(self, delivery_id: str) -> Path:
        return self.folder / f"{delivery_id}.json"

    async def open(self) -> None:
        """Create the folder, drop stale temp files and load every delivery."""
        await aiofiles.os.makedirs(self.folder, exist_ok=True)
        self._deliveries = await asyncio.to_thread(self._load_all)
        self._claimed.clear()

    async def close(self) -> None:
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def _load_all(self) -> dict[str, Delivery]:
        found: dict[str, Delivery] = {}
        for entry in os.scandir(self.folder):
            if TMP_MARKER in entry.name:
                # A write that never reached its rename: the old file is intact.
                os.unlink(entry.path)
                continue
            if not entry.name.endswith(".json"):
                continue
            try:
                with open(entry.path, "rb") as fh:
                    delivery = Delivery.from_record(json.load(fh))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("webhook_outbox_file_unreadable", path=entry.path, error=str(exc))
                continue
            found[delivery.delivery_id] = delivery
        return found

    async def add(self, delivery: Delivery) -> bool:
        if delivery.delivery_id in self._deliveries:
            return False
        self._deliveries[delivery.delivery_id] = delivery
        await self._write(delivery)
        return True

    async def claim_due(self, now_s: float, limit: int, lease_s: float) -> list[Delivery]:
        due = sorted(
            (
                d
                for d in self._deliveries.values()
                if d.next_at_s <= now_s and d.delivery_id not in self._claimed
            ),
            key=lambda d: d.next_at_s,
        )[: max(0, limit)]
        claimed = []
        for d in due:
            # next_at_s stays as it was (due): a process killed mid-attempt
            # leaves it due at once for the next start.
            bumped = replace(d, attempts=d.attempts + 1)
            self._deliveries[d.delivery_id] = bumped
            self._claimed.add(d.delivery_id)
            claimed.append(bumped)
        try:
            for d in claimed:
                await self._write(d)
        except BaseException:
            # Not counted on disk: leave them to the next look rather than claimed for good.
            self._claimed.difference_update(d.delivery_id for d in claimed)
            raise
        return claimed

    async def retry_at(self, delivery: Delivery, next_at_s: float) -> bool:
        if delivery.delivery_id not in self._claimed:
            return False
        current = self._deliveries[delivery.delivery_id]
        scheduled = replace(current, next_at_s=next_at_s)
        self._deliveries[delivery.delivery_id] = scheduled
        self._claimed.discard(delivery.delivery_id)
        await self._write(scheduled)
        return True

    async def remove(self, delivery: Delivery) -> bool:
        if delivery.delivery_id not in self._claimed:
            return False
        self._claimed.discard(delivery.delivery_id)
        del self._deliveries[delivery.delivery_id]
        await self._protect(_unlink_quiet(self._path(delivery.delivery_id)))
        return True

    async def next_due_s(self) -> float | None:
        waiting = [
            d.next_at_s for d in self._deliveries.values() if d.delivery_id not in self._claimed
        ]
        return min(waiting, default=None)

    async def count(self) -> int:
        return len(self._deliveries)

    async def _write(self, delivery: Delivery) -> None:
        data = json.dumps(delivery.to_record(), separators=(",", ":")).encode()
        await self._protect(_write_atomic(self._path(delivery.delivery_id), data))

    async def _protect(self, coro: Coroutine[Any, Any, T]) -> T:
        # The file operation completes even if the caller is cancelled.
        future = asyncio.ensure_future(coro)
        self._writes.add(future)
        future.add_done_callback(self._writes.discard)
        return await asyncio.shield(future)


# KEYS[1] the sorted set; ARGV: hash key prefix, then the delivery's fields.
_ADD = """
local key = ARGV[1] .. ARGV[2]
if redis.call('EXISTS', key) == 1 then return 0 end
redis.call('HSET', key, 'delivery_id', ARGV[2], 'job_id', ARGV[3], 'url', ARGV[4],
  'body', ARGV[5], 'ended_at_s', ARGV[6], 'attempts', ARGV[7], 'next_at_s', ARGV[8], 'lease', '')
redis.call('ZADD', KEYS[1], ARGV[8], ARGV[2])
return 1
"""

# KEYS[1] the sorted set; ARGV: hash key prefix, now, lease end, limit, then one token per claim.
# Each due delivery is moved to the lease's end, its attempts bumped, and the token stored.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for i, id in ipairs(ids) do
  local key = ARGV[1] .. id
  if redis.call('EXISTS', key) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[3], id)
    redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('HSET', key, 'lease', ARGV[4 + i])
    table.insert(out, redis.call('HGETALL', key))
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""

# KEYS[1] the sorted set, KEYS[2] the delivery's hash; ARGV: id, lease token, next attempt time.
_RETRY_AT = """
if redis.call('HGET', KEYS[2], 'lease') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], 'next_at_s', ARGV[3], 'lease', '')
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""

# KEYS[1] the sorted set, KEYS[2] the delivery's hash; ARGV: id, lease token.
_REMOVE = """
if redis.call('HGET', KEYS[2], 'lease') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""


class RedisOutbox:
    """Deliveries in Redis, shared by every API node and worker; claims are leases."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        # The job store's client (decode_responses=True) and key prefix.
        self.redis = client
        self.prefix = prefix
        self._add = client.register_script(_ADD)
        self._claim = client.register_script(_CLAIM)
        self._retry_at = client.register_script(_RETRY_AT)
        self._remove = client.register_script(_REMOVE)

    @property
    def due_key(self) -> str:
        return f"{self.prefix}webhooks"

    @property
    def _hash_prefix(self) -> str:
        return f"{self.prefix}webhook:"

    def delivery_key(self, delivery_id: str) -> str:
        return f"{self._hash_prefix}{delivery_id}"

    async def open(self) -> None:
        """Nothing to load: the state is in Redis (which may be down at start)."""

    async def close(self) -> None:
        """The client is the job store's: it closes it."""

    async def add(self, delivery: Delivery) -> bool:
        r = delivery.to_record()
        fields = ("delivery_id", "job_id", "url", "body", "ended_at_s", "attempts", "next_at_s")
        added = await _aw(
            self._add(keys=[self.due_key], args=[self._hash_prefix, *(r[f] for f in fields)])
        )
        return bool(added)

    async def claim_due(self, now_s: float, limit: int, lease_s: float) -> list[Delivery]:
        if limit <= 0:
            return []
        tokens = [uuid.uuid4().hex for _ in range(limit)]
        rows: list[list[str]] = await _aw(
            self._claim(
                keys=[self.due_key],
                args=[self._hash_prefix, repr(now_s), repr(now_s + lease_s), limit, *tokens],
            )
        )
        claimed = []
        for row in rows:
            record = dict(zip(row[::2], row[1::2], strict=True))
            try:
                claimed.append(Delivery.from_record(record, lease=record["lease"]))
            except (KeyError, ValueError) as exc:
                log.error("webhook_outbox_entry_unreadable", record=record, error=str(exc))
        return claimed

    async def retry_at(self, delivery: Delivery, next_at_s: float) -> bool:
        keys = [self.due_key, self.delivery_key(delivery.delivery_id)]
        args = [delivery.delivery_id, delivery.lease, repr(next_at_s)]
        return bool(await _aw(self._retry_at(keys=keys, args=args)))

    async def remove(self, delivery: Delivery) -> bool:
        keys = [self.due_key, self.delivery_key(delivery.delivery_id)]
        args = [delivery.delivery_id, delivery.lease]
        return bool(await _aw(self._remove(keys=keys, args=args)))

    async def next_due_s(self) -> float | None:
        first = await self.redis.zrange(self.due_key, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def count(self) -> int:
        return int(await _aw(self.redis.zcard(self.due_key)))

    async def get(self, delivery_id: str) -> Delivery | None:
        """The stored delivery (for operators and tests)."""
        record: dict[str, str] = await _aw(self.redis.hgetall(self.delivery_key(delivery_id)))
        return Delivery.from_record(record, lease=record.get("lease", "")) if record else None


async def _aw(value: Awaitable[T] | T) -> T:
    # redis-py types its commands as "sync or async result"; ours are async.
    if inspect.isawaitable(value):
        return await value
    return value


__all__ = ["Delivery", "FileOutbox", "Outbox", "RedisOutbox"]
