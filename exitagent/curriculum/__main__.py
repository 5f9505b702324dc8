"""Show a run's buffer: ``python -m exitagent.curriculum show RUN_DIR [--store URL] [--plot out.png]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from exitagent import config
from exitagent.curriculum.store_url import STORE_HELP, open_run_store, run_store_target, store_exists
from exitagent.curriculum.view import format_collectors, format_summary, plot, summarize
from exitagent.errors import ExitAgentError, ExitCode, fail
from exitagent.log import configure, read_metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exitagent.curriculum", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print the buffer of a run (and plot it)")
    show.add_argument("run_dir", type=Path)
    show.add_argument("--plot", type=Path, default=None, help="write curriculum plots to this PNG")
    show.add_argument("--store", default="", help=STORE_HELP)
    args = config.parse_args(parser, argv, "curriculum")
    configure(level="warning")
    try:
        if not store_exists(args.run_dir, args.store):  # opening would create an empty store
            print(f"no curriculum store at {run_store_target(args.run_dir, args.store)}", file=sys.stderr)
            return ExitCode.USAGE
        with open_run_store(args.run_dir, args.store) as store:
            entries, groups = store.entries(), store.groups()
    except ExitAgentError as error:  # an unreachable server, a refused login, a bad store.url
        return fail(error, "curriculum show")
    print(format_summary(summarize(entries, groups)))
    print(format_collectors(read_metrics(args.run_dir, "collect", "group")))  # every collector's file
    if args.plot:
        plot(groups, args.plot)
        print(f"plots written to {args.plot}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
