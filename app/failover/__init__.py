"""Crash detection faster than the lease: the leader's liveness beacon and the followers'
detector, on two independent signals.

The rule, its pitfalls and what ZooKeeper, Consul, Chubby and Patroni do are written down in
``app/leadership/__init__.py`` ("Fast crash detection"); this package implements it:

- :mod:`~app.failover.beacon` — while a term acts, the leader holds its liveness lock
  (``app.store.liveness``) on a dedicated Postgres connection.
- :mod:`~app.failover.detector` — every other replica waits on that lock; when it is
  released it confirms that the leader key still carries the same lease and that the
  leader's advertised address refuses connections, then revokes that lease (etcd deletes the
  key, the next candidate's watch fires and it leads). Rate-limited.

The elector knows nothing of this: it stays free of Postgres. Correctness never depends on
it either — a wrong guess costs a needless failover, and the fence keeps two leaders from
both writing.
"""
