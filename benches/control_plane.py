"""Control-plane scale, measured against a running pgtenant (driven by benches/control_plane.sh).

    python3 benches/control_plane.py PID ADMIN_SOCKET PROXY_DSN TENANTS CHANGES

Makes CHANGES route changes (`tenant set` of tenants spread over TENANTS, each a new schema) over one admin
connection, while a client of tenant t0 runs `SELECT 1` in a loop through the proxy; prints one markdown row:
change latency p50/p99/max, that client's worst latency and its queries per second before and during the
changes, RSS before and after.
"""
import json
import os
import socket
import statistics
import sys
import threading
import time

import psycopg


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Admin:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")

    def call(self, request):
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        answer = json.loads(self.file.readline())
        if not answer.get("ok", False):
            raise RuntimeError(f"{request}: {answer}")
        return answer


def select_loop(dsn, stop, worst):
    """worst = [worst latency, queries, seconds]."""
    with psycopg.connect(dsn, autocommit=True) as c:
        start = time.perf_counter()
        while not stop.is_set():
            t = time.perf_counter()
            c.execute("SELECT 1").fetchone()
            worst[0] = max(worst[0], time.perf_counter() - t)
            worst[1] += 1
        worst[2] = time.perf_counter() - start


def worst_select(dsn, seconds):
    stop, worst = threading.Event(), [0.0, 0, 0.0]
    th = threading.Thread(target=select_loop, args=(dsn, stop, worst))
    th.start()
    time.sleep(seconds)
    stop.set()
    th.join()
    return worst


def main():
    pid, path, dsn, tenants, changes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    # TOUCHED: how many distinct tenants the changes go to (default all but t0).
    touched = max(1, min(int(os.environ.get("TOUCHED", tenants - 1)), tenants - 1))
    admin = Admin(path)
    quiet = worst_select(dsn, 2.0)
    rss_before = rss_mb(pid)
    stop, worst = threading.Event(), [0.0, 0, 0.0]
    th = threading.Thread(target=select_loop, args=(dsn, stop, worst))
    th.start()
    lat = []
    rss_mid = rss_before
    for i in range(changes):
        if i == changes // 5:
            rss_mid = rss_mb(pid)
        tenant = f"t{1 + (i * 7919) % touched}"
        t = time.perf_counter()
        admin.call({"cmd": "tenant.set", "tenant": tenant, "backend": "main", "schema": f"s{i}"})
        lat.append(time.perf_counter() - t)
    stop.set()
    th.join()
    time.sleep(1.0)
    rss_after = rss_mb(pid)
    lat.sort()
    ms = lambda s: f"{s * 1000:.2f}"
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(
        f"| {tenants} | {changes} | {ms(statistics.median(lat))} / {ms(p99)} / {ms(lat[-1])} "
        f"| {ms(quiet[0])} / {ms(worst[0])} | {quiet[1] / quiet[2]:.0f} / {worst[1] / worst[2]:.0f} "
        f"| {rss_before:.0f} -> {rss_mid:.0f} -> {rss_after:.0f} |"
    )


main()
