#!/usr/bin/env bash
# A one-machine rehearsal of a cluster (docs/scaling.md): a throw-away PostgreSQL (pg_virtualenv,
# from Debian's postgresql-common, installed by setup.sh), two CPU vLLM servers on one weights
# directory, two collectors routing over both, and the trainer; the same report as the main job.
#
#   bash scripts/rehearse_cluster.sh [--train-minutes 10] [--run-dir runs/cluster] [any exitagent.run flag]
#
# The PostgreSQL cluster is dropped when the run ends (pg_virtualenv), so a stopped rehearsal cannot
# be continued: start it again with a new --run-dir. With a PostgreSQL of your own, run the same
# processes directly: python -m exitagent.run --servers 2 --collectors 2 --store postgresql://...
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=${EXITAGENT_VENV:-.venv}/bin/python
# pg_virtualenv exports PGHOST/PGPORT/PGUSER/PGPASSWORD; the URL names only the database and schema,
# so no password is ever on a command line.
exec pg_virtualenv "$py" -m exitagent.run --servers 2 --collectors 2 --run-dir runs/cluster \
    --store "postgresql:///postgres?schema=cluster" "$@"
