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
    4. The term is published; the subscriber runs until the term ends. The leader watches
       its own key meanwhile: deleted, or overwritten without its lease (an operator's
       ``etcdctl del``/``put``), it ends the term at once — the lease alone would not tell it
       that the next candidate already leads. A waiting candidate treats such an overwrite
       of the key before its own as a deletion (revoking that lease would no longer remove
       it), and only keys with a lease are candidates at all.

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
    Resign (SIGTERM) and handover set ``Term.stopping``, revoke the lease at once (a
    follower leads after one etcd round trip) and only then give the work
    ``shutdown_grace`` to finish; what it can no longer record, the next leader recovers and
    re-sends under the same provider key. Every term end is counted by reason
    (``ElectionStats.transitions``: the error's ``step_down_reason``).

Fast crash detection (``app.failover``; the elector itself stays free of Postgres)
    Rule: a follower may revoke the leader's lease before it expires only on **two
    independent signals** that the leader *process* is gone, checked in this order:
    (1) the leader's session-level Postgres advisory lock, held per token on a dedicated
    connection outside every pool (``app.store.liveness``), is released — a dead process's
    backend sees its socket close and exits within milliseconds; (2) the leader key still
    carries the token *and lease* the follower saw (else it stepped down by itself); (3)
    the leader's advertised address **refuses** a TCP connection (RST: host up, nothing
    listening) — asked three times over 200 ms while it accepts, because a killed process's
    session can end milliseconds before its listener closes. Then it revokes that lease;
    etcd deletes the key and the next candidate leads as always. At most one fast takeover
    per replica per ``PAYDISPATCH_FAST_FAILOVER_MIN_INTERVAL`` (5 s: faults closer together
    than that are not one crash; past it, crashes go the lease path).
    Pitfalls, each guarded:

    - A Postgres restart (or a killed leader backend, a pooler) drops every session lock
      while the leader lives: the lock alone is never enough — the leader's address still
      accepts, so nothing happens, and the leader re-takes its lock when Postgres is back.
      Followers only wait once pg_locks shows the lock granted (before that, acquiring it
      would mean nothing), and a lost connection restarts their wait from scratch.
    - A paused (SIGSTOP, GC, VM freeze) or partitioned leader keeps its sockets: its lock
      stays held and its port still completes the TCP handshake (the kernel answers), so it
      always goes the lease path, and its late writes bounce off the fence.
    - A timeout, "no route" or a DNS failure proves nothing (partition): only a refusal
      counts. A dead *host* therefore also goes the lease path (no RST, no FIN).
    - A wrong ``PAYDISPATCH_ADVERTISE_URL`` (e.g. a loopback address seen from another host)
      could be refused while the leader lives: set it to the address peers reach. Even then
      signal (1) must agree, and fencing turns a wrong guess into a needless failover only.
    - A replica restarted on the dead leader's port accepts again: the fast path declines
      and the lease path takes over (no harm, only slower).
    - Session locks need a session: never put a transaction-mode pooler (pgbouncer) between
      replicas and Postgres for the liveness connection.

    How others do it, and why this differs: ZooKeeper deletes ephemeral nodes only when the
    *server* expires the session (or the client closes it) — crash detection is the session
    timeout, users are told to tune it rather than be clever. Consul invalidates sessions on
    health checks (node gossip by default) and then applies a lock-delay (15 s) before anyone
    may re-acquire; Patroni users hit lost locks on 7-10 s network blips (patroni#522) and
    Vitess found node-level checks miss a crashed process — a check must be about the process
    and must not be a network blip. Chubby's lock-delay exists for servers that cannot check
    sequencers; with sequencers (our fencing token) no delay is needed. Patroni waits for
    the TTL when Patroni itself dies and measures the cost of needless failovers in minutes
    (GitLab's RCAs). Here a needless failover costs one etcd round trip and a fence raise,
    the fence makes it safe, and two signals plus a rate limit keep it rare.

Timing budget (TTL 2 s)
    A crashed leader's key disappears when a follower revokes its lease (fast path: a few ms
    for the lock, one connect, one etcd round trip) or else when its lease expires: TTL plus
    etcd's 500 ms expiry scan. When etcd's own raft leader changes, etcd re-arms every
    lease to election timeout + TTL. A graceful handover costs one etcd round trip (the
    lease is revoked). Correctness never depends on these numbers — the Postgres fence
    does — only availability does.
"""
