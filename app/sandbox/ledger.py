"""The provider's durable ledger: charges and idempotency keys in one SQLite file.

Two tables. ``charges`` holds the charges; its ``idempotency_key`` is UNIQUE, so even a bug
above this layer cannot charge a key twice, and a key's charge row is what says it was used.
``idempotency_keys`` holds the keys whose first request is still under way (``processing``),
with the parameters they were first sent with. Completing a key inserts its charge and
deletes its reservation in ONE transaction, so "charged" and "recorded" cannot drift apart:
a key left ``processing`` by a crash was never charged and is deleted on the next start.
Earlier versions also kept a ``completed`` row per charged key; such files read correctly
(a key's charge row is looked up first). The reverse does not hold: an earlier version
answers 500 to a replay of a key charged by this one (never a second charge), so do not
share one file between versions.

SQLite never runs on the event loop. All writes go through one connection owned by one
thread, fed by a writer task that commits every job queued meanwhile in one transaction
(group commit): under load one commit carries hundreds of jobs, when idle a job commits at
once. Jobs run in submission order, which the server relies on (a release queued after a
completion is a no-op). Reads use a second connection in its own thread; in WAL mode they see
only committed rows and never wait for the writer.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from app.sandbox import ledger_sql as sql
from app.sandbox.records import (
    Charge,
    ChargePage,
    ChargeParams,
    LedgerClosed,
    LedgerCounts,
    NewCharge,
    ReserveResult,
)

log = logging.getLogger("paydispatch.provider.ledger")

T = TypeVar("T")

# Bounds one transaction, so one commit never holds the write lock for long.
MAX_BATCH = 512


@dataclass(slots=True)
class _Job(Generic[T]):
    apply: Callable[[sqlite3.Connection], T]
    future: asyncio.Future[T]


class Ledger:
    """Async facade over the SQLite ledger. Open with :meth:`open`, stop with :meth:`close`."""

    def __init__(
        self,
        path: Path,
        writer: sqlite3.Connection,
        reader: sqlite3.Connection,
        write_pool: ThreadPoolExecutor,
        read_pool: ThreadPoolExecutor,
    ) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._write_pool = write_pool
        self._read_pool = read_pool
        self._queue: asyncio.Queue[_Job[Any] | None] = asyncio.Queue()
        self._closed = False
        # Kept: asyncio.get_running_loop() costs a getpid() system call per call on
        # Python 3.11, and _submit runs once per charge.
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._write_loop(), name="ledger")

    @classmethod
    async def open(cls, path: Path, *, durable: bool = False) -> Ledger:
        """Open (creating if needed) the ledger at ``path`` and forget keys a crash left
        ``processing``: they were never charged."""
        loop = asyncio.get_running_loop()
        path.parent.mkdir(parents=True, exist_ok=True)
        # One thread per connection: sqlite3 connections stay in the thread that made them.
        write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")
        read_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-reader")
        try:
            writer = await loop.run_in_executor(
                write_pool, lambda: sql.connect(path, writer=True, durable=durable)
            )
            stale = await loop.run_in_executor(
                write_pool,
                lambda: (
                    writer.execute(
                        "DELETE FROM idempotency_keys WHERE state = 'processing'"
                    ).rowcount
                ),
            )
            reader = await loop.run_in_executor(
                read_pool, lambda: sql.connect(path, writer=False, durable=durable)
            )
        except BaseException:
            write_pool.shutdown(wait=False)
            read_pool.shutdown(wait=False)
            raise
        if stale:
            log.warning("forgot %d idempotency keys left processing by a crash", stale)
        return cls(path, writer, reader, write_pool, read_pool)

    async def close(self) -> None:
        """Run every write already submitted, then close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        await asyncio.shield(self._task)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._write_pool, self._writer.close)
        await loop.run_in_executor(self._read_pool, self._reader.close)
        self._write_pool.shutdown(wait=True)
        self._read_pool.shutdown(wait=True)

    # --- writes -------------------------------------------------------------------------

    def _submit(self, apply: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._closed:
            raise LedgerClosed("the provider ledger is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put_nowait(_Job(apply, future))
        return future

    async def reserve(self, key: str, params: ChargeParams) -> ReserveResult:
        """Mark ``key`` processing if it is new, else say what the ledger has for it."""
        return await self._submit(lambda conn: sql.reserve(key, params, conn))

    async def charge_at_once(self, new: NewCharge) -> ReserveResult | Charge:
        """``reserve`` and ``complete`` as one write (no latency between them): the new
        charge, or what the ledger already holds for its key."""
        return await self._submit(lambda conn: sql.charge_at_once(new, conn))

    async def complete(self, new: NewCharge) -> Charge:
        """Record the charge and complete its key, atomically. Once submitted the write
        happens even if the caller is cancelled while waiting."""
        return await self._submit(lambda conn: sql.complete(new, conn))

    def release_nowait(self, key: str) -> None:
        """Forget a reservation that will never complete (no-op once completed)."""
        try:
            future = self._submit(lambda conn: sql.release(key, conn))
        except LedgerClosed:
            return  # the next start deletes rows left processing
        future.add_done_callback(_log_failure)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            # Let the handlers whose requests have already arrived queue their writes too:
            # one thread hand-off and one commit then carry them all. A hand-off costs
            # several system calls (lock, wake-up, the loop's self-pipe), more than the
            # SQLite write itself on this machine; when idle this costs one loop turn.
            for _ in range(2):
                await asyncio.sleep(0)
            batch = [first]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                job = self._queue.get_nowait()
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            applies = [job.apply for job in batch]
            try:
                results = await loop.run_in_executor(
                    self._write_pool, sql.run_batch, self._writer, applies
                )
            except Exception as exc:
                log.exception("ledger commit failed for %d writes", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, result in zip(batch, results, strict=True):
                if job.future.done():  # its caller was cancelled; the write still happened
                    continue
                if isinstance(result, sql.Failed):
                    job.future.set_exception(result.error)
                else:
                    job.future.set_result(result)

    # --- reads --------------------------------------------------------------------------

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise LedgerClosed("the provider ledger is closed")
        return await asyncio.get_running_loop().run_in_executor(
            self._read_pool, query, self._reader
        )

    async def get_charge(self, charge_id: str) -> Charge | None:
        """The charge with this id, if any."""

        def query(conn: sqlite3.Connection) -> Charge | None:
            row = conn.execute(
                f"SELECT {sql.CHARGE_COLUMNS} FROM charges WHERE id = ?", (charge_id,)
            ).fetchone()
            return sql.charge_from_row(row) if row is not None else None

        return await self._read(query)

    async def list_charges(
        self,
        *,
        after: int,
        limit: int,
        idempotency_key: str | None = None,
        reference: str | None = None,
    ) -> ChargePage:
        """Charges with sequence > ``after``, oldest first, optionally filtered."""
        clauses = ["seq > ?"]
        args: list[Any] = [after]
        if idempotency_key is not None:
            clauses.append("idempotency_key = ?")
            args.append(idempotency_key)
        if reference is not None:
            clauses.append("reference = ?")
            args.append(reference)
        statement = (
            f"SELECT {sql.CHARGE_COLUMNS} FROM charges WHERE {' AND '.join(clauses)} "
            "ORDER BY seq LIMIT ?"
        )
        args.append(limit + 1)  # one extra row tells whether another page exists

        def query(conn: sqlite3.Connection) -> ChargePage:
            rows = conn.execute(statement, args).fetchall()
            charges = [sql.charge_from_row(row) for row in rows[:limit]]
            return ChargePage(charges, has_more=len(rows) > limit)

        return await self._read(query)

    async def counts(self) -> LedgerCounts:
        """Charges by status and the highest sequence number."""

        def query(conn: sqlite3.Connection) -> LedgerCounts:
            by_status = dict(
                conn.execute("SELECT status, COUNT(*) FROM charges GROUP BY status").fetchall()
            )
            last = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM charges").fetchone()[0]
            return LedgerCounts(
                succeeded=by_status.get("succeeded", 0),
                declined=by_status.get("declined", 0),
                last_sequence=last,
            )

        return await self._read(query)


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.error("could not release an idempotency key: %s", exc)
