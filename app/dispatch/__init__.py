"""The leader's work: drain the queue through the provider, exactly once in effect.

:mod:`~app.dispatch.leader` subscribes to the elector's terms: for each one it raises the
Postgres fence to the term's token first, then runs the :mod:`~app.dispatch.dispatcher`
(recover → claim → call → record) and steps the term down when the work stops making
progress. :mod:`~app.dispatch.provider` calls the payment provider; what its answers mean is
decided in ``app.domain.outcome``.

Timing rule: claiming and calling the provider are *acting as leader* and need remaining
validity (their timeouts are cut to it). Recording the result of a call already made is not:
it is attempted even after validity ran out, because the fence decides — it lands if no
newer leader exists and is rejected (and counted) if one does.
"""
