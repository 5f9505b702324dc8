"""Where a run's curriculum store lives, and opening it: SQLite by default, PostgreSQL by URL.

In order: the ``--store`` flag (collect, update, ``curriculum show``), else the one line of
``RUN/store.url``, else ``RUN/store.sqlite``::

    --store postgresql://exit@db.internal:5432/exitagent           # schema: the run directory's name
    --store 'postgresql://exit@db.internal/exitagent?schema=math7'  # or named in the URL

One schema per run: every process of a run must name the same one (same run directory name, or
the same ``?schema=``). A password belongs in ``PGPASSWORD``, ``~/.pgpass`` or ``RUN/store.url``
(mode 600), not on a command line that every user of the machine can read in ``ps``: one there
works, with a warning, and is never written into the run's saved configs.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import structlog

from exitagent.curriculum.store import CurriculumStore, SQLiteStore
from exitagent.errors import ConfigError
from exitagent.run_dir import STORE_FILENAME, RunDir

log = structlog.get_logger(__name__)

URL_FILENAME = "store.url"
STORE_HELP = "curriculum store: postgresql:// URL or SQLite path (default: RUN/store.url, else RUN/store.sqlite)"
SCHEMES = ("postgresql://", "postgres://")


def is_url(target: str | Path) -> bool:
    return str(target).startswith(SCHEMES)


def redact(target: str) -> str:
    """``target`` with any password replaced by ``***`` (for logs, errors and saved configs)."""
    if "://" not in target:
        return target
    parts = urlsplit(target)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = "&".join(re.sub(r"^password=.*", "password=***", piece) for piece in parts.query.split("&"))
    if (netloc, query) == (parts.netloc, parts.query):
        return target  # nothing to hide (and urlunsplit would turn "postgresql:///db" into "postgresql:/db")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def has_password(target: str) -> bool:
    return redact(target) != target


def split_schema(url: str) -> tuple[str, str | None]:
    """(the URL without ``schema=``, which libpq would refuse, and that schema)."""
    # Cut the query by hand: urlunsplit drops an empty host ("postgresql:///db" -> "postgresql:/db"),
    # which is how a URL leaves host, port and user to PGHOST and friends (pg_virtualenv sets them).
    base, _, query = url.partition("?")
    schema = dict(parse_qsl(query)).get("schema")
    kept = "&".join(p for p in query.split("&") if p and not p.startswith("schema="))
    return (f"{base}?{kept}" if kept else base), schema


def schema_for(run_dir: Path) -> str:
    """A run directory's schema name: its own name, lower case, letters, digits and ``_`` only."""
    name = re.sub(r"[^a-z0-9_]", "_", Path(run_dir).resolve().name.lower()) or "run"
    return ("run_" + name if name[0].isdigit() else name)[:63]


def open_store(target: str | Path, *, schema: str | None = None, **options: Any) -> CurriculumStore:
    """A SQLite store at path ``target``, or the PostgreSQL store at URL ``target`` (schema: the
    URL's ``?schema=``, else ``schema``)."""
    if not is_url(target):
        if "://" in str(target):
            raise ConfigError(f"unsupported store URL {redact(str(target))!r}: postgresql://... or a SQLite path")
        return SQLiteStore(target, **options)
    url, named = split_schema(str(target))
    if not (named or schema):
        raise ConfigError(f"a PostgreSQL store needs a schema: add ?schema=NAME to {redact(str(target))}")
    try:
        from exitagent.curriculum.store_pg import PostgresStore
    except ImportError as error:
        raise ConfigError(f"a PostgreSQL store needs psycopg: pip install 'exitagent[postgres]' ({error})") from error
    return PostgresStore(url, schema=str(named or schema), shown=redact(str(target)), **options)


def run_store_target(run_dir: Path, flag: str = "") -> str:
    """The run's store: ``flag``, else ``RUN/store.url``'s URL, else ``RUN/store.sqlite``."""
    if flag:
        if "://" in flag and not is_url(flag):
            raise ConfigError(f"unsupported store URL {redact(flag)!r}: postgresql://... or a SQLite path")
        if has_password(flag):
            log.warning("store_password_on_command_line", store=redact(flag),
                        hint=f"use PGPASSWORD, ~/.pgpass or {URL_FILENAME} in the run directory (mode 600)")
            print(f"warning: the store URL on the command line carries a password, visible to every user in "
                  f"ps; use PGPASSWORD, ~/.pgpass or RUN/{URL_FILENAME} instead", file=sys.stderr)
        return flag
    url_file = Path(run_dir) / URL_FILENAME
    if url_file.exists():
        url = url_file.read_text(encoding="utf-8").strip()
        if not is_url(url):
            raise ConfigError(f"{url_file} must hold one postgresql:// URL, not {redact(url)[:60]!r}")
        return url
    return str(RunDir(Path(run_dir)).store)


def open_run_store(run_dir: Path, flag: str = "", **options: Any) -> CurriculumStore:
    """The store of the run in ``run_dir`` (see the module docstring)."""
    return open_store(run_store_target(run_dir, flag), schema=schema_for(run_dir), **options)


def store_exists(run_dir: Path, flag: str = "") -> bool:
    """Whether opening would find a store rather than create one (a PostgreSQL store: always assumed)."""
    target = run_store_target(run_dir, flag)
    return is_url(target) or Path(target).exists()


def pin_run_store(run_dir: Path, url: str) -> None:
    """Write ``url`` as ``RUN/store.url`` (mode 600), where every process of the run finds it
    without a flag, so no child gets the URL (or its password) on its command line."""
    if not url:
        return
    if not is_url(url):
        raise ConfigError(f"--store takes a postgresql:// URL, not {url!r}")
    run_store_target(run_dir, url)  # the warning, for a password on the command line
    path = Path(run_dir) / URL_FILENAME
    if path.exists():
        if path.read_text(encoding="utf-8").strip() != url:
            raise ConfigError(f"{path} names another store; remove it to move the run (its groups stay behind)")
        return
    if RunDir(Path(run_dir)).store.exists():
        raise ConfigError(f"{run_dir} already keeps its groups in {STORE_FILENAME}: use a new run directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write(url + "\n")
