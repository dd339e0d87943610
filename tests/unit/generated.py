"""Settings shared by the unit tier's generated-input (hypothesis) tests."""

from __future__ import annotations

from hypothesis import settings

# No deadline: the machine is shared and timing is not what these tests check. No example
# database: nothing is written into the work tree.
GENERATED = settings(deadline=None, database=None, max_examples=100)
