"""Postgres: the only package that talks SQL (plus ``migrations/``).

Callers get typed functions and domain dataclasses; statements stay here, named.

Fencing rules (enforced by the database itself, ``migrations/versions/0001_initial.py`` and
``0004_fence_guard.py``):

- ``leader_fence`` holds, per queue, the highest token any leader has raised it to.
  :func:`~app.store.fence.raised_fence` moves it only upward (equal = the same leader again),
  taking the row lock that fenced writes wait on; it never creates a row (unknown name: PDF03).
- No statement lowers, renames or deletes a fence row, the owner's included (trigger, PDF04).
  Replicas run as a role that cannot write the table at all except through the raise function
  (:mod:`app.store.roles`, set up by ``paydispatch migrate``), and refuse to start when their
  fence is not the one the triggers enforce (:func:`~app.store.fence.enforced_fence_name`).
- Every leader write carries its token (``fence_token``) and runs
  ``paydispatch_assert_fence`` in the same transaction — first in a fenced transaction, or
  inside the one statement of the hot claim and record (:mod:`app.store.claims`) — which
  reads the fence row ``FOR SHARE``: a write by an old token either commits before the fence
  moves or fails after it (SQLSTATE ``PDF01`` → :class:`~app.errors.StaleLeader`). A
  superseded leader fails fast even when its statement would touch no row.
- Ingest (any replica) inserts ``pending`` rows with no token and never touches claimed rows.
- Leader sessions run with ``idle_in_transaction_session_timeout`` ≤ 1 s, so a leader frozen
  inside a transaction cannot hold the share lock and block the next leader's raise.
"""
