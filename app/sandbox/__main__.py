"""``python -m app.sandbox``: run the provider, configured by PAYDISPATCH_PROVIDER_* only."""

from __future__ import annotations

import logging
import sys

from app.sandbox.server import serve
from app.sandbox.settings import SandboxConfigError, load_sandbox_settings


def main() -> int:
    """Serve until SIGTERM/SIGINT; exit 2 on bad configuration, 1 if the port is taken."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_sandbox_settings()
    except SandboxConfigError as exc:
        print(f"paydispatch provider: {exc}", file=sys.stderr)
        return 2
    try:
        serve(settings)
    except OSError as exc:  # typically the port is already in use
        print(f"paydispatch provider: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
