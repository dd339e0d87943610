"""Leadership on etcd: who may act as leader, and for how long it may trust that.

This package knows nothing of Postgres or of what a leader does. The elector
(:mod:`~app.leadership.elector`) publishes :class:`~app.leadership.term.Term` objects to one
subscriber (the dispatch side, ``app.dispatch.leader``), which raises the fence, runs the
work and decides when the work is stuck. The observer (:mod:`~app.leadership.observer`)
tells every replica who leads — only while etcd confirms it: a replica that could not
re-read the election prefix within a lease TTL names no leader ("unknown since …").

Election (etcd's ``concurrency.Election.Campaign`` recipe)
    1. Grant a lease (TTL, default 2 s) and create ``<prefix><lease id>`` only if absent, with
       ``{node_id, url, started_at}`` as its value.
    2. The key with the lowest create revision leads; a waiting candidate watches the key
       just before its own from the revision it read, so no deletion slips by.
    3. The winner checks that its key still exists with its create revision. That revision
       is the **fencing token**: etcd revisions only grow, across leaders and across restarts
       of a healthy cluster. Never the lease id: unique, but not ordered. (A restore from a
       snapshot must use ``etcdutl snapshot restore --bump-revision --mark-compacted``.)
    4. The term is published; the subscriber runs until the term ends.

Validity (the rule that keeps a slow leader harmless even before fencing)
    The leader trusts itself until ``send time of the last confirmed refresh + TTL - margin``
    on the monotonic clock (:meth:`Term.remaining`). etcd extends a lease from when it
    *receives* a refresh, which is no earlier, so the leader stops acting before etcd could
    hand leadership to anyone else. Every call made as leader takes its timeout from
    :meth:`Term.call_timeout`, never longer than the validity left.

Keep-alive (:mod:`~app.leadership.keepalive`)
    Refreshes every TTL/3 from a thread with its own event loop and etcd channel, so a busy
    main loop cannot starve it — but only while the main loop beats: a *blocked* loop must
    not be kept alive as leader by a healthy thread. It lets the lease lapse, another replica
    takes over, and the unblocked loop finds its deadline passed and acts no more.

Ending a term
    Lease lost, validity passed, the subscriber raising or returning (a fence rejection, a
    stall, any error) → the work is cancelled and awaited (bounded), the lease revoked so a
    follower proceeds at once, and the replica campaigns again after a jittered pause.
    Resign (SIGTERM) and handover set ``Term.stopping`` first and give the work
    ``shutdown_grace`` to finish. Every term end is counted by reason
    (``ElectionStats.transitions``: the error's ``step_down_reason``).

Timing budget (TTL 2 s)
    A crashed leader's key disappears when its lease expires: TTL plus etcd's 500 ms expiry
    scan. When etcd's own raft leader changes, etcd re-arms every lease to election timeout
    + TTL. A graceful handover costs one etcd round trip (the lease is revoked). Correctness
    never depends on these numbers — the Postgres fence does — only availability does.
"""
