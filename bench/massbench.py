#!/usr/bin/env python3
"""massbench - mass connection events against an MQTT broker on loopback.

What happens to everyone else when thousands of clients arrive, leave or
take over at once (issue 11): a NAT gateway, a load balancer or a cell tower
restarting, a fleet reconnecting.  Starts emqx_lite (and mosquitto, if it is
installed) on free loopback ports, or uses a broker that is running::

    python3 bench/massbench.py --start emqx_lite
    python3 bench/massbench.py --start emqx_lite,mosquitto --scenarios reset,connect
    python3 bench/massbench.py --start emqx_lite --clients 2000
    python3 bench/massbench.py --target 127.0.0.1:1883 --broker-pid 1234 --api-port 8080

Scenarios (each against a freshly started broker with --start):

    reset     N clients (--clients, default 10,000), each with a will (QoS 0,
              topic will/<id>) and keepalive 60, connect with 64 handshakes
              in flight, after a healthy pair (a publisher at 20 msg/s QoS 0
              on health/t and its subscriber) and a will subscriber on will/#.
              Then all N reset their connections at once (SO_LINGER 0 +
              close; the generator processes close under SCHED_FIFO where
              permitted, see --reset-sched).  Measured: the CONNACK latency
              of a fresh client that connects 0.2 s after the reset; the
              largest gap between deliveries on the healthy pair around the
              reset (every gap that overlaps the 10 s after it, at its full
              length); how long until the broker's client count is back to the
              survivors (emqx_lite: REST monitoring/nodes "clients" and
              monitoring/stats "clients/count"; others: the
              $SYS/broker/clients/connected topic); the wills received
              (expect N); the broker's threads and open files after settling
              against before (and how long it took to get back), and a
              once-a-second timeline of threads, fds, client count and wills.
    connect   N clients (default 10,000) connect, 64 handshakes in flight:
              connections/s, p50/p99/max CONNACK latency; meanwhile the healthy
              pair's latency (publish -> delivery, at --latency-rate 200 msg/s
              for enough samples) p50/p99 against the same measured idle
              before.
    takeover  N clients (default 2,000) connected; then N new connections
              with the same client ids while the old ones are still open: how
              long until every new one has its CONNACK, a fresh client's
              CONNACK latency 0.2 s after the storm starts, whether the broker
              closed every old connection (EOF or RST seen) and none of the new.
    idle      N idle connections (default 20,000): broker RSS per connection
              ((RSS 2 s after the last CONNACK - RSS before) / N) and the
              connect rate.  Skipped with a message when the broker's or this
              tool's RLIMIT_NOFILE cannot hold them.

Each scenario prints a human-readable summary (with the issue's targets,
"ok" or "MISS") and one JSON line on stdout (--json FILE appends the JSON
lines to FILE too); progress goes to stderr; at the end a table puts the
brokers side by side.

Keeping the generator out of the figures: the N clients live in --procs
(default nproc) forked processes on epoll, raw MQTT 3.1.1 with pre-encoded
CONNECTs, the 64 handshakes in flight split between them; the healthy pair,
the will subscriber and the fresh client are each in a process of their own,
so the storm never delays them.  Cross-process instants are CLOCK_REALTIME
nanoseconds; the pair's deliveries are stamped by the kernel
(SO_TIMESTAMPNS) where available, so the subscriber's own wake-up is not
counted.  The coordinator polls /proc/<pid>/status (Threads), /proc/<pid>/fd
and the REST API in threads of its own.

Bounds: every connect phase has --setup-timeout (60 s), every handshake
--hs-timeout (30 s), the settling after a reset --settle-timeout (60 s),
every child process a hard deadline and PR_SET_PDEATHSIG; the brokers this
tool starts get SIGTERM (SIGKILL after 10 s) at the end, on Ctrl-C or SIGTERM,
and through PR_SET_PDEATHSIG if the tool is killed.  Only loopback targets
(127.0.0.0/8, ::1) are accepted.  Only the Python standard library, and
mqttbench.py beside this file for the helpers the tools share (/proc,
loopback targets, MQTT encoding, brokers, output).  Linux only (/proc, epoll).
"""

import argparse
import array
import base64
import collections
import errno
import http.client
import json
import shlex
import multiprocessing
import multiprocessing.connection
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

# Helpers shared with mqttbench.py, next to this file (running bench/massbench.py
# puts this folder on sys.path).
import mqttbench
from mqttbench import (SO_TIMESTAMPNS, JsonLinesOutput, ManagedBroker, _str, add_output_options,
                       encode_connect, encode_subscribe, encode_varint, free_port, kernel_rx_ns,
                       kernel_timestamps_available, machine_info, mqtt_ping, packet_header,
                       parse_hostport, percentile, proc_alive, proc_cpu_s, proc_fd_count,
                       proc_rss_kb, raise_nofile_limit, resolve_loopback, scenario_list,
                       wait_broker_idle)

__version__ = "1.0"

###############################################################################
# Constants ###################################################################
###############################################################################

SCENARIOS = ("reset", "connect", "takeover", "idle")
DEFAULT_CLIENTS = {"reset": 10_000, "connect": 10_000, "takeover": 2_000, "idle": 20_000}
BROKERS = ("emqx_lite", "mosquitto")
PAIR_TOPIC = "health/t"
WILL_PREFIX = "will/"
SYS_CLIENTS_TOPIC = "$SYS/broker/clients/connected"     # mosquitto
LINGER_RST = struct.pack("ii", 1, 0)                    # SO_LINGER on, 0 s: close() sends RST
PAIR_PAYLOAD = struct.Struct("!QQ")                     # sequence number, send time (realtime ns)
CHILD_LIFETIME_S = 600                                  # hard limit of every child process
FD_MARGIN = 64                                          # descriptors a process needs besides the clients
EMQX_LITE_ENV = {"EMQX_LITE_DASHBOARD__PASSWORD_ITERATIONS": "1000"}   # cheap REST login

# The targets: (scenario, field, description, check)
TARGETS = [
    ("reset", "fresh_connack_s", "fresh client's CONNACK < 1 s", lambda v: v is not None and v < 1.0),
    ("reset", "pair_max_gap_s", "healthy pair never > 1 s without a delivery", lambda v: v is not None and v <= 1.0),
    ("reset", "count_back_s", "client count back to the survivors <= 5 s", lambda v: v is not None and v <= 5.0),
    ("reset", "wills_missing", "every will published", lambda v: v == 0),
    ("reset", "leaked_threads", "no thread left behind", lambda v: v is not None and v <= 0),
    ("reset", "leaked_fds", "no file descriptor left behind", lambda v: v is not None and v <= 0),
    ("connect", "conn_rate", ">= 5,000 connections/s", lambda v: v is not None and v >= 5000),
    ("connect", "connack_p99_ms", "CONNACK p99 < 100 ms", lambda v: v is not None and v < 100),
    ("connect", "pair_p50_ratio", "pair latency p50 within 2x of idle", lambda v: v is not None and v <= 2.0),
    ("connect", "pair_p99_ratio", "pair latency p99 within 2x of idle", lambda v: v is not None and v <= 2.0),
    ("takeover", "fresh_connack_s", "fresh client's CONNACK < 1 s", lambda v: v is not None and v < 1.0),
    ("takeover", "old_not_closed", "every old connection closed", lambda v: v == 0),
    ("idle", "rss_per_conn_bytes", "<= 20 KB (20,000 bytes) RSS per connection",
     lambda v: v is not None and v <= 20_000),
]


###############################################################################
# Small helpers ###############################################################
###############################################################################

def now_ns():
    return time.time_ns()


def sleep_until_ns(t_ns):
    while True:
        d = (t_ns - time.time_ns()) / 1e9
        if d <= 0:
            return
        time.sleep(min(d, 0.05))


def proc_threads(pid):
    """Threads of process ``pid`` (/proc/<pid>/status), or None."""
    if not pid:
        return None
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def proc_nofile(pid):
    """The soft 'Max open files' of process ``pid`` (/proc/<pid>/limits), or None."""
    try:
        with open("/proc/%d/limits" % pid) as f:
            for line in f:
                if line.startswith("Max open files"):
                    v = line.split()[3]
                    return 1 << 30 if v == "unlimited" else int(v)
    except (OSError, ValueError, IndexError, TypeError):
        return None
    return None


def set_pdeathsig(sig):
    """Have the kernel send ``sig`` to this process when its parent dies (Linux)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))     # PR_SET_PDEATHSIG
    except (ImportError, OSError, AttributeError):
        pass


def rnd(v, nd=3):
    return None if v is None else round(v, nd)


def ms(v_s):
    return None if v_s is None else round(v_s * 1000.0, 2)


def pcts_ms(vals_s):
    """p50/p99/max in ms of a list of seconds (nearest rank)."""
    vals = sorted(vals_s)
    return {"p50": ms(percentile(vals, 50)), "p99": ms(percentile(vals, 99)),
            "max": ms(vals[-1]) if vals else None, "n": len(vals)}


def fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return "{:,.0f}{}".format(v, unit)
        return "{:.3g}{}".format(v, unit)
    if isinstance(v, int):
        return "{:,}{}".format(v, unit)
    return str(v) + unit


###############################################################################
# MQTT ########################################################################
###############################################################################

def encode_connect_will(client_id, keepalive, will_topic, will_payload=b"gone"):
    """CONNECT 3.1.1, clean session, with a QoS 0 will (not retained)."""
    flags = 0x02 | 0x04                       # clean session, will flag (will QoS 0, retain 0)
    body = (_str("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + _str(client_id)
            + _str(will_topic) + _str(will_payload))
    return b"\x10" + encode_varint(len(body)) + body


def encode_publish0(topic, payload):
    body = _str(topic) + payload
    return b"\x30" + encode_varint(len(body)) + body


def split_packets(buf):
    """Complete packets at the start of bytearray ``buf`` as (first byte, body)
    pairs; removes them from ``buf``."""
    out, pos, end = [], 0, len(buf)
    while end - pos >= 2:
        head = packet_header(buf, pos, end)
        if head is None:
            if end - pos >= 5:
                raise ConnectionError("malformed remaining length")
            break
        first, hlen, total = head
        if end - pos < total:
            break
        out.append((first, bytes(buf[pos + hlen:pos + total])))
        pos += total
    del buf[:pos]
    return out


def publish_topic_payload(first, body):
    tl = (body[0] << 8) | body[1]
    off = 2 + tl + (2 if first & 0x06 else 0)
    return body[2:2 + tl].decode("utf-8", "replace"), body[off:]


class Client:
    """A blocking MQTT 3.1.1 client for the observers (pair, watcher, probe)."""

    def __init__(self, family, addr, client_id, keepalive=0, timeout=10.0):
        self.buf = bytearray()
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(addr)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.sendall(encode_connect(client_id, keepalive))
            first, body = self.read_packet()
            if first != 0x20 or len(body) < 2 or body[1] != 0:
                raise ConnectionError("CONNACK refused: %r" % ((first, body),))
        except BaseException:
            self.sock.close()
            raise

    def read_packet(self):
        while True:
            pkts = split_packets(self.buf)
            if pkts:
                first, body = pkts[0]
                # put back what came after (re-encoded) for the caller's loop
                rest = b"".join(bytes([f]) + encode_varint(len(b)) + b for f, b in pkts[1:])
                self.buf[0:0] = rest
                return first, body
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the broker")
            self.buf += data

    def subscribe(self, topic, packet_id):
        """SUBSCRIBE at QoS 0, wait for the SUBACK; other packets that arrive
        first (retained messages) stay in self.buf."""
        self.sock.sendall(encode_subscribe(topic, 0, packet_id))
        kept = []
        while True:
            first, body = self.read_packet()
            if first >> 4 == 9:
                if body[2:3] == b"\x80":
                    raise ConnectionError("SUBSCRIBE %s refused" % topic)
                break
            kept.append(bytes([first]) + encode_varint(len(body)) + body)
        self.buf[0:0] = b"".join(kept)

    def disconnect(self):
        try:
            self.sock.sendall(b"\xe0\x00")
        except OSError:
            pass
        self.sock.close()


###############################################################################
# Child processes #############################################################
###############################################################################

def child_setup():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    set_pdeathsig(signal.SIGKILL)


def orphaned(parent):
    return os.getppid() != parent


# --- the fleet: N clients in one process ---------------------------------------

class FleetWorker:
    """One generator process's share of the N clients.  Commands come over a
    pipe (dicts with "op"); each gets one reply.  Connected sockets are held
    (non-blocking, not watched) until reset or close."""

    def __init__(self, index, cfg, pipe):
        self.index, self.cfg, self.pipe = index, cfg, pipe
        self.held = []
        self.ep = select.epoll()

    def serve(self):
        end = time.monotonic() + CHILD_LIFETIME_S
        while time.monotonic() < end and not orphaned(self.cfg["parent"]):
            if not self.pipe.poll(0.25):
                continue
            msg = self.pipe.recv()
            if msg["op"] == "exit":
                break
            try:
                reply = getattr(self, "op_" + msg["op"])(msg)
            except Exception as exc:              # report, never hang the coordinator
                reply = {"fatal": "worker %d: %s: %r" % (self.index, msg["op"], exc)}
            self.pipe.send(reply)
        self.close_all(rst=True)

    def op_connect(self, msg):
        """Connect msg["ids"] (with wills when msg["will"]), msg["concurrency"]
        handshakes in flight, from msg["go_at"] (realtime ns).  With
        msg["takeover"], the held connections are watched for the broker closing
        them meanwhile (and msg["watch_s"] after the last CONNACK), and the new
        ones for being closed too."""
        cfg = self.cfg
        ka = msg["keepalive"]
        if msg["will"]:
            packets = [encode_connect_will(cid, ka, WILL_PREFIX + cid) for cid in msg["ids"]]
        else:
            packets = [encode_connect(cid, ka) for cid in msg["ids"]]
        n, conc, hs_timeout = len(packets), msg["concurrency"], msg["hs_timeout"]
        takeover = msg.get("takeover", False)
        ep = self.ep
        family, addr = cfg["family"], cfg["addr"]
        pending = {}          # fd -> [sock, index, connect sent, CONNACK bytes, t0]
        old = {}              # fd -> sock (takeover: the connections being replaced)
        new_watch = {}        # fd -> sock (takeover: connected new ones, watched)
        RDH = select.EPOLLIN | select.EPOLLRDHUP
        if takeover:
            for s in self.held:
                ep.register(s.fileno(), RDH)
                old[s.fileno()] = s
            self.held = []
        lat = array.array("d")
        connected_socks = []
        errors = collections.Counter()
        old_eof = old_rst = old_data = new_closed = 0
        old_last_ns = 0
        opened = done = failed = 0
        sleep_until_ns(msg["go_at"])
        cpu0 = time.process_time()
        t_first = now_ns()
        t_last = t_first
        deadline = time.monotonic() + msg["timeout"]
        watch_end = None
        next_check = time.monotonic() + 0.25

        def fail(fd, why):
            nonlocal failed
            st = pending.pop(fd)
            try:
                ep.unregister(fd)
            except (OSError, ValueError):
                pass
            st[0].close()
            failed += 1
            errors[why] += 1

        def close_old(fd, kind):
            nonlocal old_eof, old_rst, old_last_ns
            s = old.pop(fd)
            try:
                ep.unregister(fd)
            except (OSError, ValueError):
                pass
            s.close()
            old_last_ns = now_ns()
            if kind == "eof":
                old_eof += 1
            else:
                old_rst += 1

        while True:
            mono = time.monotonic()
            if mono >= deadline:
                break
            if done + failed >= n:
                if not takeover or not old:
                    break
                if watch_end is None:
                    watch_end = mono + msg.get("watch_s", 10.0)
                elif mono >= watch_end:
                    break
            while opened < n and len(pending) < conc:
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                t0 = time.monotonic()
                err = s.connect_ex(addr)
                fd = s.fileno()
                pending[fd] = [s, opened, False, b"", t0]
                opened += 1
                if err not in (0, errno.EINPROGRESS):
                    ep.register(fd, select.EPOLLOUT)
                    fail(fd, "connect: " + (errno.errorcode.get(err) or str(err)))
                    continue
                ep.register(fd, select.EPOLLOUT)
            for fd, ev in ep.poll(0.05):
                st = pending.get(fd)
                if st is None:
                    if fd in old:
                        s = old[fd]
                        try:
                            data = s.recv(4096)
                        except BlockingIOError:
                            continue
                        except OSError:
                            close_old(fd, "rst")
                            continue
                        if not data:
                            close_old(fd, "eof")
                        else:
                            old_data += 1
                    elif fd in new_watch:
                        s = new_watch[fd]
                        try:
                            data = s.recv(4096)
                        except BlockingIOError:
                            continue
                        except OSError:
                            data = b""
                        if not data:
                            new_closed += 1
                            ep.unregister(fd)
                            del new_watch[fd]
                            s.close()
                    continue
                s = st[0]
                if not st[2]:
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        fail(fd, "connect: " + (errno.errorcode.get(err) or str(err)))
                        continue
                    try:
                        s.send(packets[st[1]])
                    except OSError as exc:
                        fail(fd, "send CONNECT: %s" % (errno.errorcode.get(exc.errno) or exc))
                        continue
                    st[2] = True
                    ep.modify(fd, select.EPOLLIN)
                    continue
                try:
                    data = s.recv(4 - len(st[3]))
                except BlockingIOError:
                    continue
                except OSError as exc:
                    fail(fd, "read CONNACK: %s" % (errno.errorcode.get(exc.errno) or exc))
                    continue
                if not data:
                    fail(fd, "closed before CONNACK")
                    continue
                st[3] += data
                if len(st[3]) < 4:
                    continue
                if st[3][0] != 0x20 or st[3][3] != 0:
                    fail(fd, "CONNACK %s" % st[3].hex())
                    continue
                t1 = time.monotonic()
                lat.append(t1 - st[4])
                del pending[fd]
                done += 1
                t_last = now_ns()
                connected_socks.append(s)
                if takeover:
                    ep.modify(fd, RDH)
                    new_watch[fd] = s
                else:
                    ep.unregister(fd)
            if mono >= next_check:
                next_check = mono + 0.25
                for fd in [fd for fd, st in pending.items() if mono - st[4] > hs_timeout]:
                    fail(fd, "handshake timeout (%gs)" % hs_timeout)
        for fd in list(pending):
            fail(fd, "timeout before CONNACK")
        for fd in list(new_watch):
            ep.unregister(fd)
        old_open = list(old.values())
        for fd in list(old):
            ep.unregister(fd)
        alive = [s for s in connected_socks if s.fileno() != -1]
        self.held = alive + old_open
        return {"connected": done, "failed": failed, "errors": dict(errors), "t_first": t_first,
                "t_last": t_last, "lat": lat.tobytes(), "cpu_s": time.process_time() - cpu0,
                "old_eof": old_eof, "old_rst": old_rst, "old_data": old_data, "old_open": len(old_open),
                "old_last": old_last_ns, "new_closed": new_closed, "held": len(self.held)}

    def op_reset(self, msg):
        """SO_LINGER 0 on every held connection now, close them all at msg["at"].
        With msg["fifo"], the close loop runs under SCHED_FIFO (if permitted),
        so that the broker's woken threads do not preempt it and the resets
        really come at once; the normal policy is restored right after."""
        for s in self.held:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            except OSError:
                pass
        sched = "normal"
        if msg.get("fifo") and hasattr(os, "SCHED_FIFO"):
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
                sched = "fifo"
            except OSError:
                pass
        try:
            sleep_until_ns(msg["at"])
            t0 = now_ns()
            n = len(self.held)
            for s in self.held:
                s.close()
            t1 = now_ns()
        finally:
            if sched == "fifo":
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        self.held = []
        return {"closed": n, "t0": t0, "t1": t1, "sched": sched}

    def op_close(self, msg):
        n = len(self.held)
        self.close_all(rst=True)
        return {"closed": n}

    def close_all(self, rst=True):
        for s in self.held:
            if rst:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                except OSError:
                    pass
            s.close()
        self.held = []


def fleet_main(index, cfg, pipe):
    child_setup()
    FleetWorker(index, cfg, pipe).serve()


# --- the healthy pair ----------------------------------------------------------

def pair_main(cfg, pipe):
    """A publisher at cfg["rate"] msg/s QoS 0 on health/t and its subscriber.
    Sends {"ready"} once both are connected and subscribed, then publishes until
    "stop" (or the hard deadline) and replies with every delivery as
    (seq, send ns, receive ns) triples."""
    child_setup()
    parent, family, addr = cfg["parent"], cfg["family"], cfg["addr"]
    sub = pub = None
    kernel = False
    try:
        sub = Client(family, addr, "mb-pair-s%d" % os.getpid())
        sub.subscribe(PAIR_TOPIC, 1)
        pub = Client(family, addr, "mb-pair-p%d" % os.getpid())
        if cfg["kernel_ts"]:
            try:
                sub.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                kernel = True
            except OSError:
                kernel = False
        pub.sock.settimeout(2.0)
    except (OSError, ConnectionError) as exc:
        pipe.send({"fatal": "healthy pair: %s" % exc})
        for c in (sub, pub):
            if c is not None:
                c.sock.close()
        return
    pipe.send({"ready": True, "kernel_ts": kernel})
    head = b"\x30" + encode_varint(2 + len(PAIR_TOPIC) + PAIR_PAYLOAD.size) + _str(PAIR_TOPIC)
    interval = 1.0 / cfg["rate"]
    rec = array.array("q")
    seq = 0
    send_fail = 0
    error = None
    buf = sub.buf
    ancsize = socket.CMSG_SPACE(16)
    end = time.monotonic() + CHILD_LIFETIME_S
    next_t = time.monotonic()
    rlist = [sub.sock, pub.sock, pipe]
    while True:
        mono = time.monotonic()
        if mono >= end or orphaned(parent):
            break
        if mono >= next_t:
            seq += 1
            try:
                pub.sock.sendall(head + PAIR_PAYLOAD.pack(seq, time.time_ns()))
            except OSError as exc:
                send_fail += 1
                error = error or "publish: %s" % exc
            next_t += interval
            while next_t <= mono:                    # a missed slot is skipped, not sent in a burst
                next_t += interval
        r, _, _ = select.select(rlist, [], [], max(0.0, next_t - time.monotonic()))
        if pipe in r:
            if pipe.recv() == "stop":
                break
        if pub.sock in r:
            try:
                data = pub.sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                error = error or "publisher closed by the broker"
                rlist.remove(pub.sock)
        if sub.sock in r:
            try:
                data, anc, _, _ = sub.sock.recvmsg(65536, ancsize)
            except OSError as exc:
                data, anc = b"", []
                error = error or "subscriber: %s" % exc
            t_rx = (kernel_rx_ns(anc) if kernel else None) or time.time_ns()
            if not data:
                error = error or "subscriber closed by the broker"
                rlist.remove(sub.sock)
                continue
            buf += data
            try:
                pkts = split_packets(buf)
            except ConnectionError as exc:
                error = error or "subscriber: %s" % exc
                break
            for first, body in pkts:
                if first >> 4 != 3:
                    continue
                topic, payload = publish_topic_payload(first, body)
                if topic == PAIR_TOPIC and len(payload) >= PAIR_PAYLOAD.size:
                    s, t_tx = PAIR_PAYLOAD.unpack_from(payload)
                    rec.extend((s, t_tx, t_rx))
    for c in (sub, pub):
        c.disconnect()
    pipe.send({"rec": rec.tobytes(), "sent": seq, "send_fail": send_fail, "error": error, "kernel_ts": kernel})


# --- the will (and $SYS) watcher ------------------------------------------------

def watch_main(cfg, pipe):
    """Subscribes to will/# (and cfg["count_topic"] if any); counts wills and
    records the count topic's values.  Commands: "status" -> counts so far,
    "stop" -> final counts, then exit."""
    child_setup()
    parent, family, addr = cfg["parent"], cfg["family"], cfg["addr"]
    try:
        c = Client(family, addr, "mb-watch-%d" % os.getpid())
        c.subscribe(WILL_PREFIX + "#", 1)
        if cfg.get("count_topic"):
            c.subscribe(cfg["count_topic"], 2)
    except (OSError, ConnectionError) as exc:
        pipe.send({"fatal": "will subscriber: %s" % exc})
        return
    pipe.send({"ready": True})
    wills = 0
    ids = set()
    first_ns = last_ns = None
    sys_vals = []          # (t ns, value)
    error = None
    end = time.monotonic() + CHILD_LIFETIME_S
    buf = c.buf
    rlist = [c.sock, pipe]

    will_times = array.array("q")

    def status(full=False):
        st = {"wills": wills, "distinct": len(ids), "first": first_ns, "last": last_ns,
              "sys": list(sys_vals), "error": error}
        if full:
            st["times"] = will_times.tobytes()
        return st

    def handle():
        nonlocal wills, first_ns, last_ns, error
        try:
            pkts = split_packets(buf)
        except ConnectionError as exc:
            error = error or str(exc)
            return
        t = time.time_ns()
        for first, body in pkts:
            if first >> 4 != 3:
                continue
            topic, payload = publish_topic_payload(first, body)
            if topic.startswith(WILL_PREFIX):
                wills += 1
                will_times.append(t)
                ids.add(topic)
                first_ns = first_ns or t
                last_ns = t
            elif topic == cfg.get("count_topic"):
                try:
                    sys_vals.append((t, int(float(payload.decode()))))
                except ValueError:
                    pass

    handle()               # anything that came with the SUBACKs
    while time.monotonic() < end and not orphaned(parent):
        r, _, _ = select.select(rlist, [], [], 0.25)
        if c.sock in r:
            try:
                data = c.sock.recv(1 << 20)
            except OSError as exc:
                data = b""
                error = error or str(exc)
            if not data:
                error = error or "watcher closed by the broker"
                rlist.remove(c.sock)
            else:
                buf += data
                handle()
        if pipe in r:
            cmd = pipe.recv()
            if cmd == "status":
                pipe.send(status())
            elif cmd == "stop":
                break
    c.disconnect()
    pipe.send(status(full=True))


# --- the fresh client ------------------------------------------------------------

def probe_main(cfg, pipe):
    """Waits for {"at": realtime ns}, then connects one fresh client and
    measures connect() -> CONNACK; DISCONNECT and close.  Replies once."""
    child_setup()
    if not pipe.poll(CHILD_LIFETIME_S):
        return
    msg = pipe.recv()
    if msg == "stop":
        return
    sleep_until_ns(msg["at"])
    t_start = now_ns()
    t0 = time.monotonic()
    try:
        c = Client(cfg["family"], cfg["addr"], "mb-fresh-%d" % os.getpid(), keepalive=60,
                   timeout=msg["timeout"])
        dt = time.monotonic() - t0
        c.disconnect()
        pipe.send({"connack_s": dt, "t_start": t_start})
    except (OSError, ConnectionError) as exc:
        pipe.send({"connack_s": None, "t_start": t_start,
                   "error": "%s after %.1fs" % (exc or type(exc).__name__, time.monotonic() - t0)})


###############################################################################
# Coordinator-side samplers ###################################################
###############################################################################

class Sampler(threading.Thread):
    """Calls fn() every ``interval`` seconds, keeping (end time ns, value, call
    seconds); a failed call gives value None."""

    def __init__(self, fn, interval):
        super().__init__(daemon=True)
        self.fn, self.interval = fn, interval
        self.samples = []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            t0 = time.monotonic()
            try:
                v = self.fn()
            except Exception:
                v = None
            self.samples.append((now_ns(), v, time.monotonic() - t0))
            self.halt.wait(self.interval)

    def stop(self):
        self.halt.set()
        self.join(10)
        return self.samples


def first_at_or_below(samples, t_from, limit, key=lambda v: v):
    """Seconds from ``t_from`` (ns) to the first sample at or after it whose
    key(value) <= limit; None if none."""
    for t, v, _ in samples:
        if t >= t_from and v is not None:
            k = key(v)
            if k is not None and k <= limit:
                return (t - t_from) / 1e9
    return None


class RestApi:
    """GET /api/v2/monitoring/{nodes,stats} with Basic auth (loopback only)."""

    def __init__(self, host, port, user, password, timeout=5.0):
        resolve_loopback(host, port, prog="massbench")
        self.host, self.port, self.timeout = host, port, timeout
        self.auth = "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()

    def get(self, path):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("GET", path, headers={"Authorization": self.auth, "Connection": "close"})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError("GET %s: HTTP %d" % (path, resp.status))
            return json.loads(body)
        finally:
            conn.close()

    def clients(self):
        """(monitoring/nodes result[0]["clients"], monitoring/stats "clients/count")."""
        nodes = self.get("/api/v2/monitoring/nodes")["result"][0]["clients"]
        stats = self.get("/api/v2/monitoring/stats")["result"]
        stats = next(iter(stats.values()))["clients/count"] if isinstance(stats, dict) else None
        return nodes, stats


###############################################################################
# Brokers #####################################################################
###############################################################################

class Broker(ManagedBroker):
    """mqttbench's ManagedBroker, but emqx_lite with its REST API on a free
    port (--data-dir '', the cheap-login environment) and mosquitto with
    sys_interval 1 (its client count in $SYS every second); the broker gets
    SIGTERM if this tool dies (PR_SET_PDEATHSIG)."""

    def __init__(self, name, opts, workdir, log=None):
        super().__init__(name, opts, workdir, log)
        self.api_port = None

    def _emqx_lite_argv(self, port):
        path = self.opts.emqx_lite
        if not os.path.exists(path):
            raise RuntimeError("emqx_lite.py not found at %s (use --emqx-lite PATH)" % path)
        self.api_port = free_port()
        return [sys.executable, path, "--bind", "127.0.0.1", "--mqtt-port", str(port),
                "--http-port", str(self.api_port), "--dashboard-port", "-1", "--data-dir", "",
                "--log-level", "warning", *shlex.split(self.opts.emqx_lite_args)]

    def _mosquitto_argv(self, port):
        argv = super()._mosquitto_argv(port)
        with open(argv[-1], "a") as f:
            f.write("sys_interval 1\n")
        return argv

    def start(self):
        self.port = free_port()
        argv = self.command(self.port)
        env = dict(os.environ, **EMQX_LITE_ENV) if self.name == "emqx_lite" else None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, env=env, start_new_session=True,
                                         preexec_fn=lambda: set_pdeathsig(signal.SIGTERM))
        family, addr = resolve_loopback("127.0.0.1", self.port, prog="massbench")
        deadline = time.monotonic() + self.opts.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with code %s at start-up:\n%s"
                                   % (self.name, self.proc.returncode, self.log_tail()))
            if mqtt_ping(family, addr, 0.5):
                if self.api_port is None:
                    return
                try:
                    RestApi("127.0.0.1", self.api_port, self.opts.api_user, self.opts.api_password).clients()
                    return
                except (OSError, RuntimeError, ValueError, KeyError, http.client.HTTPException):
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("%s did not answer within %.0fs:\n%s"
                           % (self.name, self.opts.start_timeout, self.log_tail()))


class Endpoint:
    """Where a scenario goes: MQTT address, broker pid (or None), REST API (or
    None) and/or the $SYS topic giving the client count."""

    def __init__(self, label, host, port, pid, api, count_topic):
        self.label, self.host, self.port, self.pid = label, host, port, pid
        self.family, self.addr = resolve_loopback(host, port, prog="massbench")
        self.api, self.count_topic = api, count_topic

    @property
    def count_source(self):
        return "rest" if self.api else ("sys" if self.count_topic else None)


###############################################################################
# Scenarios ###################################################################
###############################################################################

class ScenarioError(Exception):
    pass


class Scenario:
    """One scenario run against one Endpoint; owns its child processes."""

    def __init__(self, bench, ep, name, n):
        self.bench, self.opts, self.ep, self.name, self.n = bench, bench.opts, ep, name, n
        self.ctx = multiprocessing.get_context("fork")
        self.children = []          # (process, pipe)
        self.fleet = []
        self.cfg = {"parent": os.getpid(), "family": ep.family, "addr": ep.addr,
                    "kernel_ts": kernel_timestamps_available()}
        self.rec = {"tool": "massbench", "scenario": name, "label": ep.label, "host": ep.host,
                    "port": ep.port, "clients": n}
        self.notes = []

    def log(self, msg):
        self.bench.log("%s: %s: %s" % (self.ep.label, self.name, msg))

    # --- children ------------------------------------------------------------
    def spawn(self, target, *args):
        parent_end, child_end = self.ctx.Pipe()
        p = self.ctx.Process(target=target, args=args + (child_end,), daemon=True)
        p.start()
        child_end.close()
        self.children.append((p, parent_end))
        return p, parent_end

    def expect(self, pipe, timeout, what):
        if not pipe.poll(timeout):
            raise ScenarioError("%s: no answer within %.0fs" % (what, timeout))
        try:
            msg = pipe.recv()
        except EOFError:
            raise ScenarioError("%s: the process ended" % what)
        if isinstance(msg, dict) and msg.get("fatal"):
            raise ScenarioError(msg["fatal"])
        return msg

    def start_fleet(self):
        procs = max(1, min(self.opts.procs, self.n))
        for i in range(procs):
            self.fleet.append(self.spawn(fleet_main, i, self.cfg)[1])

    def fleet_op(self, msgs, timeout, what):
        """Send msgs[i] to fleet worker i, collect the replies."""
        for pipe, msg in zip(self.fleet, msgs):
            pipe.send(msg)
        return [self.expect(pipe, timeout, "%s (worker %d)" % (what, i)) for i, pipe in enumerate(self.fleet)]

    def fleet_connect(self, ids, go_in=0.2, will=False, takeover=False):
        """Connect ``ids`` (split between the workers, the handshakes in flight
        too); returns the merged figures."""
        parts = len(self.fleet)
        conc = self.opts.concurrency
        go_at = now_ns() + int(go_in * 1e9)
        msgs = []
        for i in range(parts):
            msgs.append({"op": "connect", "ids": ids[i::parts], "will": will, "keepalive": self.opts.keepalive,
                         "concurrency": max(1, conc // parts + (1 if i < conc % parts else 0)),
                         "go_at": go_at, "timeout": self.opts.setup_timeout, "hs_timeout": self.opts.hs_timeout,
                         "takeover": takeover, "watch_s": self.opts.watch_timeout})
        replies = self.fleet_op(msgs, go_in + self.opts.setup_timeout + self.opts.watch_timeout + 30, "connect")
        lat = array.array("d")
        errors = collections.Counter()
        for r in replies:
            lat.frombytes(r["lat"])
            errors.update(r["errors"])
        connected = sum(r["connected"] for r in replies)
        t_last = max(r["t_last"] for r in replies)
        elapsed = (t_last - go_at) / 1e9
        out = {"go_at": go_at, "t_last": t_last, "connected": connected,
               "failed": sum(r["failed"] for r in replies), "errors": dict(errors.most_common(5)),
               "elapsed_s": elapsed, "rate": connected / elapsed if connected and elapsed > 0 else None,
               "lat": pcts_ms(lat), "gen_cpu_max_pct": None, "replies": replies}
        if elapsed > 0:
            out["gen_cpu_max_pct"] = round(max(r["cpu_s"] for r in replies) / elapsed * 100, 1)
        return out

    def start_pair(self, rate):
        cfg = dict(self.cfg, rate=rate)
        _, pipe = self.spawn(pair_main, cfg)
        msg = self.expect(pipe, 15, "healthy pair")
        self.pair = pipe
        return msg

    def stop_pair(self):
        self.pair.send("stop")
        msg = self.expect(self.pair, 15, "healthy pair (stop)")
        rec = array.array("q")
        rec.frombytes(msg["rec"])
        msg["deliveries"] = [(rec[i], rec[i + 1], rec[i + 2]) for i in range(0, len(rec), 3)]
        if msg.get("error"):
            self.notes.append("pair: " + msg["error"])
        return msg

    def start_watch(self, count_topic=None):
        _, pipe = self.spawn(watch_main, dict(self.cfg, count_topic=count_topic))
        self.expect(pipe, 15, "will subscriber")
        self.watch = pipe

    def watch_status(self, stop=False):
        self.watch.send("stop" if stop else "status")
        return self.expect(self.watch, 15, "will subscriber")

    def start_probe(self):
        _, pipe = self.spawn(probe_main, self.cfg)
        self.probe = pipe

    def cleanup(self):
        for p, pipe in self.children:
            try:
                if p.is_alive():
                    pipe.send({"op": "exit"} if pipe in self.fleet else "stop")
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5
        for p, pipe in self.children:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(2)
                if p.is_alive():
                    p.kill()
                    p.join(2)
            pipe.close()
        self.children = []

    # --- broker state ------------------------------------------------------------
    def broker_state(self):
        pid = self.ep.pid
        return {"threads": proc_threads(pid), "fds": proc_fd_count(pid), "rss_kb": proc_rss_kb(pid),
                "cpu_s": proc_cpu_s(pid)}

    def count_now(self, watch_wait=2.5):
        """The broker's client count now: (nodes, stats) from REST, or the latest
        $SYS value (waiting up to ``watch_wait`` s for a fresh one)."""
        if self.ep.api:
            try:
                return self.ep.api.clients()
            except (OSError, RuntimeError, ValueError, KeyError, http.client.HTTPException) as exc:
                self.notes.append("REST: %s" % exc)
                return None, None
        if self.ep.count_topic:
            t0 = now_ns()
            end = time.monotonic() + watch_wait
            while True:
                vals = self.watch_status()["sys"]
                fresh = [v for t, v in vals if t >= t0]
                if fresh or time.monotonic() >= end:
                    v = fresh[-1] if fresh else (vals[-1][1] if vals else None)
                    return v, None
                time.sleep(0.2)
        return None, None

    @staticmethod
    def pair_gaps(deliveries, t_from, t_to, t_stop):
        """The pair around an event at t_from (ns): the longest time without a
        delivery of the gaps that overlap [t_from, t_to], at full length (a gap
        that starts in the window and ends after it counts whole; one that
        has not ended when the pair stopped at t_stop counts up to t_stop),
        the deliveries in the window, the first delivery after t_from (s after
        it), and the longest time between the publisher's send stamps in the
        window (its own punctuality: a gap here is the generator's, not the
        broker's)."""
        times = sorted(d[2] for d in deliveries)
        prev = max((t for t in times if t <= t_from), default=t_from)
        gap = 0
        first_after = None
        for t in times:
            if t > t_from:
                if first_after is None:
                    first_after = t
                if prev < t_to:
                    gap = max(gap, t - prev)
                prev = t
        if prev < t_to:
            gap = max(gap, t_stop - prev)
        n = sum(1 for t in times if t_from < t <= t_to)
        sends = sorted(d[1] for d in deliveries if t_from - 1_000_000_000 <= d[1] <= t_to)
        send_gap = max((b - a for a, b in zip(sends, sends[1:])), default=None)
        lats = [d[2] - d[1] for d in deliveries if t_from <= d[1] <= t_to]
        return {"pair_max_gap_s": rnd(gap / 1e9), "pair_deliveries_in_window": n,
                "pair_first_after_s": rnd((first_after - t_from) / 1e9) if first_after else None,
                "pair_send_max_gap_s": rnd(send_gap / 1e9) if send_gap is not None else None,
                "pair_max_latency_s": rnd(max(lats) / 1e9) if lats else None}

    @staticmethod
    def timeline(t0, t_end, proc_samples, count_samples, will_times):
        """[seconds after t0, broker threads, fds, client count, wills so far]
        once a second from t0 to t_end (ns): the last sample at or before each
        second (None where there is none)."""
        out = []
        k = 0
        pi = ci = wi = 0
        th = fd = cl = None
        while t0 + k * 1_000_000_000 <= t_end and k <= 3600:
            t = t0 + k * 1_000_000_000
            while pi < len(proc_samples) and proc_samples[pi][0] <= t:
                v = proc_samples[pi][1]
                if v is not None:
                    th = v[0] if v[0] is not None else th
                    fd = v[1] if v[1] is not None else fd
                pi += 1
            while ci < len(count_samples) and count_samples[ci][0] <= t:
                if count_samples[ci][1] is not None:
                    cl = count_samples[ci][1][0]
                ci += 1
            while wi < len(will_times) and will_times[wi] <= t:
                wi += 1
            out.append([k, th, fd, cl, wi])
            k += 1
        return out

    @staticmethod
    def pair_lost(deliveries, sent):
        seen = {d[0] for d in deliveries}
        return max(0, sent - len(seen))

    @staticmethod
    def pair_latency(deliveries, t_from, t_to):
        """Latencies (s) of the messages sent in [t_from, t_to] (ns)."""
        return [(d[2] - d[1]) / 1e9 for d in deliveries if t_from <= d[1] <= t_to]

    def check_fd_room(self, need_broker):
        """None if the broker and the generator can hold the connections; else why not."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        per_proc = -(-self.n // max(1, min(self.opts.procs, self.n))) + FD_MARGIN
        if self.name == "takeover":
            per_proc = 2 * per_proc
        if soft < per_proc:
            return ("the generator processes need %s descriptors each but RLIMIT_NOFILE is %s "
                    "(raise it with ulimit -n, or use more --procs)" % (fmt(per_proc), fmt(soft)))
        lim = proc_nofile(self.ep.pid) if self.ep.pid else None
        have = proc_fd_count(self.ep.pid) if self.ep.pid else None
        if lim is not None and have is not None and lim < need_broker + have + 8:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            return ("the broker needs %s descriptors (%s connections + the %s it has open) but its "
                    "RLIMIT_NOFILE is %s (this tool's hard limit: %s; raise it with ulimit -Hn as root, "
                    "or run fewer, e.g. --idle-clients %d)"
                    % (fmt(need_broker + have + 8), fmt(need_broker), fmt(have), fmt(lim), fmt(hard),
                       max(0, lim - have - 8 - 16)))
        return None

    def ids(self, tag):
        return ["mb%s%d-%d" % (tag, os.getpid(), i) for i in range(self.n)]

    # --- the scenarios -----------------------------------------------------------
    def run(self):
        why = self.check_fd_room(self.n + (5 if self.name != "takeover" else self.n + 5))
        if why:
            self.rec["skipped"] = why
            self.log("skipped: " + why)
            return self.rec
        try:
            getattr(self, "sc_" + self.name)()
        except ScenarioError as exc:
            self.rec["error"] = str(exc)
        except Exception as exc:
            self.rec["error"] = "scenario failed: %s: %s" % (type(exc).__name__, exc)
        finally:
            self.cleanup()
        if self.notes:
            self.rec["note"] = "; ".join(dict.fromkeys(self.notes))[:2000]
        return self.rec

    def connect_fields(self, c, prefix=""):
        self.rec.update({
            prefix + "connected": c["connected"], prefix + "failed": c["failed"],
            prefix + "connect_s": rnd(c["elapsed_s"]), prefix + "conn_rate": rnd(c["rate"], 0),
            prefix + "connack_p50_ms": c["lat"]["p50"], prefix + "connack_p99_ms": c["lat"]["p99"],
            prefix + "connack_max_ms": c["lat"]["max"], prefix + "gen_cpu_max_pct": c["gen_cpu_max_pct"]})
        if c["errors"]:
            self.rec[prefix + "connect_errors"] = c["errors"]

    def sc_reset(self):
        opts, rec, ep = self.opts, self.rec, self.ep
        self.start_fleet()
        self.start_probe()
        self.start_pair(opts.pair_rate)
        self.start_watch(None if ep.api else ep.count_topic)
        time.sleep(0.5)
        rec["count_source"] = ep.count_source
        base_nodes, base_stats = self.count_now()
        time.sleep(0.3)                     # the REST request's connection closed
        before = self.broker_state()
        rec.update(clients_baseline=base_nodes, threads_before=before["threads"], fds_before=before["fds"])
        self.log("connecting %s clients with wills" % fmt(self.n))
        c = self.fleet_connect(self.ids("r"), will=True)
        self.connect_fields(c)
        if c["connected"] == 0:
            raise ScenarioError("no client connected: %s" % c["errors"])
        time.sleep(1.0)
        loaded = self.broker_state()
        nodes, stats = self.count_now()
        rec.update(threads_with_clients=loaded["threads"], fds_with_clients=loaded["fds"],
                   clients_before_reset=nodes)
        # samplers: /proc and the client count
        tick = iter(range(1 << 30))       # threads every 50 ms; fds (7 ms to list 10,000) every 250 ms
        proc_s = Sampler(lambda: (proc_threads(ep.pid), proc_fd_count(ep.pid) if next(tick) % 5 == 0 else None),
                         0.05) if ep.pid else None
        rest_s = Sampler(ep.api.clients, 0.1) if ep.api else None
        for s in (proc_s, rest_s):
            if s:
                s.start()
        t_reset = now_ns() + int(0.3e9)
        cpu0 = proc_cpu_s(ep.pid)
        self.log("resetting %s connections" % fmt(c["connected"]))
        self.probe.send({"at": t_reset + int(opts.probe_delay * 1e9), "timeout": opts.probe_timeout})
        for pipe in self.fleet:
            pipe.send({"op": "reset", "at": t_reset, "fifo": opts.reset_sched == "fifo"})
        resets = [self.expect(pipe, 30, "reset") for pipe in self.fleet]
        rec["reset_close_ms"] = ms((max(r["t1"] for r in resets) - t_reset) / 1e9)
        rec["reset_sched"] = ",".join(sorted({r["sched"] for r in resets}))
        # wait until everything is back (or --settle-timeout), and the pair's window is over
        settle_end = t_reset + int(opts.settle_timeout * 1e9)
        gap_end = t_reset + int(opts.gap_window * 1e9)
        probe = None
        base_threads, base_fds = before["threads"], before["fds"]
        count_back = wills_done = proc_back = False
        while now_ns() < settle_end:
            if probe is None and self.probe.poll(0):
                probe = self.expect(self.probe, 1, "fresh client")
            if not count_back:
                if rest_s is not None:
                    count_back = first_at_or_below(rest_s.samples, t_reset, base_nodes or 0,
                                                   key=lambda v: max(v[0], v[1] if v[1] is not None else 0)) is not None
                else:
                    count_back = True        # $SYS: read from the watcher at the end
            if not wills_done:
                wills_done = self.watch_status()["wills"] >= c["connected"]
            if proc_s is not None and not proc_back:
                th, fd = proc_threads(ep.pid), proc_fd_count(ep.pid)
                proc_back = th is not None and th <= base_threads and fd is not None and fd <= base_fds + 1
            elif proc_s is None:
                proc_back = True
            if (probe is not None and count_back and wills_done and proc_back and now_ns() >= gap_end
                    and (not ep.count_topic or ep.api or now_ns() >= t_reset + int(3e9))):
                break
            time.sleep(0.1)
        rec["settle_s"] = rnd((now_ns() - t_reset) / 1e9, 2)
        if rest_s is not None:
            rest_s.stop()
        cpu1 = proc_cpu_s(ep.pid)
        if probe is None:
            probe = self.expect(self.probe, opts.probe_timeout + 5, "fresh client")
        rec["fresh_connack_s"] = rnd(probe["connack_s"], 4)
        if probe.get("error"):
            rec["fresh_error"] = probe["error"]
        # threads and descriptors, while the survivors are still connected
        if proc_s is not None:
            samples = proc_s.stop()
            rec["threads_back_s"] = rnd(first_at_or_below(samples, t_reset, base_threads, key=lambda v: v[0]), 2)
            rec["fds_back_s"] = rnd(first_at_or_below(samples, t_reset, base_fds, key=lambda v: v[1]), 2)
            time.sleep(0.5)
            end = self.broker_state()
            rec.update(threads_after=end["threads"], fds_after=end["fds"],
                       leaked_threads=end["threads"] - base_threads if end["threads"] is not None else None,
                       leaked_fds=end["fds"] - base_fds if end["fds"] is not None else None,
                       broker_cpu_settle_s=rnd(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None)
            rec["settled"] = not (rec["leaked_threads"] or 0) > 0 and not (rec["leaked_fds"] or 0) > 0
            if not rec["settled"]:
                self.notes.append("threads/fds still above the baseline %.0f s after the reset: a slow teardown "
                                  "or a leak (a longer --settle-timeout tells them apart)" % opts.settle_timeout)
        t_stop = now_ns()
        pair = self.stop_pair()
        rec.update(self.pair_gaps(pair["deliveries"], t_reset, gap_end, t_stop))
        rec.update(pair_rate=opts.pair_rate, pair_sent=pair["sent"],
                   pair_undelivered=self.pair_lost(pair["deliveries"], pair["sent"]))
        time.sleep(0.5)
        w = self.watch_status(stop=True)
        will_times = array.array("q")
        will_times.frombytes(w.get("times", b""))
        rec["timeline"] = self.timeline(t_reset, t_stop, proc_s.samples if proc_s else [],
                                        rest_s.samples if rest_s else [(t, (v, None), 0) for t, v in w["sys"]],
                                        sorted(will_times))
        rec.update(wills_expected=c["connected"], wills_received=w["wills"], wills_distinct=w["distinct"],
                   wills_missing=c["connected"] - w["distinct"],
                   wills_last_s=rnd((w["last"] - t_reset) / 1e9, 2) if w["last"] else None)
        # the client count
        if rest_s is not None:
            rec["count_back_s"] = rnd(first_at_or_below(
                rest_s.samples, t_reset, base_nodes or 0, key=lambda v: v[0]), 2)
            rec["stats_count_back_s"] = rnd(first_at_or_below(
                rest_s.samples, t_reset, base_stats or 0, key=lambda v: v[1]), 2)
            after = [s for s in rest_s.samples if s[0] >= t_reset]
            rec["rest_polls"] = len(after)
            rec["rest_failed"] = sum(1 for s in after if s[1] is None)
            rec["rest_max_ms"] = ms(max((s[2] for s in after), default=None))
            last = [s[1] for s in after if s[1] is not None]
            rec["clients_after"] = last[-1][0] if last else None
        elif ep.count_topic:
            vals = [(t, v, 0) for t, v in w["sys"]]
            base = base_nodes if base_nodes is not None else 0
            rec["count_back_s"] = rnd(first_at_or_below(vals, t_reset, base), 2)
            rec["count_sys_values"] = len(vals)

    def sc_connect(self):
        opts, rec = self.opts, self.rec
        self.start_fleet()
        self.start_pair(opts.latency_rate)
        time.sleep(0.3)
        t_idle0 = now_ns()
        time.sleep(opts.idle_window)
        t_idle1 = now_ns()
        before = self.broker_state()
        self.log("connecting %s clients" % fmt(self.n))
        c = self.fleet_connect(self.ids("c"))
        after = self.broker_state()
        self.connect_fields(c)
        time.sleep(0.2)
        pair = self.stop_pair()
        idle = pcts_ms(self.pair_latency(pair["deliveries"], t_idle0, t_idle1))
        busy = pcts_ms(self.pair_latency(pair["deliveries"], c["go_at"], c["t_last"]))
        sent_busy = int((c["t_last"] - c["go_at"]) / 1e9 * opts.latency_rate)
        rec.update(pair_rate=opts.latency_rate, pair_idle_n=idle["n"], pair_idle_p50_ms=idle["p50"],
                   pair_idle_p99_ms=idle["p99"], pair_idle_max_ms=idle["max"], pair_busy_n=busy["n"],
                   pair_busy_p50_ms=busy["p50"], pair_busy_p99_ms=busy["p99"], pair_busy_max_ms=busy["max"],
                   pair_undelivered=self.pair_lost(pair["deliveries"], pair["sent"]),
                   pair_kernel_ts=pair.get("kernel_ts"))
        if idle["p50"] and busy["p50"] is not None:
            rec["pair_p50_ratio"] = rnd(busy["p50"] / idle["p50"], 2)
        if idle["p99"] and busy["p99"] is not None:
            rec["pair_p99_ratio"] = rnd(busy["p99"] / idle["p99"], 2)
        if busy["n"] < max(1, sent_busy // 2):
            self.notes.append("pair: only %d of ~%d messages sent during the storm were delivered"
                              % (busy["n"], sent_busy))
        if before["cpu_s"] is not None and after["cpu_s"] is not None and c["elapsed_s"] > 0:
            rec["broker_cpu_pct"] = round((after["cpu_s"] - before["cpu_s"]) / c["elapsed_s"] * 100, 1)
        rec.update(threads_with_clients=after["threads"], fds_with_clients=after["fds"])

    def sc_takeover(self):
        opts, rec = self.opts, self.rec
        self.start_fleet()
        self.start_probe()
        self.start_pair(opts.pair_rate)
        ids = self.ids("t")
        self.log("connecting %s clients" % fmt(self.n))
        c = self.fleet_connect(ids)
        self.connect_fields(c, "old_")
        if c["connected"] == 0:
            raise ScenarioError("no client connected: %s" % c["errors"])
        time.sleep(1.0)
        st = self.broker_state()
        rec.update(threads_with_clients=st["threads"], fds_with_clients=st["fds"])
        go_in = 0.3
        go_at = now_ns() + int(go_in * 1e9)
        self.probe.send({"at": go_at + int(opts.probe_delay * 1e9), "timeout": opts.probe_timeout})
        self.log("taking over %s client ids" % fmt(c["connected"]))
        t = self.fleet_connect(ids, go_in=go_in, takeover=True)
        self.connect_fields(t, "new_")
        probe = self.expect(self.probe, opts.probe_timeout + 5, "fresh client")
        replies = t["replies"]
        old_eof = sum(r["old_eof"] for r in replies)
        old_rst = sum(r["old_rst"] for r in replies)
        old_open = sum(r["old_open"] for r in replies)
        old_last = max(r["old_last"] for r in replies)
        rec.update(takeover_s=rnd((t["t_last"] - t["go_at"]) / 1e9), fresh_connack_s=rnd(probe["connack_s"], 4),
                   old_closed_eof=old_eof, old_closed_rst=old_rst, old_not_closed=old_open,
                   old_closed_last_s=rnd((old_last - t["go_at"]) / 1e9, 2) if old_last else None,
                   old_unexpected_data=sum(r["old_data"] for r in replies),
                   new_closed=sum(r["new_closed"] for r in replies))
        if probe.get("error"):
            rec["fresh_error"] = probe["error"]
        gap_end = go_at + int(opts.gap_window * 1e9)
        sleep_until_ns(gap_end)
        t_stop = now_ns()
        pair = self.stop_pair()
        rec.update(self.pair_gaps(pair["deliveries"], go_at, gap_end, t_stop))
        rec.update(pair_rate=opts.pair_rate, pair_undelivered=self.pair_lost(pair["deliveries"], pair["sent"]))
        st = self.broker_state()
        rec.update(threads_after=st["threads"], fds_after=st["fds"])

    def sc_idle(self):
        opts, rec = self.opts, self.rec
        self.start_fleet()
        time.sleep(0.3)
        before = self.broker_state()
        self.log("connecting %s idle clients" % fmt(self.n))
        c = self.fleet_connect(self.ids("i"))
        self.connect_fields(c)
        time.sleep(opts.conn_settle)
        after = self.broker_state()
        rec.update(rss_before_kb=before["rss_kb"], rss_after_kb=after["rss_kb"],
                   threads_with_clients=after["threads"], fds_with_clients=after["fds"])
        if before["rss_kb"] is not None and after["rss_kb"] is not None and c["connected"]:
            rec["rss_per_conn_bytes"] = round((after["rss_kb"] - before["rss_kb"]) * 1024 / c["connected"])


###############################################################################
# Reporting ###################################################################
###############################################################################

SUMMARY = {
    "reset": [
        ("connect N (with wills)", lambda r: "%s/%s in %ss (%s/s), CONNACK p50 %s / p99 %s / max %s ms" % (
            fmt(r.get("connected")), fmt(r.get("clients")), fmt(r.get("connect_s")), fmt(r.get("conn_rate")),
            fmt(r.get("connack_p50_ms")), fmt(r.get("connack_p99_ms")), fmt(r.get("connack_max_ms")))),
        ("fresh client 0.2 s after the reset", lambda r: "CONNACK after %s s%s" % (
            fmt(r.get("fresh_connack_s")), " (%s)" % r["fresh_error"] if r.get("fresh_error") else "")),
        ("resets sent", lambda r: "all closed %s ms after the start (%s)" % (
            fmt(r.get("reset_close_ms")), r.get("reset_sched"))),
        ("healthy pair", lambda r: "largest gap %s s, first delivery after the reset at %s s, max latency %s s "
         "(%s/s; undelivered %s; publisher's largest gap %s s)" % (
            fmt(r.get("pair_max_gap_s")), fmt(r.get("pair_first_after_s")), fmt(r.get("pair_max_latency_s")),
            fmt(r.get("pair_rate")), fmt(r.get("pair_undelivered")), fmt(r.get("pair_send_max_gap_s")))),
        ("client count back", lambda r: "%s s (%s; monitoring/stats %s s; survivors %s; REST max %s ms)" % (
            fmt(r.get("count_back_s")), r.get("count_source"), fmt(r.get("stats_count_back_s")),
            fmt(r.get("clients_baseline")), fmt(r.get("rest_max_ms")))),
        ("wills", lambda r: "%s of %s (distinct %s), the last %s s after the reset" % (
            fmt(r.get("wills_received")), fmt(r.get("wills_expected")), fmt(r.get("wills_distinct")),
            fmt(r.get("wills_last_s")))),
        ("broker threads", lambda r: "%s before, %s with the clients, %s after; back after %s s" % (
            fmt(r.get("threads_before")), fmt(r.get("threads_with_clients")), fmt(r.get("threads_after")),
            fmt(r.get("threads_back_s")))),
        ("broker fds", lambda r: "%s before, %s with the clients, %s after; back after %s s" % (
            fmt(r.get("fds_before")), fmt(r.get("fds_with_clients")), fmt(r.get("fds_after")),
            fmt(r.get("fds_back_s")))),
        ("broker CPU while settling", lambda r: "%s s in %s s" % (
            fmt(r.get("broker_cpu_settle_s")), fmt(r.get("settle_s")))),
        ("after the reset (threads/clients/wills)", lambda r: ", ".join(
            "%ds: %s/%s/%s" % (e[0], fmt(e[1]), fmt(e[3]), fmt(e[4]))
            for e in r.get("timeline", []) if e[0] in (0, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120))),
    ],
    "connect": [
        ("connect N", lambda r: "%s/%s in %ss: %s conn/s" % (
            fmt(r.get("connected")), fmt(r.get("clients")), fmt(r.get("connect_s")), fmt(r.get("conn_rate")))),
        ("CONNACK latency", lambda r: "p50 %s / p99 %s / max %s ms" % (
            fmt(r.get("connack_p50_ms")), fmt(r.get("connack_p99_ms")), fmt(r.get("connack_max_ms")))),
        ("pair latency idle", lambda r: "p50 %s / p99 %s / max %s ms (n=%s)" % (
            fmt(r.get("pair_idle_p50_ms")), fmt(r.get("pair_idle_p99_ms")), fmt(r.get("pair_idle_max_ms")),
            fmt(r.get("pair_idle_n")))),
        ("pair latency during", lambda r: "p50 %s / p99 %s / max %s ms (n=%s): x%s / x%s" % (
            fmt(r.get("pair_busy_p50_ms")), fmt(r.get("pair_busy_p99_ms")), fmt(r.get("pair_busy_max_ms")),
            fmt(r.get("pair_busy_n")), fmt(r.get("pair_p50_ratio")), fmt(r.get("pair_p99_ratio")))),
        ("CPU", lambda r: "broker %s%%, busiest generator process %s%%" % (
            fmt(r.get("broker_cpu_pct")), fmt(r.get("gen_cpu_max_pct")))),
    ],
    "takeover": [
        ("old connections", lambda r: "%s/%s in %ss (%s/s)" % (
            fmt(r.get("old_connected")), fmt(r.get("clients")), fmt(r.get("old_connect_s")),
            fmt(r.get("old_conn_rate")))),
        ("takeover", lambda r: "%s/%s new CONNACKs after %s s; CONNACK p50 %s / p99 %s / max %s ms" % (
            fmt(r.get("new_connected")), fmt(r.get("clients")), fmt(r.get("takeover_s")),
            fmt(r.get("new_connack_p50_ms")), fmt(r.get("new_connack_p99_ms")), fmt(r.get("new_connack_max_ms")))),
        ("fresh client 0.2 s after the start", lambda r: "CONNACK after %s s%s" % (
            fmt(r.get("fresh_connack_s")), " (%s)" % r["fresh_error"] if r.get("fresh_error") else "")),
        ("old connections closed", lambda r: "%s EOF + %s RST, %s left open; the last %s s after the start" % (
            fmt(r.get("old_closed_eof")), fmt(r.get("old_closed_rst")), fmt(r.get("old_not_closed")),
            fmt(r.get("old_closed_last_s")))),
        ("new connections closed", lambda r: fmt(r.get("new_closed"))),
        ("healthy pair", lambda r: "largest gap %s s, max latency %s s (undelivered %s)" % (
            fmt(r.get("pair_max_gap_s")), fmt(r.get("pair_max_latency_s")), fmt(r.get("pair_undelivered")))),
    ],
    "idle": [
        ("connect N", lambda r: "%s/%s in %ss: %s conn/s, CONNACK p99 %s ms" % (
            fmt(r.get("connected")), fmt(r.get("clients")), fmt(r.get("connect_s")), fmt(r.get("conn_rate")),
            fmt(r.get("connack_p99_ms")))),
        ("broker RSS", lambda r: "%s -> %s KiB: %s bytes per connection" % (
            fmt(r.get("rss_before_kb")), fmt(r.get("rss_after_kb")), fmt(r.get("rss_per_conn_bytes")))),
        ("broker threads, fds", lambda r: "%s, %s" % (fmt(r.get("threads_with_clients")),
                                                      fmt(r.get("fds_with_clients")))),
    ],
}

TABLE = {
    "reset": ["clients", "fresh_connack_s", "pair_max_gap_s", "count_back_s", "wills_received", "wills_missing",
              "threads_back_s", "fds_back_s", "leaked_threads", "leaked_fds", "conn_rate"],
    "connect": ["clients", "conn_rate", "connack_p50_ms", "connack_p99_ms", "connack_max_ms",
                "pair_idle_p50_ms", "pair_busy_p50_ms", "pair_idle_p99_ms", "pair_busy_p99_ms", "broker_cpu_pct"],
    "takeover": ["clients", "takeover_s", "fresh_connack_s", "new_connack_p99_ms", "old_not_closed",
                 "new_closed", "pair_max_gap_s"],
    "idle": ["clients", "conn_rate", "rss_per_conn_bytes", "connack_p99_ms"],
}


def target_checks(rec):
    out = {}
    for sc, field, desc, ok in TARGETS:
        if sc == rec.get("scenario") and field in rec:
            out[field] = bool(ok(rec[field]))
    return out


def summary_text(rec):
    lines = ["== %s: %s (%s clients) ==" % (rec["scenario"], rec["label"], fmt(rec.get("clients")))]
    if rec.get("skipped"):
        return "\n".join(lines + ["  skipped: " + rec["skipped"]])
    for name, f in SUMMARY.get(rec["scenario"], []):
        try:
            lines.append("  %-36s %s" % (name + ":", f(rec)))
        except (KeyError, TypeError, ValueError):
            pass
    for sc, field, desc, ok in TARGETS:
        if sc == rec["scenario"] and field in rec:
            lines.append("  target %-29s %s (%s)" % (desc + ":", "ok" if ok(rec[field]) else "MISS", fmt(rec[field])))
    if rec.get("connect_errors") or rec.get("new_connect_errors") or rec.get("old_connect_errors"):
        lines.append("  connect errors: %s" % (rec.get("connect_errors") or rec.get("new_connect_errors")
                                               or rec.get("old_connect_errors")))
    if rec.get("note"):
        lines.append("  note: " + rec["note"])
    if rec.get("error"):
        lines.append("  ERROR: " + rec["error"])
    return "\n".join(lines)


###############################################################################
# Command line and driver #####################################################
###############################################################################

def parse_args(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(
        prog="massbench",
        description="Mass connection events against an MQTT broker on loopback: mass reset, mass connect, "
                    "mass takeover, idle connections (issue 11). One JSON line per scenario.",
        epilog="examples:\n"
               "  %(prog)s --start emqx_lite\n"
               "  %(prog)s --start emqx_lite,mosquitto --clients 2000\n"
               "  %(prog)s --target 127.0.0.1:1883 --broker-pid 1234 --api-port 8080 --scenarios reset\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to benchmark")
    g.add_argument("--start", "--brokers", dest="start", metavar="LIST",
                   help="start these brokers on free loopback ports, a fresh process per scenario: "
                        "emqx_lite,mosquitto (a missing one is skipped with a message)")
    g.add_argument("--target", metavar="HOST:PORT", help="a running broker (loopback only)")
    g.add_argument("--broker-pid", type=int, help="pid of the --target broker (threads, fds, RSS, CPU)")
    g.add_argument("--api-port", type=int,
                   help="the --target broker's emqx_lite REST API port (client count from monitoring/nodes "
                        "and monitoring/stats); without it the count comes from --count-topic")
    g.add_argument("--api-user", default="admin", help="REST Basic auth user (default admin)")
    g.add_argument("--api-password", default="public", help="REST Basic auth password (default public)")
    g.add_argument("--count-topic", default=SYS_CLIENTS_TOPIC,
                   help="$SYS topic with the connected-client count, for brokers without the REST API "
                        "(default %(default)s; '' = none)")
    g.add_argument("--label", help="label of the --target broker (default: target)")
    g.add_argument("--emqx-lite", default=os.path.join(os.path.dirname(here), "emqx_lite.py"), metavar="PATH",
                   help="emqx_lite.py to start (default: %(default)s)")
    g.add_argument("--emqx-lite-args", metavar="ARGS", default="",
                   help="extra command-line arguments for the emqx_lite that --start launches, "
                        "split as a shell does, e.g. \"--cpu all\"")
    g.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="comma-separated, from %s (default: all)" % ",".join(SCENARIOS))
    g = p.add_argument_group("load shape")
    g.add_argument("--clients", type=int,
                   help="N for every scenario (defaults: reset %(reset)d, connect %(connect)d, takeover %(takeover)d, "
                        "idle %(idle)d)" % DEFAULT_CLIENTS)
    g.add_argument("--takeover-clients", type=int, help="N for takeover (overrides --clients)")
    g.add_argument("--idle-clients", type=int, help="N for idle (overrides --clients)")
    g.add_argument("--concurrency", type=int, default=64, help="handshakes in flight (default 64)")
    g.add_argument("--keepalive", type=int, default=60, help="keepalive of the N clients (default 60)")
    g.add_argument("--procs", type=int, default=os.cpu_count() or 1,
                   help="generator processes for the N clients (default nproc = %(default)s)")
    g.add_argument("--pair-rate", type=float, default=20.0, help="healthy pair msg/s in reset/takeover (default 20)")
    g.add_argument("--latency-rate", type=float, default=200.0,
                   help="healthy pair msg/s in connect, where its latency is measured (default 200)")
    g = p.add_argument_group("timing and bounds")
    g.add_argument("--probe-delay", type=float, default=0.2,
                   help="the fresh client connects this long after the reset / takeover start (default 0.2 s)")
    g.add_argument("--probe-timeout", type=float, default=60.0, help="the fresh client's CONNACK timeout (default 60 s)")
    g.add_argument("--reset-sched", choices=("fifo", "normal"), default="fifo",
                   help="reset: the generator processes close their connections under SCHED_FIFO (default; "
                        "where permitted, else normal), so that the woken broker does not stretch the 'at once' "
                        "over seconds; the JSON says which (reset_sched) and how long closing took (reset_close_ms)")
    g.add_argument("--gap-window", type=float, default=10.0,
                   help="the pair's largest gap is looked for this long after the event (default 10 s)")
    g.add_argument("--idle-window", type=float, default=3.0, help="connect: idle pair latency window (default 3 s)")
    g.add_argument("--settle-timeout", type=float, default=60.0,
                   help="reset: at most this long for count, wills, threads and fds to come back (default 60 s)")
    g.add_argument("--watch-timeout", type=float, default=10.0,
                   help="takeover: wait this long after the last CONNACK for old connections to close (default 10 s)")
    g.add_argument("--setup-timeout", type=float, default=60.0, help="a connect phase's limit (default 60 s)")
    g.add_argument("--hs-timeout", type=float, default=30.0, help="one handshake's limit (default 30 s)")
    g.add_argument("--conn-settle", type=float, default=2.0, help="idle: seconds before reading RSS (default 2)")
    g.add_argument("--start-timeout", type=float, default=20.0, help="a started broker's time to answer (default 20 s)")
    add_output_options(p, __version__)
    opts = p.parse_args(argv)
    opts.scenario_list = scenario_list(p, opts.scenarios, SCENARIOS)
    if bool(opts.start) == bool(opts.target):
        p.error("give exactly one of --start BROKERS or --target HOST:PORT")
    if opts.procs < 1 or opts.concurrency < 1 or opts.pair_rate <= 0 or opts.latency_rate <= 0:
        p.error("--procs, --concurrency and the rates must be positive")
    # what mqttbench's ManagedBroker reads
    opts.emqx_lite_argv, opts.emqx_lite_data_dir, opts.mqtt = [], None, 4
    return opts


def clients_for(opts, sc):
    if sc == "takeover" and opts.takeover_clients:
        return opts.takeover_clients
    if sc == "idle" and opts.idle_clients:
        return opts.idle_clients
    return opts.clients or DEFAULT_CLIENTS[sc]


class Bench(JsonLinesOutput):
    PROG = "massbench"

    def __init__(self, opts):
        self.opts = opts
        self.records = []
        self.labels = []
        self.json_file = open(opts.json, "a") if opts.json else None

    def emit_scenario(self, rec):
        rec["targets"] = target_checks(rec)
        print(summary_text(rec), flush=True)
        self.emit(rec)

    def run_one(self, sc, ep, extra):
        rec = Scenario(self, ep, sc, clients_for(self.opts, sc)).run()
        rec.update(extra)
        rec["elapsed_total_s"] = None
        return rec

    def main(self):
        opts = self.opts
        nofile = raise_nofile_limit()
        info = machine_info()
        self.log("machine: %(nproc)s CPUs, %(cpu)s, Python %(python)s, %(date)s; RLIMIT_NOFILE %(nofile)s"
                 % dict(info, nofile=nofile))
        if opts.target:
            host, port = parse_hostport(opts.target, prog="massbench")
            api = RestApi(host, opts.api_port, opts.api_user, opts.api_password) if opts.api_port else None
            ep = Endpoint(opts.label or "target", host, port, opts.broker_pid, api,
                          None if api else (opts.count_topic or None))
            if not mqtt_ping(ep.family, ep.addr, 3):
                raise SystemExit("massbench: no MQTT broker answers at %s" % opts.target)
            self.labels.append(ep.label)
            for sc in opts.scenario_list:
                baseline = proc_fd_count(ep.pid)
                t0 = time.monotonic()
                rec = self.run_one(sc, ep, {})
                rec["elapsed_total_s"] = round(time.monotonic() - t0, 1)
                if ep.pid and not proc_alive(ep.pid):
                    rec["error"] = (rec.get("error", "") + " broker process %d is gone" % ep.pid).strip()
                self.emit_scenario(rec)
                if ep.pid and proc_alive(ep.pid):
                    waited = wait_broker_idle(ep.pid, baseline, opts.settle_timeout)
                    if waited is None:
                        self.log("the broker still has %s fds (baseline %s) after %.0fs"
                                 % (proc_fd_count(ep.pid), baseline, opts.settle_timeout))
        else:
            with tempfile.TemporaryDirectory(prefix="massbench-") as workdir:
                for name in [b.strip() for b in opts.start.split(",") if b.strip()]:
                    self.run_managed(name, workdir)
        self.report(info)
        return 0 if self.records and not any("error" in r for r in self.records) else 1

    def run_managed(self, name, workdir):
        broker = Broker(name, self.opts, workdir, self.log)
        version = None
        for sc in self.opts.scenario_list:
            t0 = time.monotonic()
            try:
                broker.start()
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                self.log("skipping %s: %s" % (name, exc))
                return
            try:
                if version is None:
                    version = broker.version()
                    self.labels.append(broker.label)
                    self.log("%s: %s" % (name, version))
                api = (RestApi("127.0.0.1", broker.api_port, self.opts.api_user, self.opts.api_password)
                       if broker.api_port else None)
                ep = Endpoint(broker.label, "127.0.0.1", broker.port, broker.proc.pid, api,
                              None if api else (self.opts.count_topic or None))
                self.log("%s (pid %d, MQTT %d%s): %s" % (name, ep.pid, ep.port,
                                                          ", API %d" % broker.api_port if api else "", sc))
                rec = self.run_one(sc, ep, {"broker_version": version})
                if not broker.alive():
                    rec["error"] = (rec.get("error", "") + " broker died (exit %s); log tail:\n%s"
                                    % (broker.proc.returncode, broker.log_tail(8))).strip()
            finally:
                t_stop = time.monotonic()
                broker.stop()
                stop_s = time.monotonic() - t_stop
            rec["broker_stop_s"] = round(stop_s, 1)
            rec["elapsed_total_s"] = round(time.monotonic() - t0, 1)
            self.emit_scenario(rec)

    def report(self, info):
        if not self.records:
            self.log("no results")
            return
        print("\n## massbench (%s CPUs, %s, Python %s, %s)\n" % (info["nproc"], info["cpu"], info["python"],
                                                                 info["date"]))
        labels = self.labels or sorted({r["label"] for r in self.records})
        print("| scenario | metric | " + " | ".join(labels) + " |")
        print("|---|---|" + "---|" * len(labels))
        for sc in self.opts.scenario_list:
            by_label = {r["label"]: r for r in self.records if r.get("scenario") == sc}
            for metric in TABLE[sc]:
                cells = []
                for lab in labels:
                    r = by_label.get(lab)
                    if r is None:
                        cells.append("")
                    elif r.get("skipped"):
                        cells.append("skipped")
                    elif r.get("error") and metric not in r:
                        cells.append("error")
                    else:
                        v = r.get(metric)
                        mark = "" if metric not in r.get("targets", {}) else (" ok" if r["targets"][metric] else " MISS")
                        cells.append(fmt(v) + mark)
                print("| %s | %s | %s |" % (sc, metric, " | ".join(cells)))
        sys.stdout.flush()


def main(argv=None):
    return mqttbench.run(Bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
