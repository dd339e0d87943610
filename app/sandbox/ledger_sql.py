"""The synchronous SQLite half of the ledger; its functions run only in the ledger's threads.

Schema and statements live here, the async facade that owns the threads in
:mod:`app.sandbox.ledger`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import time
from typing import Any

import orjson

from app.sandbox.records import (
    AlreadyCharged,
    Charge,
    ChargeParams,
    InProgress,
    NewCharge,
    Reserved,
    ReserveResult,
)

SCHEMA = """
-- Keys whose first request is under way, with the parameters they were sent with. A charged
-- key is its row in charges; 'completed' rows here are what earlier versions also kept.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key        TEXT PRIMARY KEY,
    state      TEXT NOT NULL CHECK (state IN ('processing', 'completed')),
    amount     INTEGER NOT NULL,
    currency   TEXT NOT NULL,
    reference  TEXT,
    charge_id  TEXT,
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS charges (
    -- A sequence number is never reused, so it is a safe pagination cursor: SQLite gives a
    -- new row the largest rowid + 1, and no charge row is ever deleted. (AUTOINCREMENT would
    -- guarantee it even across deletes, at the price of a sqlite_sequence update per insert.)
    seq             INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    idempotency_key TEXT NOT NULL UNIQUE,
    status          TEXT NOT NULL CHECK (status IN ('succeeded', 'declined')),
    amount          INTEGER NOT NULL,
    currency        TEXT NOT NULL,
    reference       TEXT,
    decline_code    TEXT,
    description     TEXT,
    metadata        TEXT,
    created_at      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_by_reference ON charges (reference, seq);
"""

CHARGE_COLUMNS = (
    "seq, id, idempotency_key, status, amount, currency, reference, decline_code, "
    "description, metadata, created_at"
)


@dataclass(frozen=True, slots=True)
class Failed:
    """A job of a batch that failed (and was rolled back alone)."""

    error: Exception


def charge_from_row(row: Sequence[Any]) -> Charge:
    """A charge from a row selected as CHARGE_COLUMNS."""
    metadata = orjson.loads(row[9]) if row[9] is not None else None
    return Charge(
        sequence=row[0],
        id=row[1],
        idempotency_key=row[2],
        status=row[3],
        amount=row[4],
        currency=row[5],
        reference=row[6],
        decline_code=row[7],
        description=row[8],
        metadata=metadata,
        created_at=row[10],
    )


def connect(path: Path, *, writer: bool, durable: bool) -> sqlite3.Connection:
    """Open the ledger; the writer also sets WAL mode and creates the schema."""
    # isolation_level=None: transactions are opened explicitly, the sqlite3 module adds none.
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    if writer:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            conn.close()
            raise RuntimeError(f"cannot put the ledger {path} in WAL mode (got {mode})")
        # NORMAL in WAL mode loses nothing when the process dies, only on power loss.
        conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        conn.executescript(SCHEMA)
    else:
        conn.execute("PRAGMA query_only=ON")
    return conn


Jobs = list[Callable[[sqlite3.Connection], Any]]


class _JobFailed(Exception):
    """A job of an all-or-nothing batch raised (the cause): run it again job by job."""


def run_batch(conn: sqlite3.Connection, jobs: Jobs) -> list[Any]:
    """Run ``jobs`` in one transaction (one commit); a failing job yields :class:`Failed`
    in its slot, a failing commit raises for all.

    Jobs almost never fail, so the batch first runs without a savepoint per job (two
    statements more per job, the larger part of the writer's work per charge). If one does
    fail, that transaction is rolled back — nothing of it was committed — and the batch runs
    again with a savepoint per job, so that only the failing job is undone. Jobs are pure
    functions of the ledger's state, so the second run does what the first would have."""
    try:
        return _transaction(conn, _all_or_nothing, jobs)
    except _JobFailed:
        return _transaction(conn, _each_alone, jobs)


def _transaction(
    conn: sqlite3.Connection, run: Callable[[sqlite3.Connection, Jobs], list[Any]], jobs: Jobs
) -> list[Any]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        results = run(conn, jobs)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


def _all_or_nothing(conn: sqlite3.Connection, jobs: Jobs) -> list[Any]:
    try:
        return [apply(conn) for apply in jobs]
    except Exception as exc:
        raise _JobFailed from exc


def _each_alone(conn: sqlite3.Connection, jobs: Jobs) -> list[Any]:
    results: list[Any] = []
    for apply in jobs:
        # A savepoint per job: one failing job must not undo the others in the batch.
        conn.execute("SAVEPOINT job")
        try:
            results.append(apply(conn))
        except Exception as exc:
            conn.execute("ROLLBACK TO job")
            results.append(Failed(exc))
        conn.execute("RELEASE job")
    return results


def reserve(key: str, params: ChargeParams, conn: sqlite3.Connection) -> ReserveResult:
    """Mark ``key`` processing if it is new, else report what the ledger holds for it."""
    inserted = conn.execute(
        "INSERT INTO idempotency_keys (key, state, amount, currency, reference, created_at) "
        "SELECT ?, 'processing', ?, ?, ?, ? "
        "WHERE NOT EXISTS (SELECT 1 FROM charges WHERE idempotency_key = ?) "
        "ON CONFLICT (key) DO NOTHING",
        (key, params.amount, params.currency, params.reference, time(), key),
    ).rowcount
    if inserted == 1:
        return Reserved()
    return _existing(key, conn)


def charge_at_once(new: NewCharge, conn: sqlite3.Connection) -> ReserveResult | Charge:
    """``reserve`` then ``complete`` in one job, for a charge with no latency to play: the
    charge if the key is new, else what the ledger holds for it (as ``reserve`` says).

    One statement: the charge row, unless its key was charged already (the UNIQUE key of
    ``charges``) or is reserved by a request still under way (another process sharing the
    file). Nothing goes to ``idempotency_keys``: a completed key is its charge row. One
    INSERT fewer per charge, and one job instead of two halves the thread hand-offs and
    commits per charge."""
    cursor = conn.execute(
        f"INSERT INTO charges ({_INSERTED_COLUMNS}) SELECT ?,?,?,?,?,?,?,?,?,? "
        "WHERE NOT EXISTS (SELECT 1 FROM idempotency_keys WHERE key = ?) "
        "ON CONFLICT (idempotency_key) DO NOTHING",
        (*_charge_values(new), new.idempotency_key),
    )
    if cursor.rowcount == 1:
        return _inserted(new, cursor)
    return _existing(new.idempotency_key, conn)


def _existing(key: str, conn: sqlite3.Connection) -> ReserveResult:
    row = conn.execute(
        f"SELECT {CHARGE_COLUMNS} FROM charges WHERE idempotency_key = ?", (key,)
    ).fetchone()
    if row is not None:
        return AlreadyCharged(charge_from_row(row))
    reserved = conn.execute(
        "SELECT state, amount, currency, reference FROM idempotency_keys WHERE key = ?", (key,)
    ).fetchone()
    if reserved is None or reserved[0] != "processing":
        # Cannot happen: the caller's INSERT just found the key charged or reserved, in
        # this same transaction (a ``completed`` row is what earlier versions kept).
        raise RuntimeError(f"idempotency key {key!r} is neither charged nor in progress")
    return InProgress(ChargeParams(reserved[1], reserved[2], reserved[3]))


def complete(new: NewCharge, conn: sqlite3.Connection) -> Charge:
    """Record the charge and drop its reservation (the caller's transaction makes the two
    one): from now on the charge row is what says the key was used."""
    charge = _insert_charge(new, conn)
    conn.execute("DELETE FROM idempotency_keys WHERE key = ?", (new.idempotency_key,))
    return charge


_INSERTED_COLUMNS = (
    "id, idempotency_key, status, amount, currency, reference, decline_code, description, "
    "metadata, created_at"
)


def _charge_values(new: NewCharge) -> tuple[Any, ...]:
    params = new.params
    # orjson: compact UTF-8 (the stdlib wrote \u escapes and spaces): the same mapping
    # when read back, by either decoder.
    metadata = orjson.dumps(new.metadata).decode() if new.metadata is not None else None
    return (
        new.id,
        new.idempotency_key,
        new.status,
        params.amount,
        params.currency,
        params.reference,
        new.decline_code,
        new.description,
        metadata,
        new.created_at,
    )


def _insert_charge(new: NewCharge, conn: sqlite3.Connection) -> Charge:
    """Insert the charge row; the caller completes its key in the same transaction."""
    # Fails on the UNIQUE idempotency_key if the key was ever charged: at most once, always.
    cursor = conn.execute(
        f"INSERT INTO charges ({_INSERTED_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
        _charge_values(new),
    )
    return _inserted(new, cursor)


def _inserted(new: NewCharge, cursor: sqlite3.Cursor) -> Charge:
    sequence = cursor.lastrowid
    assert sequence is not None
    params = new.params
    return Charge(
        sequence=sequence,
        id=new.id,
        idempotency_key=new.idempotency_key,
        status=new.status,
        amount=params.amount,
        currency=params.currency,
        reference=params.reference,
        decline_code=new.decline_code,
        description=new.description,
        metadata=new.metadata,
        created_at=new.created_at,
    )


def release(key: str, conn: sqlite3.Connection) -> None:
    """Forget a reservation that never completed; a completed key is left alone."""
    conn.execute("DELETE FROM idempotency_keys WHERE key = ? AND state = 'processing'", (key,))
