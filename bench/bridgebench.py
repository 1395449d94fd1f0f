#!/usr/bin/env python3
"""bridgebench - throughput through emqx_lite's MQTT bridge, beside a direct connection.

Starts a remote broker (mosquitto or a second emqx_lite) and, for the bridged
runs, a local emqx_lite whose bridge forwards bench/# to it, on free loopback
ports, fresh for every run::

    python3 bench/bridgebench.py                          # remote: mosquitto if installed
    python3 bench/bridgebench.py --remote emqx_lite --seconds 5
    python3 bench/bridgebench.py --qos 1 --proto-ver mqttv5 --max-inflight 64
    python3 bench/bridgebench.py --json /tmp/bridge.jsonl

Two runs per QoS (--qos 0,1).  "direct": --publishers (4) publishers connect
to the remote; "bridged": they connect to the local emqx_lite, whose config
has bridge.mqtt.bench.address = 127.0.0.1:<remote port>, .forwards = bench/#,
.proto_ver = --proto-ver, .max_inflight = --max-inflight.  In both, one
subscriber on the remote subscribes to bench/# at the run's QoS, counts what
arrives and PUBACKs QoS 1.  Publishers are raw-socket MQTT 3.1.1 clients, one
process each, sending pre-encoded PUBLISHes (64-byte payload, topic
bench/<n>): QoS 0 in 64 KiB batches (only TCP backpressure), QoS 1 with 32
unacknowledged messages at most.

A run: subscriber connected; the local broker started and its bridge
"connected" ($SYS/brokers/+/bridges/bench/status); publishers connected;
publish for the warm-up (1 s) + --seconds (10); drain until the subscriber's
count has not grown for 1 s (at most --drain, 5 s).  Rates (time.monotonic,
measured window only): recv_rate = msg/s at the remote subscriber (the
end-to-end figure), ack_rate = PUBACKs/s to the publishers, pub_rate; after
the drain lost = published - received (drain_settled false: the count still
grew when the drain ended, so "lost" includes a backlog on its way) and
drain_rate.  Bridged runs add the local broker's CPU (utime+stime,
/proc/<pid>/stat) per 1,000 messages received at the remote (and per 1,000
published), and the bridge status changes seen (seconds since the start).

stdout: one JSON line per run, then a table (rows: QoS; columns: direct and
bridged msg/s, their ratio, loss).  Progress on stderr.  Every wait is
bounded; every broker and worker started here is stopped at the end, on
error, Ctrl-C or SIGTERM (and has PR_SET_PDEATHSIG).  127.0.0.1 only.
Standard library, plus mqttbench.py beside this file.  Linux (/proc).
"""

import argparse
import json
import multiprocessing
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

# Helpers shared with mqttbench.py, next to this file (running bench/bridgebench.py
# puts this folder on sys.path).
from mqttbench import (Conn, _str, emqx_lite_version, encode_varint, free_port, machine_info, mqtt_ping,
                       packet_runs, proc_cpu_s)

HOST = "127.0.0.1"
EMQX_LITE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "emqx_lite.py")
BATCH_BYTES = 64 * 1024          # one QoS 0 publisher write; a subscriber naps after reading less
WINDOW = 32                      # QoS 1 messages unacknowledged per publisher
QUIET_S = 1.0                    # the drain ends after this long without a delivery
K_T0, K_TEND, K_STOP, K_DEADLINE = range(4)           # shared control block (coordinator writes)
F_SENT, F_ACKED, F_RECV, F_STATE, NF = range(5)       # one counter slot per worker (it writes)
ST_READY, ST_FAILED = 1, 2


def log(msg):
    print("bridgebench: " + msg, file=sys.stderr, flush=True)


def set_pdeathsig(sig=signal.SIGKILL):
    """Have the kernel send ``sig`` to this process when its parent dies (Linux)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))     # PR_SET_PDEATHSIG
    except (ImportError, OSError, AttributeError):
        pass


# Brokers #####################################################################

class Broker:
    """mosquitto or emqx_lite (with the bridge to ``bridge_port``) on a free 127.0.0.1 port."""

    def __init__(self, kind, role, workdir, opts, bridge_port=None):
        self.kind, self.role, self.port = kind, role, free_port(HOST)
        self.log_path = os.path.join(workdir, "%s-%s.log" % (role, kind))
        conf = os.path.join(workdir, "%s-%s.conf" % (role, kind))
        if kind == "mosquitto":
            text = ("listener %d %s\nallow_anonymous true\nmax_queued_messages 100000\n"
                    "persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n" % (self.port, HOST))
            argv = [opts.mosquitto, "-c", conf]
        else:
            text = "mqtt.mqueue.max_length = 100000\n"     # as mosquitto's max_queued_messages
            if bridge_port:
                text += ("bridge.mqtt.bench.address = %s:%d\nbridge.mqtt.bench.forwards = bench/#\n"
                         "bridge.mqtt.bench.proto_ver = %s\nbridge.mqtt.bench.max_inflight = %d\n"
                         % (HOST, bridge_port, opts.proto_ver, opts.max_inflight))
            argv = [sys.executable, opts.emqx_lite, "--bind", HOST, "--mqtt-port", str(self.port),
                    "--http-port", "-1", "--dashboard-port", "-1", "--data-dir", "",
                    "--log-level", "warning", "--config", conf]
        with open(conf, "w") as f:
            f.write("# generated by bridgebench\n" + text)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=workdir, start_new_session=True, preexec_fn=set_pdeathsig)
        self.pid = self.proc.pid
        try:
            deadline = time.monotonic() + opts.start_timeout
            while not mqtt_ping(socket.AF_INET, (HOST, self.port), 0.5):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("%s %s did not start:\n%s" % (role, kind, self.log_tail()))
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_tail(self, n=12):
        try:
            with open(self.log_path, "rb") as f:
                return "\n".join("    " + s for s in f.read().decode(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# Clients: worker processes ###################################################

def worker(role, n, port, qos, ctl, counters):
    """Publisher ``n`` (role "pub") or the subscriber ("sub"), in a process of its own."""
    set_pdeathsig()
    signal.signal(signal.SIGINT, signal.SIG_IGN)            # the coordinator decides when to stop
    slot = n * NF
    try:
        conn = Conn(socket.AF_INET, (HOST, port), "bb-%s%d-%d" % (role, n, os.getpid()), 300)
        if role == "sub":
            conn.subscribe("bench/#", qos)
        sock = conn.sock
        sock.setblocking(False)
        counters[slot + F_STATE] = ST_READY
        (subscribe_loop if role == "sub" else publish_loop)(sock, n, qos, ctl, counters, slot)
    except Exception as exc:                                 # the run is marked failed
        counters[slot + F_STATE] = ST_FAILED
        log("%s %d: %r" % (role, n, exc))


def publish_loop(sock, n, qos, ctl, counters, slot):
    topic, payload = ("bench/%d" % n).encode(), bytes(97 + i % 26 for i in range(64))
    head = bytes([0x30 | qos << 1]) + encode_varint(2 + len(topic) + 2 * qos + 64) + _str(topic)
    batch = (head + payload) * (BATCH_BYTES // len(head + payload))        # QoS 0
    while not ctl[K_T0] or time.monotonic() < ctl[K_T0]:
        if ctl[K_STOP]:
            return
        time.sleep(0.005)
    out, pending, queued, sent, acked, next_id, buf = b"", 0, 0, 0, 0, 1, bytearray()
    while not ctl[K_STOP] and time.monotonic() < ctl[K_DEADLINE]:
        if not out and time.monotonic() < ctl[K_TEND]:
            if qos == 0:
                out, pending = batch, BATCH_BYTES // len(head + payload)
            elif queued - acked < WINDOW:                   # QoS 1: refill the window
                pending = WINDOW - (queued - acked)
                ids = [(next_id + i - 1) % 65535 + 1 for i in range(pending)]
                out = b"".join(head + i.to_bytes(2, "big") + payload for i in ids)
                next_id, queued = ids[-1] % 65535 + 1, queued + pending
        r, w, _ = select.select([sock], [sock] if out else [], [], 0.05)
        if w:
            try:
                out = out[sock.send(out):]
            except BlockingIOError:
                pass
            if not out:
                sent, pending = sent + pending, 0
        if r:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the broker")
            buf += data
            end = 0
            for first, pos, count, length, _ in packet_runs(buf, 0, len(buf)):
                acked += count if first >> 4 == 4 else 0     # PUBACKs
                end = pos + count * length
            del buf[:end]
        counters[slot + F_SENT], counters[slot + F_ACKED] = sent, acked
    sock.setblocking(True)
    sock.settimeout(1)
    try:
        sock.sendall(b"\xe0\x00")                            # DISCONNECT
    except OSError:
        pass
    sock.close()


def subscribe_loop(sock, n, qos, ctl, counters, slot):
    buf, rlen, recv, acks = bytearray(1 << 20), 0, 0, bytearray()
    view = memoryview(buf)
    while not ctl[K_STOP] and time.monotonic() < ctl[K_DEADLINE]:
        r, w, _ = select.select([sock], [sock] if acks else [], [], 0.05)
        if w:
            try:
                del acks[:sock.send(acks)]
            except BlockingIOError:
                pass
        if not r:
            continue
        got = sock.recv_into(view[rlen:])
        if not got:
            raise ConnectionError("closed by the broker")
        rlen += got
        end = 0
        for first, pos, count, length, hlen in packet_runs(buf, 0, rlen):   # runs of equal packets
            end = pos + count * length
            if first >> 4 == 3:
                recv += count
                if first & 0x06:                             # QoS 1: PUBACKs, built column-wise
                    id_pos = pos + hlen + 2 + ((buf[pos + hlen] << 8) | buf[pos + hlen + 1])
                    a = bytearray(4 * count)
                    a[0::4], a[1::4] = b"\x40" * count, b"\x02" * count
                    a[2::4], a[3::4] = buf[id_pos:end:length], buf[id_pos + 1:end:length]
                    acks += a
        if end:
            buf[0:rlen - end] = buf[end:rlen]
            rlen -= end
        counters[slot + F_RECV] = recv
        if not qos and got < BATCH_BYTES:
            time.sleep(0.0005)                               # read QoS 0 in batches, as mqttbench
    sock.close()


# The bridge's status, from $SYS on the local broker ##########################

class BridgeStatus(threading.Thread):
    """``changes``: [(seconds since ``t0``, status)]; ``state``: the latest."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.t0, self.changes, self.state, self.stopping = time.monotonic(), [], None, False
        self.conn = Conn(socket.AF_INET, (HOST, port), "bb-status-%d" % os.getpid(), 300)
        self.conn.subscribe("$SYS/brokers/+/bridges/bench/status", 0)
        self.conn.sock.settimeout(None)
        self.start()

    def run(self):
        while True:
            try:
                first, body = self.conn.recv_packet()
            except (OSError, ConnectionError):
                if not self.stopping:
                    self.changes.append((round(time.monotonic() - self.t0, 3), "(status connection lost)"))
                return
            if first >> 4 == 3:                              # PUBLISH, QoS 0: topic, payload
                self.state = body[2 + int.from_bytes(body[:2], "big"):].decode(errors="replace")
                self.changes.append((round(time.monotonic() - self.t0, 3), self.state))

    def wait_for(self, state, timeout):
        deadline = time.monotonic() + timeout
        while self.state != state and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.state == state

    def close(self):
        self.stopping = True
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)        # ends the blocking recv
        except OSError:
            pass
        self.join(2)
        self.conn.sock.close()


# One run #####################################################################

def wait_ready(counters, slots, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [counters[s * NF + F_STATE] for s in slots]
        if ST_FAILED in states:
            raise RuntimeError("a client could not connect or subscribe")
        if all(st == ST_READY for st in states):
            return
        time.sleep(0.02)
    raise RuntimeError("clients not connected within %.0f s" % timeout)


def run_once(mode, qos, opts, workdir):
    npub = sub = opts.publishers               # counter slots: publishers 0..npub-1, the subscriber npub
    ctl = multiprocessing.RawArray("d", 4)
    counters = multiprocessing.RawArray("Q", (npub + 1) * NF)
    ctx = multiprocessing.get_context("fork")
    brokers, procs, status = [], [], None
    rec = {"tool": "bridgebench", "mode": mode, "qos": qos, "remote": opts.remote, "publishers": npub,
           "size": 64, "window": WINDOW if qos else None, "warmup_s": opts.warmup, "window_s": opts.seconds}
    if mode == "bridged":
        rec.update(proto_ver=opts.proto_ver, max_inflight=opts.max_inflight)
    try:
        ctl[K_DEADLINE] = time.monotonic() + 90 + opts.warmup + opts.seconds + opts.drain   # workers' hard stop
        remote = target = Broker(opts.remote, "remote", workdir, opts)
        brokers.append(remote)

        def spawn(role, n, port):
            procs.append(ctx.Process(target=worker, args=(role, n, port, qos, ctl, counters), daemon=True))
            procs[-1].start()

        spawn("sub", sub, remote.port)
        wait_ready(counters, [sub], 10)
        if mode == "bridged":
            target = Broker("emqx_lite", "local", workdir, opts, bridge_port=remote.port)
            brokers.append(target)
            status = BridgeStatus(target.port)
            if not status.wait_for("connected", 15):
                raise RuntimeError("the bridge did not connect within 15 s (status %r)" % status.state)
        for i in range(npub):
            spawn("pub", i, target.port)
        wait_ready(counters, range(npub), 10)

        def snap():
            total = lambda f: sum(counters[i * NF + f] for i in range(npub))
            return {"t": time.monotonic(), "sent": total(F_SENT), "acked": total(F_ACKED),
                    "recv": counters[sub * NF + F_RECV], "local_cpu": proc_cpu_s(target.pid) or 0.0,
                    "remote_cpu": proc_cpu_s(remote.pid) or 0.0}

        t0 = time.monotonic() + 0.1
        ctl[K_TEND] = t0 + opts.warmup + opts.seconds
        ctl[K_T0] = t0
        if status:
            status.t0 = t0
        time.sleep(max(0.0, t0 + opts.warmup - time.monotonic()))
        a = snap()
        time.sleep(max(0.0, ctl[K_TEND] - time.monotonic()))
        b = c = snap()
        quiet_since = b["t"]                   # drain: until the count stops growing, or --drain
        while c["t"] - b["t"] < opts.drain and c["recv"] < c["sent"] and c["t"] - quiet_since < QUIET_S:
            time.sleep(0.05)
            prev, c = c, snap()
            if c["recv"] != prev["recv"]:
                quiet_since = c["t"]
        win, recv_win = b["t"] - a["t"], b["recv"] - a["recv"]
        rec.update(pub_rate=round((b["sent"] - a["sent"]) / win), recv_rate=round(recv_win / win),
                   ack_rate=round((b["acked"] - a["acked"]) / win) if qos else None,
                   published=c["sent"], acked=c["acked"] if qos else None, received=c["recv"],
                   lost=c["sent"] - c["recv"],
                   loss_pct=round(100.0 * (c["sent"] - c["recv"]) / c["sent"], 3) if c["sent"] else None,
                   drain_s=round(c["t"] - b["t"], 2),
                   drain_rate=round((c["recv"] - b["recv"]) / max(c["t"] - b["t"], 1e-3)),
                   drain_settled=c["recv"] >= c["sent"] or c["t"] - quiet_since >= QUIET_S,
                   remote_cpu_pct=round(100 * (b["remote_cpu"] - a["remote_cpu"]) / win, 1))
        if mode == "bridged":
            cpu, pub_win = b["local_cpu"] - a["local_cpu"], b["sent"] - a["sent"]
            rec.update(local_cpu_pct=round(100 * cpu / win, 1),
                       local_cpu_s_per_1k=round(1000 * cpu / recv_win, 4) if recv_win else None,
                       local_cpu_s_per_1k_published=round(1000 * cpu / pub_win, 4) if pub_win else None,
                       bridge_status=status.changes)
        failed = [i for i in range(npub + 1) if counters[i * NF + F_STATE] == ST_FAILED]
        dead = ["%s %s died (exit %s)" % (br.role, br.kind, br.proc.returncode) for br in brokers if not br.alive()]
        if failed or dead:
            rec["error"] = "; ".join((["workers failed: %s" % failed] if failed else []) + dead)
    except Exception as exc:                   # recorded; the processes are stopped below either way
        rec["error"] = str(exc) if isinstance(exc, RuntimeError) else "run failed: %r" % exc
    finally:
        ctl[K_STOP] = 1
        for p in procs:
            p.join(3)
            if p.is_alive():
                p.kill()
                p.join(2)
        if status:
            status.close()
        for br in brokers:
            if "error" in rec:
                rec.setdefault("log_tail", {})[br.role] = br.log_tail()
            br.stop()
    return rec


# Report and main #############################################################

def fmt(v, spec="{:,}"):
    return "-" if v is None else spec.format(v)


def fmt_loss(r):
    if not r or "error" in r:
        return "error" if r else "-"
    return "%s (%s%%)%s" % (fmt(r["lost"]), r["loss_pct"], "" if r["drain_settled"] else " unsettled")


def render_table(records):
    rows = ["| qos | direct msg/s | bridged msg/s | bridged/direct | loss direct | loss bridged "
            "| bridged acks/s | local CPU s/1k msgs |", "|---|---|---|---|---|---|---|---|"]
    for qos in sorted({r["qos"] for r in records}):
        d = next((r for r in records if r["qos"] == qos and r["mode"] == "direct"), {})
        b = next((r for r in records if r["qos"] == qos and r["mode"] == "bridged"), {})
        ratio = b["recv_rate"] / d["recv_rate"] if d.get("recv_rate") and "recv_rate" in b else None
        rows.append("| %d | %s | %s | %s | %s | %s | %s | %s |" % (
            qos, fmt(d.get("recv_rate")), fmt(b.get("recv_rate")), fmt(ratio, "{:.3f}"), fmt_loss(d),
            fmt_loss(b), fmt(b.get("ack_rate")), fmt(b.get("local_cpu_s_per_1k"), "{:.4f}")))
    return "\n".join(rows)


def parse_args(argv=None):
    mosq = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)
    p = argparse.ArgumentParser(description="Throughput through emqx_lite's MQTT bridge, beside a direct "
                                "connection to the remote (see the docstring at the top of this file).")
    p.add_argument("--remote", choices=("mosquitto", "emqx_lite"), default="mosquitto" if mosq else "emqx_lite",
                   help="the remote broker (default: mosquitto if installed, else emqx_lite)")
    p.add_argument("--qos", default="0,1", help="QoS levels, comma-separated (default 0,1)")
    p.add_argument("--publishers", type=int, default=4, help="publisher processes (default 4)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window per run (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before the window (default 1)")
    p.add_argument("--drain", type=float, default=5.0, help="max seconds of drain after publishing (default 5)")
    p.add_argument("--proto-ver", choices=("mqttv3", "mqttv4", "mqttv5"), default="mqttv4",
                   help="bridge.mqtt.bench.proto_ver (default mqttv4)")
    p.add_argument("--max-inflight", type=int, default=32, help="bridge.mqtt.bench.max_inflight (default 32)")
    p.add_argument("--emqx-lite", default=EMQX_LITE, metavar="PATH", help="emqx_lite.py (default: %(default)s)")
    p.add_argument("--mosquitto", default=mosq, metavar="PATH", help="mosquitto binary (default: %(default)s)")
    p.add_argument("--start-timeout", type=float, default=20.0, help="seconds a broker has to answer (default 20)")
    p.add_argument("--json", metavar="FILE", help="also append the JSON lines to FILE")
    opts = p.parse_args(argv)
    try:
        opts.qos_list = [int(q) for q in opts.qos.split(",") if q.strip()]
    except ValueError:
        opts.qos_list = []
    if not opts.qos_list or any(q not in (0, 1) for q in opts.qos_list):
        p.error("--qos takes 0 and/or 1, e.g. 0,1")
    if opts.publishers < 1 or opts.seconds <= 0 or opts.warmup < 0 or opts.drain < 0:
        p.error("--publishers and --seconds must be positive, --warmup and --drain not negative")
    if opts.remote == "mosquitto" and not opts.mosquitto:
        p.error("mosquitto is not installed (apt-get install mosquitto); use --remote emqx_lite")
    return opts


def _terminate(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def main(argv=None):
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    info = machine_info()
    version = "%s (sha256 %s)" % emqx_lite_version(opts.emqx_lite)
    log("%s CPUs, %s, Python %s, %s; remote %s; emqx_lite %s"
        % (info["nproc"], info["cpu"], info["python"], info["date"], opts.remote, version))
    records, status = [], 0
    jf = open(opts.json, "a") if opts.json else None
    try:
        with tempfile.TemporaryDirectory(prefix="bridgebench-") as workdir:
            for qos in opts.qos_list:
                for mode in ("direct", "bridged"):
                    log("qos %d %s: %g s warm-up + %g s" % (qos, mode, opts.warmup, opts.seconds))
                    rec = run_once(mode, qos, opts, workdir)
                    rec["emqx_lite"] = version
                    records.append(rec)
                    line = json.dumps(rec, separators=(",", ":"))
                    print(line, flush=True)
                    if jf:
                        jf.write(line + "\n")
    except KeyboardInterrupt:
        log("interrupted; results so far:")
        status = 130
    finally:
        if jf:
            jf.close()
    if records:
        print("\n## bridgebench: %d publishers, 64-byte payloads, %g s windows, remote %s, bridge %s "
              "max_inflight %d (%s CPUs, Python %s, %s)\n"
              % (opts.publishers, opts.seconds, opts.remote, opts.proto_ver, opts.max_inflight,
                 info["nproc"], info["python"], info["date"]))
        print(render_table(records))
        for r in records:
            if "error" in r:
                print("\nqos %d %s: %s" % (r["qos"], r["mode"], r["error"]))
    return status or (0 if records and not any("error" in r for r in records) else 1)


if __name__ == "__main__":
    sys.exit(main())
