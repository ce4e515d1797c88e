"""cartd: stage archive files into a local cache and serve them as one tar stream."""

__version__ = "0.1.0"
