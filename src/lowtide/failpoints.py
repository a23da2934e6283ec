"""Named points where a test can have this process killed for real, to prove crash safety.

`LOWTIDE_FAILPOINTS=upstream_batch_created,...` makes the process SIGKILL itself the first
time it reaches one of the named points: no cleanup, no flush, exactly like a power cut there.
Unset (always, outside tests), a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_ARMED = frozenset(filter(None, os.environ.get("LOWTIDE_FAILPOINTS", "").split(",")))


def reach(name: str) -> None:
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
