"""Prepare, list and calibrate the offline competitions.

    python -m exitagent.competitions prepare [--root DIR] [--only iris-species,wine-cultivar]
    python -m exitagent.competitions list
    python -m exitagent.competitions calibrate [--only ...] [--time-limit-s 120]

``calibrate`` runs each competition's reference programs (constant baseline, strong model) in the
``local`` sandbox, grades them like any policy program, and writes their raw scores as worst and
best into ``evaluators/worlds/mle/recorded.json`` (with a digest of the answers they were graded
on). Run it after changing a builder or a reference program, and commit the file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from evaluators.worlds.mle import RECORDED, catalog_ids, prepare, prepare_one, recorded
from evaluators.worlds.mle.catalog import SPECS
from exitagent import config
from exitagent.errors import ExitAgentError, ExitCode, fail
from exitagent.log import configure


async def reference_scores(root: Path, competition_id: str, time_limit_s: float,
                           backend: str = "local") -> dict[str, Any]:
    """Raw scores of the two reference programs, run and graded as a policy program would be."""
    from evaluators.mle import MLEEvaluator
    from evaluators.worlds.mle.references import baseline_program, strong_program

    competition = prepare_one(root, competition_id, record={})  # an empty record: no worst/best needed
    out: dict[str, Any] = {"metric": competition.metric, "answers_sha256": None}
    async with MLEEvaluator(time_limit_s=time_limit_s, backend=backend) as evaluator:
        for name, program in (("worst", baseline_program(competition_id)), ("best", strong_program(competition_id))):
            result, verdict = await evaluator.run_and_grade(competition, program)
            if verdict is None or verdict.raw is None:
                reason = verdict.reason if verdict else result.stderr[-2000:]
                raise ExitAgentError(f"{competition_id}: the {name} reference program failed: {reason}")
            out[name] = verdict.raw  # unrounded: the reference itself must normalise to exactly 0 or 1
    meta = json.loads((competition.root / "competition.json").read_text(encoding="utf-8"))
    out["answers_sha256"] = meta["answers_sha256"]
    return out


def _calibrate(ids: Sequence[str], time_limit_s: float) -> dict[str, Any]:
    values = recorded()
    with tempfile.TemporaryDirectory(prefix="exitagent-calibrate-") as root:
        for competition_id in ids:
            values[competition_id] = anyio.run(reference_scores, Path(root), competition_id, time_limit_s)
            print(f"{competition_id}: {values[competition_id]}", file=sys.stderr)
    body = {"format": 1, "competitions": {k: values[k] for k in sorted(values)}}
    tmp = RECORDED.with_name(RECORDED.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    tmp.replace(RECORDED)
    return body


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exitagent.competitions", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="write the offline competitions (atomic, idempotent)")
    prep.add_argument("--root", type=Path, default=None, help="target directory (default $EXITAGENT_HOME/competitions)")
    prep.add_argument("--only", default="", help="comma-separated competition ids (default: all)")
    commands.add_parser("list", help="the catalog: id, metric, split, worst and best")
    cal = commands.add_parser("calibrate", help="re-derive worst/best from the reference programs")
    cal.add_argument("--only", default="", help="comma-separated competition ids (default: all)")
    cal.add_argument("--time-limit-s", type=float, default=120.0)
    args = config.parse_args(parser, argv, "competitions")
    configure(level="warning")
    ids = [i.strip() for i in getattr(args, "only", "").split(",") if i.strip()] or catalog_ids()
    try:
        if args.command == "prepare":
            for competition in prepare(args.root, ids):
                print(competition.root)  # one prepared directory a line: easy to feed to --source
        elif args.command == "list":
            record = recorded()
            for competition_id, spec in SPECS.items():
                values = record.get(competition_id, {})
                print(f"{competition_id:26s} {spec.metric:9s} {spec.split:8s} "
                      f"worst={values.get('worst')} best={values.get('best')}")
        else:
            _calibrate(ids, args.time_limit_s)
    except ExitAgentError as error:
        return fail(error, "competitions")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
