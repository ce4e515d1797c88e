"""Persistence: the tables and the engine that hold the service's only source of truth."""
