"""Every Prometheus series cartd exports, defined in one place.

Each app builds its own `Metrics`, with its own CollectorRegistry rather than the process-wide
default one, so that several apps in one process (the tests run many) neither collide on
registration nor see each other's counts.

Two kinds of series:

- Counters and histograms of *events* (files and bytes staged, bytes served, archive
  requests, checksum failures, retries, evictions, HTTP requests) are incremented where the
  event happens.  They start at zero with each process, which is what Prometheus expects of a
  counter: `rate()` and `increase()` treat the drop at a restart as a reset.
- Gauges of *state* (carts by state, queue depth, fetches in flight, cache space) are set when
  /metrics is scraped, from the database and the running components (see scrape.py).
  Maintaining them with increments in memory would drift from the truth: a restart, a crash
  between a database write and its increment, or `cartd purge` run from another process
  would all leave them wrong until the next restart.  Read at scrape time, they cannot be.

Label values come from small fixed sets (verbs, outcomes, states, formats, route templates);
no cart id, file id or path ever becomes a label, so the number of series stays bounded.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from cartd import __version__

CART_STATES = ("waiting", "staging", "ready", "error")
ARCHIVE_VERBS = ("stage", "status", "open")
ARCHIVE_OUTCOMES = ("ok", "transient", "file_error", "cancelled", "error")
EVICTION_REASONS = ("evicted", "expired")
BUNDLE_FORMATS = ("tar", "zip")
CACHE_KINDS = ("used", "reserved", "free", "total")
HTTP_METHODS = ("GET", "HEAD", "POST", "DELETE", "PUT", "PATCH", "OPTIONS")
# An archive GET lasts as long as its file's transfer: the buckets reach to minutes.
ARCHIVE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The registry and its series; services hold one and call its methods or series."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._events()
        self._state()
        Info("cartd_build", "The running cartd version", registry=self.registry).info(
            {"version": __version__}
        )

    def _events(self) -> None:
        r = self.registry
        self.files_staged = Counter(
            "cartd_files_staged", "Files fetched, verified and committed to the volume", registry=r
        )
        self.bytes_staged = Counter(
            "cartd_staged_bytes", "Bytes of the files counted in cartd_files_staged", registry=r
        )
        self.bytes_served = Counter(
            "cartd_served_bytes", "Bundle bytes sent to clients", ["format"], registry=r
        )
        self.archive_seconds = Histogram(
            "cartd_archive_request_duration_seconds",
            "Archive requests by verb (stage, status, open: a whole transfer) and outcome",
            ["verb", "outcome"],
            buckets=ARCHIVE_BUCKETS,
            registry=r,
        )
        self.archive_errors = Counter(
            "cartd_archive_request_errors",
            "Archive requests that did not succeed, by verb and outcome",
            ["verb", "outcome"],
            registry=r,
        )
        self.checksum_failures = Counter(
            "cartd_checksum_failures", "Downloads whose checksum did not match", registry=r
        )
        self.retries = Counter(
            "cartd_archive_retries", "Archive requests repeated after a transient fault", registry=r
        )
        self.evictions = Counter(
            "cartd_evictions", "Carts removed by the cache (LRU or TTL)", ["reason"], registry=r
        )
        self.http_requests = Counter(
            "cartd_http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "cartd_http_request_duration_seconds",
            "HTTP request durations (for downloads, the whole stream)",
            ["method", "route"],
            registry=r,
        )
        for fmt in BUNDLE_FORMATS:
            self.bytes_served.labels(fmt)
        for reason in EVICTION_REASONS:
            self.evictions.labels(reason)

    def _state(self) -> None:
        r = self.registry
        self.carts = Gauge(
            "cartd_carts",
            "Carts by state in the whole database (deleted ones not counted)",
            ["state"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "cartd_queue_depth",
            "Files of live carts waiting to be staged, in the whole database",
            registry=r,
        )
        self.fetches_in_flight = Gauge(
            "cartd_fetches_in_flight", "File fetches not finished yet in this process", registry=r
        )
        self.cache_bytes = Gauge(
            "cartd_cache_bytes",
            "Volume space: used, reserved by fetches in flight, free (unreserved), total",
            ["kind"],
            registry=r,
        )
        self.database_up = Gauge(
            "cartd_database_up", "1 if the last scrape could read the database", registry=r
        )

    def file_staged(self, size: int) -> None:
        self.files_staged.inc()
        self.bytes_staged.inc(size)

    def archive_request(self, verb: str, outcome: str, seconds: float) -> None:
        self.archive_seconds.labels(verb, outcome).observe(seconds)
        if outcome != "ok":
            self.archive_errors.labels(verb, outcome).inc()

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in HTTP_METHODS else "other"
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_seconds.labels(method, route).observe(seconds)
