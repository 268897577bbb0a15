"""Measures the per-tenant gate under load: time from `pause` to "no open transaction" (the proxy reports it as
drain_ms), and time from `resume` to a queued query having run. Usage: gate_latency.py ADMIN_SOCKET PROBE_URL ROUNDS"""
import json
import socket
import statistics
import sys
import threading
import time

import psycopg


def admin(path, request):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall((json.dumps(request) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data)
    if not answer["ok"]:
        raise RuntimeError(answer["error"])
    return answer["result"]


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main(sock, url, rounds):
    probe = psycopg.connect(url, autocommit=True)
    drains, resumes, queued = [], [], []
    for _ in range(rounds):
        r = admin(sock, {"cmd": "pause", "tenant": "acme", "timeout_ms": 5000})
        assert r["drained"], r
        drains.append(r["drain_ms"])
        done = threading.Event()
        finished_at = []

        def run_probe():
            probe.execute("SELECT 1")
            finished_at.append(time.perf_counter())
            done.set()

        t = threading.Thread(target=run_probe)
        t.start()
        time.sleep(0.05)
        queued.append(admin(sock, {"cmd": "tenant.get", "tenant": "acme"})["gate"]["queued"])
        t0 = time.perf_counter()
        admin(sock, {"cmd": "resume", "tenant": "acme"})
        done.wait(10)
        t.join()
        resumes.append((finished_at[0] - t0) * 1000)
        time.sleep(0.2)
    for name, v in (("pause -> no open transaction (ms)", drains), ("resume -> queued probe query done (ms)", resumes)):
        print(f"{name}: p50 {pct(v, 50):.2f}  p99 {pct(v, 99):.2f}  max {max(v):.2f}  (n={len(v)})")
    print(f"requests queued at the gate when resumed: median {statistics.median(queued):.0f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
