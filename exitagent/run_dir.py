"""One run directory: every path the processes of a run read or write under ``--run-dir``.

    RUN/store.sqlite             the curriculum store (SQLite; a store URL may keep it elsewhere)
    RUN/config/NAME.json         each command's resolved config
    RUN/metrics/NAME.jsonl       metrics lines (update.jsonl: the trainer's; collectors add -HOST-PID)
    RUN/tracking/                an experiment tracker's own files (``--track wandb``), beside them
    RUN/logs/NAME.log            the logs of the processes ``run`` and ``launch`` start
    RUN/weights/step-N/          checkpoints published for serving
    RUN/trainer/                 the trainer's resumable state
    RUN/eval/NAME.json           evaluation results (base.json, trained.json)
    RUN/train_time.json          the main job's training clock
    RUN/report.md, RUN/report/   the run's report and its figures

The names are written once, here; code that needs a path asks ``RunDir(run_dir)`` for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STORE_FILENAME = "store.sqlite"
TRAIN_CLOCK = "train_time.json"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def store(self) -> Path:
        return self.root / STORE_FILENAME

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def tracking(self) -> Path:
        return self.root / "tracking"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def weights(self) -> Path:
        return self.root / "weights"

    @property
    def trainer(self) -> Path:
        return self.root / "trainer"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def report(self) -> Path:
        """The report's figures; the report itself is ``report_md``."""
        return self.root / "report"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def train_clock(self) -> Path:
        return self.root / TRAIN_CLOCK

    def config(self, name: str) -> Path:
        return self.root / "config" / f"{name}.json"

    def metrics_file(self, name: str) -> Path:
        return self.metrics / f"{name}.jsonl"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def evaluation(self, name: str) -> Path:
        return self.eval / f"{name}.json"
