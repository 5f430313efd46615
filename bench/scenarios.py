"""The scenarios: each starts fresh servers for one target, drives them, and returns its figures."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.client import (
    Books,
    Http,
    Room,
    Ticket,
    Timing,
    open_conn,
    open_room,
    settle,
)
from bench.report import SCALING_CORES, fmt, median
from bench.servers import (
    LAYER_TARGETS,
    TARGETS,
    Deployment,
    Server,
    Target,
    core_busy_seconds,
    free_port,
)

# A client using more than this share of its core measures itself, not the server.
CLIENT_SATURATED = 0.85


@dataclass
class Options:
    members: int = 100
    rates: list[int] = field(default_factory=lambda: [1000, 2000, 4000, 8000, 16000, 32000, 64000])
    duration: float = 5.0
    fanout_members: int = 1000
    fanout_messages: int = 20
    handshakes: int = 2000
    hs_concurrency: int = 32
    idle: int = 1000
    idle_room_size: int = 10
    persist_rooms: int = 200
    persist_window: int = 4
    persist_duration: float = 10.0
    server_procs: int = 1
    server_cpus: str = "0"
    client_cpu: int = 1
    connect_concurrency: int = 16
    profile_rate: int = 2000
    profile_duration: float = 15.0
    layer_rounds: int = 3
    scaling_pairs: int = 2


class Stage:
    """Fresh server process(es) of one target on a fresh database, for one scenario."""

    def __init__(self, target: Target, deployment: Deployment, opts: Options, label: str) -> None:
        self.target, self.deployment, self.opts, self.label = target, deployment, opts, label
        self.prefix = f"{label[:6]}{int(time.time() * 1000) % 10**7}x"
        self.db_env = deployment.fresh_database() if target.authenticated else {}
        procs = opts.server_procs if target.name == "chat" else 1
        ports = [free_port() for _ in range(procs)]
        origins = ",".join(f"http://127.0.0.1:{p}" for p in ports)
        env = {**deployment.env, **self.db_env, "CHAT_ALLOWED_ORIGINS": origins}
        self.servers = [
            Server(
                target,
                {**env, "CHAT_INSTANCE_NAME": f"bench-{port}"},
                port=port,
                cpus=cpus,
                log_path=deployment.workdir / f"{target.name}-{label}-{port}.log",
            )
            for port, cpus in zip(ports, server_cpus(opts.server_cpus, procs), strict=True)
        ]

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def seed(self, rooms: int, members: int) -> list[dict]:
        """Rooms with members: tokens for chat, just slugs and counts for the baselines."""
        if self.target.authenticated:
            return self.deployment.seed(
                self.db_env, prefix=self.prefix, rooms=rooms, members=members
            )
        return [{"slug": f"{self.prefix}r{i}", "members": members} for i in range(rooms)]

    def __enter__(self) -> Stage:
        for server in self.servers:
            server.start()
        return self

    def __exit__(self, *exc) -> None:
        for server in self.servers:
            server.stop()

    def cpu_seconds(self) -> float:
        return sum(s.cpu_seconds() for s in self.servers)

    def rss_bytes(self) -> int:
        return sum(s.rss_bytes() for s in self.servers)


def server_cpus(spec: str, procs: int) -> list[str]:
    """Each server process's taskset list: a core of its own when `spec` lists exactly one core
    per process, else all of `spec` for every process."""
    cores = _cpu_list(spec)
    if procs > 1 and len(cores) == procs:
        return [str(core) for core in cores]
    return [spec] * procs


class Window:
    """Server, client and per-core CPU across a measured window."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        # Each core once: two processes may share one (the scaling scenario, asked to).
        self.server_cores = sorted(set(_cpu_list(stage.opts.server_cpus)))
        self.client_core = stage.opts.client_cpu

    def __enter__(self) -> Window:
        self.t0 = time.perf_counter()
        self.server0 = self.stage.cpu_seconds()
        self.client0 = _self_cpu()
        self.cores0 = core_busy_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        self.server = self.stage.cpu_seconds() - self.server0
        self.client = _self_cpu() - self.client0
        cores1 = core_busy_seconds()
        busy = {c: cores1[c] - self.cores0[c] for c in cores1}
        server_core_busy = sum(busy.get(c, 0.0) for c in self.server_cores)
        self.foreign_server_core = max(0.0, server_core_busy - self.server)
        self.foreign_client_core = max(0.0, busy.get(self.client_core, 0.0) - self.client)

    def figures(self, *, per: int, unit: str) -> dict:
        wall = self.wall or 1e-9
        client_share = self.client / wall
        return {
            "wall_s": round(self.wall, 3),
            "server_cpu_s": round(self.server, 3),
            "client_cpu_s": round(self.client, 3),
            f"server_cpu_us_per_{unit}": _per(self.server, per),
            f"client_cpu_us_per_{unit}": _per(self.client, per),
            "server_core_share": round(self.server / wall, 3),
            "client_core_share": round(client_share, 3),
            "client_saturated": client_share > CLIENT_SATURATED,
            # CPU that other processes used on our cores meanwhile: the machine is shared. Per
            # server core (the mean over them), as for the client's one core.
            "foreign_share_server_core": round(
                self.foreign_server_core / wall / len(self.server_cores), 3
            ),
            "foreign_share_client_core": round(self.foreign_client_core / wall, 3),
        }


def _per(seconds: float, count: int) -> float | None:
    return round(seconds * 1e6 / count, 1) if count else None


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_list(spec: str) -> list[int]:
    cores = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cores += range(int(lo), int(hi or lo) + 1)
    return cores


def latency_figures(latencies_ns: list[int]) -> dict:
    if not latencies_ns:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    arr = np.asarray(latencies_ns, dtype=np.float64) / 1e6
    p50, p90, p99, p999 = np.percentile(arr, [50, 90, 99, 99.9])
    return {
        "p50_ms": round(float(p50), 2),
        "p90_ms": round(float(p90), 2),
        "p99_ms": round(float(p99), 2),
        "p999_ms": round(float(p999), 2),
        "max_ms": round(float(arr.max()), 2),
    }


def cdf_points(latencies_ns: list[int], points: int = 200) -> list[list[float]]:
    """A down-sampled latency CDF for the plot: [latency_ms, fraction] pairs."""
    if not latencies_ns:
        return []
    arr = np.sort(np.asarray(latencies_ns, dtype=np.float64) / 1e6)
    qs = np.linspace(0, 1, points)
    values = np.quantile(arr, qs)
    return [[round(float(v), 3), round(float(q), 4)] for v, q in zip(values, qs, strict=True)]


async def drain(books: Books, expected: int, *, stall: float = 3.0, limit: float = 60.0) -> None:
    """Wait for every expected delivery, or until nothing arrives for `stall` seconds."""
    start = last_change = time.monotonic()
    last = -1
    while books.deliveries < expected:
        await asyncio.sleep(0.01)
        now = time.monotonic()
        if books.deliveries != last:
            last, last_change = books.deliveries, now
        elif now - last_change > stall or now - start > limit:
            return


def delivery_books(books: Books, expected: int) -> dict:
    span = (books.last_rx - books.first_tx) / 1e9 if books.last_rx > books.first_tx else 0.0
    return {
        "expected": expected,
        "deliveries": books.deliveries,
        "deliveries_per_s": round(books.deliveries / span, 1) if span else 0.0,
        "lost": expected - books.deliveries,
        "duplicated": books.duplicates,
        "out_of_order": books.out_of_order,
        "unknown": books.unknown,
        "errors": dict(books.errors),
        **latency_figures(books.latencies),
    }


async def close_all(rooms: list[Room]) -> None:
    for room in rooms:
        for conn in room.conns:
            conn.close()
    await asyncio.sleep(0.2)


# --- broadcast: one room of `members`, a sweep of delivery rates ---


async def paced_send(room: Room, n_messages: int, msg_rate: float) -> list[float]:
    """Open loop: message i leaves at start + i/rate whatever the answers; returns send lags (s)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    senders = room.conns
    lags = []
    for i in range(n_messages):
        due = start + i / msg_rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(loop.time() - due)
        senders[i % len(senders)].send_message()
    return lags


async def open_seeded_room(stage: Stage, members: int, books: Books):
    """One new room with `members` members, every one of them connected and settled."""
    (spec,) = stage.seed(1, members)
    room = await open_room(
        stage.target,
        spec["slug"],
        spec["members"],
        books,
        ports=stage.ports,
        concurrency=stage.opts.connect_concurrency,
    )
    await settle(books)
    return room


async def broadcast(stage: Stage) -> dict:
    opts = stage.opts
    books = Books()
    room = await open_seeded_room(stage, opts.members, books)
    members = len(room.conns)
    points = []
    for rate in opts.rates:
        books.reset()
        msg_rate = rate / members
        n_messages = max(1, round(msg_rate * opts.duration))
        expected = n_messages * members
        with Window(stage) as window:
            lags = await paced_send(room, n_messages, msg_rate)
            await drain(books, expected)
        point = {
            "offered_deliveries_per_s": rate,
            "messages": n_messages,
            "members": members,
            **delivery_books(books, expected),
            **window.figures(per=books.deliveries, unit="delivery"),
            "send_lag_p99_ms": round(float(np.percentile(lags, 99)) * 1000, 2),
            "cdf": cdf_points(books.latencies),
        }
        points.append(point)
        _log(stage, f"{rate}/s", point)
        await settle(books)
        if point["lost"] or point["deliveries_per_s"] < 0.9 * rate or (point["p99_ms"] or 0) > 1000:
            break  # saturated: higher rates only grow the backlog
    await close_all([room])
    return {"members": members, "points": points}


# --- fanout: one message at a time to a big room ---


async def fanout(stage: Stage) -> dict:
    opts = stage.opts
    books = Books()
    room = await open_seeded_room(stage, opts.fanout_members, books)
    members = len(room.conns)
    expected = 0
    with Window(stage) as window:
        for i in range(opts.fanout_messages):
            expected += members
            room.conns[(i * 37) % members].send_message()
            await drain(books, expected, stall=2.0)
            await asyncio.sleep(0.05)
    figures = {
        "members": members,
        "messages": opts.fanout_messages,
        **delivery_books(books, expected),
        **window.figures(per=books.deliveries, unit="delivery"),
        "cdf": cdf_points(books.latencies),
    }
    figures.pop("deliveries_per_s")  # paced one message at a time: not a throughput figure
    _log(stage, "fanout", figures)
    await close_all([room])
    return figures


# --- handshakes: ticket + connect + hello, then close, by concurrent clients ---


async def handshakes(stage: Stage) -> dict:
    opts = stage.opts
    workers = opts.hs_concurrency
    specs = stage.seed(workers, 1)
    books = Books()
    ticket_ns: list[int] = []
    connect_ns: list[int] = []
    failures: Counter[str] = Counter()

    async def worker(i: int, count: int, record: bool) -> None:
        spec = specs[i]
        member = spec["members"][0] if isinstance(spec["members"], list) else None
        room = Room(spec["slug"])
        http = Http(stage.ports[i % len(stage.ports)])
        try:
            for _ in range(count):
                timing = Timing()
                try:
                    conn = await open_conn(
                        stage.target,
                        room,
                        books,
                        port=http.port,
                        token=member["token"] if member else None,
                        http=http,
                        name=f"h{i}",
                        timing=timing,
                    )
                except Exception as error:
                    failures[_failure(error)] += 1
                    continue
                conn.close()
                if record:
                    ticket_ns.append(timing.ticket_ns)
                    connect_ns.append(timing.connect_ns)
        finally:
            http.close()

    # Warm up (imports, caches, the hub) on one handshake per worker, then measure.
    await asyncio.gather(*(worker(i, 1, False) for i in range(workers)))
    await asyncio.sleep(1.0)
    failures.clear()
    per_worker = max(1, opts.handshakes // workers)
    total = per_worker * workers
    with Window(stage) as window:
        started = time.perf_counter()
        await asyncio.gather(*(worker(i, per_worker, True) for i in range(workers)))
        elapsed = time.perf_counter() - started
        await asyncio.sleep(1.0)  # closes and audit flushes belong to the handshake's cost
    done = len(connect_ns)
    figures = {
        "attempted": total,
        "completed": done,
        "failed": dict(failures),
        "concurrency": workers,
        "handshakes_per_s": _rate(done, elapsed),
        **window.figures(per=done, unit="handshake"),
        "ticket_ms": latency_figures(ticket_ns),
        "connect_to_hello_ms": latency_figures(connect_ns),
    }
    if stage.target.authenticated:
        figures["apart"] = await _handshake_halves(stage, specs, per_worker)
    _log(stage, "handshakes", figures)
    return figures


async def _handshake_halves(stage: Stage, specs: list[dict], per_worker: int) -> dict:
    """The same handshakes in two windows: every client takes all its tickets, then opens a
    socket with each (hello, close). Server CPU per ticket POST and per connect, apart.

    A ticket lives CHAT_TICKET_LIFETIME (30 s) from its POST: the POSTs of the whole run must
    end, and the connects reach the last ticket, within it. At the rates measured here both
    windows last seconds; a ticket that expired first counts as a failed connect.
    """
    workers = len(specs)
    failures: Counter[str] = Counter()
    answers: list[list[dict]] = [[] for _ in specs]
    issued, post_elapsed, posts = await _post_window(
        stage, specs, "/api/tickets/", per_worker, failures, answers=answers
    )
    tickets = [[Ticket.from_answer(a) for a in mine] for mine in answers]

    connected = 0

    async def connect(i: int) -> None:
        nonlocal connected
        room, books = Room(specs[i]["slug"]), Books()
        for ticket in tickets[i]:
            try:
                conn = await open_conn(
                    stage.target,
                    room,
                    books,
                    port=stage.ports[i % len(stage.ports)],
                    name=f"a{i}",
                    ticket=ticket,
                )
            except Exception as error:
                failures["connect: " + _failure(error)] += 1
                continue
            conn.close()
            connected += 1

    with Window(stage) as connects:
        started = time.perf_counter()
        await asyncio.gather(*(connect(i) for i in range(workers)))
        connect_elapsed = time.perf_counter() - started
        await asyncio.sleep(1.0)  # closes and audit flushes belong to the connect's cost
    posted = posts.figures(per=issued, unit="ticket_post")
    opened = connects.figures(per=connected, unit="connect")
    return {
        "failed": dict(failures),
        "ticket_posts_per_s": _rate(issued, post_elapsed),
        "server_cpu_us_per_ticket_post": posted["server_cpu_us_per_ticket_post"],
        "client_core_share_posts": posted["client_core_share"],
        "connects_per_s": _rate(connected, connect_elapsed),
        "server_cpu_us_per_connect": opened["server_cpu_us_per_connect"],
        "client_core_share_connects": opened["client_core_share"],
    }


async def _post_window(
    stage: Stage,
    specs: list[dict],
    path: str,
    per_worker: int,
    failures: Counter,
    *,
    warm: int = 0,
    answers: list[list[dict]] | None = None,
) -> tuple[int, float, Window]:
    """A measured window of ticket-shaped POSTs (`{"room": slug}` with the client's Bearer
    token; `-` for a server without users): each client posts `per_worker` times on its own
    keep-alive connection, after `warm` unmeasured POSTs whose failures are not counted. The
    window runs 1 s past the last answer, as the connects' do. Returns the 201 answers counted,
    the seconds until the last, and the window; `answers[i]` gets client i's measured bodies.
    """
    https = [Http(stage.ports[i % len(stage.ports)]) for i in range(len(specs))]

    async def worker(i: int, count: int, counted: Counter, keep: list | None) -> int:
        spec = specs[i]
        token = spec["members"][0]["token"] if stage.target.authenticated else "-"
        done = 0
        for _ in range(count):
            try:
                status, answer = await https[i].post_json(path, {"room": spec["slug"]}, token)
            except Exception as error:
                counted[f"POST {path}: " + _failure(error)] += 1
                continue
            if status != 201:
                counted[f"POST {path}: HTTP {status} {str(answer)[:80]}"] += 1
                continue
            if keep is not None:
                keep.append(answer)
            done += 1
        return done

    try:
        if warm:
            await asyncio.gather(*(worker(i, warm, Counter(), None) for i in range(len(specs))))
        with Window(stage) as window:
            started = time.perf_counter()
            done = await asyncio.gather(
                *(
                    worker(i, per_worker, failures, None if answers is None else answers[i])
                    for i in range(len(specs))
                )
            )
            elapsed = time.perf_counter() - started
            await asyncio.sleep(1.0)
    finally:
        for http in https:
            http.close()
    return sum(done), elapsed, window


def _failure(error: Exception) -> str:
    """A failed handshake, as counted: its kind and the start of its message."""
    return f"{type(error).__name__}: {str(error)[:80]}"


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds else 0.0


# --- layers: a handshake's cost, one layer of the stack at a time ---

# The POSTs of the `layers` scenario, in the chat's process (bench/baselines/stack): the same
# request each time (the Bearer token, the room in a JSON body), one layer more each time
# (the chat's own authentication instead of simplejwt's at `chat_auth`).
STACK_LAYERS = {
    "django": "/bench/django/",
    "drf": "/bench/drf/",
    "token": "/bench/token/",
    "jwt": "/bench/jwt/",
    "chat_auth": "/bench/chat-auth/",
    "ticket": "/api/tickets/",
}


async def layers(deployment: Deployment, opts: Options) -> dict:
    """Server CPU per ticket-shaped POST and per WebSocket handshake, a layer at a time.

    daphne with an ASGI app that does nothing (bench/baselines/raw_asgi.py) answers the POST
    and accepts the socket (the handshakes scenario, connect and close): the server alone.
    Then the chat's own server, settings and middleware, with five views in front of its URLs
    (bench/baselines/stack), answer the same POST: a Django view, a DRF APIView, the same with
    simplejwt's stateless authentication, with its JWTAuthentication, and with the chat's own
    authentication; and the real ticket view beside them. Each figure is measured
    `layer_rounds` times, the chat's layers in turn in each round (rotated, and reversed every
    other round, so that none keeps its place or its neighbours). A window with a failed
    request counts as no figure (None), its failures are listed. The client's and other
    processes' worst shares of a core over the windows are kept, for the report's warnings.
    """
    windows: list[dict] = []
    failures: Counter[str] = Counter()

    def kept(figures: dict, per: str, failed: int) -> float | None:
        windows.append(figures)
        return None if failed else figures[f"server_cpu_us_per_{per}"]

    async def post(stage: Stage, specs: list[dict], path: str) -> float | None:
        before = sum(failures.values())
        per_worker = max(1, opts.handshakes // len(specs))
        posted, _, window = await _post_window(stage, specs, path, per_worker, failures, warm=2)
        failed = sum(failures.values()) - before
        return kept(window.figures(per=posted, unit="request"), "request", failed)

    out: dict = {"rounds": opts.layer_rounds}
    with Stage(LAYER_TARGETS["daphne"], deployment, opts, "lay-daphne") as stage:
        specs = stage.seed(opts.hs_concurrency, 1)
        out["daphne"] = {"post": [], "connect": []}
        for _ in range(opts.layer_rounds):
            out["daphne"]["post"].append(await post(stage, specs, "/"))
            shook = await handshakes(stage)
            failures.update({f"connect: {k}": v for k, v in shook["failed"].items()})
            failed = sum(shook["failed"].values())
            out["daphne"]["connect"].append(kept(shook, "handshake", failed))
    with Stage(LAYER_TARGETS["stack"], deployment, opts, "lay-stack") as stage:
        specs = stage.seed(opts.hs_concurrency, 1)
        names = list(STACK_LAYERS)
        out["stack"] = {name: [] for name in names}
        for r in range(opts.layer_rounds):
            turn = names[r % len(names) :] + names[: r % len(names)]
            for name in reversed(turn) if r % 2 else turn:
                out["stack"][name].append(await post(stage, specs, STACK_LAYERS[name]))
    worst = {
        key: max(w[key] for w in windows)
        for key in ("client_core_share", "foreign_share_server_core", "foreign_share_client_core")
    }
    out.update(worst, client_saturated=worst["client_core_share"] > CLIENT_SATURATED)
    out["failed"] = dict(failures)
    medians = ", ".join(
        f"{server}/{layer}={fmt(median(values))}"
        for server in ("daphne", "stack")
        for layer, values in out[server].items()
    )
    print(f"  [layers] median server µs per request: {medians}", flush=True)
    return out


# --- idle: RSS per idle authenticated connection ---


async def idle(stage: Stage) -> dict:
    opts = stage.opts
    size = min(opts.idle_room_size, opts.idle)
    n_rooms = max(1, opts.idle // size)
    specs = stage.seed(n_rooms + 1, size)
    books = Books()
    # Warm up: a room opened and closed, so lazy imports and caches are not counted per socket.
    warm = await open_room(
        stage.target, specs[-1]["slug"], specs[-1]["members"], books, ports=stage.ports
    )
    await settle(books)
    await close_all([warm])
    await asyncio.sleep(1.0)
    before = stage.rss_bytes()
    rooms = []
    for spec in specs[:-1]:
        rooms.append(
            await open_room(
                stage.target,
                spec["slug"],
                spec["members"],
                books,
                ports=stage.ports,
                concurrency=opts.connect_concurrency,
            )
        )
    await settle(books, quiet=1.0)
    await asyncio.sleep(2.0)
    after = stage.rss_bytes()
    connections = sum(len(r.conns) for r in rooms)
    figures = {
        "connections": connections,
        "room_size": size,
        "rss_before_mb": round(before / 2**20, 1),
        "rss_after_mb": round(after / 2**20, 1),
        "rss_per_connection_kb": round((after - before) / connections / 1024, 1),
    }
    _log(stage, "idle", figures)
    await close_all(rooms)
    return figures


# --- persist: many small rooms, every member sending as fast as acks come back ---


async def persist(stage: Stage, profile_path: Path | None = None) -> dict:
    opts = stage.opts
    specs = stage.seed(opts.persist_rooms, 2)
    books = Books()
    rooms = []
    for spec in specs:
        rooms.append(
            await open_room(
                stage.target,
                spec["slug"],
                spec["members"],
                books,
                ports=stage.ports,
                concurrency=opts.connect_concurrency,
            )
        )
    await settle(books)
    conns = [c for r in rooms for c in r.conns]
    books.reset()
    loop = asyncio.get_running_loop()
    stop_at = 0.0  # set once py-spy (if any) is running: it takes a second to attach
    sent = 0

    async def pump(conn) -> None:
        nonlocal sent
        conn.window = asyncio.Event()
        while loop.time() < stop_at:
            if len(conn.inflight) >= opts.persist_window:
                conn.window.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.window.wait(), stop_at - loop.time())
                continue
            conn.inflight.add(conn.send_message())
            sent += 1

    spy = PySpy(stage, profile_path) if profile_path else contextlib.nullcontext()
    with spy, Window(stage) as window:
        stop_at = loop.time() + opts.persist_duration
        await asyncio.gather(*(pump(c) for c in conns))
        acked_in_window, delivered_in_window = books.acks, books.deliveries
    expected = sum(len(r.sent) * len(r.conns) for r in rooms)
    await drain(books, expected)
    deadline = time.monotonic() + 30
    while any(c.inflight for c in conns) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    figures = {
        "rooms": len(rooms),
        "connections": len(conns),
        "window": opts.persist_window,
        "sent": sent,
        "acked": books.acks,
        "unacked": sum(len(c.inflight) for c in conns),
        "messages_per_s": round(acked_in_window / opts.persist_duration, 1),
        # Delivered to both members (the sender's copy included) within the window: acks come
        # from the sender's process, and say nothing of a receiving process that lags.
        "delivered_messages_per_s": round(delivered_in_window / 2 / opts.persist_duration, 1),
        **delivery_books(books, expected),
        **window.figures(per=acked_in_window, unit="message"),
    }
    figures.pop("deliveries_per_s")
    await close_all(rooms)
    if stage.target.authenticated:
        await asyncio.sleep(0.5)
        figures["rows_in_database"] = stage.deployment.count_messages(stage.db_env, stage.prefix)
        figures["rows_match_acks"] = figures["rows_in_database"] == books.acks
    _log(stage, "persist", figures)
    if profile_path:
        figures.update(spy.result())
    return figures


# --- scaling: the persist scenario on one chat process, then on two ---


def scaling_cores(
    nproc: int, client_cpu: int, requested: str | None = None
) -> tuple[list[int], str]:
    """The cores of the two chat processes (`requested`, else the first two that are not the
    load client's), and why a ratio measured on them would be no verdict ("" when it is one)."""
    cores = _cpu_list(requested) if requested else [c for c in range(nproc) if c != client_cpu][:2]
    if len(cores) != 2:
        raise ValueError(f"two cores are needed, one per chat process, not {cores}")
    if beyond := [c for c in cores if c >= nproc]:
        raise ValueError(f"core {beyond[0]}: this machine has cores 0-{nproc - 1}")
    problems = []
    if cores[0] == cores[1]:
        problems.append(f"both processes ran on core {cores[0]}")
    if client_cpu in cores:
        problems.append(f"a process shared core {client_cpu} with the load client")
    if nproc < SCALING_CORES:
        problems.append(
            f"{nproc} cores: none left for Redis and the database (needs {SCALING_CORES})"
        )
    return cores, "; ".join(problems)


async def scaling(deployment: Deployment, opts: Options, cores: list[int]) -> dict:
    """Messages/s of the persist scenario on one chat process and on two, each pinned to a
    core of its own, on the deployment's Redis and database server: `scaling_pairs` pairs of
    runs, in alternating order (1 then 2, 2 then 1, ...).

    A run's rate counts a message once it is acked (stored) and delivered to both members of
    its room, within the window: the smaller of the two rates. The client opens a room's two
    members on different processes (bench.client.open_room), so with two processes each
    process receives every message of its rooms from Redis; with one, the one process does.
    The ratio is the median of the pairs' ratios: the issue's "2 processes ≥ 1.8x one".
    """
    runs: dict[int, list[dict]] = {1: [], 2: []}
    ratios = []
    for pair in range(opts.scaling_pairs):
        for procs in (1, 2) if pair % 2 == 0 else (2, 1):
            run_opts = dataclasses.replace(
                opts, server_procs=procs, server_cpus=",".join(str(c) for c in cores[:procs])
            )
            with Stage(TARGETS["chat"], deployment, run_opts, f"scale{procs}") as stage:
                figures = await persist(stage)
            figures["rate"] = min(figures["messages_per_s"], figures["delivered_messages_per_s"])
            runs[procs].append(figures)
        one, two = runs[1][-1]["rate"], runs[2][-1]["rate"]
        ratios.append(round(two / one, 2) if one else None)
    measured = [r for r in ratios if r is not None]
    return {
        "cores": cores,
        "one": runs[1],
        "two": runs[2],
        "ratios": ratios,
        "ratio": median(measured) if len(measured) == len(ratios) else None,
    }


# --- profile: py-spy on the chat server during a scenario ---


class PySpy:
    """py-spy recording the first server, on the client's core, without pausing the server."""

    def __init__(self, stage: Stage, out_path: Path) -> None:
        self.stage, self.raw = stage, out_path.with_suffix(".collapsed")

    def __enter__(self) -> PySpy:
        self.process = subprocess.Popen(
            [
                "taskset",
                "-c",
                str(self.stage.opts.client_cpu),
                str(Path(sys.executable).with_name("py-spy")),
                "record",
                "--pid",
                str(self.stage.servers[0].pid),
                "--rate",
                "200",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(self.raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        _, err = self.process.communicate(timeout=60)
        self.error = err.decode(errors="replace")[-500:]

    def result(self) -> dict:
        if not self.raw.exists():
            return {"error": self.error}
        stacks: dict[str, int] = {}
        for line in self.raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():  # a line cut short when py-spy was stopped
                continue
            stacks[stack] = stacks.get(stack, 0) + int(count)
        return {**summarize_stacks(stacks), "stacks": stacks}


async def profile_broadcast(stage: Stage, out_path: Path) -> dict:
    """The broadcast scenario at one rate for profile_duration seconds, under py-spy."""
    opts = stage.opts
    (spec,) = stage.seed(1, opts.members)
    books = Books()
    room = await open_room(stage.target, spec["slug"], spec["members"], books, ports=stage.ports)
    await settle(books)
    members = len(room.conns)
    msg_rate = opts.profile_rate / members
    n_messages = round(msg_rate * opts.profile_duration)
    books.reset()
    with PySpy(stage, out_path) as spy, Window(stage) as window:
        await paced_send(room, n_messages, msg_rate)
        await drain(books, n_messages * members)
    await close_all([room])
    return {
        "rate": opts.profile_rate,
        "members": members,
        **delivery_books(books, n_messages * members),
        **window.figures(per=books.deliveries, unit="delivery"),
        **spy.result(),
    }


async def profile_handshakes(stage: Stage, out_path: Path) -> dict:
    with PySpy(stage, out_path) as spy:
        figures = await handshakes(stage)
    return {**figures, **spy.result()}


async def profile_persist(stage: Stage, out_path: Path) -> dict:
    """The persist scenario with py-spy on the measured window only (not on the connects)."""
    return await persist(stage, out_path)


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})"


# Leaves where a thread waits rather than works (py-spy --nonblocking cannot always tell).
IDLE_LEAVES = {
    "EpollSelector.select (selectors.py)",
    "Condition.wait (threading.py)",
    "Thread._wait_for_tstate_lock (threading.py)",
    "_worker (concurrent/futures/thread.py)",
    "DatabaseThread._work (chatproject/dbthread.py)",  # waiting in SimpleQueue.get, in C
}

# What kind of work a sample is, by the first rule that matches from the leaf up.
CATEGORIES = [
    ("database connection open/close", ("get_new_connection", "._close (django/db", "connect (")),
    (
        "SQL execution and commit (driver)",
        ("CursorWrapper.execute", "_commit (django/db", "executemany", "fetchmany", "fetchone"),
    ),
    ("ORM: building queries and models", ("django/db/",)),
    ("JWT and signing", ("rest_framework_simplejwt/", "jwt/", "hmac", "hashlib")),
    (
        "Django HTTP stack, DRF, middleware",
        (
            "rest_framework/",
            "django/core/handlers",
            "django/middleware",
            "django/contrib",
            "csp/",
            "whitenoise/",
            "django/http",
            "django/urls",
        ),
    ),
    ("JSON encode/decode", ("json/",)),
    (
        "WebSocket and HTTP I/O (daphne, autobahn, Twisted)",
        ("autobahn/", "twisted/", "daphne/", "txaio/"),
    ),
    ("channel layer", ("channels/layers", "channels_redis/")),
    (
        "thread hops (asgiref, executor, the database thread)",
        (
            "asgiref/",
            "concurrent/futures",
            "threading.py",
            "channels/db.py",
            "chatproject/dbthread.py",
        ),
    ),
    ("asyncio event loop", ("asyncio/",)),
]


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return "other (project code, stdlib)"


def summarize_stacks(stacks: dict[str, int], top: int = 25) -> dict:
    """Self and total shares per function and per kind of work, from py-spy's collapsed stacks.

    Shares are of busy samples: idle waits (epoll, an empty thread pool) are left out.
    """
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    busy = idle = 0
    for stack, count in stacks.items():
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        if frames[-1] in IDLE_LEAVES:
            idle += count
            continue
        busy += count
        self_time[frames[-1]] += count
        kinds[_category(frames)] += count
        for name in set(frames):
            total_time[name] += count

    def share(items) -> list[list]:
        return [[name, round(100 * n / max(busy, 1), 1)] for name, n in items]

    project = [
        (name, n)
        for name, n in total_time.most_common()
        if re.search(r"\((chat|accounts|chatproject)/", name)
    ]
    return {
        "samples": busy + idle,
        "busy_samples": busy,
        "idle_share": round(idle / max(busy + idle, 1), 3),
        "top_self": share(self_time.most_common(top)),
        "top_total": share(total_time.most_common(top)),
        "top_project": share(project[:top]),
        "kinds": share(kinds.most_common()),
    }


def _log(stage: Stage, what: str, figures: dict) -> None:
    keys = (
        "deliveries_per_s",
        "p50_ms",
        "p99_ms",
        "lost",
        "duplicated",
        "server_cpu_us_per_delivery",
        "client_core_share",
        "handshakes_per_s",
        "server_cpu_us_per_handshake",
        "rss_per_connection_kb",
        "messages_per_s",
        "server_cpu_us_per_message",
    )
    shown = ", ".join(f"{k}={figures[k]}" for k in keys if k in figures)
    if apart := figures.get("apart"):
        shown += ", apart: " + ", ".join(f"{k}={v}" for k, v in apart.items())
    print(f"  [{stage.target.name}] {what}: {shown}", flush=True)
