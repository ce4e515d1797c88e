#!/bin/sh
# The cartd image's entrypoint.
#
#   (no arguments) or `serve [OPTIONS]`: bring the database schema to this image's version
#       with `cartd db upgrade` (idempotent), then replace this shell with `cartd serve`
#       (exec), so that cartd itself receives the runtime's SIGTERM and shuts down gracefully.
#   anything else: run that cartd command as it is, e.g. `config show`, `db status`,
#       `fsck --repair`, `carts list`, without touching the schema.
#
# Settings come from the environment (CARTD_*), as everywhere else.
set -eu

if [ "$#" -eq 0 ] || [ "$1" = serve ]; then
    [ "$#" -eq 0 ] || shift
    cartd db upgrade
    exec cartd serve "$@"
fi
exec cartd "$@"
