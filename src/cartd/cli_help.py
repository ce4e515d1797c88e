"""The operator's manual for `cartd --help` and every `cartd COMMAND --help`.

Kept apart from the parser so the text reads as a page.  Each page says what the command
does, shows examples (a test parses every one of them), and lists its exit codes.
"""

from __future__ import annotations

MAIN = """\
cartd stages files from a Pacifica archive interface into a local cache (the volume) and
serves them over HTTP as tar or zip "carts". It is a drop-in replacement for pacifica-cartd.

Every setting comes from the environment: CARTD_* variables, plus upstream pacifica-cartd
names such as VOLUME_PATH. `cartd config show` prints what is in effect. Every command
below uses the same settings as the service.
"""

MAIN_EPILOG = """\
Examples:
  cartd serve                       run the service on 127.0.0.1:8081
  cartd config show                 print the effective settings, secrets masked
  cartd db status                   is the database schema up to date?
  cartd db upgrade                  create or upgrade the database schema
  cartd carts list                  every cart with its state, size and last use
  cartd purge --older-than 30d      delete finished carts unused for 30 days
  cartd fsck                        check the database against the volume
  cartd openapi -o docs/openapi.json  write the OpenAPI document

Exit status:
  0  success
  1  the command failed; the reason is on stderr
  2  usage error, or a setting is invalid (each problem is named)
  Some commands add codes of their own: see `cartd COMMAND --help`.
"""

SERVE = """\
Run the HTTP API and the staging worker in one process, until SIGTERM or SIGINT.

At start-up cartd waits for the database (CARTD_DATABASE_CONNECT_ATTEMPTS tries,
CARTD_DATABASE_CONNECT_WAIT seconds apart) and checks its schema:
  - an empty database gets the schema (a fresh install needs no set-up step);
  - a schema at this cartd's revision starts as it is;
  - a schema behind it is refused, with the command that fixes it (`cartd db upgrade`),
    unless CARTD_AUTO_MIGRATE=1, which upgrades it at start-up;
  - a schema written by a newer cartd is refused.
Then it reconciles the volume with the database and resumes unfinished carts.
On SIGTERM it stops staging at once (it resumes at the next start) and gives downloads in
flight CARTD_SHUTDOWN_GRACE seconds to finish.
"""

SERVE_EPILOG = """\
Examples:
  cartd serve
  cartd serve --host 0.0.0.0 --port 8081
  cartd serve --log-level debug

Exit status:
  on SIGTERM or SIGINT it shuts down gracefully, then ends by that signal (143 or 130)
  1  the database is unreachable, or its schema is refused (the message names the fix)
  3  start-up failed otherwise, e.g. another cartd holds the volume
"""

HEALTHCHECK = """\
Ask a running service whether it is alive (GET /healthz), as the container's HEALTHCHECK
does. The URL defaults to this machine's CARTD_PORT, on CARTD_HOST or, when that is a
wildcard such as 0.0.0.0, on 127.0.0.1. Prints the answer on one line.
"""

HEALTHCHECK_EPILOG = """\
Examples:
  cartd healthcheck
  cartd healthcheck --url http://127.0.0.1:8081/readyz --timeout 5

Exit status:
  0  the service answered 2xx
  1  it did not: no answer, a timeout, or another status
"""

DB = """\
Database schema maintenance. The schema's revision is kept in the alembic_version table;
the migrations ship inside cartd. Back up the database before an upgrade or a downgrade.
"""

DB_EPILOG = """\
Examples:
  cartd db status
  cartd db upgrade
  cartd db downgrade 0002

Exit status: see each subcommand.
"""

DB_UPGRADE = """\
Bring the schema to this cartd's revision (the head). Safe to repeat: at the head it does
nothing. Run it before starting a new cartd version on an existing database, or set
CARTD_AUTO_MIGRATE=1 to let `cartd serve` do it. It refuses a schema written by a newer
cartd, and cartd's tables without a recorded revision.
"""

DB_UPGRADE_EPILOG = """\
Examples:
  cartd db upgrade
  CARTD_DATABASE_URL=mysql+aiomysql://cartd:PASSWORD@db/cartd cartd db upgrade

Exit status:
  0  the schema is at the head (upgraded, or already there)
  1  the upgrade failed or was refused; the reason is on stderr
"""

DB_DOWNGRADE = """\
Step the schema back to REVISION, to roll back to an older cartd. Run it with the newer
cartd (the one that has the downgrade steps), with the service stopped. `base` drops every
cartd table, and with them every cart.
"""

DB_DOWNGRADE_EPILOG = """\
Examples:
  cartd db downgrade 0002
  cartd db downgrade base

Exit status:
  0  the schema is at REVISION
  1  the downgrade failed (e.g. an unknown revision); the reason is on stderr
"""

DB_STATUS = """\
Print the database's schema revision, this cartd's head revision, and what to do.
"""

DB_STATUS_EPILOG = """\
Examples:
  cartd db status

Exit status:
  0  up to date
  1  empty or behind: run `cartd db upgrade`
  3  not usable by this cartd: a newer cartd's revision, or tables without a revision
"""

CONFIG = """\
Inspect the configuration. Settings come only from the environment (CARTD_* and the
upstream names); the README's configuration table explains each one.
"""

CONFIG_EPILOG = """\
Examples:
  cartd config show
  cartd config show --json

Exit status: see `cartd config show --help`.
"""

CONFIG_SHOW = """\
Print every setting: its variable, the value cartd uses, and where that value came from
(`env NAME` for the variable that set it, or `default`). Secrets are masked: passwords in
URLs, secret-looking URL query values, and settings named like a password, secret, token
or key. Safe to paste into a ticket.
"""

CONFIG_SHOW_EPILOG = """\
Examples:
  cartd config show
  cartd config show --json
  CARTD_PORT=9000 cartd config show

Exit status:
  0  printed
  2  a setting is invalid; each problem is named
"""

CARTS = """\
Inspect carts, with or without a running service (the database is the source of truth).
"""

CARTS_EPILOG = """\
Examples:
  cartd carts list

Exit status: 0 listed, 1 failed (e.g. the database is unreachable or its schema is behind).
"""

CARTS_LIST = """\
Print every cart with its state, files, bytes held, last use and expiry, the least recently
used first (the order eviction takes them in).
"""

CARTS_LIST_EPILOG = """\
Examples:
  cartd carts list

Exit status: 0 listed, 1 failed.
"""

PURGE = """\
Delete finished carts (ready or error) not used for a while, with their files. Carts still
staging are left alone. Safe while the service runs: a purged cart then answers 404.
"""

PURGE_EPILOG = """\
Examples:
  cartd purge --older-than 30d
  cartd purge --older-than 12h

Exit status: 0 done (prints each purged cart and a count), 1 failed or a bad duration.
"""

FSCK = """\
Check that the database and the volume agree: stray cart directories and files, `.part`
leftovers, staged rows whose file is missing or has the wrong size, and carts whose state
contradicts their files. Stop the service first: it refuses to run on a volume in use.
"""

FSCK_EPILOG = """\
Examples:
  cartd fsck
  cartd fsck --checksums
  cartd fsck --repair

Exit status:
  0  consistent (or everything was repaired)
  1  disagreements remain, or the database is unusable (unreachable, schema not current)
  2  the volume is in use by a running cartd
"""

OPENAPI = """\
Print the service's OpenAPI document, built from the code alone: no database, volume or
archive is touched. docs/openapi.json is this output; CI fails when they differ.
"""

OPENAPI_EPILOG = """\
Examples:
  cartd openapi
  cartd openapi -o docs/openapi.json

Exit status:
  0  the document was written
  1  it could not be written (the reason is on stderr)
"""
