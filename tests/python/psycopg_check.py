"""psycopg 3 through pgtenant: simple and extended queries, automatic prepared statements, transactions, COPY,
and the SET pgtenant.tenant statement. Usage: psycopg_check.py URL_WITH_TENANT URL_WITHOUT_TENANT"""
import sys

import psycopg


def main(url, url_no_tenant):
    with psycopg.connect(url, autocommit=True) as conn:
        conn.prepare_threshold = 2  # prepare server-side after the second execution
        conn.execute("CREATE TABLE py (id int primary key, v text)")
        for i in range(10):
            conn.execute("INSERT INTO py VALUES (%s, %s)", (i, f"v{i}"))
        assert conn.execute("SELECT count(*) FROM py").fetchone()[0] == 10
        with conn.transaction():
            conn.execute("UPDATE py SET v = 'changed' WHERE id = %s", (3,))
        try:
            with conn.transaction():
                conn.execute("UPDATE py SET v = 'rolled back' WHERE id = %s", (4,))
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        assert conn.execute("SELECT v FROM py WHERE id = 4").fetchone()[0] == "v4"
        with conn.cursor() as cur:
            with cur.copy("COPY py (id, v) FROM STDIN") as copy:
                for i in range(10, 1010):
                    copy.write_row((i, f"row {i}"))
        rows = []
        with conn.cursor() as cur:
            with cur.copy("COPY (SELECT id FROM py ORDER BY id) TO STDOUT") as copy:
                for row in copy.rows():
                    rows.append(int(row[0]))
        assert rows == list(range(1010)), rows[:5]
        schema = conn.execute("SELECT current_schema()").fetchone()[0]
        assert schema == "tenant_acme", schema
    with psycopg.connect(url_no_tenant, autocommit=True) as conn:
        conn.execute("SET pgtenant.tenant = 'acme'")
        assert conn.execute("SELECT count(*) FROM py").fetchone()[0] == 1010
    print("psycopg ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
