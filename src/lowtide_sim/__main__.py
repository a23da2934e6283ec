"""``python -m lowtide_sim [flags]``: run the simulator until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from lowtide_sim.config import parse_args
from lowtide_sim.server import serve


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    try:
        import uvloop  # optional: roughly doubles throughput
    except ImportError:
        uvloop = None

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # not on Windows
                loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    if uvloop is not None:
        uvloop.run(run())
    else:
        asyncio.run(run())


if __name__ == "__main__":
    main()
