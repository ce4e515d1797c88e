"""Schema migrations.

Installed as the `cartd.migrations` package so that `cartd db upgrade` finds them.
"""
