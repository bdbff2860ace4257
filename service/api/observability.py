"""Prometheus metrics of one API process (its own registry, so tests can build many apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _JobsByStatus(Collector):
    """jobs by status, read from the database at scrape time (true across all API processes)."""

    def __init__(self, count: Callable[[], dict[str, int]], statuses: Iterable[str]) -> None:
        self.count, self.statuses = count, sorted(statuses)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("rsavq_jobs", "jobs in the database, by status", labels=["status"])
        counted = self.count()
        for status in self.statuses:  # every status, zero too: a series that vanishes reads as "no data"
            family.add_metric([status], counted.get(status, 0))
        yield family


class Metrics:
    def __init__(self, count_jobs: Callable[[], dict[str, int]], statuses: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rsavq_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "rsavq_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.jobs_submitted = Counter("rsavq_jobs_submitted", "jobs accepted", ["method"], registry=self.registry)
        self.registry.register(_JobsByStatus(count_jobs, statuses))
