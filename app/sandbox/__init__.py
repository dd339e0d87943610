"""The stand-in payment provider: a real HTTP server shaped like a card processor.

It de-duplicates charges by idempotency key in a durable SQLite ledger and injects latency,
errors, timeouts, conflicts, declines and lost responses on demand. The CLI serves it with
:func:`serve`; tests, the demo and the load scenarios run it as a child process
(``app.stack.sandbox_process`` and ``app.stack.provider``).

It stands for a third party, so it imports nothing else from ``app``: a fake provider that
shared the replicas' configuration or errors could hide a mismatch a real one would expose.
"""

from app.sandbox.server import create_sandbox_app, run_sandbox, serve
from app.sandbox.settings import SandboxConfigError, SandboxSettings, load_sandbox_settings

__all__ = [
    "SandboxConfigError",
    "SandboxSettings",
    "create_sandbox_app",
    "load_sandbox_settings",
    "run_sandbox",
    "serve",
]
