"""Opens N idle client connections through pgtenant and reports the proxy's RSS growth per connection.
Usage: idle_memory.py PROXY_PID URL N [all]   (all: every connection runs one query first, not just three)"""
import sys
import time

import psycopg


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main(pid, url, n, every=False):
    before = rss_kib(pid)
    conns = [psycopg.connect(url, autocommit=True) for _ in range(n)]
    for c in conns if every else conns[:3]:
        c.execute("SELECT 1") if "app." in url else None
    time.sleep(1)
    after = rss_kib(pid)
    print(f"{n} idle connections: RSS {before} -> {after} KiB, {(after - before) / n:.1f} KiB per connection")
    for c in conns:
        c.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:] == ["all"])
