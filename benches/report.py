"""Turns compare.sh's raw runs (target, script, mode, tps, latency[, proxy CPU us per transaction]) into one
Markdown table: mean TPS, latency and proxy CPU per cell, with ratios to direct PostgreSQL and to PgBouncer in
the same pool mode."""
import sys
from collections import defaultdict
from statistics import mean

raw, stamp, setup = sys.argv[1], sys.argv[2], sys.argv[3]
cells = defaultdict(list)
order = []
for line in open(raw):
    target, script, mode, tps, lat, *rest = line.rstrip("\n").split("\t")
    cpu = float(rest[0]) if rest and rest[0] else None
    key = (script, mode, target)
    if key not in cells:
        order.append(key)
    cells[key].append(None if tps == "fail" else (float(tps), float(lat), cpu))


def summary(key):
    runs = cells.get(key)
    if not runs or any(r is None for r in runs):
        return None
    cpus = [r[2] for r in runs if r[2] is not None]
    return mean(r[0] for r in runs), mean(r[1] for r in runs), mean(cpus) if cpus else None


def bouncer_for(target):
    if target.startswith("pgtenant-"):
        return "pgbouncer-" + target.split("-", 1)[1]
    return None


print(f"## pgbench side by side ({stamp})\n")
print(f"{setup}. TPS and latency are means over the repetitions; ratios compare TPS in the same cell.\n")
print("| script | -M | target | TPS | avg latency ms | proxy CPU µs/txn | vs direct | vs PgBouncer (same pool mode) |")
print("|---|---|---|---:|---:|---:|---:|---:|")
for script, mode, target in order:
    s = summary((script, mode, target))
    if s is None:
        print(f"| {script} | {mode} | {target} | fail | | | | |")
        continue
    d = summary((script, mode, "direct"))
    b_name = bouncer_for(target)
    b = summary((script, mode, b_name)) if b_name else None
    vs_d = f"{s[0] / d[0]:.2f}" if d else ""
    vs_b = f"{s[0] / b[0]:.2f}" if b else ""
    cpu = f"{s[2]:.1f}" if s[2] is not None else ""
    print(f"| {script} | {mode} | {target} | {s[0]:.0f} | {s[1]:.3f} | {cpu} | {vs_d} | {vs_b} |")
