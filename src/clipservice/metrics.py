"""Prometheus metrics, one registry per application.

Each app owns a :class:`Metrics` with its own ``CollectorRegistry``, so two
services in one process (tests, benchmarks) never share or collide on
counters. Every clip attempt (:mod:`clipservice.jobs.attempt`, in either
runner) records clips, cuts, queue waits and bytes, and every resolve its
time and errors; the HTTP middleware records requests; gauges that describe
the present (jobs by state, FFmpeg processes) are read when scraped. A
``clipservice worker`` records into a registry of its own, which no endpoint
serves yet.

The autoscaling signals (queue depth, oldest queued task's age, clips in
flight per worker, live workers) come from the runner's
:class:`~clipservice.jobs.backlog.Backlog`, read by the ``/metrics`` handler
on every scrape and exported by :class:`QueueCollector` as that snapshot: a
worker that went away leaves no stale series behind.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from clipservice.jobs.backlog import QueueStats
from clipservice.jobs.models import Job, JobStatus
from clipservice.media.ffmpeg import running_processes

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds: from a sub-second stream copy up to the default clip timeout.
_CUT_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
_WAIT_BUCKETS_S = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900)
_RESOLVE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
_LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_HTTP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class QueueCollector(Collector):
    """The queue's gauges, as last read (by the ``/metrics`` handler, just before export)."""

    def __init__(self) -> None:
        self.stats: QueueStats | None = None

    def describe(self) -> Iterator[Metric]:
        return self._families(QueueStats(depth={}, oldest_age_s={}))

    def collect(self) -> Iterator[Metric]:
        # Nothing (rather than stale numbers) when the queue could not be read.
        return self._families(self.stats) if self.stats is not None else iter(())

    @staticmethod
    def _families(stats: QueueStats) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "clipservice_queue_depth",
            "Tasks queued and not started, by queue (clips: clips; jobs: jobs "
            "waiting for their source to be resolved).",
            labels=["queue"],
        )
        for name, n in stats.depth.items():
            depth.add_metric([name], n)
        oldest = GaugeMetricFamily(
            "clipservice_queue_oldest_age_seconds",
            "How long the oldest queued task has waited to start, by queue (0 when none waits).",
            labels=["queue"],
        )
        for name, age_s in stats.oldest_age_s.items():
            oldest.add_metric([name], age_s)
        in_flight = GaugeMetricFamily(
            "clipservice_clips_in_flight",
            "Clips (cuts and reels) running now, by worker (live idle workers show 0).",
            labels=["worker"],
        )
        for worker, n in stats.in_flight.items():
            in_flight.add_metric([worker], n)
        workers = GaugeMetricFamily(
            "clipservice_workers", "Live worker processes (1 for the in-process runner)."
        )
        workers.add_metric([], stats.workers)
        yield from (depth, oldest, in_flight, workers)


class Metrics:
    """The service's metrics and the registry they are exported from."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Gauge("clipservice_jobs", "Jobs held, by state.", ["state"], registry=r)
        self.clips = Counter(
            "clipservice_clips",
            "Clips attempted, by outcome (ok or an error code) and cut mode.",
            ["outcome", "mode"],
            registry=r,
        )
        self.cut_seconds = Histogram(
            "clipservice_clip_cut_seconds",
            "Time to produce one clip once it had an FFmpeg slot, by cut mode.",
            ["mode"],
            buckets=_CUT_BUCKETS_S,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "clipservice_clip_queue_wait_seconds",
            "Time a clip waited for an FFmpeg slot.",
            buckets=_WAIT_BUCKETS_S,
            registry=r,
        )
        self.ffmpeg_running = Gauge(
            "clipservice_ffmpeg_processes", "FFmpeg processes running now.", registry=r
        )
        self.ffmpeg_running.set_function(lambda: len(running_processes))
        self.resolve_seconds = Histogram(
            "clipservice_resolve_seconds",
            "Time to resolve a job's source into stream URLs.",
            buckets=_RESOLVE_BUCKETS_S,
            registry=r,
        )
        self.resolve_errors = Counter(
            "clipservice_resolve_errors",
            "Failed source resolutions, by code.",
            ["code"],
            registry=r,
        )
        self.bytes_written = Counter(
            "clipservice_clip_bytes_written",
            "Bytes of clip files written (reused files not counted).",
            registry=r,
        )
        self.http_requests = Counter(
            "clipservice_http_requests",
            "HTTP requests answered, by method, route and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "clipservice_http_request_seconds",
            "HTTP request handling time, by route.",
            ["route"],
            buckets=_HTTP_BUCKETS_S,
            registry=r,
        )
        self.sse_listeners = Gauge(
            "clipservice_sse_listeners", "Open job event streams.", registry=r
        )
        self.loop_lag_seconds = Histogram(
            "clipservice_event_loop_lag_seconds",
            "How late a timer on the event loop fires: blocking calls or CPU starvation.",
            buckets=_LAG_BUCKETS_S,
            registry=r,
        )
        self.draining = Gauge(
            "clipservice_draining", "1 while the service is shutting down.", registry=r
        )
        self.jobs_refused = Counter(
            "clipservice_jobs_refused",
            "Job creations refused with 503, by reason (queue_full: past [queue] max_depth).",
            ["reason"],
            registry=r,
        )
        self.jobs_refused.labels("queue_full")  # exported at 0 from the start
        self.queue = QueueCollector()
        r.register(self.queue)

    def set_jobs(self, jobs: Iterable[Job]) -> None:
        counts = Tally(job.status for job in jobs)
        for state in JobStatus:
            self.jobs.labels(state.value).set(counts.get(state, 0))

    def export(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
