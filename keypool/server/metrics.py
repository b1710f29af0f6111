"""``/metrics``: the pool's keys as every replica sees them (read from the store at each
scrape) and this replica's proxy counters and latency histograms, in Prometheus format."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..kinds import ErrorKind
from ..stats import KeyStats

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("active", "cooling", "exhausted", "disabled")
_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class _KeysCollector(Collector):
    """Yields the key families from the snapshot set just before a scrape."""

    def __init__(self) -> None:
        self.stats: Sequence[KeyStats] = ()
        self.now = 0.0

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["provider", "key_id", "scope"]
        state = GaugeMetricFamily(
            "keypool_key_state", "1 for the key's current state", labels=[*labels, "state"]
        )
        reason = GaugeMetricFamily(
            "keypool_key_unavailable",
            "1 while the key cannot serve, by reason",
            labels=[*labels, "reason"],
        )
        requests = CounterMetricFamily("keypool_key_requests", "requests served", labels=labels)
        successes = CounterMetricFamily("keypool_key_successes", "successes", labels=labels)
        errors = CounterMetricFamily(
            "keypool_key_errors", "failures by kind", labels=[*labels, "kind"]
        )
        tokens = CounterMetricFamily("keypool_key_tokens", "tokens reported", labels=labels)
        in_flight = GaugeMetricFamily("keypool_key_in_flight", "open leases", labels=labels)
        cooldown = GaugeMetricFamily(
            "keypool_key_cooldown_seconds", "seconds until the key serves again", labels=labels
        )
        left = GaugeMetricFamily(
            "keypool_key_budget_left", "budget left now", labels=[*labels, "budget"]
        )
        limit = GaugeMetricFamily(
            "keypool_key_budget_limit", "configured limit", labels=[*labels, "budget"]
        )
        consecutive = GaugeMetricFamily(
            "keypool_key_consecutive_errors", "failures in a row", labels=labels
        )
        for s in self.stats:
            base = [s.provider, s.key_id, "key"]
            for name in STATES:
                state.add_metric([*base, name], 1.0 if s.status == name else 0.0)
            if s.unavailable_reason:
                reason.add_metric([*base, s.unavailable_reason], 1.0)
            requests.add_metric(base, s.total_requests)
            successes.add_metric(base, s.success_count)
            for kind in ErrorKind:
                errors.add_metric([*base, kind.value], s.errors_by_kind.get(kind.value, 0))
            tokens.add_metric(base, s.tokens_used)
            in_flight.add_metric(base, s.in_flight)
            until = s.cooldown_until or s.available_at
            cooldown.add_metric(base, max(0.0, until - self.now) if until else 0.0)
            consecutive.add_metric(base, s.consecutive_errors)
            for budget, cap, rest in (
                ("rpm", s.rpm, s.rpm_left),
                ("tpm", s.tpm, s.tpm_left),
                ("rpd", s.rpd, s.rpd_left),
                ("max_concurrency", s.max_concurrency, None),
            ):
                if cap is None:
                    continue
                limit.add_metric([*base, budget], cap)
                if budget == "max_concurrency":
                    rest = max(0, cap - s.in_flight)
                if rest is not None:
                    left.add_metric([*base, budget], rest)
        yield from (state, reason, requests, successes, errors, tokens, in_flight)
        yield from (cooldown, left, limit, consecutive)


class GatewayMetrics:
    """One registry per app (so several apps in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._keys = _KeysCollector()
        self.registry.register(self._keys)
        self.requests = Counter(
            "keypool_proxy_requests",
            "proxied requests answered, by provider and status",
            ["provider", "code"],
            registry=self.registry,
        )
        self.upstream_failures = Counter(
            "keypool_proxy_upstream_failures",
            "upstream attempts that failed, by provider and kind",
            ["provider", "kind"],
            registry=self.registry,
        )
        self.retries = Counter(
            "keypool_proxy_retries",
            "requests sent again on another key",
            ["provider"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "keypool_proxy_request_duration_seconds",
            "time from the request to its last byte, by provider",
            ["provider"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "keypool_proxy_upstream_headers_seconds",
            "time from sending upstream to its response headers, by provider",
            ["provider"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.overhead = Histogram(
            "keypool_proxy_overhead_seconds",
            "time spent in the gateway before the upstream request (auth, body, lease)",
            ["provider"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "keypool_proxy_in_flight",
            "requests in progress in this replica",
            registry=self.registry,
        )

    def render(self, stats: Sequence[KeyStats]) -> bytes:
        """The exposition text, with the keys as in ``stats``."""
        self._keys.stats = stats
        self._keys.now = time.time()
        try:
            return generate_latest(self.registry)
        finally:
            self._keys.stats = ()
