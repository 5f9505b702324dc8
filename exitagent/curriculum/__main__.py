"""Show a run's buffer: ``python -m exitagent.curriculum show RUN_DIR [--plot out.png]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from exitagent.curriculum.view import format_collectors, format_summary, plot, summarize
from exitagent.log import configure, read_metrics
from exitagent.store import STORE_FILENAME, SQLiteStore


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exitagent.curriculum", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print the buffer of a run (and plot it)")
    show.add_argument("run_dir", type=Path)
    show.add_argument("--plot", type=Path, default=None, help="write curriculum plots to this PNG")
    args = parser.parse_args(argv)
    configure(level="warning")
    path = args.run_dir / STORE_FILENAME
    if not path.exists():  # opening would create an empty store
        print(f"no curriculum store at {path}", file=sys.stderr)
        return 2
    with SQLiteStore(path) as store:
        entries, groups = store.entries(), store.groups()
    print(format_summary(summarize(entries, groups)))
    print(format_collectors(read_metrics(args.run_dir, "collect", "group")))  # every collector's file
    if args.plot:
        plot(groups, args.plot)
        print(f"plots written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
