#!/usr/bin/env python3
"""Ferry data-path benchmarks, each against its peer tool in the same run.

    python3 bench/run.py [--rounds 3] [--only write|sync|lag|points|journal]

Needs a release build (cargo build --release -p ferry), qemu-utils. The "shipping paused" row needs
test-only behaviour: the script builds a second release binary with `--features testing` (in
target/bench-testing) for that row alone and says so. Prints a Markdown summary (medians and
ratios) for BENCHMARKS.md. The machine is shared and noisy: compare ratios.
"""
import argparse, json, os, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRY = os.path.join(ROOT, "target", "release", "ferry")
FERRY_TESTING = os.path.join(ROOT, "target", "bench-testing", "release", "ferry")


def testing_binary():
    """A release ferry with the `testing` feature (shipping pause), built once."""
    print("building a release binary with --features testing for the shipping-paused row", file=sys.stderr)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "ferry", "--features", "testing",
                    "--target-dir", os.path.join(ROOT, "target", "bench-testing")], check=True, cwd=ROOT)
    return FERRY_TESTING


def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def wait_port(p, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", p), 0.2).close(); return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {p} never opened")


def wait_socket(path, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.socket(socket.AF_UNIX) as so:
                so.connect(path)
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"socket {path} never opened")


def status(p):
    with urllib.request.urlopen(f"http://127.0.0.1:{p}/status", timeout=5) as r:
        return json.load(r)


class Chain:
    """MT + PS + agent on loopback with TLS, each a real process."""

    def __init__(self, d, disk, extra_agent=(), extra_mt=()):
        self.d, self.disk, self.procs = d, disk, {}
        self.extra_mt = list(extra_mt)
        # Listeners bound here and handed to each start (FERRY_LISTEN_FDS): no port is chosen by
        # one process and bound by another, and a restarted daemon keeps its address.
        self.socks = {}
        for k in ["as", "ps", "pss", "mt", "mts"]:
            so = socket.socket(); so.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            so.bind(("127.0.0.1", 0)); so.listen(128); self.socks[k] = so
        self.p = {k: so.getsockname()[1] for k, so in self.socks.items()}
        self.exe_for = {}
        if not os.path.exists(f"{d}/certs/agent-vm1.pem"):
            run([FERRY, "certs", "--dir", f"{d}/certs", "--component", "process-server", "--component", "master-target", "--component", "agent/vm1"])
        self.extra_agent = list(extra_agent)
        # The agent's disks: its owner-only unix socket (plain TCP NBD is refused).
        self.nbd_url = f"nbd+unix:///disk0?socket={d}/nbd.sock"

    def start(self, which):
        d, p = self.d, self.p
        args = {
            "master-target": ["--datastore", f"{d}/ds", "--retention", f"{d}/ret", "--listen", f"127.0.0.1:{p['mt']}", "--status-listen", f"127.0.0.1:{p['mts']}", "--certs", f"{d}/certs"] + self.extra_mt,
            "process-server": ["--cache-dir", f"{d}/cache", "--cache-capacity-bytes", str(8 << 30), "--listen", f"127.0.0.1:{p['ps']}", "--status-listen", f"127.0.0.1:{p['pss']}", "--master-target", f"127.0.0.1:{p['mt']}", "--certs", f"{d}/certs"],
            "agent": ["--machine", "vm1", "--state-dir", f"{d}/agent", "--process-server", f"127.0.0.1:{p['ps']}", "--nbd-socket", f"{d}/nbd.sock", "--status-listen", f"127.0.0.1:{p['as']}", "--certs", f"{d}/certs", "--disk", f"disk0={self.disk}"] + self.extra_agent,
        }[which]
        log = open(f"{d}/{which}.log", "a")
        exe = self.exe_for.get(which, FERRY)
        keys = {"master-target": [("listen", "mt"), ("status_listen", "mts")],
                "process-server": [("listen", "ps"), ("status_listen", "pss")],
                "agent": [("status_listen", "as")]}[which]
        fds = [self.socks[k].fileno() for _, k in keys]
        env = dict(os.environ, FERRY_LISTEN_FDS=",".join(f"{key}={self.socks[k].fileno()}" for key, k in keys))
        self.procs[which] = subprocess.Popen([exe, "--log", "warn", which] + args, stdout=log, stderr=log,
                                             pass_fds=fds, env=env)
        wait_port({"master-target": p["mts"], "process-server": p["pss"], "agent": p["as"]}[which])

    def start_all(self):
        for w in ["master-target", "process-server", "agent"]:
            self.start(w)

    def stop(self, which=None):
        for w in ([which] if which else list(self.procs)):
            pr = self.procs.pop(w, None)
            if pr:
                pr.send_signal(signal.SIGTERM)
                try:
                    pr.wait(30)
                except subprocess.TimeoutExpired:
                    pr.kill(); pr.wait()

    def wait_caught_up(self, timeout=600, poll=0.05):
        end = time.time() + timeout
        while time.time() < end:
            try:
                if status(self.p["as"])["caught_up"]:
                    return
            except Exception:
                pass
            time.sleep(poll)
        raise RuntimeError("not caught up")


def bench_seconds(url, count, depth, size):
    out = run(["qemu-img", "bench", "-w", "-f", "raw", "-c", str(count), "-d", str(depth), "-s", size, url]).stdout
    return float(re.search(r"Run completed in ([0-9.]+) seconds", out).group(1))


def write_throughput(rounds, work, extra=()):
    extra = list(extra)
    count, depth, size = 200000, 64, "4k"
    mib = count * 4096 / (1 << 20)
    img = f"{work}/w.img"
    res = {"qemu-nbd": [], "ferry (shipping paused)": [], "ferry (replicating)": []}
    testing = testing_binary()
    for r in range(rounds):
        # qemu-nbd, writeback cache, same preallocated image.
        shutil.rmtree(f"{work}/wq", ignore_errors=True); os.makedirs(f"{work}/wq")
        run(["qemu-img", "create", "-f", "raw", "-o", "preallocation=falloc", img, "1G"])
        # Served the way Ferry's agent serves its disks: a unix socket.
        sock = f"{work}/wq/nbd.sock"
        q = subprocess.Popen(["qemu-nbd", "-f", "raw", "--cache=writeback", "-t", "-k", sock, "-x", "disk0", img])
        wait_socket(sock)
        res["qemu-nbd"].append(mib / bench_seconds(f"nbd+unix:///disk0?socket={sock}", count, depth, size))
        q.terminate(); q.wait()
        for mode in ["ferry (shipping paused)", "ferry (replicating)"]:
            d = f"{work}/wf"; shutil.rmtree(d, ignore_errors=True); os.makedirs(d)
            run(["qemu-img", "create", "-f", "raw", "-o", "preallocation=falloc", img, "1G"])
            c = Chain(d, img, ["--log-limit-bytes", str(2 << 30)] + extra)
            c.start_all(); c.wait_caught_up()  # initial sync of a zeroed disk
            if mode.endswith("paused)"):
                c.stop("agent"); c.extra_agent.append("--shipping-paused"); c.exe_for["agent"] = testing
                c.start("agent")
            res[mode].append(mib / bench_seconds(c.nbd_url, count, depth, size))
            c.stop()
    return res


def make_half_data(path):
    """1 GiB: 512 MiB of random data and 512 MiB of written zeros, interleaved in 32 MiB runs."""
    with open(path, "wb") as f:
        rnd = os.urandom(32 << 20)
        zero = bytes(32 << 20)
        for i in range(32):
            f.write(rnd if i % 2 == 0 else zero)
        f.flush(); os.fsync(f.fileno())


def initial_sync(rounds, work):
    src = f"{work}/src.img"
    make_half_data(src)
    res = {"cp --sparse=always && sync": [], "qemu-img convert → qemu-nbd": [], "ferry initial sync": []}
    for r in range(rounds):
        dst = f"{work}/cp.img"
        if os.path.exists(dst): os.remove(dst)
        t = time.time(); run(["cp", "--sparse=always", src, dst]); run(["sync"]); res["cp --sparse=always && sync"].append(time.time() - t)
        os.remove(dst)
        tgt = f"{work}/q.img"; run(["qemu-img", "create", "-f", "raw", tgt, "1G"])
        p = port()
        q = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-p", str(p), "-b", "127.0.0.1", "-x", "t", tgt]); wait_port(p)
        t = time.time(); run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, f"nbd://127.0.0.1:{p}/t"]); run(["sync"])
        res["qemu-img convert → qemu-nbd"].append(time.time() - t)
        q.terminate(); q.wait(); os.remove(tgt)
        d = f"{work}/sync"; shutil.rmtree(d, ignore_errors=True); os.makedirs(d)
        c = Chain(d, src)
        c.start("master-target"); c.start("process-server")
        t = time.time(); c.start("agent"); c.wait_caught_up(poll=0.02); res["ferry initial sync"].append(time.time() - t)
        c.stop()
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, f"{d}/ds/vm1/disk0.img"])
        assert cmp.returncode == 0, "initial sync result differs"
        shutil.rmtree(d)
    return res


def lag(work, rate_mib=20, seconds=15):
    img = f"{work}/lag.img"; run(["qemu-img", "create", "-f", "raw", img, "1G"])
    d = f"{work}/lag"; shutil.rmtree(d, ignore_errors=True); os.makedirs(d)
    c = Chain(d, img); c.start_all(); c.wait_caught_up()
    # 1 MiB writes every 1000/rate ms.
    period = int(1000 / rate_mib)
    n = rate_mib * seconds
    cmds = "".join(f"write -P {i % 250 + 1} {(i % 1000) << 20} 1M\nsleep {period}\n" for i in range(n)) + "flush\n"
    qio = subprocess.Popen(["qemu-io", "-f", "raw", c.nbd_url], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    qio.stdin.write(cmds); qio.stdin.close()
    samples = []
    while qio.poll() is None:
        samples.append(status(c.p["as"])["lag_seconds"]); time.sleep(0.05)
    c.wait_caught_up(); c.stop()
    samples.sort()
    return {"p50": samples[len(samples) // 2], "p99": samples[int(len(samples) * 0.99)], "max": samples[-1], "samples": len(samples)}


def api(p, method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{p}{path}", method=method, data=json.dumps(body).encode() if body is not None else None, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def points_bench(rounds, work):
    """Materializing a point of a 4 GiB disk with 1% changed since the base, vs a full copy."""
    src = f"{work}/p4g.img"
    with open(src, "wb") as f:
        rnd = os.urandom(64 << 20)
        for _ in range(64):
            f.write(rnd)
        f.flush(); os.fsync(f.fileno())
    d = f"{work}/pts"; shutil.rmtree(d, ignore_errors=True); os.makedirs(d)
    c = Chain(d, src, ["--set", "crash_point_interval_secs=0"])
    c.start_all(); c.wait_caught_up()
    import random
    rng = random.Random(7)
    n = (4 << 30) // 100 // 65536
    cmds = "".join(f"aio_write -P {i % 250 + 1} {rng.randrange(0, (4 << 30) // 65536) * 65536} 64k\n" for i in range(n)) + "aio_flush\nflush\n"
    run(["qemu-io", "-f", "raw", c.nbd_url], input=cmds)
    c.wait_caught_up()
    pt = api(c.p["mts"], "POST", "/machines/vm1/points", {"selector": "latest"})
    res = {"cp && sync (full copy)": [], "qemu-img convert -O qcow2 (full copy)": [], "ferry raw image": [], "ferry qcow2 overlay on the base": [], "ferry NBD export (index)": []}
    for r in range(rounds):
        t = time.time(); run(["cp", src, f"{work}/copy.img"]); run(["sync"]); res["cp && sync (full copy)"].append(time.time() - t)
        os.remove(f"{work}/copy.img")
        t = time.time(); run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, f"{work}/copy.qcow2"]); run(["sync"]); res["qemu-img convert -O qcow2 (full copy)"].append(time.time() - t)
        os.remove(f"{work}/copy.qcow2")
        for name, body in [("ferry raw image", {"kind": "image", "format": "raw"}), ("ferry qcow2 overlay on the base", {"kind": "image", "format": "qcow2"}), ("ferry NBD export (index)", {"kind": "export"})]:
            body = dict(body, point=pt["id"], dir=f"{work}/m{r}-{len(res[name])}") if body["kind"] == "image" else dict(body, point=pt["id"])
            t = time.time(); m = api(c.p["mts"], "POST", "/machines/vm1/materializations", body); res[name].append(time.time() - t)
            if r == 0 and body["kind"] == "image":
                fmt = body["format"]
                cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, src, m["files"][0]], capture_output=True)
                assert cmp.returncode == 0, f"{fmt} image differs from the source: {cmp.stdout}"
            api(c.p["mts"], "DELETE", f"/materializations/{m['id']}")
    c.stop(); shutil.rmtree(d, ignore_errors=True); os.remove(src)
    return res


def journal_bench(work):
    """1 GiB of 64 KiB writes end to end (until applied): history off, on, on with pruning."""
    out = {}
    for name, window in [("history off (retention_window_secs = 0)", 0), ("history on, 24 h window (no pruning)", 86400), ("history on, 5 s window (pruning runs)", 5)]:
        img = f"{work}/j.img"; run(["qemu-img", "create", "-f", "raw", img, "2G"])
        d = f"{work}/j"; shutil.rmtree(d, ignore_errors=True); os.makedirs(d)
        c = Chain(d, img, ["--set", "crash_point_interval_secs=1"], ["--set", f"retention_window_secs={window}"])
        c.start_all(); c.wait_caught_up()
        t = time.time()
        bench_seconds(c.nbd_url, 16384, 16, "64k")
        c.wait_caught_up(poll=0.02)
        secs = time.time() - t
        m = status(c.p["mts"])["machines"][0]["retention"]
        out[name] = {"seconds": secs, "mib_s": 1024 / secs, "journal_bytes": m["journal_bytes"], "payload": m["journal_payload_bytes"], "per_gib": m["journal_bytes_per_gib_written"], "base_bytes": m["base_bytes"]}
        c.stop(); shutil.rmtree(d, ignore_errors=True); os.remove(img)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only")
    ap.add_argument("--work", default=None)
    ap.add_argument("--agent-set", action="append", default=[], help="KEY=VALUE passed to the agent as --set")
    a = ap.parse_args()
    if not os.path.exists(FERRY):
        sys.exit("build first: cargo build --release -p ferry")
    work = a.work or tempfile.mkdtemp(prefix="ferry-bench-")
    print(f"machine: {os.cpu_count()} cores; {run(['uname', '-r']).stdout.strip()}; work dir {work}")
    if a.only in (None, "write"):
        res = write_throughput(a.rounds, work, [x for s in a.agent_set for x in ("--set", s)])
        base = statistics.median(res["qemu-nbd"])
        print("\n| write path (qemu-img bench -w -c 200000 -d 64 -s 4k) | median MiB/s | runs | vs qemu-nbd |\n|---|---|---|---|")
        for k, v in res.items():
            m = statistics.median(v)
            print(f"| {k} | {m:.1f} | {', '.join(f'{x:.1f}' for x in v)} | {m / base:.2f}x |")
    if a.only in (None, "sync"):
        res = initial_sync(a.rounds, work)
        base = statistics.median(res["cp --sparse=always && sync"])
        print("\n| initial sync, 1 GiB (half data, half zeros) | median s | runs | vs cp |\n|---|---|---|---|")
        for k, v in res.items():
            m = statistics.median(v)
            print(f"| {k} | {m:.2f} | {', '.join(f'{x:.2f}' for x in v)} | {m / base:.2f}x |")
    if a.only in (None, "points"):
        res = points_bench(a.rounds, work)
        base = statistics.median(res["cp && sync (full copy)"])
        print("\n| a point of a 4 GiB disk, 1% changed since the base | median s | runs | vs cp |\n|---|---|---|---|")
        for k, v in res.items():
            m = statistics.median(v)
            print(f"| {k} | {m:.3f} | {', '.join(f'{x:.3f}' for x in v)} | {m / base:.3f}x |")
    if a.only in (None, "journal"):
        res = journal_bench(work)
        print("\n| 1 GiB of 64 KiB writes, until applied | s | MiB/s | journal bytes kept | journal bytes per GiB written |\n|---|---|---|---|---|")
        for k, v in res.items():
            print(f"| {k} | {v['seconds']:.2f} | {v['mib_s']:.0f} | {v['journal_bytes']} | {v['per_gib'] / (1 << 30):.4f} GiB |")
    if a.only in (None, "lag"):
        r = lag(work)
        print(f"\nreplication lag at 20 MiB/s for 15 s: p50 {r['p50']:.3f} s, p99 {r['p99']:.3f} s, max {r['max']:.3f} s ({r['samples']} samples)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
