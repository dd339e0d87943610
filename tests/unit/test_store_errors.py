"""Postgres failures → typed errors (app.store.engine's pure helpers), on constructed exception
objects: no database involved.

A replica sees asyncpg's exceptions as they are; ``paydispatch migrate`` sees them wrapped by
SQLAlchemy. Both are mapped alike, so both kinds are here."""

from __future__ import annotations

import asyncpg
import pytest
import sqlalchemy.exc

from app.errors import DatabaseUnavailable, StaleLeader, TerminalStateViolation
from app.store.engine import (
    IntegrityViolation,
    is_outage,
    is_unavailable,
    sqlstate_of,
    translate,
)


class DriverError(Exception):
    """A driver exception carrying a SQLSTATE, as asyncpg's do."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def wrapped(orig: BaseException, *, invalidated: bool = False) -> sqlalchemy.exc.DBAPIError:
    """What SQLAlchemy raises around a driver error (``paydispatch migrate``)."""
    return sqlalchemy.exc.DBAPIError(
        "UPDATE payments ...", None, orig, connection_invalidated=invalidated
    )


def postgres_error(sqlstate: str, message: str) -> asyncpg.PostgresError:
    """What asyncpg raises for an error the server sent (our triggers' SQLSTATEs included)."""
    error: asyncpg.PostgresError = asyncpg.PostgresError.new({"C": sqlstate, "M": message})
    return error


def caused_by(cause: BaseException) -> RuntimeError:
    try:
        raise RuntimeError("outer") from cause
    except RuntimeError as exc:
        return exc


# --- sqlstate_of ----------------------------------------------------------------------------


def test_the_sqlstate_is_read_from_the_exception_itself() -> None:
    assert sqlstate_of(DriverError("x", "23505")) == "23505"


def test_the_sqlstate_of_an_asyncpg_error_is_read_even_for_our_own_codes() -> None:
    assert sqlstate_of(postgres_error("PDF01", "fence token 3 < 7")) == "PDF01"


def test_the_sqlstate_is_found_through_sqlalchemys_wrapper() -> None:
    assert sqlstate_of(wrapped(DriverError("x", "PDF01"))) == "PDF01"


def test_the_sqlstate_is_found_through_a_chain_of_causes() -> None:
    assert sqlstate_of(caused_by(caused_by(DriverError("x", "57P01")))) == "57P01"


def test_an_exception_without_a_sqlstate_has_none() -> None:
    assert sqlstate_of(ValueError("no state")) is None
    assert sqlstate_of(DriverError("empty state", "")) is None


def test_a_cycle_of_causes_ends_the_search() -> None:
    first, second = ValueError("a"), ValueError("b")
    first.__cause__, second.__cause__ = second, first

    assert sqlstate_of(first) is None


# --- is_unavailable -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connection refused"),
        OSError("network unreachable"),
        TimeoutError(),
        sqlalchemy.exc.TimeoutError("QueuePool limit reached"),
        wrapped(Exception("server closed the connection"), invalidated=True),
        DriverError("connection failure", "08006"),
        postgres_error("08006", "connection failure"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        postgres_error("57P01", "terminating connection due to administrator command"),
        asyncpg.exceptions.ConnectionDoesNotExistError("closed in the middle of operation"),
        asyncpg.exceptions.InterfaceError("cannot call Connection.fetch(): connection is closed"),
        DriverError("the database system is starting up", "57P03"),
        DriverError("too many connections", "53300"),
        wrapped(asyncpg.exceptions.ConnectionDoesNotExistError("closed mid-operation")),
        caused_by(ConnectionResetError()),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_a_postgres_that_cannot_be_reached_now_is_unavailable(exc: BaseException) -> None:
    assert is_unavailable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        DriverError("duplicate key", "23505"),
        DriverError("relation does not exist", "42P01"),
        DriverError("stale token", "PDF01"),
        postgres_error("PDF01", "stale token"),
        asyncpg.exceptions.UniqueViolationError("duplicate key"),
        asyncpg.exceptions.DataError("invalid input for query argument $1"),
        ValueError("a bug"),
        wrapped(DriverError("syntax error", "42601")),
    ],
    ids=lambda exc: type(exc).__name__ + "-" + str(getattr(exc, "sqlstate", "")),
)
def test_a_bad_query_or_a_rule_violation_is_not_unavailability(exc: BaseException) -> None:
    assert not is_unavailable(exc)


def test_a_driver_interface_error_without_a_sqlstate_is_unavailability() -> None:
    # asyncpg says "connection is closed" with an InterfaceError that carries no SQLSTATE.
    orig = asyncpg.exceptions.InterfaceError("cannot call Connection.fetch(): connection is closed")
    exc = sqlalchemy.exc.InterfaceError("SELECT 1", None, orig)

    assert is_unavailable(exc)


def test_a_raw_connection_broken_under_a_statement_is_unavailability() -> None:
    # The raw asyncpg paths (ingest, the leader's claim and record) see this unwrapped when
    # Postgres ends a session under a statement (a restart); the client retries, so 503.
    exc = asyncpg.exceptions._base.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"
    )

    assert is_unavailable(exc)


# --- translate ------------------------------------------------------------------------------


@pytest.mark.parametrize("sqlstate", ["PDF01", "PDF03"])
def test_a_stale_token_or_unknown_fence_means_this_leader_is_stale(sqlstate: str) -> None:
    typed = translate(wrapped(DriverError("fence token 3 < 7\nCONTEXT: trigger", sqlstate)))

    assert isinstance(typed, StaleLeader)
    assert "Postgres said: fence token 3 < 7" in str(typed)
    assert "CONTEXT" not in str(typed)


@pytest.mark.parametrize("sqlstate", ["PDF01", "PDF03"])
def test_the_fence_triggers_refusal_as_asyncpg_raises_it_means_stale(sqlstate: str) -> None:
    typed = translate(
        asyncpg.PostgresError.new({"C": sqlstate, "M": "fence token 3 < 7", "D": "fence at 7"})
    )

    assert isinstance(typed, StaleLeader)
    assert "Postgres said: fence token 3 < 7" in str(typed)
    assert "DETAIL" not in str(typed)


@pytest.mark.parametrize("raw", [False, True], ids=["wrapped", "asyncpg"])
def test_a_change_to_a_terminal_payment_is_a_terminal_state_violation(raw: bool) -> None:
    error = postgres_error("PDT01", "payment 9 is terminal")
    typed = translate(error if raw else wrapped(DriverError("payment 9 is terminal", "PDT01")))

    assert isinstance(typed, TerminalStateViolation)
    assert str(typed) == "payment 9 is terminal"


@pytest.mark.parametrize("sqlstate", ["PDF02", "PDF04", "PDI01", "PDA01"])
def test_the_other_paydispatch_rules_are_integrity_violations(sqlstate: str) -> None:
    assert isinstance(translate(DriverError("rule broken", sqlstate)), IntegrityViolation)
    assert isinstance(translate(postgres_error(sqlstate, "rule broken")), IntegrityViolation)


def test_an_unreachable_postgres_is_database_unavailable() -> None:
    typed = translate(ConnectionRefusedError(111, "Connection refused"))

    assert isinstance(typed, DatabaseUnavailable)
    assert str(typed).startswith("Postgres is unavailable: ")


def test_an_unreachable_postgres_without_a_message_is_named_by_its_type() -> None:
    assert str(translate(TimeoutError())) == "Postgres is unavailable: TimeoutError"


@pytest.mark.parametrize(
    "exc", [DriverError("duplicate key", "23505"), ValueError("a bug"), KeyError("id")]
)
def test_anything_else_is_left_unclassified(exc: BaseException) -> None:
    assert translate(exc) is None


# --- is_outage: what ingest waits out (a connection failure), and what it does not -----------


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        OSError(113, "No route to host"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        postgres_error("57P01", "terminating connection due to administrator command"),
        postgres_error("57P03", "the database system is starting up"),
        postgres_error("08006", "connection failure"),
        # asyncpg's words for a statement whose session a restart ended under it.
        asyncpg.exceptions._base.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        ),
    ],
    ids=repr,
)
def test_a_connection_that_failed_or_a_server_restarting_is_an_outage(
    exc: BaseException,
) -> None:
    assert is_outage(exc)
    assert is_unavailable(exc)  # an outage is always unavailability too


@pytest.mark.parametrize(
    "exc",
    [
        # A slow server, not an absent one: waiting for it to "come back" proves nothing.
        TimeoutError(),
        postgres_error("53300", "sorry, too many clients already"),
        # Driver state errors would be met again on the next try.
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        postgres_error("23505", "duplicate key value violates unique constraint"),
        postgres_error("PDF01", "fence token 3 < 7"),
        ValueError("a bug"),
    ],
    ids=repr,
)
def test_a_slow_server_a_driver_state_error_or_a_bad_query_is_no_outage(
    exc: BaseException,
) -> None:
    assert not is_outage(exc)
