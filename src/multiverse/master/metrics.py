"""Prometheus metrics at /metrics: cluster state read from the store at scrape time, plus the
API's latency, counted as requests are served."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from multiverse.core.model import Instance, InstanceState, Node, NodeStatus
from multiverse.master.images import Images
from multiverse.master.reconciler import Reconciler
from multiverse.store.repository import Store, now

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _ClusterCollector(Collector):
    """Renders the cluster's state as read just before (prometheus_client collects
    synchronously; the store is read without blocking the event loop)."""

    def __init__(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler
        self.nodes: list[Node] = []
        self.instances: list[Instance] = []

    def collect(self) -> Iterator[Metric]:
        nodes = self.nodes
        by_status = Counter(node.status for node in nodes)
        gauge = GaugeMetricFamily("multiverse_nodes", "Nodes by status.", labels=["status"])
        for status in NodeStatus:
            gauge.add_metric([status.value], by_status.get(status, 0))
        yield gauge
        by_state = Counter(instance.state for instance in self.instances)
        gauge = GaugeMetricFamily(
            "multiverse_instances", "Instances by observed state.", labels=["state"]
        )
        for state in InstanceState:
            gauge.add_metric([state.value], by_state.get(state, 0))
        yield gauge
        lag = GaugeMetricFamily(
            "multiverse_node_sync_lag_seconds", "Seconds since the node's last report.",
            labels=["node"],
        )  # fmt: skip
        moment = now()
        for node in nodes:
            if node.last_sync:
                lag.add_metric([node.name], (moment - node.last_sync).total_seconds())
        yield lag
        yield GaugeMetricFamily(
            "multiverse_reconcile_queue_depth", "Instances waiting for a reconcile action.",
            value=self.reconciler.queue_depth(nodes, self.instances),
        )  # fmt: skip
        yield CounterMetricFamily(
            "multiverse_reconcile_retries", "Failed reconcile actions, retried or given up.",
            value=self.reconciler.retries_total,
        )  # fmt: skip


class _ImageCollector(Collector):
    """Bytes the image transfers sent, and what they cost in disk reads (less when several
    workers pull one image at once: see master/images.py)."""

    def __init__(self, images: Images) -> None:
        self.images = images

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "multiverse_image_sent_bytes", "Image bytes sent to workers.",
            value=self.images.bytes_sent,
        )  # fmt: skip
        yield CounterMetricFamily(
            "multiverse_image_read_bytes", "Image bytes read from disk for transfers.",
            value=self.images.reader.disk_bytes,
        )  # fmt: skip


class Metrics:
    def __init__(self, store: Store, reconciler: Reconciler, images: Images) -> None:
        self.store = store
        self.registry = CollectorRegistry()
        self.cluster = _ClusterCollector(reconciler)
        self.registry.register(self.cluster)
        self.registry.register(_ImageCollector(images))
        self.api_latency = Histogram(
            "multiverse_api_request_seconds", "REST API latency.", ["method", "route", "status"],
            registry=self.registry,
        )  # fmt: skip

    async def render(self) -> bytes:
        self.cluster.nodes = await self.store.list_nodes()
        self.cluster.instances = await self.store.list_instances()
        return generate_latest(self.registry)
