"""For operators: liveness, readiness, Prometheus metrics, and HTTP request metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..hub import Hub
from ..keys import BUS, DB, HUB

#: named checks that must all pass for /readyz; each area may add its own (e.g. "rtmp")
READINESS = web.AppKey("readiness", dict[str, Callable[[], Awaitable[bool] | bool]])

HTTP_REQUESTS = Counter("livesrv_http_requests_total", "HTTP requests by route and status",
                        ["method", "route", "status"])
HTTP_SECONDS = Histogram("livesrv_http_request_seconds", "HTTP request handling time by route",
                         ["route"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))


class HubCollector(Collector):
    """Per-stream gauges read from the hub at scrape time (nothing to update per packet)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        streams = self.hub.streams()
        live = GaugeMetricFamily("livesrv_live_streams", "Channels live now", labels=["source"])
        by_source: dict[str, int] = {}
        for stream in streams:
            by_source[stream.source] = by_source.get(stream.source, 0) + 1
        for source, count in sorted(by_source.items()):
            live.add_metric([source], count)
        if not by_source:
            live.add_metric(["rtmp"], 0)
        yield live
        bitrate = GaugeMetricFamily("livesrv_stream_ingest_bitrate_bits",
                                    "Ingest bitrate per stream over the last 2 s", labels=["channel"])
        received = CounterMetricFamily("livesrv_stream_ingest_bytes",
                                       "Bytes received per live stream", labels=["channel"])
        consumers = GaugeMetricFamily("livesrv_stream_consumers",
                                      "Consumers (packagers, viewers) per stream", labels=["channel"])
        dropped = CounterMetricFamily("livesrv_stream_consumer_dropped_packets",
                                      "Packets dropped for slow consumers", labels=["channel"])
        for stream in streams:
            bitrate.add_metric([stream.channel], stream.bitrate)
            received.add_metric([stream.channel], stream.bytes_in)
            consumers.add_metric([stream.channel], stream.consumers)
            dropped.add_metric([stream.channel], stream.dropped_packets)
        yield bitrate
        yield received
        yield consumers
        yield dropped


@web.middleware
async def http_metrics(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
    # the route's pattern, not the path, keeps the label set bounded
    info = request.match_info.route.resource
    route = info.canonical if info is not None else "unmatched"
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        HTTP_REQUESTS.labels(request.method, route, str(status)).inc()
        HTTP_SECONDS.labels(route).observe(time.perf_counter() - start)


routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, bool] = {}
    db = request.app.get(DB)
    checks["store"] = db is not None and await db.ping()
    bus = request.app.get(BUS)
    checks["bus"] = bus is not None and bus.healthy
    for name, check in request.app[READINESS].items():
        try:
            result = check()
            checks[name] = bool(await result if isinstance(result, Awaitable) else result)
        except Exception:
            checks[name] = False
    ready = all(checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    app[READINESS] = {}
    app.middlewares.append(http_metrics)
    app.add_routes(routes)
    # registered for the app's lifetime only: one app per process, but tests build many, and an
    # app whose start-up fails must not leave its collector behind for the next one
    async def hub_collector(app: web.Application):
        collector = HubCollector(app[HUB])
        REGISTRY.register(collector)
        yield
        REGISTRY.unregister(collector)

    app.cleanup_ctx.append(hub_collector)


def add_readiness(app: web.Application, name: str,
                  check: Callable[[], Awaitable[bool] | bool]) -> None:
    """Make /readyz depend on ``check`` too (a listener that is up, a worker that runs)."""
    app[READINESS][name] = check
