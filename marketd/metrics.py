"""Prometheus metrics without a global registry.

The daemon makes one `CollectorRegistry` and hands it to every stage; each stage declares its own
metric families through `Metrics` helpers. `FastHistogram` is a lock-free histogram for per-message
latencies (prometheus_client's Histogram takes a lock and walks its buckets: ~2 µs per observation,
too dear at 35k messages/s); it is exposed through a custom collector in the Prometheus format.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

T = TypeVar("T")

# Latency buckets in seconds: 100 µs .. 10 s, roughly x2 apart.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
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
)


class FastHistogram:
    """Cumulative histogram fed from any thread without a lock.

    Each observation does one bisect and two list updates under the GIL; a lost update under a
    race between the trio thread and a librdkafka callback thread costs one count, never a crash.
    Also keeps the raw counts so benchmarks can read quantiles without scraping.
    """

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile q (what a dashboard would show)."""
        n = self.count
        if n == 0:
            return 0.0
        rank = q * n
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return self.bounds[i] if i < len(self.bounds) else float("inf")
        return float("inf")


class FastHistogramCollector(Collector):
    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS_S,
    ) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(buckets)
        self._children: dict[tuple[str, ...], FastHistogram] = {}

    def labels(self, *values: str) -> FastHistogram:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = FastHistogram(self.buckets)
        return child

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, h in list(self._children.items()):
            cumulative = 0
            buckets = []
            for bound, c in zip([*h.bounds, float("inf")], h.counts, strict=True):
                cumulative += c
                buckets.append((repr(bound) if bound != float("inf") else "+Inf", cumulative))
            family.add_metric(list(values), buckets, h.total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)


class MetricsFactory:
    """Declares metric families in one registry with the `marketd_` prefix.

    Declaring a family twice returns the first one: a component restarted by the supervisor
    declares its metrics again and keeps counting into the same series.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._declared: dict[str, Any] = {}

    def _once(self, name: str, make: Callable[[], T]) -> T:
        existing = self._declared.get(name)
        if existing is None:
            existing = self._declared[name] = make()
        return existing

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return self._once(
            name, lambda: Counter(f"marketd_{name}", doc, labelnames=labels, registry=self.registry)
        )

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return self._once(
            name, lambda: Gauge(f"marketd_{name}", doc, labelnames=labels, registry=self.registry)
        )

    def histogram(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS_S,
    ) -> Histogram:
        return self._once(
            name,
            lambda: Histogram(
                f"marketd_{name}", doc, labelnames=labels, buckets=buckets, registry=self.registry
            ),
        )

    def fast_histogram(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS_S,
    ) -> FastHistogramCollector:
        def make() -> FastHistogramCollector:
            collector = FastHistogramCollector(f"marketd_{name}", doc, labels, buckets)
            self.registry.register(collector)
            return collector

        return self._once(name, make)

    def fast_counter(self, name: str, doc: str, label: str) -> FastCounter:
        # CounterMetricFamily appends "_total" itself.
        def make() -> FastCounter:
            collector = FastCounter(f"marketd_{name}", doc, label)
            self.registry.register(collector)
            return collector

        return self._once(name, make)

    def state_gauge(
        self, name: str, doc: str, label: str, read: Callable[[], Mapping[str, float]]
    ) -> StateGauge:
        """A labelled gauge whose series are read from `read()` at scrape time (one series per
        key it returns): for states that live elsewhere, like component health."""

        def make() -> StateGauge:
            collector = StateGauge(f"marketd_{name}", doc, label, read)
            self.registry.register(collector)
            return collector

        return self._once(name, make)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class StateGauge(Collector):
    def __init__(
        self, name: str, doc: str, labelname: str, read: Callable[[], Mapping[str, float]]
    ) -> None:
        self.name = name
        self.doc = doc
        self.labelname = labelname
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.doc, labels=[self.labelname])
        for label, value in sorted(self.read().items()):
            family.add_metric([label], value)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.name, self.doc, labels=[self.labelname])


class FastCounter(Collector):
    """A labelled counter that is a plain dict increment on the hot path (~50 ns).

    prometheus_client's Counter.labels(...).inc() costs ~0.5 µs with its lock; the decoder counts
    every frame, so it keeps plain ints and the registry reads them at scrape time.
    """

    def __init__(self, name: str, doc: str, labelname: str) -> None:
        self.name = name
        self.doc = doc
        self.labelname = labelname
        self.values: dict[str, int] = {}

    def inc(self, label: str, amount: int = 1) -> None:
        values = self.values
        values[label] = values.get(label, 0) + amount

    def get(self, label: str) -> int:
        return self.values.get(label, 0)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.doc, labels=[self.labelname])
        for label, value in list(self.values.items()):
            family.add_metric([label], value)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.doc, labels=[self.labelname])
