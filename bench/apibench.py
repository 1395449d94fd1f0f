#!/usr/bin/env python3
"""apibench - latency of emqx_lite's REST management API under load and abuse.

Starts emqx_lite on free loopback ports (or uses one that is running) and
measures ``GET /api/v2/monitoring/stats`` while the broker is put in the
situations that used to take the API down::

    python3 bench/apibench.py                                   # every scenario
    python3 bench/apibench.py --emqx-lite /tmp/before/emqx_lite.py --hold 15
    python3 bench/apibench.py --scenarios idle,api_idle1k --api-conns 300
    python3 bench/apibench.py --target-api 127.0.0.1:8080 --target-mqtt 127.0.0.1:1883 \\
                              --broker-pid 1234

Scenarios (each against a freshly started broker unless --fresh none):

    idle           nothing else going on
    mqtt10k        10,000 idle MQTT clients connected (the broker holds > 1,024
                   file descriptors), then again after they disconnected
                   (reported as after_mqtt10k)
    api_idle1k     1,000 silent TCP connections held open to the API port
    slowloris1k    1,000 connections to the API port that send half a request
                   header and then one more header byte every 2 s, held for
                   --hold seconds; how many of them the server closed
    mqtt_pub       a QoS 0 flood (4 publishers, 100-message window each) into
                   one subscriber on bench/#; the MQTT msg/s achieved

Each measurement is --requests (200) requests spread over --workers (4)
threads, each request on its own short HTTP/1.1 connection (http.client,
``Connection: close``, --timeout 5 s for the whole exchange).  A request that
fails or times out counts as --timeout (5,000 ms) in the percentiles; a
measurement in which every request failed is ``"dead": true``.  After
--give-up (12) consecutive failures a measurement stops early (the API is
dead or locked out: the rest would only add timeouts).

The connections that make the load (MQTT clients, held API connections, the
publish flood) live in a separate process, so that the thread measuring the
REST latency never waits for them.  Only the Python standard library is used,
and mqttbench.py from this folder for the helpers the two tools share (/proc,
loopback targets, MQTT encoding, output, command line); Linux is needed for
/proc (broker CPU and open file count).  Only loopback targets are accepted
(127.0.0.0/8 or ::1).
"""

import argparse
import base64
import collections
import errno
import http.client
import multiprocessing
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

# Helpers shared with mqttbench.py, next to this file (running bench/apibench.py
# puts this folder on sys.path).
from mqttbench import (JsonLinesOutput, _str, _terminate, add_output_options, emqx_lite_version,
                       encode_connect, encode_subscribe, encode_varint, packet_header, parse_hostport,
                       percentile, proc_alive, proc_cpu_s, proc_fd_count, raise_nofile_limit,
                       resolve_loopback, scenario_list)

__version__ = "1.0"

###############################################################################
# Constants ###################################################################
###############################################################################

SCENARIOS = ("idle", "mqtt10k", "api_idle1k", "slowloris1k", "mqtt_pub")
DEFAULT_SCENARIOS = ",".join(SCENARIOS)

RE_MQTT = re.compile(r"Listening for MQTT \((mqtt:\w+)\) on [\d.]+:(\d+)")
RE_API = re.compile(r"REST API \(waitress\) on https?://[\d.]+:(\d+)/")
RE_EXC = re.compile(r"^[\w.]*(Error|Exception|Exit)(: .*)?$")   # last line of a traceback

PARTIAL_REQUEST = b"GET /api/v2/monitoring/stats HTTP/1.1\r\nHost: x\r\n"
TRICKLE_HEADER = b"X-Trickle: "       # then 'a' forever: the header line never ends
MQTT_DISCONNECT = b"\xe0\x00"
FD_SLACK = 16                         # broker fds above the baseline that count as "settled"


###############################################################################
# /proc helpers ###############################################################
###############################################################################

def cpu_pct(before, after, seconds):
    if before is None or after is None or seconds <= 0:
        return None
    return round((after - before) / seconds * 100, 1)


###############################################################################
# Loopback targets ############################################################
###############################################################################

class Endpoint:
    """A loopback address (checked) to connect to."""

    def __init__(self, host, port):
        self.family, self.addr = resolve_loopback(host, port, "apibench")
        self.host, self.port = self.addr[0], self.addr[1]

    def __str__(self):
        return ("[%s]:%d" if ":" in self.host else "%s:%d") % (self.host, self.port)


###############################################################################
# MQTT encoding ###############################################################
###############################################################################

def encode_publish(topic, payload):
    """QoS 0 PUBLISH; returns (packet, header length)."""
    body = _str(topic) + payload
    header = b"\x30" + encode_varint(len(body))
    return header + body, len(header)


def connack_ok(ack):
    return len(ack) == 4 and ack[0] == 0x20 and ack[1] == 0x02 and ack[3] == 0


###############################################################################
# The load process ############################################################
###############################################################################
#
# Everything that makes load runs in one child process (multiprocessing,
# "spawn"), driven over a Pipe: the child sets up, sends ("ready", info), then
# answers "stats" with a dict and "stop" with its final dict, closes all its
# sockets and exits.  It ignores SIGINT (the parent stops it), gives up by
# itself after its hard time limit, and exits when the parent is gone.

class LoadExit(Exception):
    """The parent asked us to stop (or went away) during setup."""


class ChildCtl:
    """The child's end of the control pipe."""

    def __init__(self, pipe, limit_s):
        self.pipe = pipe
        self.ppid = os.getppid()
        self.hard = time.monotonic() + limit_s
        self.last_check = 0.0
        self.stats = lambda: {}

    def expired(self):
        return time.monotonic() >= self.hard or os.getppid() != self.ppid

    def handle(self):
        """Answer pending requests; True when told to stop."""
        while self.pipe.poll():
            try:
                msg = self.pipe.recv()
            except (EOFError, OSError):
                return True
            if msg == "stop":
                return True
            if msg == "stats":
                self.pipe.send(("stats", self.stats()))
        return False

    def check(self, every=0.1):
        """During setup: raise LoadExit when told to stop, out of time or orphaned."""
        now = time.monotonic()
        if now - self.last_check < every:
            return
        self.last_check = now
        if self.expired() or self.handle():
            raise LoadExit()


def open_many(ep, n, concurrency, hs_timeout, ctl, hello, expect_len=0, check=None, progress=None):
    """Open ``n`` non-blocking connections to ``ep``, at most ``concurrency``
    handshakes at a time, with an epoll-backed selector.  When a connection is
    up, ``hello(i)`` is sent; with ``expect_len`` the connection counts only
    after that many reply bytes arrived and ``check(reply)`` is true.

    Returns (sockets, open times, errors Counter, first start, last success).
    """
    sel = selectors.DefaultSelector()
    pending = {}
    done, t_done = [], []
    errors = collections.Counter()
    i, t_first, t_last, last_scan = 0, None, None, time.monotonic()

    def fail(sock, why):
        errors[why] += 1
        if sock in pending:
            del pending[sock]
            sel.unregister(sock)
        sock.close()

    try:
        while i < n or pending:
            ctl.check()
            now = time.monotonic()
            while i < n and len(pending) < concurrency:
                try:
                    s = socket.socket(ep.family, socket.SOCK_STREAM)
                except OSError as exc:
                    errors[errno.errorcode.get(exc.errno, "socket")] += n - i   # EMFILE: no point going on
                    i = n
                    break
                s.setblocking(False)
                if t_first is None:
                    t_first = now
                rc = s.connect_ex(ep.addr)
                i += 1
                if rc not in (0, errno.EINPROGRESS):
                    errors[errno.errorcode.get(rc, str(rc))] += 1
                    s.close()
                    continue
                st = [i - 1, 0, b"", now]               # number, state, reply so far, start
                pending[s] = st
                sel.register(s, selectors.EVENT_WRITE, st)
            for key, _ in sel.select(0.05):
                s, st = key.fileobj, key.data
                if s not in pending:
                    continue
                if st[1] == 0:                          # connect finished (or failed)
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        fail(s, errno.errorcode.get(err, str(err)))
                        continue
                    data = hello(st[0])
                    try:
                        if data and s.send(data) != len(data):
                            fail(s, "short_send")
                            continue
                    except OSError as exc:
                        fail(s, errno.errorcode.get(exc.errno, "send"))
                        continue
                    if expect_len:
                        st[1] = 1
                        sel.modify(s, selectors.EVENT_READ, st)
                        continue
                else:                                   # waiting for the reply
                    try:
                        chunk = s.recv(expect_len - len(st[2]))
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        fail(s, errno.errorcode.get(exc.errno, "recv"))
                        continue
                    if not chunk:
                        fail(s, "closed")
                        continue
                    st[2] += chunk
                    if len(st[2]) < expect_len:
                        continue
                    if check is not None and not check(st[2]):
                        fail(s, "refused")
                        continue
                del pending[s]
                sel.unregister(s)
                done.append(s)
                t_last = time.monotonic()
                t_done.append(t_last)
                if progress is not None and len(done) % 1000 == 0:
                    progress(len(done))
            now = time.monotonic()
            if now - last_scan >= 0.25:
                last_scan = now
                for s, st in list(pending.items()):
                    if now - st[3] > hs_timeout:
                        fail(s, "timeout")
    except BaseException:
        for s in list(pending) + done:
            s.close()
        raise
    finally:
        sel.close()
    for s in list(pending):
        s.close()
    return done, t_done, errors, t_first, t_last


class Held:
    """One held connection of the hold loop."""
    __slots__ = ("sock", "t_open", "next_t", "sent", "closed_at", "got")

    def __init__(self, sock, t_open, interval):
        self.sock, self.t_open, self.next_t = sock, t_open, t_open + interval
        self.sent, self.closed_at, self.got = 0, None, 0


def hold_loop(ctl, socks, t_open, trickle_interval, info):
    """Hold ``socks`` open until told to stop: count the ones the server closes
    and, with ``trickle_interval``, send each one more header byte that often.
    Reports ("ready", info) to the parent once everything is registered."""
    sel = selectors.DefaultSelector()
    held = [Held(s, t, trickle_interval or 0) for s, t in zip(socks, t_open)]
    for h in held:
        sel.register(h.sock, selectors.EVENT_READ, h)
    sel.register(ctl.pipe, selectors.EVENT_READ, None)
    due = collections.deque(held) if trickle_interval else collections.deque()
    responses = collections.Counter()
    closed_after = []
    trickled = [0]
    t_hold = time.monotonic()
    ctl.pipe.send(("ready", info))

    def closed(h, now):
        if h.closed_at is None:
            h.closed_at = now
            closed_after.append(now - h.t_open)
            sel.unregister(h.sock)
            h.sock.close()

    def stats():
        after = sorted(closed_after)
        rec = dict(info)
        rec.update({"held": len(held), "server_closed": len(after),
                    "server_closed_p50_s": round(after[(len(after) - 1) // 2], 1) if after else None,
                    "server_closed_max_s": round(after[-1], 1) if after else None,
                    "server_responses": dict(responses), "held_s": round(time.monotonic() - t_hold, 1)})
        if trickle_interval:
            rec["trickled_bytes"] = trickled[0]
        return rec

    ctl.stats = stats
    try:
        while not ctl.expired():
            now = time.monotonic()
            timeout = 0.25
            if due:
                timeout = max(0.0, min(timeout, due[0].next_t - now))
            stop = False
            for key, _ in sel.select(timeout):
                h = key.data
                if h is None:
                    stop = ctl.handle()
                    continue
                if h.closed_at is not None:
                    continue
                try:
                    data = h.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    closed(h, time.monotonic())
                    continue
                if not data:
                    closed(h, time.monotonic())
                elif not h.got:
                    h.got = len(data)
                    line = data.split(b"\r\n", 1)[0][:12].decode("latin-1")
                    responses[line if line.startswith("HTTP/") else "other"] += 1
            if stop:
                break
            now = time.monotonic()
            while due and due[0].next_t <= now:
                h = due.popleft()
                if h.closed_at is not None:
                    continue
                k = h.sent
                byte = TRICKLE_HEADER[k:k + 1] or b"a"
                try:
                    h.sock.send(byte)
                    h.sent += 1
                    trickled[0] += 1
                except BlockingIOError:
                    pass
                except OSError:
                    closed(h, now)
                    continue
                h.next_t = max(h.next_t + trickle_interval, now + trickle_interval / 2)
                due.append(h)
        return stats()
    finally:
        sel.close()


def load_mqtt_hold(ctl, p):
    """``n`` idle MQTT clients; on stop each sends DISCONNECT and closes."""
    ep = Endpoint(*p["mqtt"])
    prefix = "apib-%d-" % os.getpid()
    progress = {"connected": 0}
    ctl.stats = lambda: dict(progress)

    def on_progress(k):
        progress["connected"] = k

    socks, t_done, errors, t0, t1 = open_many(
        ep, p["n"], p["concurrency"], p["hs_timeout"], ctl,
        lambda i: encode_connect(prefix + str(i), p["keepalive"]), 4, connack_ok, on_progress)
    elapsed = t1 - t0 if t0 is not None and t1 is not None else None
    ru = resource.getrusage(resource.RUSAGE_SELF)
    info = {"mqtt_clients": p["n"], "mqtt_connected": len(socks), "mqtt_failed": p["n"] - len(socks),
            "mqtt_connect_s": round(elapsed, 2) if elapsed is not None else None,
            "mqtt_conn_rate": round(len(socks) / elapsed) if elapsed else None,
            "load_connect_cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "mqtt_connect_errors": dict(errors)}
    try:
        rec = hold_loop(ctl, socks, t_done, 0, info)
    finally:
        for s in socks:
            try:
                s.send(MQTT_DISCONNECT)
            except OSError:
                pass
            s.close()
    rec["mqtt_dropped_by_broker"] = rec.pop("server_closed")
    for k in ("server_closed_p50_s", "server_closed_max_s", "server_responses"):
        rec.pop(k, None)
    return rec


def load_api_hold(ctl, p):
    """``n`` connections to the API port: silent, or trickling a request header."""
    ep = Endpoint(*p["api"])
    trickle = p["trickle"]
    socks, t_done, errors, t0, t1 = open_many(
        ep, p["n"], p["concurrency"], p["hs_timeout"], ctl,
        (lambda i: PARTIAL_REQUEST) if trickle else (lambda i: b""))
    info = {"api_conns": p["n"], "api_opened": len(socks),
            "api_open_s": round(t1 - t0, 2) if t0 is not None and t1 is not None else None,
            "api_open_errors": dict(errors)}
    try:
        return hold_loop(ctl, socks, t_done, p["interval"] if trickle else 0, info)
    finally:
        for s in socks:
            s.close()


def recv_exact(sock, n, what):
    """The next ``n`` bytes from blocking ``sock``, the broker's ``what`` (for the error)."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed by the broker before %s" % what)
        data += chunk
    return data


def blocking_mqtt_client(ep, client_id, keepalive, timeout=10.0):
    s = socket.socket(ep.family, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(ep.addr)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(encode_connect(client_id, keepalive))
        ack = recv_exact(s, 4, "CONNACK")
        if not connack_ok(ack):
            raise ConnectionError("CONNACK refused: %r" % ack)
        return s
    except BaseException:
        s.close()
        raise


def load_mqtt_pub(ctl, p):
    """QoS 0 flood: publishers on bench/0..bench/N-1 -> one subscriber on bench/#.
    A publisher stays at most ``window`` messages ahead of what the subscriber
    received from it; a window that makes no progress for 1 s (messages lost)
    is reopened and counted in mqtt_window_resets."""
    ep = Endpoint(*p["mqtt"])
    npubs, window = p["pubs"], p["window"]
    payload = bytes((97 + i % 26) for i in range(p["size"]))
    packets = [encode_publish("bench/%d" % i, payload) for i in range(npubs)]
    L, hlen = len(packets[0][0]), packets[0][1]
    head = packets[0][0][:hlen]
    digit_off = hlen + 2 + len("bench/")
    tag = "apib-%d-" % os.getpid()
    socks = []
    try:
        sub = blocking_mqtt_client(ep, tag + "sub", p["keepalive"])
        socks.append(sub)
        sub.sendall(encode_subscribe("bench/#", 0))
        suback = recv_exact(sub, 5, "SUBACK")
        if suback[0] != 0x90 or suback[4] == 0x80:
            raise ConnectionError("SUBACK refused: %r" % suback)
        pubs = []
        for i in range(npubs):
            pubs.append(blocking_mqtt_client(ep, tag + "pub%d" % i, p["keepalive"]))
            socks.append(pubs[-1])
        for s in socks:
            s.setblocking(False)
        sent, recvd, forgiven = [0] * npubs, [0] * npubs, [0] * npubs
        last_progress = [time.monotonic()] * npubs
        out = [b""] * npubs
        rbuf = bytearray()
        st = {"resets": 0, "dead": 0, "other": 0}

        def stats():
            return {"t": time.monotonic(), "sent": sum(sent), "recv": sum(recvd),
                    "mqtt_window_resets": st["resets"], "mqtt_dead": st["dead"], "mqtt_other_packets": st["other"]}

        ctl.stats = stats
        sel = selectors.DefaultSelector()
        sel.register(sub, selectors.EVENT_READ, "sub")
        for i, s in enumerate(pubs):
            sel.register(s, selectors.EVENT_READ, i)
        sel.register(ctl.pipe, selectors.EVENT_READ, None)
        writing = set()
        ctl.pipe.send(("ready", {"mqtt_publishers": npubs, "mqtt_window": window, "mqtt_size": p["size"]}))

        def pump(i, now):
            if out[i]:
                try:
                    k = pubs[i].send(out[i])
                except BlockingIOError:
                    k = 0
                except OSError:
                    st["dead"] += 1
                    out[i] = b""
                    return
                out[i] = out[i][k:]
            if not out[i]:
                room = recvd[i] + forgiven[i] + window - sent[i]
                if room <= 0 and now - last_progress[i] > 1.0:
                    forgiven[i] = sent[i] - recvd[i]       # lost messages: reopen the window
                    st["resets"] += 1
                    last_progress[i] = now
                    room = window
                if room > 0:
                    sent[i] += room
                    data = packets[i][0] * room
                    try:
                        k = pubs[i].send(data)
                    except BlockingIOError:
                        k = 0
                    except OSError:
                        st["dead"] += 1
                        return
                    out[i] = data[k:]
            want = bool(out[i])
            if want != (i in writing):
                sel.modify(pubs[i], selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0), i)
                (writing.add if want else writing.discard)(i)

        def count(now):
            n = len(rbuf) // L
            if n:
                chunk = rbuf[:n * L]
                if all(chunk[j::L].count(head[j]) == n for j in range(hlen)):
                    for i in range(npubs):
                        k = chunk[digit_off::L].count(48 + i)
                        if k:
                            recvd[i] += k
                            last_progress[i] = now
                    del rbuf[:n * L]
                    return
            pos, end = 0, len(rbuf)                      # not a run of our PUBLISHes: one by one
            while True:
                hd = packet_header(rbuf, pos, end)
                if hd is None or end - pos < hd[2]:
                    break
                first, hl, total = hd
                i = rbuf[pos + hl + 2 + len("bench/")] - 48 if first >> 4 == 3 and total > hl + 8 else -1
                if first >> 4 == 3 and 0 <= i < npubs:
                    recvd[i] += 1
                    last_progress[i] = now
                else:
                    st["other"] += 1
                pos += total
            del rbuf[:pos]

        now = time.monotonic()
        for i in range(npubs):
            pump(i, now)
        while not ctl.expired():
            stop = False
            for key, ev in sel.select(0.05):
                if key.data is None:
                    stop = ctl.handle()
                elif key.data == "sub":
                    try:
                        data = sub.recv(1 << 20)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        raise ConnectionError("the broker closed the subscriber")
                    rbuf += data
                    count(time.monotonic())
                elif ev & selectors.EVENT_READ:
                    try:
                        if not pubs[key.data].recv(4096):
                            raise ConnectionError("the broker closed publisher %d" % key.data)
                    except BlockingIOError:
                        pass
            if stop:
                break
            now = time.monotonic()
            for i in range(npubs):
                pump(i, now)
        sel.close()
        return stats()
    finally:
        for s in socks:
            try:
                s.setblocking(False)
                s.send(MQTT_DISCONNECT)
            except OSError:
                pass
            s.close()


LOADS = {"mqtt_hold": load_mqtt_hold, "api_hold": load_api_hold, "mqtt_pub": load_mqtt_pub}


def load_main(pipe, kind, params, limit_s):
    """Entry point of the load process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl = ChildCtl(pipe, limit_s)
    try:
        rec = LOADS[kind](ctl, params)
        pipe.send(("done", rec))
    except LoadExit:
        pipe.send(("done", {"note": "stopped during setup"}))
    except Exception as exc:
        try:
            pipe.send(("error", "%s: %s" % (type(exc).__name__, exc)))
        except OSError:
            pass
    finally:
        pipe.close()


class LoadProc:
    """The parent's handle on one load process."""

    def __init__(self, kind, params, limit_s):
        ctx = multiprocessing.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=load_main, args=(child, kind, params, limit_s),
                                name="apibench-" + kind, daemon=True)
        self.proc.start()
        child.close()
        self.final = None

    @property
    def pid(self):
        return self.proc.pid

    def wait(self, kinds, timeout):
        """The next message of one of ``kinds`` within ``timeout`` s; ("error", why) if
        the child failed or died, None on timeout."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return None
            try:
                if self.pipe.poll(min(left, 0.25)):
                    msg = self.pipe.recv()
                    if msg[0] in kinds or msg[0] == "error":
                        if msg[0] == "done":
                            self.final = msg[1]
                        return msg
                    continue
            except (EOFError, OSError):
                return ("error", "load process exited (code %s)" % self.proc.exitcode)
            if not self.proc.is_alive() and not self.pipe.poll():
                return ("error", "load process exited (code %s)" % self.proc.exitcode)

    def stats(self, timeout=10.0):
        try:
            self.pipe.send("stats")
        except OSError:
            return None
        msg = self.wait(("stats", "done"), timeout)
        return msg[1] if msg and msg[0] in ("stats", "done") else None

    def stop(self, timeout=60.0):
        """Ask the child to close everything and exit; kill it if it does not."""
        result = self.final
        if self.proc.is_alive():
            try:
                self.pipe.send("stop")
                msg = self.wait(("done",), timeout)
                if msg and msg[0] == "done":
                    result = msg[1]
                elif msg:
                    result = {"error": msg[1]}
            except OSError:
                pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.pipe.close()
        return result


###############################################################################
# REST latency ################################################################
###############################################################################

def rest_request(api, path, auth, timeout):
    """One GET on its own connection; returns (ok, ms, error kind or None)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(api.host, api.port, timeout=timeout)
    kind = None
    try:
        conn.request("GET", path, headers={"Authorization": auth, "Connection": "close",
                                           "Accept": "application/json"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            kind = "http_%d" % resp.status
    except socket.timeout:
        kind = "timeout"
    except ConnectionRefusedError:
        kind = "refused"
    except http.client.RemoteDisconnected:          # (a ConnectionResetError)
        kind = "closed"
    except ConnectionResetError:
        kind = "reset"
    except (OSError, http.client.HTTPException) as exc:
        kind = type(exc).__name__
    finally:
        conn.close()
    ms = (time.perf_counter() - t0) * 1000.0
    if kind is None and ms > timeout * 1000.0:
        kind = "timeout"                               # answered, but too late to count
    return kind is None, ms, kind


def measure(opts, api, deadline, broker_pid=None, load_pid=None):
    """--requests GETs from --workers threads; stops at ``deadline`` (monotonic)
    or after --give-up consecutive failures."""
    n, timeout = opts.requests, opts.timeout
    lock = threading.Lock()
    state = {"next": 0, "consec": 0, "stop": None}
    results = []

    def worker():
        while True:
            with lock:
                if state["stop"]:
                    return
                if state["next"] >= n:
                    state["stop"] = state["stop"] or "done"
                    return
                if time.monotonic() >= deadline:
                    state["stop"] = "deadline"
                    return
                state["next"] += 1
            res = rest_request(api, opts.path, opts.auth_header, timeout)
            with lock:
                results.append(res)
                state["consec"] = 0 if res[0] else state["consec"] + 1
                if opts.give_up and state["consec"] >= opts.give_up and not state["stop"]:
                    state["stop"] = "gave_up"

    fds_before = proc_fd_count(broker_pid)
    cpu0 = (proc_cpu_s(broker_pid), proc_cpu_s(os.getpid()), proc_cpu_s(load_pid))
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, name="apibench-rest-%d" % k, daemon=True)
               for k in range(max(1, opts.workers))]
    for t in threads:
        t.start()
    hard = max(deadline, time.monotonic()) + 3 * timeout + 2
    for t in threads:
        while t.is_alive() and time.monotonic() < hard:
            t.join(0.2)
    elapsed = time.monotonic() - t0
    cpu1 = (proc_cpu_s(broker_pid), proc_cpu_s(os.getpid()), proc_cpu_s(load_pid))
    with lock:
        res = list(results)
        stop = state["stop"] or "deadline"
    failed = [r for r in res if not r[0]]
    vals = sorted(r[1] if r[0] else timeout * 1000.0 for r in res)
    errors = collections.Counter(r[2] for r in failed)
    rec = {"requests": len(res), "failed": len(failed), "timeouts": errors.get("timeout", 0),
           "p50_ms": round(percentile(vals, 50), 1) if vals else None,
           "p99_ms": round(percentile(vals, 99), 1) if vals else None,
           "max_ms": round(vals[-1], 1) if vals else None,
           "dead": bool(res) and len(failed) == len(res),
           "planned": n, "stopped": stop, "elapsed_s": round(elapsed, 2)}
    if errors:
        rec["errors"] = dict(errors)
    rec["broker_fds"] = fds_before
    rec["broker_cpu_pct"] = cpu_pct(cpu0[0], cpu1[0], elapsed)
    rec["bench_cpu_pct"] = cpu_pct(cpu0[1], cpu1[1], elapsed)
    if load_pid:
        rec["load_cpu_pct"] = cpu_pct(cpu0[2], cpu1[2], elapsed)
    return rec


###############################################################################
# The broker ##################################################################
###############################################################################

class ManagedBroker:
    """emqx_lite started on free loopback ports (port 0) and stopped again."""

    def __init__(self, path, opts):
        self.path, self.opts = path, opts
        self.proc = None
        self.tail = collections.deque(maxlen=200)
        self.exceptions = collections.deque(maxlen=50)    # (monotonic time, line) from tracebacks
        self.api = self.mqtt = None
        self.workdir = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def start(self):
        if not os.path.exists(self.path):
            raise RuntimeError("emqx_lite.py not found at %s (use --emqx-lite PATH)" % self.path)
        self.workdir = tempfile.TemporaryDirectory(prefix="apibench-")
        argv = [sys.executable, self.path, "--bind", "127.0.0.1", "--mqtt-port", "0",
                "--http-port", "0", "--log-level", "info"]
        self.tail.clear()
        found = {}
        got = threading.Event()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd=self.workdir.name,
                                     start_new_session=True, preexec_fn=_parent_death_signal())

        def drain(stream):                  # the broker must never block on a full pipe
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip()
                self.tail.append(line)
                if RE_EXC.match(line):
                    self.exceptions.append((time.monotonic(), line))
                if "api" not in found:
                    m = RE_API.search(line)
                    if m:
                        found["api"] = int(m.group(1))
                m = RE_MQTT.search(line)
                if m and (m.group(1) == "mqtt:tcp" or "mqtt" not in found):
                    found["mqtt"] = int(m.group(2))
                if "api" in found and "mqtt" in found:
                    got.set()
            stream.close()

        threading.Thread(target=drain, args=(self.proc.stdout,), name="apibench-broker-log",
                         daemon=True).start()
        end = time.monotonic() + self.opts.start_timeout
        while not got.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > end:
                why = ("exited with code %s" % self.proc.returncode if self.proc.poll() is not None
                       else "did not log both ports within %.0fs" % self.opts.start_timeout)
                self.stop()
                raise RuntimeError("emqx_lite %s:\n%s" % (why, self.log_tail()))
        time.sleep(0.05)                    # a later mqtt:tcp line wins over e.g. mqtt:ssl
        self.api = Endpoint("127.0.0.1", found["api"])
        self.mqtt = Endpoint("127.0.0.1", found["mqtt"])
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def exceptions_since(self, t):
        """Distinct exception lines the broker logged since monotonic time ``t``."""
        return list(dict.fromkeys(line for when, line in list(self.exceptions) if when >= t))[:5]

    def log_tail(self, n=10):
        return "\n".join(list(self.tail)[-n:])

    def stop(self):
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except OSError:
                proc.terminate()
            try:
                proc.wait(self.opts.stop_timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    proc.kill()
                proc.wait(10)
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None
        self.proc = proc if proc is not None and proc.returncode is None else None


def _parent_death_signal():
    """A preexec_fn that makes the broker get SIGTERM if this process dies
    without cleaning up (SIGKILL); Linux only, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None
    PR_SET_PDEATHSIG = 1

    def preexec():
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return preexec


def describe_emqx_lite(path):
    try:
        out, digest = emqx_lite_version(path)
        return "%s (%s, sha256 %s)" % (out, path, digest)
    except (OSError, subprocess.SubprocessError):
        return path


###############################################################################
# Scenarios ###################################################################
###############################################################################

class Bench(JsonLinesOutput):
    PROG = "apibench"

    def __init__(self, opts):
        self.opts = opts
        self.records = []
        self.broker = None          # ManagedBroker while one runs
        self.load = None            # LoadProc while one runs
        self.api = self.mqtt = None
        self.pid = opts.broker_pid
        self.json_file = open(opts.json, "a") if opts.json else None
        self.errors = 0
        self.phase_t = 0.0          # broker exceptions logged after this go into the next record

    # --- broker ----------------------------------------------------------------
    def fresh_broker(self):
        """Start (or restart) the managed broker; with --target just check it."""
        if self.opts.target_api:
            return
        if self.broker is not None and self.broker.alive() and self.opts.fresh == "none":
            return
        if self.broker is not None:
            self.broker.stop()
        self.broker = ManagedBroker(self.opts.emqx_lite, self.opts).start()
        self.api, self.mqtt, self.pid = self.broker.api, self.broker.mqtt, self.broker.pid
        self.log("started emqx_lite (pid %d): API %s, MQTT %s" % (self.pid, self.api, self.mqtt))

    def api_ready(self, timeout):
        """Wait until one GET succeeds (warms the API up); SystemExit on 401."""
        end = time.monotonic() + timeout
        kind = None
        while time.monotonic() < end:
            ok, _, kind = rest_request(self.api, self.opts.path, self.opts.auth_header, min(5.0, self.opts.timeout))
            if ok:
                return True
            if kind == "http_401":
                raise SystemExit("apibench: the API refuses --user %r / --password (401)" % self.opts.user)
            time.sleep(0.2)
        self.log("the API did not answer before the scenario (%s)" % kind)
        return False

    def broker_gone(self):
        if self.broker is not None:
            return not self.broker.alive()
        return bool(self.pid) and not proc_alive(self.pid)

    def wait_fds(self, limit, max_s):
        """Wait until the broker holds at most ``limit`` fds; seconds waited or None."""
        if not self.pid or limit is None:
            return None
        t0 = time.monotonic()
        while True:
            fds = proc_fd_count(self.pid)
            if fds is None or fds <= limit:
                return round(time.monotonic() - t0, 1)
            if time.monotonic() - t0 >= max_s:
                return None
            time.sleep(0.5)

    # --- one scenario ------------------------------------------------------------
    def run(self, sc):
        opts = self.opts
        head = {"tool": "apibench", "scenario": sc}
        try:
            self.fresh_broker()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            self.errors += 1
            self.emit(dict(head, error="broker start failed: %s" % exc))
            return
        self.phase_t = time.monotonic()
        self.api_ready(min(opts.deadline, 30))
        baseline = proc_fd_count(self.pid)
        t_start = time.monotonic()
        deadline = t_start + opts.deadline
        try:
            rec = getattr(self, "sc_" + sc)(head, deadline, baseline)
        except Exception as exc:
            self.errors += 1
            rec = dict(head, error="scenario failed: %s: %s" % (type(exc).__name__, exc))
        finally:
            if self.load is not None:
                self.load.stop()
                self.load = None
        if rec is not None:
            self.finish(rec)
        if opts.target_api and self.pid and baseline is not None:    # nothing restarts it: wait
            waited = self.wait_fds(baseline + FD_SLACK, opts.settle)
            if waited is None:
                self.log("the broker still holds %s fds (%d before the scenario)"
                         % (proc_fd_count(self.pid), baseline))

    def finish(self, rec):
        if self.broker is not None:
            exc = self.broker.exceptions_since(self.phase_t)
            if exc:
                rec["broker_exceptions"] = exc
        self.phase_t = time.monotonic()
        if self.broker_gone():
            self.errors += 1
            rec["error"] = (rec.get("error", "") + " broker exited during the scenario; log tail:\n%s"
                            % (self.broker.log_tail(8) if self.broker else "")).strip()
        self.emit(rec)

    def start_load(self, kind, params, deadline):
        """Start a load process and wait for it to be ready; returns its info or raises."""
        self.load = LoadProc(kind, params, max(10.0, deadline - time.monotonic()) + 30)
        msg = self.load.wait(("ready", "done"), max(1.0, deadline - time.monotonic()))
        if msg is None:
            raise RuntimeError("load not ready before the deadline: %s" % (self.load.stats(2) or {}))
        if msg[0] == "error":
            raise RuntimeError(msg[1])
        if msg[0] == "done":
            raise RuntimeError("load process ended during setup: %s" % msg[1])
        return msg[1]

    def sc_idle(self, head, deadline, baseline):
        return dict(head, **measure(self.opts, self.api, deadline, self.pid))

    def sc_mqtt10k(self, head, deadline, baseline):
        opts = self.opts
        self.log("mqtt10k: connecting %d MQTT clients" % opts.mqtt_clients)
        t0, cpu0 = time.monotonic(), proc_cpu_s(self.pid)
        info = self.start_load("mqtt_hold", {"mqtt": (self.mqtt.host, self.mqtt.port), "n": opts.mqtt_clients,
                                             "concurrency": opts.mqtt_concurrency, "keepalive": opts.keepalive,
                                             "hs_timeout": opts.hs_timeout}, deadline)
        info["broker_connect_cpu_pct"] = cpu_pct(cpu0, proc_cpu_s(self.pid), time.monotonic() - t0)
        self.log("mqtt10k: %d connected in %s s; measuring" % (info["mqtt_connected"], info["mqtt_connect_s"]))
        rec = dict(head, **measure(opts, self.api, deadline, self.pid, self.load.pid))
        rec.update(info)
        final = self.load.stop() or {}
        self.load = None
        rec["mqtt_dropped_by_broker"] = final.get("mqtt_dropped_by_broker")
        self.finish(rec)
        # after_mqtt10k: they disconnected; wait for the broker to close them, then measure again
        t_after = time.monotonic()
        self.log("after_mqtt10k: clients disconnected; waiting for the broker to close them")
        limit = baseline + FD_SLACK if baseline is not None else None
        settle_s = self.wait_fds(limit, min(opts.settle, opts.deadline / 2))
        if settle_s is None and not self.pid:
            time.sleep(2.0)
        rec2 = {"tool": "apibench", "scenario": "after_mqtt10k"}
        rec2.update(measure(opts, self.api, t_after + opts.deadline, self.pid))
        rec2.update({"settle_s": settle_s, "settled": settle_s is not None if self.pid else None,
                     "broker_fds_baseline": baseline})
        return rec2

    def hold_api(self, head, deadline, trickle):
        opts = self.opts
        what = "trickling" if trickle else "idle"
        self.log("%s: opening %d %s connections to the API port" % (head["scenario"], opts.api_conns, what))
        info = self.start_load("api_hold", {"api": (self.api.host, self.api.port), "n": opts.api_conns,
                                            "concurrency": opts.api_concurrency, "hs_timeout": opts.hs_timeout,
                                            "trickle": trickle, "interval": opts.trickle_interval}, deadline)
        t_ready = time.monotonic()
        self.log("%s: %d open in %s s; measuring" % (head["scenario"], info["api_opened"], info["api_open_s"]))
        rec = dict(head, **measure(opts, self.api, deadline, self.pid, self.load.pid))
        end = min(t_ready + opts.hold, deadline)
        while time.monotonic() < end and not self.broker_gone():
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))
        final = self.load.stop() or {}
        self.load = None
        rec.update(info)
        for k in ("held_s", "server_closed", "server_closed_p50_s", "server_closed_max_s",
                  "server_responses", "trickled_bytes", "error"):
            if k in final:
                rec[k] = final[k]
        return rec

    def sc_api_idle1k(self, head, deadline, baseline):
        return self.hold_api(head, deadline, trickle=False)

    def sc_slowloris1k(self, head, deadline, baseline):
        return self.hold_api(head, deadline, trickle=True)

    def sc_mqtt_pub(self, head, deadline, baseline):
        opts = self.opts
        info = self.start_load("mqtt_pub", {"mqtt": (self.mqtt.host, self.mqtt.port), "pubs": opts.mqtt_publishers,
                                            "window": opts.mqtt_window, "size": opts.mqtt_size,
                                            "keepalive": opts.keepalive}, deadline)
        time.sleep(0.5)                                  # let the flood reach its pace
        a = self.load.stats()
        rec = dict(head, **measure(opts, self.api, deadline, self.pid, self.load.pid))
        b = self.load.stats()
        final = self.load.stop() or {}
        self.load = None
        rec.update(info)
        if a and b and b["t"] > a["t"]:
            rec["mqtt_msgs_per_s"] = round((b["recv"] - a["recv"]) / (b["t"] - a["t"]))
            rec["mqtt_sent_per_s"] = round((b["sent"] - a["sent"]) / (b["t"] - a["t"]))
        else:
            rec["mqtt_msgs_per_s"] = None
        for k in ("mqtt_window_resets", "mqtt_dead", "mqtt_other_packets", "error"):
            if k in final:
                rec[k] = final[k]
        return rec

    # --- everything -----------------------------------------------------------
    def main(self):
        opts = self.opts
        nofile = raise_nofile_limit()
        need = (opts.mqtt_clients if "mqtt10k" in opts.scenario_list else 0) + 200
        if nofile < need:
            self.log("warning: file limit %d is below the %d descriptors mqtt10k needs" % (nofile, need))
        if opts.target_api:
            self.api = Endpoint(*parse_hostport(opts.target_api, "--target-api", "apibench"))
            self.mqtt = Endpoint(*parse_hostport(opts.target_mqtt, "--target-mqtt", "apibench"))
            self.describe = "target API %s, MQTT %s" % (self.api, self.mqtt)
            if not self.api_ready(5):
                raise SystemExit("apibench: no answer from the API at %s" % self.api)
            if opts.fresh != "none":
                self.log("note: with --target-* the broker is not restarted between scenarios; "
                         "a scenario that kills the API spoils the ones after it")
        else:
            self.describe = describe_emqx_lite(opts.emqx_lite)
        self.log("%s; fd limit %d; %s CPUs, Python %s" % (self.describe, nofile, os.cpu_count(),
                                                             sys.version.split()[0]))
        for sc in opts.scenario_list:
            self.log("scenario %s" % sc)
            self.run(sc)
        self.report()
        return 1 if self.errors else 0

    def cleanup(self):
        if self.load is not None:
            self.load.stop(timeout=10)
            self.load = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self.json_file:
            self.json_file.close()
            self.json_file = None

    def report(self):
        if not self.records:
            self.log("no results")
            return
        print("\n## apibench results (%s; %s CPUs, Python %s, %s)\n"
              % (getattr(self, "describe", "?"), os.cpu_count(), sys.version.split()[0],
                 time.strftime("%Y-%m-%d %H:%M:%S %Z")))
        print(render_table(self.records))
        sys.stdout.flush()


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "{:,.1f}".format(v) if v < 10_000 else "{:,.0f}".format(v)
    if isinstance(v, int):
        return "{:,}".format(v)
    return str(v)


def details(r):
    """The scenario-specific figures of a record, in words."""
    out = []
    sc = r.get("scenario")
    if sc == "mqtt10k":
        out.append("%s/%s MQTT clients connected in %s s" % (fmt(r.get("mqtt_connected")),
                                                             fmt(r.get("mqtt_clients")), fmt(r.get("mqtt_connect_s"))))
    if sc == "after_mqtt10k":
        out.append("broker fds back to baseline after %s s" % fmt(r["settle_s"]) if r.get("settled")
                   else "broker fds not back to baseline" if r.get("settled") is False else "")
    if sc in ("api_idle1k", "slowloris1k"):
        out.append("%s/%s held %s s, server closed %s" % (fmt(r.get("api_opened")), fmt(r.get("api_conns")),
                                                          fmt(r.get("held_s")), fmt(r.get("server_closed"))))
        if r.get("server_closed"):
            out.append("after %s s (p50) / %s s (max)" % (fmt(r.get("server_closed_p50_s")),
                                                         fmt(r.get("server_closed_max_s"))))
        if r.get("server_responses"):
            out.append("answers: %s" % ", ".join("%s x%d" % kv for kv in r["server_responses"].items()))
    if sc == "mqtt_pub":
        out.append("MQTT %s msg/s" % fmt(r.get("mqtt_msgs_per_s")))
    if r.get("broker_fds") is not None:
        out.append("broker fds %s" % fmt(r["broker_fds"]))
    if r.get("errors"):
        out.append("errors: %s" % ", ".join("%s x%d" % kv for kv in sorted(r["errors"].items())))
    if r.get("stopped") and r["stopped"] != "done":
        out.append("stopped: %s" % r["stopped"])
    if r.get("broker_exceptions"):
        out.append("broker logged: %s" % " / ".join(r["broker_exceptions"]))
    if r.get("error"):
        out.append("ERROR: %s" % r["error"].splitlines()[0])
    return "; ".join(x for x in out if x)


def render_table(records):
    lines = ["| scenario | requests | failed | p50 ms | p99 ms | max ms | dead | details |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r.get("scenario"), fmt(r.get("requests")), fmt(r.get("failed")), fmt(r.get("p50_ms")),
            fmt(r.get("p99_ms")), fmt(r.get("max_ms")), "**yes**" if r.get("dead") else fmt(r.get("dead")),
            details(r)))
    return "\n".join(lines)


###############################################################################
# Command line ################################################################
###############################################################################

def parse_args(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(
        prog="apibench",
        description="Latency of emqx_lite's REST API (GET /api/v2/monitoring/stats) while the broker "
                    "is under load and abuse: %s. Prints one JSON line per measurement and a table."
                    % ", ".join(SCENARIOS),
        epilog="examples:\n"
               "  %(prog)s\n"
               "  %(prog)s --emqx-lite /tmp/before/emqx_lite.py --hold 15\n"
               "  %(prog)s --scenarios idle,mqtt_pub --requests 500\n"
               "  %(prog)s --target-api 127.0.0.1:8080 --target-mqtt 127.0.0.1:1883 --broker-pid 1234\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to benchmark")
    g.add_argument("--emqx-lite", default=os.path.join(os.path.dirname(here), "emqx_lite.py"), metavar="PATH",
                   help="emqx_lite.py to start on free loopback ports (default: %(default)s)")
    g.add_argument("--target-api", metavar="HOST:PORT", help="use a running broker: its REST API (loopback only)")
    g.add_argument("--target-mqtt", metavar="HOST:PORT", help="... and its MQTT listener (loopback only)")
    g.add_argument("--broker-pid", type=int, help="pid of the --target broker (open fds, CPU%%)")
    g.add_argument("--scenarios", default=DEFAULT_SCENARIOS,
                   help="comma-separated, from %s (default: all)" % ",".join(SCENARIOS))
    g.add_argument("--fresh", choices=("scenario", "none"), default="scenario",
                   help="start a fresh broker for every scenario (default), or keep one for the whole run")
    g.add_argument("--user", default="admin", help="REST API user (default admin)")
    g.add_argument("--password", default="public", help="REST API password (default public)")
    g = p.add_argument_group("REST measurement")
    g.add_argument("--requests", type=int, default=200, help="requests per measurement (default 200)")
    g.add_argument("--workers", type=int, default=4, help="sequential client threads (default 4)")
    g.add_argument("--timeout", type=float, default=5.0,
                   help="seconds a request may take; a failed one counts as this long (default 5)")
    g.add_argument("--give-up", type=int, default=12,
                   help="stop a measurement after this many consecutive failures (default 12, 0 = never)")
    g.add_argument("--path", default="/api/v2/monitoring/stats", help="what to GET (default %(default)s)")
    g = p.add_argument_group("load")
    g.add_argument("--mqtt-clients", type=int, default=10000, help="mqtt10k: idle MQTT clients (default 10000)")
    g.add_argument("--mqtt-concurrency", type=int, default=128, help="MQTT handshakes in flight (default 128)")
    g.add_argument("--keepalive", type=int, default=600, help="MQTT keepalive of the clients (default 600 s)")
    g.add_argument("--api-conns", type=int, default=1000, help="api_idle1k/slowloris1k connections (default 1000)")
    g.add_argument("--api-concurrency", type=int, default=128, help="API connects in flight (default 128)")
    g.add_argument("--hold", type=float, default=20.0,
                   help="api_idle1k/slowloris1k: hold the connections at least this long (default 20 s)")
    g.add_argument("--trickle-interval", type=float, default=2.0,
                   help="slowloris1k: one more header byte per connection this often (default 2 s)")
    g.add_argument("--mqtt-publishers", type=int, default=4, help="mqtt_pub: publishers (1-10, default 4)")
    g.add_argument("--mqtt-window", type=int, default=100,
                   help="mqtt_pub: messages a publisher may be ahead of the subscriber (default 100)")
    g.add_argument("--mqtt-size", type=int, default=64, help="mqtt_pub: payload bytes (default 64)")
    g.add_argument("--hs-timeout", type=float, default=15.0,
                   help="seconds a single connect (+ CONNACK) may take (default 15)")
    g = p.add_argument_group("bounds")
    g.add_argument("--deadline", type=float, default=120.0,
                   help="hard limit per scenario (and for after_mqtt10k) in seconds (default 120)")
    g.add_argument("--settle", type=float, default=60.0,
                   help="max seconds to wait for the broker to close disconnected clients (default 60)")
    g.add_argument("--start-timeout", type=float, default=20.0, help="seconds the broker has to start (default 20)")
    g.add_argument("--stop-timeout", type=float, default=10.0,
                   help="seconds the broker has to exit on SIGTERM before SIGKILL (default 10)")
    add_output_options(p, __version__)
    opts = p.parse_args(argv)
    opts.scenario_list = scenario_list(p, opts.scenarios, SCENARIOS)
    if bool(opts.target_api) != bool(opts.target_mqtt):
        p.error("--target-api and --target-mqtt go together")
    if not 1 <= opts.mqtt_publishers <= 10:
        p.error("--mqtt-publishers must be 1..10")
    if min(opts.requests, opts.workers, opts.mqtt_clients, opts.api_conns, opts.mqtt_concurrency,
           opts.api_concurrency, opts.mqtt_window, opts.mqtt_size) < 1 or min(
           opts.timeout, opts.deadline, opts.trickle_interval, opts.hs_timeout) <= 0:
        p.error("counts, timeouts and intervals must be positive")
    opts.auth_header = "Basic " + base64.b64encode(("%s:%s" % (opts.user, opts.password)).encode()).decode()
    return opts


def main(argv=None):
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)       # stop the broker and the load process on the way out
    bench = Bench(opts)
    try:
        return bench.main()
    except KeyboardInterrupt:
        bench.log("interrupted; results so far:")
        bench.cleanup()
        bench.report()
        return 130
    finally:
        bench.cleanup()


if __name__ == "__main__":
    sys.exit(main())
