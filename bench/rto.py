#!/usr/bin/env python3
"""RTO in the lab: from the failover request until the machine runs at the recovery site (its
agent registered and reporting, its workload writing), for planned and unplanned failovers,
beside the same run's baseline: powering a stopped machine on in place until its workload writes
(the floor any failover pays: the guest's boot delay and its agent's start).

    python3 bench/rto.py [--rounds 3]

Needs a release build (cargo build --release -p ferry). One lab with 2 x rounds protected
machines plus one for the baseline; each failover uses a machine of its own. Prints a Markdown
table of medians for BENCHMARKS.md.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRY = os.path.join(ROOT, "target", "release", "ferry")


def lab_toml(n):
    machines = "".join(
        f"""
[[sites.machines]]
name = "m{i}"
os_family = "linux"
host = "esx-p1"
datastore = "vmfs-p"
disks = [{{ name = "disk0", size = 67108864 }}]
workload = {{ rate = 20, max_blocks = 8, seed = {100 + i} }}
"""
        for i in range(n)
    )
    return f"""
boot_delay_secs = 1.0
heartbeat_interval_secs = 1.0
[[sites]]
name = "primary"
config_server = true
hosts = [{{ name = "esx-p1" }}]
datastores = [{{ name = "vmfs-p", kind = "vmfs", hosts = ["esx-p1"] }}]
process_server = {{ name = "ps-primary" }}
{machines}
[[sites]]
name = "recovery"
hosts = [{{ name = "esx-r1" }}]
datastores = [{{ name = "vmfs-r", kind = "vmfs", hosts = ["esx-r1"] }}]
[[sites.master_targets]]
name = "mt-r"
os_family = "linux"
host = "esx-r1"
"""


def lines(path):
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def wait(what, cond, limit=120):
    end = time.time() + limit
    while time.time() < end:
        if cond():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out: {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not os.path.exists(FERRY):
        sys.exit("build first: cargo build --release -p ferry")
    tmp = tempfile.mkdtemp(prefix="ferry-rto-")
    lab = os.path.join(tmp, "lab")
    cfg = os.path.join(tmp, "lab.toml")
    n = 2 * args.rounds + 1
    with open(cfg, "w") as f:
        f.write(lab_toml(n))
    st = json.loads(subprocess.run([FERRY, "--output", "json", "lab", "up", lab, "--config", cfg],
                                   check=True, capture_output=True, text=True).stdout)
    env = dict(os.environ, FERRY_LAB=lab, FERRY_SERVER=st["config_server"], FERRY_CA=st["ca"],
               FERRY_TOKEN=st["operator_token"])

    def ferry(*a):
        return subprocess.run([FERRY, *a], check=True, capture_output=True, text=True, env=env).stdout

    try:
        ferry("policies", "create", "gold", "--crash-consistent-secs", "5", "--retention-secs", "3600")
        ferry("protect", *[f"m{i}" for i in range(n)], "--policy", "gold", "--process-server", "ps-primary",
              "--master-target", "mt-r", "--datastore", "vmfs-r")
        guest = lambda site, m: os.path.join(lab, "sites", site, "guests", m, "records.log")
        for i in range(n):
            wait(f"m{i} writes", lambda: lines(guest("primary", f"m{i}")) > 20)
        results = {"planned": [], "unplanned": [], "baseline": []}
        # Baseline: a stopped machine powered on in place, until its workload writes again.
        base = f"m{n - 1}"
        for _ in range(args.rounds):
            ferry("lab", "power-off", base)
            before = lines(guest("primary", base))
            t0 = time.time()
            ferry("lab", "power-on", base)
            wait("the baseline machine writes", lambda: lines(guest("primary", base)) > before)
            results["baseline"].append(time.time() - t0)
        for r in range(args.rounds):
            for kind, m in (("planned", f"m{2 * r}"), ("unplanned", f"m{2 * r + 1}")):
                if kind == "unplanned":
                    ferry("lab", "crash", m)
                rm = f"{m}.recovery"
                t0 = time.time()
                ferry("failover", "start", m, f"--{kind}", "--no-wait")
                wait(f"{rm} writes", lambda: lines(guest("recovery", rm)) > 0)
                results[kind].append(time.time() - t0)
        print(f"| measure (medians of {args.rounds}) | seconds |")
        print("|---|---|")
        for k, label in (("baseline", "power a stopped machine on in place until its workload writes (baseline)"),
                         ("planned", "planned failover: request → machine writing at the recovery site"),
                         ("unplanned", "unplanned failover (primary crashed): request → machine writing at the recovery site")):
            print(f"| {label} | {statistics.median(results[k]):.2f} (all: {', '.join(f'{x:.2f}' for x in results[k])}) |")
    finally:
        subprocess.run([FERRY, "lab", "down", lab, "--remove"], capture_output=True)


if __name__ == "__main__":
    main()
