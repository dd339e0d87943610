"""The payment domain: types, states, provider outcomes and the retry policy. No I/O.

Payment states (:mod:`~app.domain.states`)::

    pending ──claim (token T)──▶ in_flight ──▶ succeeded | declined | failed      (terminal)
       ▲                             │
       └──── retry with backoff ─────┤
                                     └──▶ needs_reconciliation ──look-up──▶ terminal

Rules (the database enforces the first two by trigger, see ``migrations/``):

- Terminal states never change again; a payment's request fields never change at all.
- Every provider call for a payment carries the payment's own idempotency key and identical
  parameters, so any retry — by this leader or the next — is answered with the original
  result instead of a second charge (:class:`~app.domain.payment.ChargeRequest`).
- A transient answer (409, 429, 5xx, timeout, lost connection) is retried with backoff and
  jitter under the same key (:mod:`~app.domain.retry`); past the attempt budget or near the
  provider's key retention a payment is never re-sent blind but reconciled by looking the
  key up.
- What a provider answer means is decided in one place, :mod:`~app.domain.outcome`.
"""
