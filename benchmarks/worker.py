"""One system's worker process: `python -m benchmarks.worker SYSTEM --dsn ... [options]`.

Started (and, if it hangs, killed) by the harness; runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio

from .systems import SYSTEMS, WorkerOptions


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--handler", choices=("noop", "sleep"), default="noop")
    parser.add_argument("--stamps", required=True)
    parser.add_argument("--no-listen", dest="listen", action="store_false")
    args = parser.parse_args()
    options = WorkerOptions(args.dsn, args.concurrency, args.handler, args.stamps, args.listen)
    asyncio.run(SYSTEMS[args.system].serve(options))


if __name__ == "__main__":
    main()
