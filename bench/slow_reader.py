"""Memory with a client that never reads in a busy room: `python -m bench.slow_reader`.

One member of a room connects, reads its hello and never reads again (a tiny receive buffer, so
the kernel holds little for it); the other sends ROUNDS x MESSAGES large messages and reads its
own traffic. The server's RSS is sampled throughout. Run twice: with the slow-reader guard as
shipped (the socket is dropped once backed up past CHAT_SLOW_CLIENT_TIMEOUT or
CHAT_SLOW_CLIENT_MAX_BYTES) and with it disabled. Bounded memory shows as a flat peak across
rounds; without the guard, what the stalled socket never reads stays queued in the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import httpx
import websockets

from bench.servers import TARGETS, Deployment, Server, free_port

BODY = "x" * 3900
DISABLED = {"CHAT_SLOW_CLIENT_TIMEOUT": "1000000", "CHAT_SLOW_CLIENT_MAX_BYTES": "100000000000"}


async def connect(server: Server, slug: str, token: str, *, stalled: bool):
    async with httpx.AsyncClient(base_url=server.origin) as http:
        response = await http.post(
            "/api/tickets/", json={"room": slug}, headers={"Authorization": f"Bearer {token}"}
        )
        ticket = response.json()
    sock = socket.socket()
    if stalled:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    ws = await websockets.connect(
        f"ws://127.0.0.1:{server.port}{ticket['ws_url']}",
        sock=sock,
        subprotocols=["chat.v1", f"ticket.{ticket['ticket']}"],
        origin=server.origin,
        max_queue=1 if stalled else None,
        ping_interval=None,
    )
    await ws.recv()  # hello
    return ws


async def one_round(server: Server, room: dict, messages: int, tag: str) -> tuple[float, float]:
    """Returns (RSS at the start, peak RSS) in MiB for one round."""
    stalled = await connect(server, room["slug"], room["members"][1]["token"], stalled=True)
    sender = await connect(server, room["slug"], room["members"][0]["token"], stalled=False)
    start = peak = server.rss_bytes() / 2**20
    acks = 0

    async def read() -> None:
        nonlocal acks
        async for frame in sender:
            if frame.startswith('{"type":"ack"'):
                acks += 1

    reader = asyncio.create_task(read())
    for i in range(messages):
        await sender.send(json.dumps({"type": "message", "body": BODY, "client_id": f"{tag}{i}"}))
        if i % 100 == 0:
            peak = max(peak, server.rss_bytes() / 2**20)
            await asyncio.sleep(0.02)
    while acks < messages:
        peak = max(peak, server.rss_bytes() / 2**20)
        await asyncio.sleep(0.05)
    await asyncio.sleep(2)
    peak = max(peak, server.rss_bytes() / 2**20)
    reader.cancel()
    await sender.close()
    stalled.transport.abort()
    return start, peak


async def measure(deployment: Deployment, env: dict, rounds: int, messages: int) -> list[dict]:
    db_env = deployment.fresh_database()
    [room] = deployment.seed(db_env, prefix=f"s{time.time_ns()}", rooms=1, members=2)
    port = free_port()
    server_env = {
        **deployment.env,
        **db_env,
        **env,
        "CHAT_ALLOWED_ORIGINS": f"http://127.0.0.1:{port}",
    }
    log = deployment.workdir / f"slow-reader-{port}.log"
    server = Server(TARGETS["chat"], server_env, port=port, cpus="0", log_path=log).start()
    try:
        results = []
        for r in range(rounds):
            start, peak = await one_round(server, room, messages, tag=f"r{r}-")
            results.append(
                {"round": r + 1, "rss_start_mib": round(start, 1), "rss_peak_mib": round(peak, 1)}
            )
        return results
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.slow_reader")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=10_000, help="per round, 3.9 KB each")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory(prefix="bench-slow-") as workdir:
        deployment = Deployment(Path(workdir))
        deployment.prepare()
        mib = args.messages * len(BODY) / 2**20
        for label, env in (("guard on (as shipped)", {}), ("guard off", DISABLED)):
            rows = asyncio.run(measure(deployment, env, args.rounds, args.messages))
            peaks = ", ".join(f"{row['rss_peak_mib']:.0f}" for row in rows)
            print(
                f"{label}: peak RSS per round {peaks} MiB "
                f"({args.rounds} rounds of {args.messages} x 3.9 KB = {mib:.0f} MiB each)"
            )


if __name__ == "__main__":
    main()
