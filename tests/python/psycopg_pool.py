"""psycopg 3 prepared statements through pgtenant with more clients than backend connections: automatic
preparation after N executions, statement names that repeat across connections (psycopg names them _pg3_0,
_pg3_1, ... per connection), eviction from psycopg's own cache (which deallocates), and transactions.
Usage: psycopg_pool.py URL"""
import sys

import psycopg


def main(url):
    conns = [psycopg.connect(url, autocommit=True) for _ in range(5)]
    for i, conn in enumerate(conns):
        conn.prepare_threshold = 0 if i % 2 == 0 else 5  # prepare at once / after five executions
        conn.prepared_max = 3  # small, so psycopg evicts and deallocates
    for rnd in range(12):
        for i, conn in enumerate(conns):
            # Each connection's k-th statement has its own text: the same psycopg name means different statements.
            for k in range(5):
                row = conn.execute(f"SELECT %s::int * {i + 1} + {k}, current_schema()", (rnd,)).fetchone()
                assert row[0] == rnd * (i + 1) + k, (i, k, rnd, row)
                assert row[1] == "tenant_acme", row
            with conn.transaction():
                row = conn.execute(f"SELECT %s::int + {i}", (rnd,)).fetchone()
                assert row[0] == rnd + i, row
    prepared = conns[0].execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
    print("server statements visible on one connection:", prepared)
    for conn in conns:
        conn.close()
    print("psycopg pool ok")


if __name__ == "__main__":
    main(sys.argv[1])
