#!/usr/bin/env python3
"""mqttbench - a self-contained MQTT 3.1.1 (or, with --mqtt5, 5.0) benchmark for loopback brokers.

Runs standard load scenarios against emqx_lite or any broker listening on a
loopback address, optionally starting the brokers itself so that several can
be compared side by side in one run::

    python3 bench/mqttbench.py --start emqx_lite --scenarios fanin,fanout,qos1,latency,conn2k
    python3 bench/mqttbench.py --start emqx_lite,mosquitto,amqtt
    python3 bench/mqttbench.py --target 127.0.0.1:1883 --broker-pid 1234 --scenarios fanin
    python3 bench/mqttbench.py --start emqx_lite --scenarios fanin,fanout,qos1,latency --mqtt5

With --mqtt5 every client speaks MQTT 5.0: CONNECT with protocol level 5 and
an empty property block, PUBLISH and SUBSCRIBE with an empty property block,
PUBACK in the 2-byte form (Success); CONNACK, SUBACK and PUBLISH properties
from the broker are parsed, a Receive Maximum below --inflight is obeyed, and
ack reason codes other than Success, DISCONNECTs etc. from the broker end up
in the run's "note".  Every JSON line has "mqtt": 4 or 5.

With --persistent every client connects with clean session 0 (5.0: Clean
Start 0 and a Session Expiry Interval of an hour) and a fixed client id,
mqb-<case>-s<N> for subscriber N, mqb-<case>-p<N> for publisher N and
mqb-<case>-c<N> for connection N of a conn run (e.g. mqb-qos1-s0, the QoS 1
subscriber), so the broker keeps every session beyond its connection, as
durable state: a subscriber's subscription and, at QoS 1, its unacknowledged
messages.  Without it (the default) every client asks for a clean session
under a client id with the generator's pid in it.  After each --persistent
run the bench ends these sessions (a CONNECT with clean session 1 and a
DISCONNECT for every id, --concurrency at a time), so that no run inherits
the sessions, subscriptions or queued messages of the one before; the
"sessions_resumed" field counts the clients whose CONNACK still said Session
Present (stored state from before the run: a killed bench, another client
with the same ids), and a failed clean-up is reported in the "note".  Every
JSON line has "persistent": true or false.

--emqx-lite-args "ARGS" appends ARGS (split as a shell does) to the command
line of the emqx_lite that --start emqx_lite launches, after the bench's own
--bind 127.0.0.1 --mqtt-port PORT --http-port -1 --log-level warning (ARGS
may override --log-level, not --bind nor --mqtt-port); the word after
--emqx-lite-args is always its value, even "--data-dir=/tmp/d" or a single
flag.  The broker is then labelled
"emqx_lite ARGS" (column of the table, "label" of the JSON lines, which also
carry "broker_args": [...]), so runs with different ARGS can be told apart.
A --data-dir DIR (or --data-dir=DIR) in ARGS is made absolute (the broker
runs in a temporary directory) and before every start of the broker, the
first and each restart (see --fresh), the files named emqx_lite.db* in DIR
are deleted, so that no broker process starts from the state of an earlier
run; nothing else in DIR is touched.  Without a --data-dir in ARGS the same
is done in data/ of the temporary directory the broker runs in (emqx_lite's
default data directory is ./data), so a restarted broker never reloads the
state of the process before it.  A data directory set another way (--config,
EMQX_LITE_* environment) is not cleared: point it to a fresh directory for
every bench run.  Load runs share one broker process unless
--fresh all, so within a bench run only its sessions are cleaned up between
runs (see --persistent), not the rest of the broker's state::

    python3 bench/mqttbench.py --start emqx_lite --scenarios qos1 --persistent \\
        --emqx-lite-args "--data-dir /tmp/mqb-data" --fresh all

Scenarios (64-byte payloads by default; same definitions and JSON field names
as the C generator in shared/bench/mqttload.c):

    fanin    8 publishers -> 1 subscriber on bench/#, QoS 0, unthrottled
    fanout   1 publisher -> 50 subscribers on bench/fanout, QoS 0, unthrottled
    qos1     8 QoS 1 publishers, 16 messages in flight each (PUBACK-paced),
             1 subscriber at QoS 1 that acknowledges every message
    latency  1 publisher at 1,000 msg/s -> 1 subscriber; end-to-end latency
    conn2k   2,000 idle connections: connect rate, broker RSS per connection
    conn10k  10,000 idle connections: the same

Timeline of a load run: connect and subscribe everything, publish for the
warm-up (1 s) plus the measured window (5 s), stop publishing and drain until
nothing arrives for 0.5 s (at most --drain seconds).  Rates are computed over
the measured window only; loss over the whole run after the drain.

Every payload (>= 20 bytes) carries [0..7] the send time (CLOCK_MONOTONIC ns,
latency runs only), [8..15] a per-publisher sequence number from 1 and
[16..19] the publisher number, in native byte order (as mqttload.c).  A
flooding QoS 0/1 publisher never runs more than --window messages ahead of
the highest sequence number its slowest subscriber has seen, so that "loss"
means messages the broker dropped, not messages still sitting in socket
buffers when the drain ended.

Design for throughput (Python is slow, the generator must not be the
bottleneck): publishers and subscribers live in separate OS processes
(``--procs`` per role), talk raw MQTT over non-blocking sockets, build QoS 0
batches of up to 64 KiB from one pre-encoded PUBLISH by patching the sequence
numbers in with strided slice assignment, and subscribers ``recv_into`` a
1 MiB buffer and handle each run of equal-sized packets with C-speed slice
operations instead of a per-message Python loop.  Processes share counters
and the per-subscriber sequence high-water marks through shared memory.
QoS 0 flood subscribers read in batches (``--coalesce-us``).  Latency is
measured from the send time in the payload to the kernel's receive timestamp
(SO_TIMESTAMPNS), so the generator's own wake-up is not counted, and the
publisher stamps a message as the last thing before send().

Only the Python standard library is used.  Linux is needed for /proc (broker
and generator CPU, broker RSS and open file count).
"""

import argparse
import array
import errno
import hashlib
import ipaddress
import json
import multiprocessing
import os
import re
import resource
import select
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

__version__ = "1.0"

###############################################################################
# Constants ###################################################################
###############################################################################

SCENARIOS = ("fanin", "fanout", "qos1", "latency", "conn2k", "conn10k")
DEFAULT_SCENARIOS = "fanin,fanout,qos1,latency,conn2k,conn10k"
BROKERS = ("emqx_lite", "mosquitto", "amqtt")

FLOOD_BATCH_BYTES = 64 * 1024   # largest user-space batch per publisher (mqttload: FLOOD_WCAP)
RECV_BUFFER_BYTES = 1 << 20     # one subscriber's receive buffer
SEQ_MIN_PAYLOAD = 20            # payload bytes needed for timestamp + seq + publisher number
QUIET_S = 0.5                   # drain ends after this long without a delivery
COALESCE_BYTES = 64 * 1024      # a QoS 0 subscriber process naps after polls that read less
HS_DEAD = (1 << 64) - 1         # high-water mark of a dead subscriber: never limits anyone
MQTT_V311, MQTT_V5 = 4, 5       # protocol levels in CONNECT (--mqtt5 selects 5)
PERSISTENT_EXPIRY_S = 3600      # --persistent, 5.0: Session Expiry Interval (outlives a run)
EMQX_LITE_DB_PREFIX = "emqx_lite.db"  # files the bench deletes from an emqx_lite --data-dir

# One slot of shared counters per worker process; written by that worker only.
(C_SENT, C_RECV, C_ACKED, C_GAPS, C_REORDER, C_PENDING, C_INFLIGHT, C_DEAD,
 C_STATE, C_CONNECTED, C_FAILED, C_RESUMED, C_NFIELDS) = range(13)
# C_STATE values
ST_STARTING, ST_READY, ST_FAILED, ST_DONE = 0, 1, 2, 3
# Shared control block, written by the coordinator only.
K_T0, K_STOP, K_NFIELDS = 0, 1, 4
# Per-worker shared times (conn scenario): first connect started, last CONNACK.
T_FIRST, T_LAST, T_NFIELDS = 0, 1, 2

_RUNS = re.compile(rb"(.)\1*", re.S)   # runs of one repeated byte (publisher numbers)
_NATIVE = sys.byteorder
# Kernel receive timestamps (CLOCK_REALTIME) for latency; 35 on Linux/asm-generic.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform.startswith("linux") else None)
_TIMESPEC = struct.Struct("@ll")


###############################################################################
# /proc helpers ###############################################################
###############################################################################

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_s(pid):
    """utime + stime of process ``pid`` in seconds (all its threads), or None."""
    if not pid:
        return None
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK   # fields 14 and 15 of stat(5)


def host_busy_s():
    """CPU seconds all CPUs spent busy since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(v[:8]) - v[3] - v[4]) / _CLK_TCK      # all but idle and iowait


def proc_rss_kb(pid):
    """VmRSS of process ``pid`` in KiB (from /proc/<pid>/status), or None."""
    if not pid:
        return None
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_fd_count(pid):
    """Number of open file descriptors of ``pid`` (None if not readable)."""
    if not pid:
        return None
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except (OSError, TypeError):
        return None


def proc_alive(pid):
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:data.rindex(b")") + 3] != b"Z"
    except (OSError, TypeError, ValueError):
        return False


def raise_nofile_limit():
    """Raise the soft RLIMIT_NOFILE to the hard limit (brokers we start inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


###############################################################################
# Loopback targets ############################################################
###############################################################################

def resolve_loopback(host, port, prog="mqttbench"):
    """Resolve ``host`` and return (family, sockaddr); refuse anything not loopback.

    Every address the name resolves to must be in 127.0.0.0/8 or be ::1, so a
    typo or a DNS answer can never point the benchmark at another machine.
    ``prog`` starts the SystemExit messages.
    """
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SystemExit("%s: cannot resolve %r: %s" % (prog, host, exc))
    for _, _, _, _, sockaddr in infos:
        if not ipaddress.ip_address(sockaddr[0].split("%")[0]).is_loopback:
            raise SystemExit("%s: refusing non-loopback target %s (%s); "
                             "only 127.x, localhost and ::1 are allowed" % (prog, host, sockaddr[0]))
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def parse_hostport(s, what="--target", prog="mqttbench"):
    """(host, port) of the HOST:PORT (or [IPv6]:PORT) given as option ``what``;
    the host defaults to 127.0.0.1."""
    host, _, port = s.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        return host, int(port)
    except ValueError:
        raise SystemExit("%s: %s must be HOST:PORT, got %r" % (prog, what, s))


def free_port(host="127.0.0.1"):
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


###############################################################################
# MQTT encoding ###############################################################
###############################################################################

def encode_varint(n):
    """MQTT remaining-length encoding of ``n``."""
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s):
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def encode_connect(client_id, keepalive=60, version=MQTT_V311, persistent=False):
    """CONNECT, clean session: MQTT 3.1.1 (protocol level 4), or 5.0 with
    ``version`` 5 (level 5 and an empty property block after the keepalive).
    With ``persistent``, clean session 0 (5.0: Clean Start 0 and a Session
    Expiry Interval of PERSISTENT_EXPIRY_S, so the session outlives the
    connection)."""
    props = b""
    if version == MQTT_V5:
        props = b"\x05\x11" + PERSISTENT_EXPIRY_S.to_bytes(4, "big") if persistent else b"\x00"
    flags = 0x00 if persistent else 0x02
    body = _str("MQTT") + bytes([version, flags]) + keepalive.to_bytes(2, "big") + props + _str(client_id)
    return b"\x10" + encode_varint(len(body)) + body


def session_present(first, body):
    """The Session Present flag of a CONNACK (``body`` after the fixed header)."""
    return first == 0x20 and len(body) >= 1 and bool(body[0] & 0x01)


def persistent_client_id(case, role, n):
    """--persistent: the fixed client id of connection ``n`` of ``role`` ("s"
    subscriber, "p" publisher, "c" conn) in scenario ``case``, e.g.
    mqb-qos1-s0; at most 23 characters, as MQTT 3.1.1 servers must accept."""
    return "mqb-%s-%s%d" % (case, role, n)


def encode_subscribe(topic, qos, packet_id=1, version=MQTT_V311):
    """SUBSCRIBE with one topic filter (5.0: an empty property block after the
    packet id; the options byte is the QoS, No Local etc. off)."""
    props = b"\x00" if version == MQTT_V5 else b""
    body = packet_id.to_bytes(2, "big") + props + _str(topic) + bytes([qos])
    return b"\x82" + encode_varint(len(body)) + body


def decode_varint(buf, pos, end=None):
    """(value, position after it) of the variable byte integer at ``pos``;
    ValueError if it is longer than 4 bytes or runs past ``end``."""
    end = len(buf) if end is None else end
    value, mul = 0, 1
    for i in range(pos, min(end, pos + 4)):
        b = buf[i]
        value += (b & 0x7F) * mul
        mul *= 128
        if not b & 0x80:
            return value, i + 1
    raise ValueError("malformed variable byte integer at %d" % pos)


# MQTT 5.0 property identifiers -> value type ("B" byte, "H" two-byte int, "I" four-byte
# int, "V" varint, "S" string, "D" binary data, "P" string pair), as in 5.0 section 2.2.2.2.
PROPERTY_TYPES = {
    0x01: "B", 0x02: "I", 0x03: "S", 0x08: "S", 0x09: "D", 0x0B: "V", 0x11: "I", 0x12: "S",
    0x13: "H", 0x15: "S", 0x16: "D", 0x17: "B", 0x18: "I", 0x19: "B", 0x1A: "S", 0x1C: "S",
    0x1F: "S", 0x21: "H", 0x22: "H", 0x23: "H", 0x24: "B", 0x25: "B", 0x26: "P", 0x27: "I",
    0x28: "B", 0x29: "B", 0x2A: "B",
}
PROP_RECEIVE_MAXIMUM, PROP_MAXIMUM_QOS, PROP_REASON_STRING = 0x21, 0x24, 0x1F


def decode_properties(buf, pos, end=None):
    """(dict identifier -> value, position after the block) of the MQTT 5.0
    property block (length + properties) at ``pos``.  A repeated property
    (User Property) keeps its last value.  ValueError if it is malformed."""
    end = len(buf) if end is None else end
    length, pos = decode_varint(buf, pos, end)
    stop = pos + length
    if stop > end:
        raise ValueError("property block runs past the packet")
    props = {}
    while pos < stop:
        ident, pos = decode_varint(buf, pos, stop)
        kind = PROPERTY_TYPES.get(ident)
        if kind is None:
            raise ValueError("unknown property 0x%02x" % ident)
        if kind in "BHI":
            n = {"B": 1, "H": 2, "I": 4}[kind]
            value, pos = int.from_bytes(buf[pos:pos + n], "big"), pos + n
        elif kind == "V":
            value, pos = decode_varint(buf, pos, stop)
        else:
            parts = []
            for _ in range(2 if kind == "P" else 1):
                n = int.from_bytes(buf[pos:pos + 2], "big")
                parts.append(bytes(buf[pos + 2:pos + 2 + n]))
                pos += 2 + n
            value = tuple(parts) if kind == "P" else parts[0]
        props[ident] = value
    if pos != stop:
        raise ValueError("property block length does not match its properties")
    return props, stop


def check_connack(first, body, version):
    """The properties of a CONNACK that accepts the connection (empty for
    3.1.1); ConnectionError for a refusal or a malformed CONNACK."""
    if first != 0x20 or len(body) < 2:
        raise ConnectionError("not a CONNACK: %r" % (bytes([first]) + bytes(body)))
    if version != MQTT_V5:
        if len(body) != 2 or body[1] != 0:
            raise ConnectionError("CONNACK refused: %r" % (bytes([first, len(body)]) + bytes(body)))
        return {}
    try:
        props, stop = decode_properties(body, 2)
    except ValueError as exc:
        raise ConnectionError("malformed 5.0 CONNACK (%s): %r" % (exc, bytes(body)))
    if body[1] != 0:
        why = props.get(PROP_REASON_STRING, b"").decode(errors="replace")
        raise ConnectionError("CONNACK refused: reason 0x%02x%s" % (body[1], " (%s)" % why if why else ""))
    if stop != len(body):
        raise ConnectionError("5.0 CONNACK with %d bytes after its properties" % (len(body) - stop))
    return props


class PublishTemplate:
    """One pre-encoded PUBLISH; ``batch()`` stamps sequence numbers into copies.

    The payload is ``size`` bytes of 'a'..'z' filler with, when it is at least
    20 bytes long, the send timestamp at [0..7], the sequence number at
    [8..15] and the publisher number at [16..19].
    """

    def __init__(self, topic, qos, size, pubno, version=MQTT_V311):
        topic = topic.encode()
        self.qos = qos
        self.size = size
        payload = bytearray((97 + i % 26) for i in range(size))
        if size >= SEQ_MIN_PAYLOAD:
            payload[0:16] = bytes(16)
            payload[16:20] = pubno.to_bytes(4, _NATIVE)
        props = b"\0" if version == MQTT_V5 else b""        # 5.0: empty property block
        body = _str(topic) + (b"\0\0" if qos else b"") + props + payload
        header = bytes([0x30 | (qos << 1)]) + encode_varint(len(body))
        self.packet = bytearray(header + body)
        self.length = len(self.packet)
        self.pid_off = len(header) + 2 + len(topic)
        self.pay_off = self.pid_off + (2 if qos else 0) + len(props)
        self.has_seq = size >= SEQ_MIN_PAYLOAD
        self.has_stamp = size >= 8

    def batch(self, first_seq, n, clock=None):
        """``n`` consecutive packets with sequence numbers first_seq.. (and ids for
        QoS 1); with a ``clock`` (time.time_ns or time.monotonic_ns), its current
        value is patched in last, right before the caller sends."""
        if n <= 4:                                   # PUBACK-paced QoS 1, rate mode: few at a time
            out = self.few(first_seq, n)
            if clock is not None:
                self.stamp(out, n, clock)
            return out
        L = self.length
        out = self.packet * n
        if self.has_seq:
            seqs = array.array("Q", range(first_seq, first_seq + n)).tobytes()
            base = self.pay_off + 8
            for j in range(8):
                out[base + j::L] = seqs[j::8]
        if self.qos:
            ids = array.array("H", [(s - 1) % 65535 + 1 for s in range(first_seq, first_seq + n)])
            if _NATIVE == "little":
                ids.byteswap()                       # packet ids are big-endian on the wire
            raw = ids.tobytes()
            out[self.pid_off::L] = raw[0::2]
            out[self.pid_off + 1::L] = raw[1::2]
        if clock is not None:
            self.stamp(out, n, clock)
        return out

    def few(self, first_seq, n):
        """``batch()`` for a handful of packets: plain slice writes per packet."""
        out = bytearray()
        seq_off, pid_off = self.pay_off + 8, self.pid_off
        for seq in range(first_seq, first_seq + n):
            pkt = bytearray(self.packet)
            if self.has_seq:
                pkt[seq_off:seq_off + 8] = seq.to_bytes(8, _NATIVE)
            if self.qos:
                pkt[pid_off:pid_off + 2] = ((seq - 1) % 65535 + 1).to_bytes(2, "big")
            out += pkt
        return out

    def stamp(self, out, n, clock):
        """Write clock() as the send time of all ``n`` packets in ``out``."""
        if self.has_stamp:
            now = clock().to_bytes(8, _NATIVE)
            if n == 1:
                out[self.pay_off:self.pay_off + 8] = now
            else:
                for j in range(8):
                    out[self.pay_off + j::self.length] = now[j:j + 1] * n


###############################################################################
# Stream parsing ##############################################################
###############################################################################

def packet_header(buf, pos, end):
    """(first byte, header length, total length) of the packet at ``pos``, or None
    if its fixed header is not complete yet."""
    rl, mul, i = 0, 1, pos + 1
    while i < end and i < pos + 5:
        b = buf[i]
        rl += (b & 0x7F) * mul
        mul *= 128
        i += 1
        if not b & 0x80:
            return buf[pos], i - pos, i - pos + rl
    return None


def packet_runs(buf, pos, end, v5=False):
    """Yield (first_byte, pos, count, length, header_len) for the complete
    packets in buf[pos:end], grouping consecutive packets whose fixed header
    (and, for PUBLISH, topic length) bytes are identical into one run.  With
    ``v5`` (MQTT 5.0 streams) the bytes of a PUBLISH's property length are
    compared too, so every packet of a run has its payload at the same offset.

    The check is exact: packet 0 has length L; a packet at pos+i*L whose
    header bytes equal packet 0's also has length L, so packet i+1 starts at
    pos+(i+1)*L.  Checking each header byte column with one strided slice
    and ``lstrip`` finds the run length at C speed.  Parsing stops at the
    first incomplete packet; the caller keeps buf[returned pos:end].
    """
    while end - pos >= 2:
        head = packet_header(buf, pos, end)
        if head is None:
            return
        first, hlen, L = head
        if end - pos < L:
            return
        cols = hlen + 2 if (first >> 4) == 3 and L >= hlen + 2 else hlen
        count = (end - pos) // L
        if count > 1:
            stop = pos + count * L
            for j in range(cols):
                col = buf[pos + j:stop:L]
                count = min(count, len(col) - len(col.lstrip(col[0:1])))
            if v5 and cols > hlen and count > 1:
                for j in publish_props_columns(buf, pos, first, hlen, L):
                    col = buf[pos + j:stop:L]
                    count = min(count, len(col) - len(col.lstrip(col[0:1])))
        yield first, pos, count, L, hlen
        pos += count * L


def publish_props_columns(buf, pos, first, hlen, length):
    """Offsets (from the packet start) of the property length bytes of the 5.0
    PUBLISH at ``pos``: after the topic and, for QoS > 0, the packet id.  A packet
    whose bytes at these offsets equal these ones has the same property length."""
    tl = (buf[pos + hlen] << 8) | buf[pos + hlen + 1]
    off = hlen + 2 + tl + (2 if first & 0x06 else 0)
    cols = []
    for j in range(off, min(off + 4, length)):
        cols.append(j)
        if not buf[pos + j] & 0x80:
            break
    return cols


###############################################################################
# Shared state between processes ##############################################
###############################################################################

class Shared:
    """Shared-memory counters, control block and sequence high-water marks.

    ``counters[w*C_NFIELDS + f]`` is written by worker ``w`` only;
    ``control`` by the coordinator only; ``hs[s*npubs + p]`` (highest
    sequence subscriber ``s`` has seen from publisher ``p``) by the worker
    owning subscriber ``s`` only.  Aligned 8-byte stores are atomic on the
    platforms this runs on, so no locks are needed.
    """

    def __init__(self, nworkers, nsubs, npubs):
        ctx = multiprocessing.get_context("fork")
        self._counters = ctx.RawArray("Q", nworkers * C_NFIELDS)
        self._control = ctx.RawArray("d", K_NFIELDS)
        self._times = ctx.RawArray("d", nworkers * T_NFIELDS)
        self._hs = ctx.RawArray("Q", max(1, nsubs * npubs))
        self.nworkers, self.nsubs, self.npubs = nworkers, nsubs, npubs
        self.attach()

    def attach(self):
        """(Re)create the memoryviews; called again in a forked child."""
        self.counters = memoryview(self._counters).cast("B").cast("Q")
        self.control = memoryview(self._control).cast("B").cast("d")
        self.times = memoryview(self._times).cast("B").cast("d")
        self.hs = memoryview(self._hs).cast("B").cast("Q")

    def total(self, field):
        return sum(self.counters[field::C_NFIELDS])

    def states(self):
        return list(self.counters[C_STATE::C_NFIELDS])


###############################################################################
# Connections #################################################################
###############################################################################

class Poller:
    """The thinnest readiness API: epoll where there is one, else selectors.

    ``poll(timeout)`` returns (handler, readable, writable) triples.  It is
    called right after a latency publisher's send, so it does as little
    Python work as possible before the process sleeps: a sender that stays
    busy after send() delays the broker thread the kernel wakes on its CPU.
    """

    FINE_FDS = 8    # up to this many sockets, sub-millisecond waits use select()

    def __init__(self):
        self.handlers = {}
        self.writers = set()
        self.ep = select.epoll() if hasattr(select, "epoll") else None
        self.sel = None if self.ep else selectors.DefaultSelector()

    def register(self, sock, handler, write=False):
        self.handlers[sock.fileno()] = handler
        (self.writers.add if write else self.writers.discard)(sock.fileno())
        if self.ep:
            self.ep.register(sock.fileno(), select.EPOLLIN | (select.EPOLLOUT if write else 0))
        else:
            self.sel.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0), handler)

    def modify(self, sock, write):
        (self.writers.add if write else self.writers.discard)(sock.fileno())
        if self.ep:
            self.ep.modify(sock.fileno(), select.EPOLLIN | (select.EPOLLOUT if write else 0))
        else:
            self.sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0),
                            self.handlers[sock.fileno()])

    def unregister(self, sock):
        fd = sock.fileno()
        self.writers.discard(fd)
        if self.handlers.pop(fd, None) is None:
            return
        if self.ep:
            self.ep.unregister(fd)
        else:
            self.sel.unregister(sock)

    def poll(self, timeout):
        if 0 < timeout < 0.002 and len(self.handlers) <= self.FINE_FDS:
            # epoll rounds timeouts up to whole milliseconds; a 1,000 msg/s
            # publisher would then drift and send pairs.  select() takes microseconds.
            r, w, _ = select.select(list(self.handlers), list(self.writers), [], timeout)
            h = self.handlers
            return [(h[fd], fd in r, fd in w) for fd in set(r) | set(w)]
        if self.ep:
            h = self.handlers
            return [(h[fd], ev & _EP_READ, ev & select.EPOLLOUT) for fd, ev in self.ep.poll(timeout) if fd in h]
        return [(key.data, mask & selectors.EVENT_READ, mask & selectors.EVENT_WRITE)
                for key, mask in self.sel.select(timeout)]

    def close(self):
        (self.ep or self.sel).close()


_EP_READ = (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP) if hasattr(select, "epoll") else 0


def kernel_rx_ns(ancdata):
    """The SCM_TIMESTAMPNS time (ns since the epoch) in recvmsg ancillary data, or None."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return sec * 1_000_000_000 + nsec
    return None


def kernel_timestamps_available():
    """True if this platform gives SO_TIMESTAMPNS receive times on TCP sockets."""
    if SO_TIMESTAMPNS is None or not hasattr(socket.socket, "recvmsg_into"):
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        return True
    except OSError:
        return False


class Conn:
    """One MQTT client socket of a worker: blocking handshake, then non-blocking I/O.
    ``version`` is the protocol level (4 = 3.1.1, 5 = 5.0); ``persistent`` asks
    for a session that outlives the connection (see encode_connect)."""

    def __init__(self, family, addr, client_id, keepalive=60, version=MQTT_V311, persistent=False):
        self.version = version
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(addr)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(encode_connect(client_id, keepalive, version, persistent))
        if version == MQTT_V5:
            first, body = self.recv_packet()
            self.server_props = check_connack(first, body, version)   # 5.0: CONNACK properties
        else:
            ack = self.recv_exact(4)
            if ack[0] != 0x20 or ack[3] != 0:
                raise ConnectionError("CONNACK refused: %r" % ack)
            first, body = ack[0], ack[2:]
            self.server_props = {}
        self.session_present = session_present(first, body)   # a stored session was resumed
        self.out = bytearray()          # bytes not yet accepted by the kernel
        self.rbuf = None
        self.rlen = 0
        self.rx_ns = 0                  # receive time of the last data read (latency)
        self.kernel_ts = False          # rx_ns from SO_TIMESTAMPNS instead of the clock
        self.dead = False

    def recv_exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by broker during handshake")
            data += chunk
        return data

    def recv_packet(self):
        """(first byte, body) of the next packet, blocking (handshake only)."""
        first = self.recv_exact(1)[0]
        length, mul = 0, 1
        for _ in range(4):
            b = self.recv_exact(1)[0]
            length += (b & 0x7F) * mul
            mul *= 128
            if not b & 0x80:
                return first, self.recv_exact(length) if length else b""
        raise ConnectionError("malformed remaining length from broker")

    def subscribe(self, topic, qos):
        self.sock.sendall(encode_subscribe(topic, qos, version=self.version))
        if self.version == MQTT_V5:
            first, body = self.recv_packet()
            try:
                pos = decode_properties(body, 2)[1] if first == 0x90 and len(body) >= 3 else None
            except ValueError:
                pos = None
            if pos is None or len(body) != pos + 1:
                raise ConnectionError("malformed 5.0 SUBACK for %s: %r" % (topic, bytes([first]) + body))
            if body[pos] >= 0x80:
                raise ConnectionError("SUBACK failure for %s: reason 0x%02x" % (topic, body[pos]))
            return
        head = self.recv_exact(2)
        body = self.recv_exact(head[1])
        if head[0] != 0x90 or body[-1] == 0x80:
            raise ConnectionError("SUBACK failure for %s" % topic)

    def go_nonblocking(self):
        self.sock.setblocking(False)
        self.rbuf = bytearray(RECV_BUFFER_BYTES)
        self.rview = memoryview(self.rbuf)

    def flush(self):
        """Write as much of ``out`` as the socket takes; False if the connection died."""
        try:
            while self.out:
                n = self.sock.send(self.out)
                del self.out[:n]
        except BlockingIOError:
            pass
        except OSError:
            self.dead = True
            return False
        return True

    def read(self):
        """recv_into the buffer; returns bytes read, 0 if nothing, -1 on EOF/error."""
        if self.rlen == len(self.rbuf):
            self.rbuf.extend(bytes(len(self.rbuf)))      # a packet larger than the buffer
            self.rview = memoryview(self.rbuf)
        try:
            if self.kernel_ts:
                n, anc, _, _ = self.sock.recvmsg_into([self.rview[self.rlen:]], 64)
            else:
                n = self.sock.recv_into(self.rview[self.rlen:])
        except BlockingIOError:
            return 0
        except OSError:
            return -1
        if n == 0:
            return -1
        if self.kernel_ts:
            self.rx_ns = kernel_rx_ns(anc) or time.time_ns()
        else:
            self.rx_ns = time.monotonic_ns()
        self.rlen += n
        return n

    def enable_kernel_timestamps(self):
        """Have the kernel stamp arriving data (SO_TIMESTAMPNS); False if it cannot."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except (OSError, TypeError):
            return False
        self.kernel_ts = True
        return True

    def consume(self, pos):
        """Drop buf[:pos] (parsed packets), keeping a partial packet at the front."""
        if pos:
            rest = self.rlen - pos
            if rest:
                self.rbuf[0:rest] = self.rbuf[pos:self.rlen]
            self.rlen = rest


PACKET_NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
                7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
                12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH"}


def note_odd(odd, buf, first, pos, count, length, hlen):
    """5.0: count a run of packets that a client of this tool does not expect
    (a DISCONNECT from the broker, an AUTH, ...) in ``odd`` ("what" -> count),
    with the reason code (and Reason String) where the packet has one."""
    kind = first >> 4
    what = PACKET_NAMES.get(kind, "type %d" % kind)
    if kind in (14, 15):                     # DISCONNECT, AUTH: reason code, properties
        what += " reason 0x%02x" % (buf[pos + hlen] if length > hlen else 0)
        if length > hlen + 1:
            try:
                why = decode_properties(buf, pos + hlen + 1, pos + length)[0].get(PROP_REASON_STRING)
            except ValueError:
                why = None
            if why:
                what += " (%s)" % why.decode(errors="replace")
    odd[what] = odd.get(what, 0) + count


class Publisher:
    """A publishing connection: flood (window-limited) or fixed-rate."""

    def __init__(self, conn, pubno, template, cfg, shared):
        self.conn, self.pubno, self.tmpl, self.cfg, self.shared = conn, pubno, template, cfg, shared
        self.sent = 0          # messages handed to the socket layer (seq of the last one)
        self.acked = 0
        self.inflight = 0
        self.skipped = 0       # rate mode: slots skipped because the QoS 1 window was full
        self.max_batch = max(1, FLOOD_BATCH_BYTES // template.length)
        self.v5 = cfg["mqtt"] == MQTT_V5
        self.odd = {}          # 5.0: unexpected packets / ack reason codes from the broker
        # QoS 1 in flight: --inflight, and with 5.0 no more than the broker's Receive Maximum
        self.inflight_max = min(cfg["inflight"], conn.server_props.get(PROP_RECEIVE_MAXIMUM, 65535))
        # latency stamps: the clock the subscriber's receive times come from
        self.clock = {"kernel": time.time_ns, "user": time.monotonic_ns}.get(cfg["lat_clock"])

    def window_limit(self):
        """Highest sequence number we may send: slowest subscriber + window."""
        if self.cfg["window"] <= 0 or not self.tmpl.has_seq or self.shared.nsubs == 0:
            return self.cfg["max_msgs"]
        seen = min(self.shared.hs[self.pubno::self.shared.npubs])
        return min(self.cfg["max_msgs"], seen + self.cfg["window"]) if seen != HS_DEAD else self.cfg["max_msgs"]

    def add(self, n, clock=None):
        self.conn.out += self.tmpl.batch(self.sent + 1, n, clock)
        self.sent += n
        if self.tmpl.qos:
            self.inflight += n

    def pump_flood(self):
        """Send batches until something stops us; returns why: 'full' (socket),
        'window' (slowest subscriber), 'inflight' (QoS 1 acks), 'cap', 'dead'
        or 'more' (stopped after four batches to let the others have a go)."""
        for _ in range(4):
            if self.conn.out:
                if not self.conn.flush():
                    return "dead"
                if self.conn.out:
                    return "full"
            by_window = self.window_limit() - self.sent
            n = min(self.max_batch, by_window)
            if self.tmpl.qos:
                n = min(n, self.inflight_max - self.inflight)
            if n <= 0:
                if self.sent >= self.cfg["max_msgs"]:
                    return "cap"
                return "window" if by_window <= 0 else "inflight"
            self.add(n)
        if self.conn.out and not self.conn.flush():
            return "dead"
        return "full" if self.conn.out else "more"

    def pump_rate(self, elapsed, rate):
        """Send what is due at ``rate`` msg/s ``elapsed`` seconds after t0."""
        due = int(elapsed * rate) - self.skipped
        n = due - self.sent
        if n > 0:
            room = self.inflight_max - self.inflight if self.tmpl.qos else n
            room = min(room, self.cfg["max_msgs"] - self.sent)
            if room < n:
                self.skipped += n - max(room, 0)     # full window: skip, don't burst later
                n = room
            if n > 0:
                self.send_stamped(n)
        elif self.conn.out:
            self.conn.flush()

    def send_stamped(self, n):
        """Build ``n`` packets, then stamp and send them with nothing in between:
        Python code run between the two (cold after a sleep) would count as latency."""
        pkt = self.tmpl.batch(self.sent + 1, n)
        self.sent += n
        if self.tmpl.qos:
            self.inflight += n
        if self.clock is None or self.conn.out:
            if self.clock is not None:
                self.tmpl.stamp(pkt, n, self.clock)
            self.conn.out += pkt
            self.conn.flush()
            return
        self.tmpl.stamp(pkt, n, self.clock)
        try:
            sent = self.conn.sock.send(pkt)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.conn.dead = True
            return
        if sent < len(pkt):
            self.conn.out += pkt[sent:]

    def on_packets(self, buf, first, pos, count, length, hlen):
        if first >> 4 == 4:                           # PUBACK
            self.acked += count
            self.inflight = max(0, self.inflight - count)
            if self.v5 and length > hlen + 2:         # 5.0 long form: a reason code
                codes = bytes(buf[pos + hlen + 2:pos + count * length:length])
                for code in set(codes) - {0}:         # 0x10 No matching subscribers, >= 0x80 errors
                    what = "PUBACK reason 0x%02x" % code
                    self.odd[what] = self.odd.get(what, 0) + codes.count(code)
        elif self.v5:
            note_odd(self.odd, buf, first, pos, count, length, hlen)


def count_runs(b):
    """Number of runs of equal bytes in ``b``, at C speed: XOR the bytes with
    their right neighbours (as big integers) and count the zero bytes."""
    n = len(b)
    if n < 2:
        return n
    x = int.from_bytes(b[:-1], "big") ^ int.from_bytes(b[1:], "big")
    return n - x.to_bytes(n - 1, "big").count(0)


class Subscriber:
    """A subscribing connection: counts, checks sequences, acks QoS 1, measures latency."""

    def __init__(self, conn, subno, cfg, shared, latencies):
        self.conn, self.subno, self.cfg, self.shared = conn, subno, cfg, shared
        self.recv = 0
        self.gaps = 0
        self.reorder = 0
        self.hs = [0] * shared.npubs
        self.latencies = latencies        # array('q') when measuring latency, else None
        self.lat_window = None            # (start_ns, end_ns) of the measured window
        self.v5 = cfg["mqtt"] == MQTT_V5
        self.odd = {}                     # 5.0: unexpected packets from the broker

    def on_packets(self, buf, first, pos, count, length, hlen):
        if first >> 4 != 3:
            if self.v5:
                note_odd(self.odd, buf, first, pos, count, length, hlen)
            return
        qos = (first >> 1) & 3
        tl = (buf[pos + hlen] << 8) | buf[pos + hlen + 1]
        pid_off = hlen + 2 + tl
        pay_off = pid_off + (2 if qos else 0)
        if self.v5:                       # property block between packet id and payload
            plen, after = decode_varint(buf, pos + pay_off, pos + length)
            pay_off = after - pos + plen
        stop = pos + count * length
        self.recv += count
        if qos:
            self.ack(buf, pos + pid_off, stop, length, count, qos)
        plen = length - pay_off
        if plen >= SEQ_MIN_PAYLOAD and self.shared.npubs:
            self.check_sequences(buf, pos + pay_off, stop, length, count)
        if self.latencies is not None and plen >= 8:
            self.measure(buf, pos + pay_off, stop, length, count)

    def ack(self, buf, id_pos, stop, length, count, qos):
        """Queue one PUBACK (QoS 1) or PUBREC (QoS 2) per packet, built column-wise."""
        acks = bytearray(4 * count)
        acks[0::4] = (b"\x40" if qos == 1 else b"\x50") * count
        acks[1::4] = b"\x02" * count
        acks[2::4] = buf[id_pos:stop:length]
        acks[3::4] = buf[id_pos + 1:stop:length]
        self.conn.out += acks

    def check_sequences(self, buf, pay_pos, stop, length, count):
        """Update gaps/reorders from the sequence numbers of a run of packets."""
        npubs = self.shared.npubs
        if count <= 4:                          # a few packets: slicing per column costs more
            for off in range(pay_pos, stop, length):
                p = int.from_bytes(buf[off + 16:off + 20], _NATIVE) if npubs > 1 else 0
                if p < npubs:
                    self.check_one(p, int.from_bytes(buf[off + 8:off + 16], _NATIVE))
            return
        seqs = bytearray(8 * count)
        for j in range(8):
            seqs[j::8] = buf[pay_pos + 8 + j:stop:length]
        if npubs == 1:
            self.check_run(seqs, 0, count, 0)
            return
        if npubs > 256:                        # publisher numbers need all four bytes
            nums = bytearray(4 * count)
            for j in range(4):
                nums[j::4] = buf[pay_pos + 16 + j:stop:length]
            self.check_each(seqs, memoryview(nums).cast("I"))
            return
        pubnos = bytes(buf[pay_pos + 16:stop:length])
        if count_runs(pubnos) * 16 > count:     # finely interleaved publishers (mosquitto)
            self.check_each(seqs, pubnos)
            return
        for m in _RUNS.finditer(pubnos):        # long runs per publisher (batching brokers)
            p = pubnos[m.start()]
            if p < npubs:
                self.check_run(seqs, m.start(), m.end(), p)

    def check_each(self, seqs, pubnos):
        """Per-message check, for streams that switch publisher every few messages."""
        hs, npubs = self.hs, self.shared.npubs
        for p, q in zip(pubnos, memoryview(seqs).cast("Q")):
            if p >= npubs or not q:
                continue
            last = hs[p]
            if q == last + 1:
                hs[p] = q
            elif q > last:
                self.gaps += q - last - 1
                hs[p] = q
            else:
                self.reorder += 1

    def check_one(self, p, q):
        last = self.hs[p]
        if q == last + 1:
            self.hs[p] = q
        elif q > last:
            self.gaps += q - last - 1
            self.hs[p] = q
        elif q:
            self.reorder += 1

    def check_run(self, seqs, start, end, p):
        """Messages start..end (exclusive) all came from publisher ``p``."""
        last = self.hs[p]
        first = int.from_bytes(seqs[8 * start:8 * start + 8], _NATIVE)
        n = end - start
        if first == last + 1 and seqs[8 * start:8 * end] == array.array("Q", range(first, first + n)).tobytes():
            self.hs[p] = first + n - 1                 # the usual case: no gap, in order
            return
        for q in memoryview(seqs)[8 * start:8 * end].cast("Q"):
            if q == 0:
                continue
            if q > last + 1:
                self.gaps += q - last - 1
            elif q <= last:
                self.reorder += 1
            if q > last:
                last = q
        self.hs[p] = last

    def measure(self, buf, pay_pos, stop, length, count):
        """Latency of each message: receive time minus the send time in its payload.

        The receive time is the kernel's SO_TIMESTAMPNS stamp of the data
        (lat_clock "kernel": publishers stamp CLOCK_REALTIME) or, failing that,
        CLOCK_MONOTONIC right after recv returned (lat_clock "user")."""
        start, end = self.lat_window
        if not start <= time.monotonic_ns() < end:
            return
        now = self.conn.rx_ns
        stamps = bytearray(8 * count)
        for j in range(8):
            stamps[j::8] = buf[pay_pos + j:stop:length]
        for t in memoryview(stamps).cast("Q"):
            self.latencies.append(now - t if now > t else 0)

    def publish_hs(self):
        """Publish our high-water marks for the flood publishers' windows."""
        npubs = self.shared.npubs
        if npubs == 1:
            self.shared.hs[self.subno] = self.hs[0]
        elif npubs:
            self.shared.hs[self.subno * npubs:(self.subno + 1) * npubs] = array.array("Q", self.hs)

    def mark_dead(self):
        base = self.subno * self.shared.npubs
        for p in range(self.shared.npubs):
            self.shared.hs[base + p] = HS_DEAD


###############################################################################
# Load worker process #########################################################
###############################################################################

def topics_for(scenario, prefix, pubno):
    """(publish topic, subscription filter) of a scenario, as mqttload.c names them."""
    if scenario == "fanout":
        return prefix + "/fanout", prefix + "/fanout"
    if scenario == "latency":
        return prefix + "/lat", prefix + "/lat"
    return "%s/%d" % (prefix, pubno), prefix + "/#"


class LoadWorker:
    """One OS process owning some publishers and/or subscribers of a load run."""

    def __init__(self, index, pubnos, subnos, cfg, shared, pipe):
        self.index, self.cfg, self.shared, self.pipe = index, cfg, shared, pipe
        self.pubnos, self.subnos = pubnos, subnos
        self.pubs, self.subs = [], []
        self.latencies = array.array("q") if cfg["scenario"] == "latency" else None
        self.error = None
        self.slot = index * C_NFIELDS

    def set(self, field, value):
        self.shared.counters[self.slot + field] = value

    def setup(self):
        """Connect (and subscribe) every connection of this worker, blocking."""
        cfg = self.cfg
        tag = "%d-%d" % (os.getpid(), self.index)
        persistent = cfg["persistent"]

        def client_id(role, n):
            return persistent_client_id(cfg["scenario"], role, n) if persistent else "mqb-%s%d-%s" % (role, n, tag)

        for s in self.subnos:
            conn = Conn(cfg["family"], cfg["addr"], client_id("s", s), cfg["keepalive"], cfg["mqtt"], persistent)
            conn.subscribe(topics_for(cfg["scenario"], cfg["prefix"], 0)[1], cfg["subqos"])
            if cfg["lat_clock"] == "kernel" and not conn.enable_kernel_timestamps():
                raise ConnectionError("SO_TIMESTAMPNS refused; use --latency-clock user")
            self.subs.append(Subscriber(conn, s, cfg, self.shared, self.latencies))
        for p in self.pubnos:
            conn = Conn(cfg["family"], cfg["addr"], client_id("p", p), cfg["keepalive"], cfg["mqtt"], persistent)
            if cfg["qos"] > conn.server_props.get(PROP_MAXIMUM_QOS, 2):     # 5.0 CONNACK Maximum QoS
                raise ConnectionError("the broker's Maximum QoS is %d" % conn.server_props[PROP_MAXIMUM_QOS])
            tmpl = PublishTemplate(topics_for(cfg["scenario"], cfg["prefix"], p)[0], cfg["qos"], cfg["size"], p,
                                   cfg["mqtt"])
            self.pubs.append(Publisher(conn, p, tmpl, cfg, self.shared))
        for c in self.pubs + self.subs:
            c.conn.go_nonblocking()
        self.set(C_RESUMED, sum(1 for c in self.pubs + self.subs if c.conn.session_present))

    def run(self):
        try:
            self.setup()
        except (OSError, ConnectionError) as exc:
            self.error = "setup: %s" % exc
            self.set(C_STATE, ST_FAILED)
            return
        self.set(C_STATE, ST_READY)
        t0 = self.wait_for_start()
        if t0 is not None:
            self.loop(t0)
        self.set(C_STATE, ST_DONE)

    def wait_for_start(self):
        deadline = time.monotonic() + self.cfg["setup_timeout"]
        while time.monotonic() < deadline:
            if self.shared.control[K_STOP] or orphaned(self.cfg):
                return None
            t0 = self.shared.control[K_T0]
            if t0:
                return t0
            time.sleep(0.001)
        self.error = "coordinator never started the run"
        return None

    def loop(self, t0):
        """The event loop: publish until t0+warm+dur, read until told to stop."""
        cfg = self.cfg
        sel = Poller()
        for h in self.pubs + self.subs:
            sel.register(h.conn.sock, h)
        writing = set()
        t_end_pub = t0 + cfg["warmup"] + cfg["duration"]
        hard_end = t_end_pub + cfg["drain"] + 30
        for s in self.subs:
            s.lat_window = (int((t0 + cfg["warmup"]) * 1e9), int(t_end_pub * 1e9))
        rate = cfg["rate"] / max(1, cfg["pubs"]) if cfg["rate"] > 0 else 0
        writers = self.pubs + (self.subs if cfg["subqos"] else [])   # who can have bytes queued
        # A QoS 0 subscriber-only process under flood load reads in batches:
        # after a poll that brought little data it naps COALESCE_S, so each recv
        # gets many messages instead of a few (per-recv Python cost dominates
        # otherwise).  Not for QoS 1 (acks must be prompt) nor rate-limited runs.
        coalesce = not self.pubs and not cfg["subqos"] and not cfg["rate"] and cfg["coalesce_us"] > 0
        nap = cfg["coalesce_us"] / 1e6
        # Shared counters are refreshed every millisecond under flood load (the
        # coordinator snapshots them), every 10 ms in rate mode, where each
        # Python instruction between two sends counts (see Poller).
        counter_period = 0.01 if rate else 0.001
        last_counters = 0.0
        while not self.shared.control[K_STOP]:
            now = time.monotonic()
            if now > hard_end:
                self.error = "worker hard timeout"
                break
            if now - last_counters >= counter_period:
                self.publish_counters()
                if orphaned(cfg):
                    break
                last_counters = now
            timeout = self.publish_step(now, t0, t_end_pub, rate)     # sends last ...
            if writers:
                self.update_write_interest(sel, writers, writing)
            got = 0
            for h, readable, writable in sel.poll(timeout):          # ... then sleeps at once
                if readable:
                    got += self.on_readable(h, sel, writing)
                if writable and not h.conn.dead:
                    if not h.conn.flush():
                        self.kill(h, sel, writing)
            if coalesce and 0 < got < COALESCE_BYTES:
                time.sleep(nap)
        self.publish_counters()
        sel.close()

    def publish_step(self, now, t0, t_end_pub, rate):
        """Publish what may be published now; returns the select() timeout."""
        if not self.pubs:
            return 0.05
        if not t0 <= now < t_end_pub:
            for p in self.pubs:
                if p.conn.out and not p.conn.dead:
                    p.conn.flush()
            return 0.05
        if rate:
            for p in self.pubs:
                if not p.conn.dead:
                    p.pump_rate(now - t0, rate)
            next_due = t0 + (min(p.sent + p.skipped for p in self.pubs) + 1) / rate
            return max(0.0, min(0.05, next_due - time.monotonic()))
        timeout = 0.05
        for p in self.pubs:
            if p.conn.dead:
                continue
            state = p.pump_flood()
            if state == "more":
                timeout = 0
            elif state == "window":
                timeout = min(timeout, 0.001)        # poll the subscribers' progress
        return min(timeout, max(0.0, t_end_pub - now))

    def update_write_interest(self, sel, writers, writing):
        """Watch for writability exactly while a connection has bytes queued."""
        for h in writers:
            want = bool(h.conn.out) and not h.conn.dead
            if want != (h in writing):
                sel.modify(h.conn.sock, want)
                (writing.add if want else writing.discard)(h)

    def on_readable(self, h, sel, writing):
        """Read and handle what a connection has; returns the number of bytes read."""
        conn = h.conn
        total = 0
        v5 = self.cfg["mqtt"] == MQTT_V5
        for _ in range(4):
            n = conn.read()
            if n < 0:
                self.kill(h, sel, writing)
                return total
            if n == 0:
                break
            total += n
            pos = 0
            for first, pos, count, length, hlen in packet_runs(conn.rbuf, 0, conn.rlen, v5):
                h.on_packets(conn.rbuf, first, pos, count, length, hlen)
                pos += count * length
            conn.consume(pos)
            if n < len(conn.rbuf) // 2:
                break
        if isinstance(h, Subscriber) and not self.cfg["rate"]:
            h.publish_hs()                    # only flood publishers read the high-water marks
        if conn.out and not conn.flush():
            self.kill(h, sel, writing)
        return total

    def kill(self, h, sel, writing):
        """Forget a connection the broker closed (or that failed)."""
        if h.conn.sock.fileno() < 0:
            return
        h.conn.dead = True
        h.conn.out.clear()
        try:
            sel.unregister(h.conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        writing.discard(h)
        h.conn.sock.close()
        if isinstance(h, Subscriber):
            h.mark_dead()
        if isinstance(h, Publisher):
            h.inflight = 0
        if not self.error:
            self.error = "connection %s closed by broker" % ("sub%d" % h.subno if isinstance(h, Subscriber)
                                                              else "pub%d" % h.pubno)

    def publish_counters(self):
        c, b = self.shared.counters, self.slot
        c[b + C_SENT] = sum(p.sent for p in self.pubs)
        c[b + C_ACKED] = sum(p.acked for p in self.pubs)
        c[b + C_INFLIGHT] = sum(p.inflight for p in self.pubs)
        c[b + C_PENDING] = sum(len(h.conn.out) for h in self.pubs)
        c[b + C_RECV] = sum(s.recv for s in self.subs)
        c[b + C_GAPS] = sum(s.gaps for s in self.subs)
        c[b + C_REORDER] = sum(s.reorder for s in self.subs)
        c[b + C_DEAD] = sum(1 for h in self.pubs + self.subs if h.conn.dead)

    def odd_summary(self):
        """5.0: what the broker sent that this tool's clients did not expect, e.g.
        "PUBACK reason 0x10 x3 (pub0)"; "" if nothing."""
        parts = []
        for h in self.pubs + self.subs:
            who = "pub%d" % h.pubno if isinstance(h, Publisher) else "sub%d" % h.subno
            parts += ["%s x%d (%s)" % (what, n, who) for what, n in sorted(h.odd.items())]
        if len(parts) > 6:
            parts[6:] = ["... (%d more)" % (len(parts) - 6)]
        return ", ".join(parts)

    def report(self):
        self.publish_counters()
        odd = self.odd_summary()
        if odd:
            self.error = (self.error + "; " if self.error else "") + "broker sent " + odd
        self.pipe.send({"error": self.error,
                        "latencies": self.latencies.tobytes() if self.latencies is not None else b""})
        for h in self.pubs + self.subs:
            try:
                h.conn.sock.close()
            except OSError:
                pass


def orphaned(cfg):
    """True once the coordinator that forked us is gone (we were re-parented)."""
    return os.getppid() != cfg["coordinator"]


def load_worker_main(index, pubnos, subnos, cfg, shared, pipe):
    """Entry point of a forked load worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    shared.attach()
    worker = LoadWorker(index, pubnos, subnos, cfg, shared, pipe)
    try:
        worker.run()
    except Exception as exc:                      # report, never hang the coordinator
        worker.error = "worker crashed: %r" % exc
        worker.set(C_STATE, ST_FAILED)
    worker.report()


###############################################################################
# Connection worker process (conn scenarios) ##################################
###############################################################################

class ConnOpener:
    """Opens ``count`` idle MQTT connections, at most ``concurrency`` handshakes
    at a time, for one conn worker process; ``first`` is the run-wide number of
    its first connection (--persistent client ids)."""

    LINGER_RST = struct.pack("ii", 1, 0)     # SO_LINGER on, 0 s: close() sends RST

    def __init__(self, index, count, concurrency, first, cfg, shared):
        self.index, self.count, self.concurrency, self.cfg, self.shared = index, count, concurrency, cfg, shared
        self.slot = index * C_NFIELDS
        self.sel = selectors.DefaultSelector()
        self.socks = []
        self.opened = self.pending = self.connected = self.failed = self.resumed = 0
        self.error = None
        self.version = cfg["mqtt"]
        if cfg["persistent"]:
            ids = [persistent_client_id(cfg["scenario"], "c", first + i) for i in range(count)]
        else:
            ids = ["mqb-c%d-%d-%d" % (os.getpid(), index, i) for i in range(count)]
        self.connect_packets = [encode_connect(cid, cfg["keepalive"], self.version, cfg["persistent"])
                                for cid in ids]

    def run(self):
        """Connect everything (recording first connect / last CONNACK times),
        hold the connections until the coordinator says stop, close with RST."""
        deadline = time.monotonic() + self.cfg["setup_timeout"]
        self.shared.times[self.index * T_NFIELDS + T_FIRST] = time.monotonic()
        while (self.connected + self.failed < self.count and time.monotonic() < deadline
               and not self.shared.control[K_STOP]):
            self.open_more()
            for key, _ in self.sel.select(0.05):
                self.on_event(key.fileobj, key.data)
            self.shared.counters[self.slot + C_CONNECTED] = self.connected
            self.shared.counters[self.slot + C_FAILED] = self.failed
            self.shared.counters[self.slot + C_RESUMED] = self.resumed
        if self.connected + self.failed < self.count:
            self.error = self.error or "timeout: %d/%d connected" % (self.connected, self.count)
            self.shared.counters[self.slot + C_FAILED] = self.count - self.connected
        self.shared.counters[self.slot + C_STATE] = ST_DONE
        while not self.shared.control[K_STOP] and time.monotonic() < deadline + 600 and not orphaned(self.cfg):
            time.sleep(0.02)
        self.close_all()

    def open_more(self):
        while self.opened < self.count and self.pending < self.concurrency:
            s = socket.socket(self.cfg["family"], socket.SOCK_STREAM)
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = s.connect_ex(self.cfg["addr"])
            self.socks.append(s)
            self.opened += 1
            self.pending += 1
            if err not in (0, errno.EINPROGRESS):
                self.fail(s, "connect: %s" % os.strerror(err))
                continue
            # state: [connection number, CONNECT sent, CONNACK bytes so far]
            self.sel.register(s, selectors.EVENT_WRITE, [self.opened - 1, False, b""])

    def on_event(self, s, state):
        if not state[1]:                               # TCP connected: send CONNECT
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return self.fail(s, "connect: %s" % os.strerror(err))
            try:
                s.send(self.connect_packets[state[0]])
            except OSError as exc:
                return self.fail(s, "send CONNECT: %s" % exc)
            state[1] = True
            self.sel.modify(s, selectors.EVENT_READ, state)
            return None
        v5 = self.version == MQTT_V5
        try:
            data = s.recv(connack_missing(state[2]) if v5 else 4 - len(state[2]))
        except BlockingIOError:
            return None
        except OSError as exc:
            return self.fail(s, "read CONNACK: %s" % exc)
        if not data:
            return self.fail(s, "closed before CONNACK")
        state[2] += data
        if v5:
            if connack_missing(state[2]):
                return None
            ack = state[2]
            hlen = packet_header(ack, 0, len(ack))[1]
            try:
                check_connack(ack[0], ack[hlen:], MQTT_V5)
            except ConnectionError as exc:
                return self.fail(s, "bad CONNACK: %s" % exc)
        else:
            if len(state[2]) < 4:
                return None
            ack = state[2]
            hlen = 2
            if ack[0] != 0x20 or ack[3] != 0:
                return self.fail(s, "bad CONNACK %r" % ack)
        self.sel.unregister(s)
        self.pending -= 1
        self.connected += 1
        self.resumed += session_present(ack[0], ack[hlen:])
        self.shared.times[self.index * T_NFIELDS + T_LAST] = time.monotonic()
        return None

    def fail(self, sock, why):
        self.pending -= 1
        self.failed += 1
        self.error = self.error or why
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def close_all(self):
        for s in self.socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, self.LINGER_RST)
            except OSError:
                pass
            s.close()
        self.sel.close()


def connack_missing(data):
    """Bytes still missing from the 5.0 CONNACK whose start is ``data`` (0 when it
    is complete); never more than the packet has, so nothing after it is read."""
    head = packet_header(data, 0, len(data)) if len(data) >= 2 else None
    if head is None:
        return max(1, 5 - len(data))          # 5 bytes: the shortest 5.0 CONNACK
    return max(0, head[2] - len(data))


def conn_worker_main(index, count, concurrency, first, cfg, shared, pipe):
    """Entry point of a forked conn worker (see ConnOpener)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    shared.attach()
    opener = ConnOpener(index, count, concurrency, first, cfg, shared)
    try:
        opener.run()
    except Exception as exc:                      # report, never hang the coordinator
        opener.error = "conn worker crashed: %r" % exc
        shared.counters[index * C_NFIELDS + C_STATE] = ST_DONE
    pipe.send({"error": opener.error, "latencies": b""})


###############################################################################
# Ending persistent sessions (--persistent) ###################################
###############################################################################

def discard_sessions(family, addr, client_ids, version=MQTT_V311, concurrency=64, timeout=60.0):
    """End the sessions the broker stores for ``client_ids``: connect each with
    clean session 1 (5.0: Clean Start 1, no Session Expiry Interval), wait for
    the CONNACK, send DISCONNECT and close, at most ``concurrency`` at a time.
    Returns "" when every session was ended, else what went wrong."""
    sel = selectors.DefaultSelector()
    v5 = version == MQTT_V5
    todo = list(reversed(client_ids))
    failed, why = 0, ""

    def fail(sock, reason):
        nonlocal failed, why
        failed += 1
        why = why or reason
        try:
            sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    deadline = time.monotonic() + timeout
    try:
        while (todo or sel.get_map()) and time.monotonic() < deadline:
            while todo and len(sel.get_map()) < concurrency:
                cid = todo.pop()
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                err = sock.connect_ex(addr)
                if err not in (0, errno.EINPROGRESS):
                    fail(sock, "connect: %s" % os.strerror(err))
                    continue
                # state: [CONNECT, CONNACK bytes so far, CONNECT sent]
                sel.register(sock, selectors.EVENT_WRITE, [encode_connect(cid, 10, version), b"", False])
            for key, _ in sel.select(0.05):
                sock, state = key.fileobj, key.data
                try:
                    if not state[2]:                                 # TCP connected: send CONNECT
                        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            fail(sock, "connect: %s" % os.strerror(err))
                        elif sock.send(state[0]) != len(state[0]):
                            fail(sock, "short send of CONNECT")
                        else:
                            state[2] = True
                            sel.modify(sock, selectors.EVENT_READ, state)
                        continue
                    data = sock.recv(connack_missing(state[1]) if v5 else 4 - len(state[1]))
                except BlockingIOError:
                    continue
                except OSError as exc:
                    fail(sock, str(exc))
                    continue
                if not data:
                    fail(sock, "closed before CONNACK")
                    continue
                state[1] = ack = state[1] + data
                if (connack_missing(ack) if v5 else len(ack) < 4):
                    continue
                try:
                    check_connack(ack[0], ack[packet_header(ack, 0, len(ack))[1]:], version)
                except ConnectionError as exc:
                    fail(sock, str(exc))
                    continue
                sel.unregister(sock)
                try:
                    sock.send(b"\xe0\x00")                          # DISCONNECT (5.0: reason 0)
                except OSError:
                    pass
                sock.close()
    finally:
        left = list(sel.get_map().values())
        for key in left:
            key.fileobj.close()
        sel.close()
    failed += len(left) + len(todo)
    if left or todo:
        why = why or "timeout"
    if failed:
        return "could not end %d of %d persistent sessions: %s" % (failed, len(client_ids), why)
    return ""


###############################################################################
# Running one scenario ########################################################
###############################################################################

SCENARIO_DEFAULTS = {
    # name: (kind, publishers, subscribers, qos, subqos, rate, connections)
    "fanin": ("load", 8, 1, 0, 0, 0, 0),
    "fanout": ("load", 1, 50, 0, 0, 0, 0),
    "qos1": ("load", 8, 1, 1, 1, 0, 0),
    "latency": ("load", 1, 1, 0, 0, 1000, 0),
    "conn2k": ("conn", 0, 0, 0, 0, 0, 2000),
    "conn10k": ("conn", 0, 0, 0, 0, 0, 10000),
}


def split(items, parts):
    """Split ``items`` into ``parts`` nearly equal contiguous lists (no empty ones)."""
    parts = max(1, min(parts, len(items)))
    k, r = divmod(len(items), parts)
    out, i = [], 0
    for j in range(parts):
        n = k + (1 if j < r else 0)
        out.append(items[i:i + n])
        i += n
    return out


class Run:
    """Coordinator side of one run: forks workers, times the phases, takes snapshots."""

    def __init__(self, scenario, opts, target):
        self.scenario, self.opts, self.target = scenario, opts, target
        kind, pubs, subs, qos, subqos, rate, conns = SCENARIO_DEFAULTS[scenario]
        self.kind = kind
        self.cfg = {
            "scenario": scenario, "family": target.family, "addr": target.addr,
            "pubs": opts.publishers if opts.publishers is not None and kind == "load" else pubs,
            "subs": opts.subscribers if opts.subscribers is not None and kind == "load" else subs,
            "qos": qos, "subqos": subqos,
            "rate": (opts.rate if opts.rate is not None else rate) if kind == "load" else 0,
            "size": opts.size, "window": opts.window, "inflight": opts.inflight,
            "warmup": opts.warmup, "duration": opts.duration, "drain": opts.drain,
            "keepalive": opts.keepalive, "prefix": opts.prefix, "max_msgs": opts.max_msgs,
            "lat_clock": (opts.latency_clock if scenario == "latency" else None),
            "coalesce_us": opts.coalesce_us, "coordinator": os.getpid(),
            "conns": conns, "concurrency": opts.concurrency,
            "setup_timeout": opts.setup_timeout, "mqtt": opts.mqtt, "persistent": opts.persistent,
        }
        self.procs, self.pipes, self.groups = [], [], []

    # -- workers ---------------------------------------------------------------

    def plan(self):
        """Assign publishers/subscribers (or connections) to worker processes."""
        cfg, procs = self.cfg, self.opts.procs
        if self.kind == "conn":
            counts = [len(g) for g in split(list(range(cfg["conns"])), procs)]
            conc = [len(g) for g in split(list(range(cfg["concurrency"])), len(counts))]
            firsts = [sum(counts[:i]) for i in range(len(counts))]
            return [("conn", n, c, f) for n, c, f in zip(counts, conc, firsts)]
        pubs, subs = list(range(cfg["pubs"])), list(range(cfg["subs"]))
        if self.scenario == "latency" or (cfg["rate"] and len(pubs) + len(subs) <= 4):
            return [("load", pubs, subs)]        # light load: one process, like mqttload
        groups = [("load", [], g) for g in split(subs, procs)] if subs else []
        groups += [("load", g, []) for g in split(pubs, procs)] if pubs else []
        return groups

    def start_workers(self, shared):
        ctx = multiprocessing.get_context("fork")
        for i, g in enumerate(self.groups):
            parent, child = ctx.Pipe(duplex=False)
            if g[0] == "conn":
                args, target = (i, g[1], g[2], g[3], self.cfg, shared, child), conn_worker_main
            else:
                args, target = (i, g[1], g[2], self.cfg, shared, child), load_worker_main
            p = ctx.Process(target=target, args=args, daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.pipes.append(parent)

    def collect(self, timeout=20):
        """Results from every worker (error text, latencies), then join them."""
        results = []
        deadline = time.monotonic() + timeout
        for p, pipe in zip(self.procs, self.pipes):
            res = {"error": "worker sent no result", "latencies": b""}
            if pipe.poll(max(0.0, deadline - time.monotonic())):
                try:
                    res = pipe.recv()
                except (EOFError, OSError):
                    pass
            results.append(res)
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(2)
        return results

    def gen_cpu(self):
        """CPU seconds of every worker process and of this coordinator."""
        per = [proc_cpu_s(p.pid) or 0.0 for p in self.procs]
        own = sum(os.times()[:2])
        return per, own

    # -- phases ------------------------------------------------------------------

    def execute(self, broker_pid):
        self.groups = self.plan()
        cfg = self.cfg
        shared = Shared(len(self.groups), cfg["subs"], cfg["pubs"])
        self.shared = shared
        self.start_workers(shared)
        try:
            if self.kind == "conn":
                rec = self.execute_conn(shared, broker_pid)
            else:
                rec = self.execute_load(shared, broker_pid)
        finally:
            shared.control[K_STOP] = 1
            if cfg["persistent"]:                    # the next run must not inherit these sessions
                problem = discard_sessions(cfg["family"], cfg["addr"], self.client_ids(), cfg["mqtt"],
                                           cfg["concurrency"], cfg["setup_timeout"])
        if cfg["persistent"]:
            resumed = shared.total(C_RESUMED)
            rec["sessions_resumed"] = resumed
            notes = [rec.get("note", "")]
            if resumed:
                notes.append("%d clients resumed a session stored before the run" % resumed)
            notes.append(problem)
            rec["note"] = "; ".join(n for n in notes if n)
            if not rec["note"]:
                del rec["note"]
        return rec

    def client_ids(self):
        """--persistent: the client ids of every connection of this run."""
        cfg, sc = self.cfg, self.scenario
        if self.kind == "conn":
            return [persistent_client_id(sc, "c", i) for i in range(cfg["conns"])]
        return ([persistent_client_id(sc, "s", i) for i in range(cfg["subs"])]
                + [persistent_client_id(sc, "p", i) for i in range(cfg["pubs"])])

    def wait_ready(self, shared, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = shared.states()
            if ST_FAILED in states or any(not p.is_alive() for p in self.procs):
                return False
            if all(s == ST_READY for s in states):
                return True
            time.sleep(0.005)
        return False

    def snapshot(self, shared, broker_pid):
        per, own = self.gen_cpu()
        return {"t": time.monotonic(), "sent": shared.total(C_SENT), "recv": shared.total(C_RECV),
                "acked": shared.total(C_ACKED), "cpu_per": per, "cpu_own": own,
                "broker_cpu": proc_cpu_s(broker_pid), "host_busy": host_busy_s()}

    def execute_load(self, shared, broker_pid):
        cfg = self.cfg
        if not self.wait_ready(shared, cfg["setup_timeout"]):
            shared.control[K_STOP] = 1
            res = self.collect()
            errs = [r["error"] for r in res if r["error"]]
            return {"error": "; ".join(errs) or "setup timeout"}
        t0 = time.monotonic() + 0.02
        shared.control[K_T0] = t0
        sleep_until(t0 + cfg["warmup"])
        a = self.snapshot(shared, broker_pid)
        sleep_until(t0 + cfg["warmup"] + cfg["duration"])
        b = self.snapshot(shared, broker_pid)
        drain_s, drained = self.drain(shared, b["t"])
        end = self.snapshot(shared, broker_pid)
        gaps, reorder, dead = shared.total(C_GAPS), shared.total(C_REORDER), shared.total(C_DEAD)
        shared.control[K_STOP] = 1
        results = self.collect()
        return self.load_record(a, b, end, gaps, reorder, dead, drain_s, results, broker_pid)

    def drain(self, shared, t_start):
        """Wait until nothing arrived for QUIET_S with nothing pending or in flight."""
        last_rx, t_last = shared.total(C_RECV), time.monotonic()
        while True:
            time.sleep(0.02)
            now = time.monotonic()
            rx = shared.total(C_RECV)
            if rx != last_rx:
                last_rx, t_last = rx, now
            idle = shared.total(C_PENDING) == 0 and shared.total(C_INFLIGHT) == 0
            if now - t_last >= QUIET_S and idle:
                return now - t_start, True
            if now - t_start >= self.cfg["drain"]:
                return now - t_start, False

    def load_record(self, a, b, end, gaps, reorder, dead, drain_s, results, broker_pid):
        cfg = self.cfg
        win = b["t"] - a["t"]
        subs = cfg["subs"]
        expected = end["sent"] * subs
        lost = expected - end["recv"]
        rec = {"pubs": cfg["pubs"], "subs": subs, "size": cfg["size"], "qos": cfg["qos"],
               "subqos": cfg["subqos"], "rate": cfg["rate"], "inflight": cfg["inflight"],
               "warmup_s": cfg["warmup"], "window_s": round(win, 3),
               "pub_rate": round((b["sent"] - a["sent"]) / win),
               "recv_rate": round((b["recv"] - a["recv"]) / win),
               "per_sub_rate": round((b["recv"] - a["recv"]) / win / max(1, subs))}
        if cfg["qos"]:
            rec["ack_rate"] = round((b["acked"] - a["acked"]) / win)
            rec["acked"] = end["acked"]
        rec.update({"window": cfg["window"], "seq_gaps": gaps, "reordered": reorder,
                    "published": end["sent"], "expected": expected, "received": end["recv"],
                    "lost": lost, "loss_pct": round(100.0 * lost / expected, 3) if expected else 0.0,
                    "drain_s": round(drain_s, 2), "dead": dead})
        if cfg["scenario"] == "latency":
            lats = array.array("q")
            for r in results:
                lats.frombytes(r["latencies"])
            rec.update(latency_stats(lats))
            rec["lat_clock"] = cfg["lat_clock"]
        rec.update(cpu_fields(a, b, win, broker_pid))
        errs = [r["error"] for r in results if r["error"]]
        if errs:
            rec["note"] = "; ".join(errs)
        return rec

    def execute_conn(self, shared, broker_pid):
        cfg = self.cfg
        rss_before, cpu_before = proc_rss_kb(broker_pid), proc_cpu_s(broker_pid)
        deadline = time.monotonic() + cfg["setup_timeout"] + 5
        while time.monotonic() < deadline:
            if all(s == ST_DONE for s in shared.states()) or not all(p.is_alive() for p in self.procs):
                break
            time.sleep(0.01)
        connected, failed = shared.total(C_CONNECTED), shared.total(C_FAILED)
        firsts = [shared.times[i * T_NFIELDS + T_FIRST] for i in range(len(self.procs))]
        lasts = [shared.times[i * T_NFIELDS + T_LAST] for i in range(len(self.procs))]
        elapsed = max(lasts) - min(firsts) if connected else 0.0
        time.sleep(self.opts.conn_settle)                 # let the broker settle, like mqttload -w 2
        rss_after, cpu_after = proc_rss_kb(broker_pid), proc_cpu_s(broker_pid)
        per, _ = self.gen_cpu()
        shared.control[K_STOP] = 1
        results = self.collect(timeout=60)
        rec = {"n": cfg["conns"], "connected": connected, "failed": failed,
               "concurrency": cfg["concurrency"], "elapsed_s": round(elapsed, 3),
               "conn_rate": round(connected / elapsed, 1) if elapsed > 0 else 0.0,
               "broker_rss_before_kb": rss_before, "broker_rss_after_kb": rss_after,
               "rss_per_conn_bytes": (round((rss_after - rss_before) * 1024 / connected)
                                      if rss_before is not None and rss_after is not None and connected else None),
               "broker_cpu_s": round(cpu_after - cpu_before, 2) if cpu_before is not None and cpu_after is not None else None,
               "gen_cpu_s": round(sum(per), 2), "gen_procs": len(self.procs)}

        errs = [r["error"] for r in results if r["error"]]
        if errs:
            rec["error" if failed else "note"] = "; ".join(sorted(set(errs)))[:300]
        return rec


def sleep_until(t):
    while True:
        d = t - time.monotonic()
        if d <= 0:
            return
        time.sleep(min(d, 0.05))


def percentile(sorted_vals, p):
    """Nearest-rank percentile ``p`` (0-100) of an ascending list, or None if it is empty."""
    if not sorted_vals:
        return None
    n = len(sorted_vals)
    i = min(n, max(1, -(-int(p * n * 10) // 1000)))   # ceil(p/100*n) without float error
    return sorted_vals[i - 1]


def latency_stats(lats):
    """p50/p90/p99/p99.9/max in microseconds, nearest-rank like mqttload.c."""
    vals = sorted(lats)
    n = len(vals)

    def pct(p):
        return round(percentile(vals, p) / 1000.0, 1) if n else 0.0

    return {"lat_n": n, "lat_mean_us": round(sum(vals) / n / 1000.0, 1) if n else 0.0,
            "lat_p50_us": pct(50), "lat_p90_us": pct(90), "lat_p99_us": pct(99),
            "lat_p999_us": pct(99.9), "lat_max_us": round(vals[-1] / 1000.0, 1) if n else 0.0}


def cpu_fields(a, b, win, broker_pid):
    per = [(y - x) / win * 100 for x, y in zip(a["cpu_per"], b["cpu_per"])]
    own = (b["cpu_own"] - a["cpu_own"]) / win * 100
    rec = {"gen_cpu_pct": round(sum(per) + own, 1),
           "gen_cpu_max_proc_pct": round(max(per), 1) if per else 0.0, "gen_procs": len(per)}
    broker = None
    if broker_pid and a["broker_cpu"] is not None and b["broker_cpu"] is not None:
        broker = (b["broker_cpu"] - a["broker_cpu"]) / win * 100
        rec["broker_cpu_pct"] = round(broker, 1)
        rec["broker_rss_kb"] = proc_rss_kb(broker_pid)
    if a["host_busy"] is not None and b["host_busy"] is not None and broker is not None:
        # CPU used by everything else on the machine during the window: other
        # load here makes the figures unreliable, so it is reported with them.
        other = (b["host_busy"] - a["host_busy"]) / win * 100 - broker - rec["gen_cpu_pct"]
        rec["other_cpu_pct"] = round(max(0.0, other), 1)
    return rec


###############################################################################
# Brokers #####################################################################
###############################################################################

class Target:
    """Where a run goes: a loopback address and, when known, the broker's pid."""

    def __init__(self, label, host, port, pid=None, broker=None):
        self.label, self.host, self.port, self.pid, self.broker = label, host, port, pid, broker
        self.family, self.addr = resolve_loopback(host, port)


def mqtt_ping(family, addr, timeout=1.0, version=MQTT_V311):
    """True if an MQTT CONNECT (protocol level ``version``) to ``addr`` is
    answered with a CONNACK that accepts it."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(addr)
            s.sendall(encode_connect("mqb-probe-%d" % os.getpid(), 10, version))
            if version == MQTT_V5:
                ack = b""
                while connack_missing(ack):
                    chunk = s.recv(connack_missing(ack))
                    if not chunk:
                        return False
                    ack += chunk
                s.sendall(b"\xe0\x00")            # DISCONNECT, reason 0 (Normal) omitted
                check_connack(ack[0], ack[packet_header(ack, 0, len(ack))[1]:], version)
                return True
            ack = s.recv(4)
            s.sendall(b"\xe0\x00")
            return len(ack) == 4 and ack[0] == 0x20 and ack[3] == 0
    except (OSError, ConnectionError):
        return False


class ManagedBroker:
    """A broker process this tool starts on a free loopback port and stops again.
    ``label`` names it in the output: the name, and for emqx_lite the
    --emqx-lite-args (``extra_args``) after it; ``log`` takes progress messages."""

    def __init__(self, name, opts, workdir, log=None):
        self.name, self.opts, self.workdir = name, opts, workdir
        self.extra_args = list(opts.emqx_lite_argv) if name == "emqx_lite" else []
        # emqx_lite's state: --data-dir DIR, else its default ./data (in our temporary workdir)
        self.data_dir = (opts.emqx_lite_data_dir or os.path.join(workdir, "data")) if name == "emqx_lite" else None
        self.label = " ".join([name] + ([shlex.join(self.extra_args)] if self.extra_args else []))
        self.log = log or (lambda msg: None)
        self.proc = None
        self.port = None
        self.log_path = os.path.join(workdir, "%s.log" % name)
        self.restarts = 0
        self.runs = 0                   # runs done against the current process

    def command(self, port):
        """argv to run the broker on ``port``; RuntimeError if it is not installed."""
        build = {"emqx_lite": self._emqx_lite_argv, "mosquitto": self._mosquitto_argv,
                 "amqtt": self._amqtt_argv}.get(self.name)
        if build is None:
            raise RuntimeError("unknown broker %r (choose from %s)" % (self.name, ", ".join(BROKERS)))
        return build(port)

    def _emqx_lite_argv(self, port):
        path = self.opts.emqx_lite
        if not os.path.exists(path):
            raise RuntimeError("emqx_lite.py not found at %s (use --emqx-lite PATH)" % path)
        return [sys.executable, path, "--bind", "127.0.0.1", "--mqtt-port", str(port),
                "--http-port", "-1", "--log-level", "warning"] + self.extra_args

    def _mosquitto_argv(self, port):
        exe = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)
        if not exe:
            raise RuntimeError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        conf = os.path.join(self.workdir, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write("# generated by mqttbench\n"
                    "listener %d 127.0.0.1\n"
                    "allow_anonymous true\n"
                    "max_queued_messages 1000\n"      # mosquitto's default, emqx_lite's max_mqueue_len
                    "max_inflight_messages 20\n"      # mosquitto's default
                    "persistence false\n"
                    "log_dest stderr\n"
                    "log_type error\n"
                    "log_type warning\n" % port)
        return [exe, "-c", conf]

    def _amqtt_argv(self, port):
        conf = os.path.join(self.workdir, "amqtt.yaml")
        with open(conf, "w") as f:
            f.write("# generated by mqttbench\n"
                    "listeners:\n"
                    "  default:\n"
                    "    type: tcp\n"
                    "    bind: 127.0.0.1:%d\n"
                    "    max_connections: 0\n"
                    "plugins:\n"
                    "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                    "    allow_anonymous: true\n" % port)
        probe = subprocess.run([sys.executable, "-c", "import amqtt.scripts.broker_script"],
                               capture_output=True, timeout=60)
        if probe.returncode == 0:                    # same interpreter: its pid is the broker's
            return [sys.executable, "-c", "import sys; from amqtt.scripts.broker_script import main; "
                    "sys.argv[0] = 'amqtt'; main()", "-c", conf]
        exe = shutil.which("amqtt")
        if not exe:
            raise RuntimeError("amqtt is not installed (pip install amqtt)")
        return [exe, "-c", conf]

    def start(self):
        """Start the broker and wait until it answers MQTT; returns a Target.
        emqx_lite's data directory is emptied first (see clear_emqx_lite_data)."""
        self.port = free_port()
        argv = self.command(self.port)
        if self.data_dir:
            removed = clear_emqx_lite_data(self.data_dir)
            if removed:
                self.log("%s: deleted %s from %s before starting it"
                         % (self.label, ", ".join(removed), self.data_dir))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, start_new_session=True)
        log.close()
        target = Target(self.label, "127.0.0.1", self.port, self.proc.pid, self)
        deadline = time.monotonic() + self.opts.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with code %s at start-up:\n%s"
                                   % (self.name, self.proc.returncode, self.log_tail()))
            if mqtt_ping(target.family, target.addr, 0.5, self.opts.mqtt):
                return target
            if self.opts.mqtt == MQTT_V5 and mqtt_ping(target.family, target.addr, 0.5):
                self.stop()
                raise RuntimeError("%s answers MQTT 3.1.1 but does not accept an MQTT 5.0 CONNECT" % self.name)
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("%s did not answer MQTT within %.0fs:\n%s"
                           % (self.name, self.opts.start_timeout, self.log_tail()))

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def version(self):
        """A short description of what ran: version string (and file hash for emqx_lite)."""
        try:
            if self.name == "emqx_lite":
                return "%s (sha256 %s)" % emqx_lite_version(self.opts.emqx_lite)
            if self.name == "mosquitto":
                argv = self.command(self.port or 1883)[:1] + ["-h"]
                out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
                return (out.stdout or out.stderr).splitlines()[0].strip()
            if self.name == "amqtt":
                out = subprocess.run([sys.executable, "-c", "import amqtt; print(amqtt.__version__)"],
                                     capture_output=True, text=True, timeout=60)
                return "amqtt " + (out.stdout.strip() or "?")
        except (OSError, IndexError, subprocess.SubprocessError, RuntimeError):
            pass
        return self.name

    def restart(self):
        """A fresh broker process (same name, new port): stop, then start."""
        self.stop()
        self.runs = 0
        return self.start()

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log_tail(self, n=15):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
            return "\n".join("    " + line for line in lines[-n:])
        except OSError:
            return ""


def emqx_lite_extra_args(text):
    """(argv, data directory or None) of --emqx-lite-args ``text``: split as a
    shell does, with the DIR of a --data-dir DIR or --data-dir=DIR (the last
    one, as argparse takes it) made absolute, since the broker runs in a
    temporary directory.  ValueError for unbalanced quotes."""
    argv = shlex.split(text or "")
    data_dir = None
    for i, arg in enumerate(argv):
        if arg == "--data-dir" and i + 1 < len(argv) and argv[i + 1]:
            data_dir = argv[i + 1] = os.path.abspath(argv[i + 1])
        elif arg.startswith("--data-dir=") and len(arg) > len("--data-dir="):
            data_dir = os.path.abspath(arg[len("--data-dir="):])
            argv[i] = "--data-dir=" + data_dir
    return argv, data_dir


def clear_emqx_lite_data(path):
    """Delete the files named emqx_lite.db* (the database and its companions)
    from the directory ``path``, nothing else; returns their names.  A missing
    directory is fine; OSError if it cannot be read or a file not deleted."""
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        full = os.path.join(path, name)
        if name.startswith(EMQX_LITE_DB_PREFIX) and (os.path.islink(full) or not os.path.isdir(full)):
            os.remove(full)
            removed.append(name)
    return removed


def emqx_lite_version(path):
    """(what ``path --version`` prints, or "emqx_lite"; the first 12 hex digits of
    the file's SHA-256); OSError or SubprocessError if either cannot be had."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    out = subprocess.run([sys.executable, path, "--version"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    return out or "emqx_lite", digest


def wait_broker_idle(pid, baseline_fds, timeout):
    """Wait until the broker has closed the previous run's sockets (its open file
    count is back near ``baseline_fds``); returns seconds waited, or None if it
    did not get there within ``timeout``."""
    if not pid or baseline_fds is None:
        return 0.0
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        n = proc_fd_count(pid)
        if n is None or n <= baseline_fds + 2:
            return time.monotonic() - t
        time.sleep(0.1)
    return None


###############################################################################
# Reporting ###################################################################
###############################################################################

TABLE_METRICS = {
    "fanin": ["recv_rate", "pub_rate", "lost", "loss_pct", "seq_gaps", "gen_cpu_pct",
              "gen_cpu_max_proc_pct", "broker_cpu_pct", "broker_rss_kb", "other_cpu_pct"],
    "fanout": ["recv_rate", "per_sub_rate", "pub_rate", "lost", "loss_pct", "seq_gaps", "gen_cpu_pct",
               "gen_cpu_max_proc_pct", "broker_cpu_pct", "broker_rss_kb", "other_cpu_pct"],
    "qos1": ["ack_rate", "recv_rate", "lost", "loss_pct", "seq_gaps", "gen_cpu_pct",
             "gen_cpu_max_proc_pct", "broker_cpu_pct", "broker_rss_kb", "other_cpu_pct"],
    "latency": ["lat_p50_us", "lat_p99_us", "lat_max_us", "recv_rate", "loss_pct", "gen_cpu_pct",
                "broker_cpu_pct", "other_cpu_pct"],
    "conn": ["conn_rate", "connected", "failed", "rss_per_conn_bytes", "broker_rss_after_kb",
             "broker_cpu_s", "gen_cpu_s", "broker_settle_s"],
}


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float) and abs(v) < 100:
        return ("%.3f" % v).rstrip("0").rstrip(".") if abs(v) < 1 else "%.1f" % v
    return "{:,}".format(round(v))


def median_of(records, metric):
    vals = [r[metric] for r in records if isinstance(r.get(metric), (int, float))]
    return statistics.median(vals) if vals else None


def render_table(records, labels, scenarios):
    """Markdown table: one row per scenario/metric, one column per broker (medians)."""
    lines = ["| scenario | metric | " + " | ".join(labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for sc in scenarios:
        runs = {lab: [r for r in records if r.get("case") == sc and r.get("label") == lab and "error" not in r]
                for lab in labels}
        counts = {lab: sum(1 for r in records if r.get("case") == sc and r.get("label") == lab) for lab in labels}
        for metric in TABLE_METRICS["conn" if sc.startswith("conn") else sc]:
            cells = []
            for lab in labels:
                if not counts[lab]:
                    cells.append("n/a")
                elif not runs[lab]:
                    cells.append("failed")
                else:
                    cells.append(fmt(median_of(runs[lab], metric)))
            if all(c == "-" for c in cells):
                continue
            lines.append("| %s | %s | %s |" % (sc, metric, " | ".join(cells)))
    return "\n".join(lines)


def render_problems(records):
    out = []
    for r in records:
        msg = r.get("error") or r.get("note")
        bad = r.get("lost", 0) or r.get("seq_gaps", 0) or r.get("failed", 0) or r.get("dead", 0)
        if msg or bad:
            parts = ["%s %s run %s:" % (r.get("label"), r.get("case"), r.get("run"))]
            for k in ("lost", "loss_pct", "seq_gaps", "reordered", "dead", "failed"):
                if r.get(k):
                    parts.append("%s=%s" % (k, r[k]))
            if msg:
                parts.append(msg)
            out.append("  " + " ".join(str(p) for p in parts))
    return out


def machine_info():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


###############################################################################
# Command line ################################################################
###############################################################################

def add_output_options(p, version):
    """The "output" option group: --json FILE, --quiet, --version."""
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="FILE", help="also append every JSON line to FILE")
    g.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    g.add_argument("--version", action="version", version="%(prog)s " + version)


def scenario_list(p, text, scenarios):
    """The scenario names in the comma-separated ``text``; p.error() on one not in ``scenarios``."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in scenarios]
    if bad:
        p.error("unknown scenario(s) %s; choose from %s" % (", ".join(bad), ", ".join(scenarios)))
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="mqttbench",
        description="MQTT load benchmark for brokers on loopback (fanin, fanout, qos1, latency, "
                    "conn2k, conn10k). Prints one JSON line per run and a table of medians.",
        epilog="examples:\n"
               "  %(prog)s --start emqx_lite --scenarios fanin,fanout,qos1,latency,conn2k\n"
               "  %(prog)s --start emqx_lite,mosquitto,amqtt --repeat 3\n"
               "  %(prog)s --target 127.0.0.1:1883 --broker-pid 1234 --scenarios fanin\n"
               "  %(prog)s --start emqx_lite --scenarios qos1 --persistent "
               "--emqx-lite-args \"--data-dir /tmp/mqb-data\" --fresh all\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to benchmark")
    g.add_argument("--start", "--brokers", dest="start", metavar="LIST",
                   help="start these brokers on free loopback ports and compare them: "
                        "emqx_lite,mosquitto,amqtt (missing ones are skipped with a message)")
    g.add_argument("--target", metavar="HOST:PORT",
                   help="benchmark an already running broker (loopback only: 127.x, localhost, [::1])")
    g.add_argument("--broker-pid", type=int, help="pid of the --target broker (broker CPU%%, RSS, RSS/conn)")
    g.add_argument("--label", help="label of the --target broker in the output (default: target)")
    g.add_argument("--emqx-lite", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "emqx_lite.py"), metavar="PATH", help="emqx_lite.py to start (default: %(default)s)")
    g.add_argument("--emqx-lite-args", metavar="ARGS", default="",
                   help="extra command-line arguments for the emqx_lite that --start launches, split as a "
                        "shell does, e.g. \"--data-dir /tmp/d\" (a --data-dir DIR is made absolute and "
                        "emptied of emqx_lite.db* files before every broker start, as is the default ./data "
                        "in the broker's temporary directory); shown in its label")
    g.add_argument("--scenarios", default=DEFAULT_SCENARIOS,
                   help="comma-separated, from %s (default: %%(default)s)" % ",".join(SCENARIOS))
    g.add_argument("--repeat", type=int, default=3, help="runs per scenario; the table shows medians (default 3)")
    g = p.add_argument_group("load shape")
    g.add_argument("--size", type=int, default=64, help="payload bytes (default 64; >= 20 for sequence checks)")
    g.add_argument("--publishers", type=int, help="override the scenario's publisher count")
    g.add_argument("--subscribers", type=int, help="override the scenario's subscriber count")
    g.add_argument("--rate", type=float, help="total publish rate msg/s (default: unthrottled, latency 1000)")
    g.add_argument("--window", type=int, default=1000,
                   help="flood publishers stay at most this many messages ahead of their slowest "
                        "subscriber (default 1000, 0 = only TCP backpressure)")
    g.add_argument("--inflight", type=int, default=16, help="QoS 1 messages in flight per publisher (default 16)")
    g.add_argument("--latency-clock", choices=("kernel", "user"), default=None,
                   help="latency receive time: 'kernel' = SO_TIMESTAMPNS arrival stamp (default where "
                        "available; excludes the generator's own wake-up), 'user' = after recv returns")
    g.add_argument("--concurrency", type=int, default=64, help="conn: handshakes in flight at once (default 64)")
    g.add_argument("--prefix", default="bench", help="topic prefix (default bench)")
    g.add_argument("--keepalive", type=int, default=60, help="MQTT keepalive in seconds (default 60)")
    g.add_argument("--mqtt5", action="store_true",
                   help="every client speaks MQTT 5.0 (CONNECT protocol level 5, empty property blocks) "
                        "instead of 3.1.1; the JSON lines carry \"mqtt\": 5 (else 4)")
    g.add_argument("--persistent", action="store_true",
                   help="every client connects with clean session 0 (5.0: Clean Start 0, Session Expiry "
                        "%ds) and a fixed client id such as mqb-qos1-s0, so its session outlives the "
                        "connection; the sessions are ended after each run. JSON: \"persistent\": "
                        "true (else false), \"sessions_resumed\"" % PERSISTENT_EXPIRY_S)
    g = p.add_argument_group("timing and bounds")
    g.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before measuring (default 1)")
    g.add_argument("--duration", type=float, default=5.0, help="measured window in seconds (default 5)")
    g.add_argument("--drain", type=float, default=5.0, help="max seconds to wait for deliveries after publishing (default 5)")
    g.add_argument("--conn-settle", type=float, default=2.0, help="conn: seconds before reading RSS after the last CONNACK (default 2)")
    g.add_argument("--max-msgs", type=int, default=50_000_000, help="hard cap of messages per publisher per run")
    g.add_argument("--setup-timeout", type=float, default=120.0, help="seconds allowed to connect everything (default 120)")
    g.add_argument("--start-timeout", type=float, default=20.0, help="seconds a started broker has to answer (default 20)")
    g.add_argument("--fresh", choices=("conn", "all", "none"), default="conn",
                   help="restart a --start'ed broker before each run of: the conn scenarios (default; "
                        "RSS per connection from a clean process), every scenario, or never")
    g.add_argument("--idle-timeout", type=float, default=90.0,
                   help="seconds to wait between runs for the broker to close the last run's sockets "
                        "(reported as broker_settle_s; default 90)")
    g.add_argument("--coalesce-us", type=float, default=500,
                   help="QoS 0 flood subscribers nap this long after a poll that read < 64 KiB, so that "
                        "each recv carries many messages (default 500; 0 = off)")
    g.add_argument("--procs", type=int, default=os.cpu_count() or 1,
                   help="generator processes per role (publishers, subscribers, conn) (default: nproc = %(default)s)")
    add_output_options(p, __version__)
    argv = list(sys.argv[1:] if argv is None else argv)
    i = 0
    while i < len(argv) - 1:                  # argparse would take a value like "--flag" for an option
        if argv[i] == "--emqx-lite-args":
            argv[i:i + 2] = ["--emqx-lite-args=" + argv[i + 1]]
        i += 1
    opts = p.parse_args(argv)
    opts.scenario_list = scenario_list(p, opts.scenarios, SCENARIOS)
    opts.mqtt = MQTT_V5 if opts.mqtt5 else MQTT_V311
    if bool(opts.start) == bool(opts.target):
        p.error("give exactly one of --start BROKERS or --target HOST:PORT")
    try:
        opts.emqx_lite_argv, opts.emqx_lite_data_dir = emqx_lite_extra_args(opts.emqx_lite_args)
    except ValueError as exc:
        p.error("--emqx-lite-args: %s" % exc)
    if opts.emqx_lite_argv and "emqx_lite" not in [b.strip() for b in (opts.start or "").split(",")]:
        p.error("--emqx-lite-args needs --start with emqx_lite")
    if opts.latency_clock is None:
        opts.latency_clock = "kernel" if kernel_timestamps_available() else "user"
    if opts.repeat < 1 or opts.procs < 1 or opts.duration <= 0:
        p.error("--repeat, --procs and --duration must be positive")
    return opts


class JsonLinesOutput:
    """Progress messages on stderr (none with --quiet) and one JSON line per
    record on stdout (also appended to --json FILE).  For a class with
    ``opts``, ``json_file`` (or None) and ``records``; PROG starts the messages."""

    PROG = "mqttbench"

    def log(self, msg):
        if not self.opts.quiet:
            print(self.PROG + ": " + msg, file=sys.stderr, flush=True)

    def emit(self, rec):
        line = json.dumps(rec, separators=(",", ":"))
        print(line, flush=True)
        if self.json_file:
            self.json_file.write(line + "\n")
            self.json_file.flush()
        self.records.append(rec)


class Bench(JsonLinesOutput):
    """Runs every scenario ``repeat`` times against every target and reports."""

    def __init__(self, opts):
        self.opts = opts
        self.records = []
        self.labels = []
        self.versions = {}
        self.json_file = open(opts.json, "a") if opts.json else None

    def run_target(self, target, managed=None):
        """All scenarios x repeats against one broker; restarts a managed broker that died."""
        opts = self.opts
        for sc in opts.scenario_list:
            for i in range(1, opts.repeat + 1):
                fresh = managed is not None and (opts.fresh == "all" or (opts.fresh == "conn" and sc.startswith("conn")))
                if fresh and managed.runs == 0:
                    fresh = False               # just started for this very run
                if managed is not None and (fresh or not managed.alive()):
                    if not managed.alive():
                        self.log("%s is not running any more; restarting it" % managed.label)
                        managed.restarts += 1
                    try:
                        target = managed.restart()
                    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                        self.log("cannot restart %s: %s" % (managed.label, exc))
                        self.emit({"tool": "mqttbench", "case": sc, "label": managed.label, "mqtt": opts.mqtt,
                                   "persistent": opts.persistent, "run": i,
                                   "error": "broker restart failed: %s" % exc})
                        return target
                baseline = proc_fd_count(target.pid)
                self.log("%s: %s run %d/%d" % (target.label, sc, i, opts.repeat))
                rec = self.one_run(sc, i, target)
                if managed is not None:
                    rec["broker_version"] = self.versions.get(managed.label)
                    if managed.extra_args:
                        rec["broker_args"] = managed.extra_args
                    managed.runs += 1
                    rec["broker_fresh"] = fresh or managed.runs == 1
                if managed is not None and not managed.alive():
                    rec["error"] = (rec.get("error", "") + " broker died during the run (exit %s); log tail:\n%s"
                                    % (managed.proc.returncode, managed.log_tail(8))).strip()
                elif target.pid and not proc_alive(target.pid):
                    rec["error"] = (rec.get("error", "") + " broker process %d is gone" % target.pid).strip()
                elif target.pid:
                    waited = wait_broker_idle(target.pid, baseline, opts.idle_timeout)
                    rec["broker_settle_s"] = round(waited, 2) if waited is not None else None
                    if waited is None:
                        rec["note"] = (rec.get("note", "") + " broker still had %s open fds (baseline %s) %.0fs "
                                       "after the run" % (proc_fd_count(target.pid), baseline,
                                                          opts.idle_timeout)).strip()
                self.emit(rec)
        return target

    def one_run(self, sc, i, target):
        head = {"tool": "mqttbench", "scenario": "conn" if sc.startswith("conn") else sc, "case": sc,
                "label": target.label, "host": target.host, "port": target.port, "mqtt": self.opts.mqtt,
                "persistent": self.opts.persistent, "run": i}
        try:
            body = Run(sc, self.opts, target).execute(target.pid)
        except Exception as exc:
            body = {"error": "run failed: %r" % exc}
        head.update(body)
        return head

    def main(self):
        opts = self.opts
        nofile = raise_nofile_limit()
        need = max([SCENARIO_DEFAULTS[s][6] for s in opts.scenario_list] + [0])
        if need and nofile < need + 100:
            self.log("warning: file limit %d is below the %d connections asked for" % (nofile, need))
        info = machine_info()
        self.log("machine: %(nproc)s CPUs, %(cpu)s, Python %(python)s, %(date)s" % info)
        if opts.target:
            host, port = parse_hostport(opts.target)
            target = Target(opts.label or "target", host, port, opts.broker_pid)
            if not mqtt_ping(target.family, target.addr, 3, opts.mqtt):
                if opts.mqtt == MQTT_V5 and mqtt_ping(target.family, target.addr, 3):
                    raise SystemExit("mqttbench: the broker at %s refused an MQTT 5.0 CONNECT "
                                     "(it answers 3.1.1)" % opts.target)
                raise SystemExit("mqttbench: no MQTT broker answers at %s" % opts.target)
            self.labels.append(target.label)
            self.run_target(target)
        else:
            with tempfile.TemporaryDirectory(prefix="mqttbench-") as workdir:
                for name in [b.strip() for b in opts.start.split(",") if b.strip()]:
                    self.run_managed(name, workdir)
        self.report(info)
        return 0 if self.records and not any("error" in r for r in self.records) else 1

    def run_managed(self, name, workdir):
        broker = ManagedBroker(name, self.opts, workdir, self.log)
        label = broker.label
        try:
            target = broker.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            self.log("skipping %s: %s" % (label, exc))
            return
        self.labels.append(label)
        self.versions[label] = broker.version()
        self.log("started %s (pid %d) on 127.0.0.1:%d: %s" % (label, target.pid, target.port, self.versions[label]))
        try:
            self.run_target(target, broker)
        finally:
            broker.stop()

    def report(self, info):
        if not self.records:
            self.log("no results")
            return
        print("\n## mqttbench results (%s%smedian of %d runs; %s CPUs, %s, Python %s, %s)\n"
              % ("MQTT 5.0, " if self.opts.mqtt == MQTT_V5 else "",
                 "persistent sessions, " if self.opts.persistent else "", self.opts.repeat, info["nproc"],
                 info["cpu"], info["python"], info["date"]))
        print(render_table(self.records, self.labels, self.opts.scenario_list))
        if self.versions:
            print("\nbrokers: " + "; ".join("%s = %s" % kv for kv in self.versions.items()))
        problems = render_problems(self.records)
        if problems:
            print("\nloss, gaps, failures and notes:")
            print("\n".join(problems))
        sys.stdout.flush()


def _terminate(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def run(bench_class, opts):
    """Run a benchmark driver (this file's Bench, or massbench's) until done or
    interrupted (Ctrl-C, SIGTERM): brokers and workers are stopped either way,
    and an interrupted run still reports what it measured."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, _terminate)        # stop brokers and workers on the way out
    bench = bench_class(opts)
    try:
        return bench.main()
    except KeyboardInterrupt:
        bench.log("interrupted; results so far:")
        bench.report(machine_info())
        return 130


def main(argv=None):
    return run(Bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
