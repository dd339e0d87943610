"""The stand-in payment provider: a real HTTP server shaped like a card processor.

It de-duplicates charges by idempotency key in a durable SQLite ledger and injects latency,
errors, timeouts, conflicts, declines and lost responses on demand. Tests, the demo and the
load scenarios run it as a separate process (:func:`start_sandbox_process`), the CLI serves
it with :func:`run_sandbox`.
"""

from app.sandbox.process import SandboxProcess, start_sandbox_process, stop_sandbox_process
from app.sandbox.server import create_sandbox_app, run_sandbox
from app.sandbox.settings import SandboxSettings, load_sandbox_settings

__all__ = [
    "SandboxProcess",
    "SandboxSettings",
    "create_sandbox_app",
    "load_sandbox_settings",
    "run_sandbox",
    "start_sandbox_process",
    "stop_sandbox_process",
]
