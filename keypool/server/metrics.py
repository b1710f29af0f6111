"""``/metrics``: the pool's keys and limit scopes as every replica sees them (read from the
store at each scrape) and this replica's proxy counters and latency histograms, in
Prometheus format."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..kinds import ErrorKind
from ..stats import KeyStats, ScopeStats
from .status import scope_state

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("active", "cooling", "exhausted", "disabled")
SCOPE_STATES = ("active", "cooling", "exhausted")
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
    """Yields the key and limit-scope families from the snapshot set just before a scrape."""

    def __init__(self) -> None:
        self.stats: Sequence[KeyStats] = ()
        self.scopes: Sequence[ScopeStats] = ()
        self.now = 0.0

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield from self._keys()
        yield from self._scopes()

    def _keys(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["provider", "key_id", "scope"]
        state = GaugeMetricFamily(
            "keypool_key_state", "1 for the key's current state", labels=[*labels, "state"]
        )
        reason = GaugeMetricFamily(
            "keypool_key_unavailable",
            "1 while the key cannot serve, by reason",
            labels=[*labels, "reason"],
        )
        info = GaugeMetricFamily(
            "keypool_key_info", "1 per key, with its account", labels=[*labels, "account"]
        )
        requests = CounterMetricFamily("keypool_key_requests", "requests served", labels=labels)
        successes = CounterMetricFamily("keypool_key_successes", "successes", labels=labels)
        errors = CounterMetricFamily(
            "keypool_key_errors", "failures by kind", labels=[*labels, "kind"]
        )
        tokens = CounterMetricFamily("keypool_key_tokens", "tokens reported", labels=labels)
        tokens_in = CounterMetricFamily(
            "keypool_key_input_tokens", "input tokens reported", labels=labels
        )
        tokens_out = CounterMetricFamily(
            "keypool_key_output_tokens", "output tokens reported", labels=labels
        )
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
            info.add_metric([*base, s.account or ""], 1.0)
            requests.add_metric(base, s.total_requests)
            successes.add_metric(base, s.success_count)
            for kind in ErrorKind:
                errors.add_metric([*base, kind.value], s.errors_by_kind.get(kind.value, 0))
            tokens.add_metric(base, s.tokens_used)
            tokens_in.add_metric(base, s.tokens_in)
            tokens_out.add_metric(base, s.tokens_out)
            in_flight.add_metric(base, s.in_flight)
            until = s.cooldown_until or s.available_at
            cooldown.add_metric(base, max(0.0, until - self.now) if until else 0.0)
            consecutive.add_metric(base, s.consecutive_errors)
            for budget, cap, rest in (
                ("rpm", s.rpm, s.rpm_left),
                ("tpm", s.tpm, s.tpm_left),
                ("rpd", s.rpd, s.rpd_left),
                ("tpd", s.tpd, s.tpd_left),
                ("itpm", s.itpm, s.itpm_left),
                ("otpm", s.otpm, s.otpm_left),
                ("max_concurrency", s.max_concurrency, None),
            ):
                if cap is None:
                    continue
                limit.add_metric([*base, budget], cap)
                if budget == "max_concurrency":
                    rest = max(0, cap - s.in_flight)
                if rest is not None:
                    left.add_metric([*base, budget], rest)
        yield from (state, reason, info, requests, successes, errors, tokens, tokens_in)
        yield from (tokens_out, in_flight, cooldown, left, limit, consecutive)

    def _scopes(self) -> Iterator[GaugeMetricFamily]:
        """The limit scopes: accounts, accounts for a model, keys for a model (a key for a
        model also while it cools for that model). ``account`` or ``key_id`` names the
        owner; the other, and ``model`` for an account scope, are empty."""
        labels = ["provider", "scope", "account", "key_id", "model"]
        state = GaugeMetricFamily(
            "keypool_scope_state", "1 for the scope's current state", labels=[*labels, "state"]
        )
        reason = GaugeMetricFamily(
            "keypool_scope_unavailable",
            "1 while the scope holds requests back, by reason",
            labels=[*labels, "reason"],
        )
        in_flight = GaugeMetricFamily(
            "keypool_scope_in_flight", "open leases charged to the scope", labels=labels
        )
        cooldown = GaugeMetricFamily(
            "keypool_scope_cooldown_seconds",
            "seconds until the scope admits a request again",
            labels=labels,
        )
        left = GaugeMetricFamily(
            "keypool_scope_budget_left", "budget left now", labels=[*labels, "budget"]
        )
        limit = GaugeMetricFamily(
            "keypool_scope_budget_limit", "configured limit", labels=[*labels, "budget"]
        )
        for c in self.scopes:
            base = [c.provider, c.scope, c.account or "", c.key_id or "", c.model or ""]
            current = scope_state(c)
            for name in SCOPE_STATES:
                state.add_metric([*base, name], 1.0 if current == name else 0.0)
            if c.unavailable_reason:
                reason.add_metric([*base, c.unavailable_reason], 1.0)
            in_flight.add_metric(base, c.in_flight)
            until = c.available_at or c.cooldown_until
            cooldown.add_metric(base, max(0.0, until - self.now) if until else 0.0)
            for budget, cap in c.limits.items():
                limit.add_metric([*base, budget], cap)
                if budget == "max_concurrency":
                    left.add_metric([*base, budget], max(0, cap - c.in_flight))
                elif budget in c.left:
                    left.add_metric([*base, budget], c.left[budget])
        yield from (state, reason, in_flight, cooldown, left, limit)


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

    def render(self, stats: Sequence[KeyStats], scopes: Sequence[ScopeStats] = ()) -> bytes:
        """The exposition text, with the keys as in ``stats`` and the limit scopes as in
        ``scopes``."""
        self._keys.stats = stats
        self._keys.scopes = scopes
        self._keys.now = time.time()
        try:
            return generate_latest(self.registry)
        finally:
            self._keys.stats = ()
            self._keys.scopes = ()
