#!/usr/bin/env python3
"""emqx_lite - a small MQTT 3.1/3.1.1/5.0 broker with the EMQ X 2.x REST API.

Run it::

    python emqx_lite.py                      # MQTT on :1883, REST on :8080, state in ./data
    python emqx_lite.py --mqtt-port 0 --http-port 0 --log-level debug

Embed it (tests, demos)::

    with emqx_lite.Broker(mqtt_port=0, http_port=0) as broker:
        paho_client.connect("127.0.0.1", broker.mqtt_port)
        broker.publish("greeting", b"hello", qos=1)

Contents
--------
The module reads top to bottom: each section uses only the sections above it.
``grep -n '^# .* #####' emqx_lite.py`` prints these banners::

    Imports and small helpers
    Protocol constants
    Exceptions
    Topics
    Codec: primitives
    Codec: packets
    Subscription tree
    Durable state (SQLite)
    Messages and sessions
    Authentication
    ACL files
    Broker core
    Transports: TLS and WebSocket
    Connection (one reader thread per socket)
    Listeners
    Dashboard page (HTML, CSS, JavaScript)
    REST API (EMQ X api/v2 blueprint)
    REST API server (waitress: limits, credentials first, TLS)
    Settings: values and emq.conf keys
    Configuration files (emq.conf)
    Bridges (emqx_bridge_mqtt)
    Application control
    Command-line interface
    Test kit: the pytest plugin

Architecture
------------
::

    service thread (one per Broker)          reader threads (one per socket)
    +---------------------------------+      +-------------------------------+
    | selector: listening sockets,    |      | recv (up to 64 KiB), decode   |
    |   blocked writers, wake pipe    |----->| every complete packet,        |
    | tick: keepalive (a heap of      |spawn | handle_* (routing via         |
    |   deadlines), retries, expiry,  |      | BrokerCore), flush touched    |
    |   $SYS                          |      | connections                   |
    +---------------------------------+      +-------------------------------+
                 |                                  |  BrokerCore.publish(msg)
                 | on writable: finish the send     v
                 |                  +-----------------------------------+
                 +----------------->| BrokerCore: sessions, router trie,|
                                    | retained store, stats (one lock)  |
                                    +-----------------------------------+
                                          | Session.deliver(messages)
                                          v
                                    Session (inflight, mqueue) -> Connection
                                    outbound buffer -> one non-blocking send

    Durable state (with a data directory): what a persistent session or the
    retained store changes is recorded in the Store and committed by its
    writer thread in groups to one SQLite file; an acknowledgement that
    promises such a change leaves only after its commit.

    REST API: a Flask blueprint served by waitress (poll(), so no descriptor
    limit); it reads the broker through snapshot methods and writes through the
    same verbs MQTT uses. A request's credentials are settled from its headers,
    before its body is read; password hashes are computed by a small verifier
    pool, and a verified credential is remembered for a short while.

Every connection has a reader thread that owns the socket's read side. A
PUBLISH is routed by the thread that read it: the topic is matched (a cached
result, or the trie under the broker lock) and the message is added to the
reader's Batch. After all packets of one recv are handled, the Batch takes each
target session's lock once to assign packet ids and append the encoded bytes to
that client's outbound buffer, then flushes every touched connection with a
single non-blocking send. A client that does not read fills its outbound
buffer: the rest is sent by the service thread when the socket becomes
writable, further QoS 0 messages are dropped (``messages/dropped``) and QoS 1/2
messages wait in the session queue. No thread ever blocks on another client's
socket.

Threads and locks
-----------------
Threads: one service thread (accepts, finishes blocked writes, runs timers),
one reader thread per connection (a bare thread, started without a
threading.Thread: see ``_start_bare_thread``), the REST API's: waitress's loop thread
(every HTTP socket), four task threads (the application) and two verifier
threads (password hashes); the dashboard's listener, the same with eight
task threads (four may stream live views), and while its plugin stops or it
moves, a thread that stops it (and starts it again); a thread per bridge (its
socket: connect, read, write, keep time); with a data directory, the
Store's writer (group commits to SQLite); with ``--trace``, a printer;
and while a test's fault holds a packet back, a timer thread for it
(``Faults.later``).

``BrokerCore.lock``      guards ``sessions``, ``connections``, ``sockets``, the
                         router trie, the route cache, the retained store, the
                         route table and the stats high-water marks. Held for
                         dict/trie work only.
``Session.lock``         guards one session's subscriptions, inflight window,
                         awaiting-PUBREL ids, message queue, packet ids, flow-
                         control waiters, expiry, what its client allows
                         (window, packet size, topic aliases toward it) and
                         its ``conn`` pointer.
``Connection.out_lock``  guards one connection's outbound buffer, its held
                         acks, its TLS/WebSocket transport state and the
                         non-blocking ``send`` that drains the buffer.
``Broker._selector_lock`` guards the service thread's selector registrations
                         made from other threads (taken under ``out_lock``).
``_ApiChannel.tls_lock`` guards one HTTPS connection's TLS state and its
                         unsent records, and the non-blocking ``send`` of them.
``Store.lock``           guards the changes recorded for the disk and not yet
                         committed, their sequence numbers, the connections
                         holding output until a commit, and whether writes
                         fail. Held for dictionary work only; SQLite runs
                         without it, on the writer thread.
``BrokerCore.counts_lock``, ``Listener.lock``, ``UserTable.lock`` (users and
remembered credentials), ``ApiGuard.lock`` (failed logins per address) and
``Broker._plugins_lock`` guard small registries and tables, and
``LiveViews.lock`` one HTTP server's live views. ``Bridge.lock`` guards one
bridge's queue, in-flight messages, counters and state (only ``Store.lock``
is taken under it). ``Broker._settings_lock`` serialises changes of settings
at run time and ``Broker._dashboard_lock`` the dashboard's listener (taken in
that order, each with no other lock held; ``_plugins_lock`` under them).
``Broker._lifecycle_lock`` serialises start() and stop(); ``Broker._settle_lock``
the settling of closed connections (it takes ``Listener.lock``,
``BrokerCore.lock`` and ``counts_lock`` in turn) and guards the set of reader
threads to join. ``Connection.running`` guards nothing: a reader thread holds it
while it runs, and a join acquires it (a takeover's with no lock held; stop()'s
under ``_lifecycle_lock``; a ManualClock tick's under ``ManualClock.lock``).
``ManualClock.lock`` serialises advance(), which runs the brokers' timers (so it comes before
every lock above, ``_settle_lock`` included; an embedding test holds no lock
when it calls advance()). The test kit's leaves: ``Broker._state_cv`` (the
awaits' change counter), each ``Capture``'s condition (its messages),
``Faults.lock`` (refusals, timers) and ``ConnectionFaults.lock`` (one
connection's drops, delays and close_after).

Order: ``BrokerCore.lock`` -> ``Session.lock`` -> ``Connection.out_lock`` ->
``Broker._selector_lock``; never the other way. ``Store.lock`` comes last of
all: it is taken under ``Session.lock``, ``BrokerCore.lock``,
``Connection.out_lock``, ``UserTable.lock`` and ``Broker._plugins_lock`` (to
record a change in order), and nothing is taken while it is held. The
remaining locks are leaves: nothing is taken while one is held.
``BrokerCore.publish`` releases the broker lock before any session is
touched, and a session's waiters are released after its lock is. No blocking socket I/O happens under any lock:
the one send made under ``out_lock`` is non-blocking.

Reads without the lock, on purpose (each is of one attribute, atomic in
CPython, and a stale value only delays work to the next event or tick):
``Connection.blocked`` and ``out_bytes`` (Batch.run, Session.deliver and the
timers: a slow-client hint), a session's ``conn``, ``mqueue`` length and
``last_ack`` in ``FlowControl.congested`` (whether to hold a publisher's ack;
``send_ack`` asks again under the session's lock before it waits), a
session's ``waiters`` in ``FlowControl.settle`` (a waiter added after the
session's last change saw the session as it is and is settled by the next
change), ``keepalive``, ``last_recv`` and ``blocked_since`` in the service
thread's timeouts, the queue and window lengths that pick
``BrokerCore.sessions_with_timers``, ``Store.committed`` (written by the
writer only; a stale value holds output until the writer's own flush), and a
session's ``seq`` when a new connection takes it over (read after joining the
old reader thread, the last to write it).

Shared without a lock, each changed by single operations that are atomic in
CPython (``add``, ``discard``, ``append``, ``popleft``, an assignment) and
copied with ``list()`` before a loop: ``FlowControl.holding``,
``Broker._blocked``, ``Broker._timers_new``, ``Broker._closed`` and a timer
entry's connection (cleared when the connection is settled). The timer heap
itself belongs to whoever runs the timers.

Metrics are counted in per-thread dictionaries (each written by one thread
only) and summed when read, so counting needs no lock on the hot path.
"""

__version__ = "0.1.0"
__all__ = [
    "Broker", "BrokerCore", "Session", "Message", "Connection",
    "MQTTError", "MalformedPacket", "ProtocolError", "PacketTooLarge",
    "ConnectRefused", "validate_topic_name", "validate_topic_filter",
    "topic_matches", "load_config", "main", "Capture", "Journal", "Faults", "ManualClock",
    "SystemClock", "Store", "StoreError",
]

###############################################################################
# Imports and small helpers ###################################################
###############################################################################

import argparse
import base64
import collections
import errno
import fcntl
import functools
import gc
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import secrets
import selectors
import signal
import socket
import sqlite3
import ssl
import sys
import threading
import time
import _thread

try:   # the REST API's HTTP server; MQTT runs without it (http_port=None)
    from waitress.adjustments import Adjustments as WaitressAdjustments
    from waitress.channel import HTTPChannel as WaitressChannel
    from waitress.parser import HTTPRequestParser as WaitressParser
    from waitress.server import TcpWSGIServer as WaitressServer
    from waitress.task import ErrorTask as WaitressErrorTask
    from waitress.task import ThreadedTaskDispatcher as WaitressDispatcher
    from waitress.utilities import Error as WaitressError, RequestEntityTooLarge
except ImportError:   # pragma: no cover
    WaitressAdjustments = WaitressServer = WaitressDispatcher = None
    WaitressChannel = WaitressParser = WaitressErrorTask = WaitressError = object
    RequestEntityTooLarge = None

try:   # MQTT over WebSocket; the broker runs without it when no ws listener is asked for
    import wsproto
    import wsproto.events
    import wsproto.utilities
except ImportError:   # pragma: no cover
    wsproto = None

_log = logging.getLogger("emqx_lite")
_log.addHandler(logging.NullHandler())   # a library stays quiet unless the app configures logging

#: Non-blocking send flag. The socket stays in blocking mode for its reader
#: thread; writers use this flag so that a full socket buffer never blocks.
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)

#: accept() gives the new socket the listener's O_NONBLOCK on macOS and the BSDs;
#: on Linux it is blocking already (unless socket.setdefaulttimeout() was called).
_ACCEPT_INHERITS_NONBLOCK = not sys.platform.startswith("linux")

#: Stack size for the threads the broker starts: small enough for 10k clients.
_THREAD_STACK_SIZE = 256 * 1024
_stack_size_lock = threading.Lock()  # guards the process-wide stack size setting


class SystemClock:
    """Real time: the clock a Broker reads unless given another. Its two
    readings are all a broker's timers use: ``monotonic()`` for keepalive,
    retries, expiry, will delay and the $SYS intervals, ``time()`` for what
    is shown or stored as a date."""
    manual = False
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)


class ManualClock:
    """Virtual time for tests: it stands still until ``advance(seconds)``,
    which moves it forward and runs, in order and before it returns, every
    timer of the brokers reading it that falls due (``Broker(clock=...)``).
    ``time()`` starts at the real date (or ``start``)."""
    manual = True
    _ORIGIN = 1_000_000.0   # monotonic() at creation

    def __init__(self, start=None):
        self._now = self._ORIGIN
        self._wall0 = time.time() if start is None else float(start)
        #: serialises advance(); guards _brokers (taken with no other lock held)
        self.lock = threading.RLock()
        self._brokers = []   # started brokers reading this clock

    def monotonic(self):
        return self._now

    def time(self):
        return self._wall0 + (self._now - self._ORIGIN)

    def attach(self, broker):
        with self.lock:
            self._brokers.append(broker)

    def detach(self, broker):
        with self.lock:
            if broker in self._brokers:
                self._brokers.remove(broker)

    def advance(self, seconds):
        """Move time forward by ``seconds``, running each timer as it falls
        due (the brokers' clients timed out, messages and sessions expired,
        wills published) before returning."""
        if seconds < 0:
            raise ValueError("time does not go back: %r" % (seconds,))
        with self.lock:
            target = self._now + seconds
            while True:
                due = min((b._next_timer() for b in self._brokers), default=math.inf)
                if due > target:
                    self._now = target
                    return
                self._now = max(self._now, due)
                for broker in list(self._brokers):
                    broker._run_timers(self._now)


def _is_loopback(host):
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _start_thread(target, name, args=()):
    """Start a daemon thread with a small stack; return it."""
    thread = threading.Thread(target=target, name=name, args=args, daemon=True)
    with _stack_size_lock:
        old = threading.stack_size(_THREAD_STACK_SIZE)
        try:
            thread.start()
        finally:
            threading.stack_size(old)
    return thread


def _start_bare_thread(target, running):
    """Run ``target()`` on a thread of its own, with the small stack, without
    a threading.Thread: a connection's reader. Thread.start() waits until the
    new thread has run (a round trip of the GIL between the two threads, for
    every connection of a connect storm), and its objects cost memory for as
    long as the connection lasts. ``running`` is an acquired lock, released
    when the thread ends: acquiring it joins the thread. RuntimeError (and
    ``running`` released) when no thread can be started."""
    with _stack_size_lock:
        old = threading.stack_size(_THREAD_STACK_SIZE)
        try:
            _thread.start_new_thread(_bare_thread, (target, running))
        except BaseException:
            running.release()
            raise
        finally:
            threading.stack_size(old)


def _bare_thread(target, running):
    try:
        target()
    finally:
        try:
            _forget_dummy_thread()
        finally:
            running.release()


def _forget_dummy_thread():
    """threading.current_thread() (logging asks it for every record) makes a
    _DummyThread for a thread the threading module did not start, and keeps
    it for good: a bare thread that logged forgets its own when it ends."""
    ident = _thread.get_ident()
    if isinstance(threading._active.get(ident), threading._DummyThread):
        with threading._active_limbo_lock:
            threading._active.pop(ident, None)


def _strftime(ts):
    """EMQ X's date-time format, local time: '2017-04-14 14:11:38'."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _uptime_text(seconds):
    """EMQ X's uptime text: '1 hours, 17 minutes, 1 seconds' (always plural)."""
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return "%d days,%d hours, %d minutes, %d seconds" % (days, hours, minutes, secs)
    if hours:
        return "%d hours, %d minutes, %d seconds" % (hours, minutes, secs)
    if minutes:
        return "%d minutes, %d seconds" % (minutes, secs)
    return "%d seconds" % secs


###############################################################################
# Protocol constants ##########################################################
###############################################################################

# Packet types (MQTT 3.1.1 section 2.2.1).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
AUTH = 15  # MQTT 5.0 only; reserved in 3.1.1

PACKET_NAMES = {
    CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK",
    PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE", UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ", PINGRESP: "PINGRESP", DISCONNECT: "DISCONNECT", AUTH: "AUTH",
}

#: Required fixed-header flags for every type but PUBLISH [MQTT-2.2.2-1, -2].
FIXED_FLAGS = {
    CONNECT: 0, CONNACK: 0, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0,
    SUBSCRIBE: 2, SUBACK: 0, UNSUBSCRIBE: 2, UNSUBACK: 0, PINGREQ: 0,
    PINGRESP: 0, DISCONNECT: 0, AUTH: 0,
}

#: Protocol level -> protocol name (3.1.1 section 3.1.2.1/2; 3.1 "MQIsdp").
PROTOCOL_NAMES = {3: "MQIsdp", 4: "MQTT", 5: "MQTT"}
MQTT_V31, MQTT_V311, MQTT_V5 = 3, 4, 5
SUPPORTED_LEVELS = (MQTT_V31, MQTT_V311, MQTT_V5)

# CONNACK return codes (MQTT 3.1.1 table 3.1).
CONNACK_ACCEPTED = 0x00
CONNACK_UNACCEPTABLE_PROTOCOL = 0x01
CONNACK_IDENTIFIER_REJECTED = 0x02
CONNACK_SERVER_UNAVAILABLE = 0x03
CONNACK_BAD_USERNAME_PASSWORD = 0x04
CONNACK_NOT_AUTHORIZED = 0x05

SUBACK_FAILURE = 0x80

# MQTT 5.0 reason codes (5.0 section 2.4), the ones the broker sends or reads.
RC_SUCCESS = 0x00                      # also Normal disconnection, Granted QoS 0
RC_DISCONNECT_WITH_WILL = 0x04
RC_NO_MATCHING_SUBSCRIBERS = 0x10
RC_NO_SUBSCRIPTION_EXISTED = 0x11
RC_MALFORMED_PACKET = 0x81
RC_PROTOCOL_ERROR = 0x82
RC_UNSUPPORTED_PROTOCOL_VERSION = 0x84
RC_CLIENT_IDENTIFIER_NOT_VALID = 0x85
RC_BAD_USERNAME_OR_PASSWORD = 0x86
RC_NOT_AUTHORIZED = 0x87
RC_SERVER_UNAVAILABLE = 0x88
RC_SERVER_SHUTTING_DOWN = 0x8B
RC_BAD_AUTHENTICATION_METHOD = 0x8C
RC_KEEP_ALIVE_TIMEOUT = 0x8D
RC_SESSION_TAKEN_OVER = 0x8E
RC_TOPIC_FILTER_INVALID = 0x8F
RC_PACKET_IDENTIFIER_NOT_FOUND = 0x92
RC_RECEIVE_MAXIMUM_EXCEEDED = 0x93
RC_TOPIC_ALIAS_INVALID = 0x94
RC_PACKET_TOO_LARGE = 0x95
RC_QUOTA_EXCEEDED = 0x97
RC_ADMINISTRATIVE_ACTION = 0x98

#: A 3.x CONNACK return code -> the MQTT 5.0 reason code for the same refusal.
CONNACK_V5 = {
    CONNACK_UNACCEPTABLE_PROTOCOL: RC_UNSUPPORTED_PROTOCOL_VERSION,
    CONNACK_IDENTIFIER_REJECTED: RC_CLIENT_IDENTIFIER_NOT_VALID,
    CONNACK_SERVER_UNAVAILABLE: RC_SERVER_UNAVAILABLE,
    CONNACK_BAD_USERNAME_PASSWORD: RC_BAD_USERNAME_OR_PASSWORD,
    CONNACK_NOT_AUTHORIZED: RC_NOT_AUTHORIZED,
}

#: Why the broker closed a connection (the per-listener shutdown reasons) ->
#: the reason code of the DISCONNECT a 5.0 client gets first (5.0 section 3.14.2.1).
DISCONNECT_REASONS = {
    "conflict": RC_SESSION_TAKEN_OVER, "keepalive_timeout": RC_KEEP_ALIVE_TIMEOUT,
    "kick": RC_ADMINISTRATIVE_ACTION, "shutdown": RC_SERVER_SHUTTING_DOWN,
    "parser_error": RC_MALFORMED_PACKET, "protocol_error": RC_PROTOCOL_ERROR,
    "frame_too_large": RC_PACKET_TOO_LARGE, "receive_maximum": RC_RECEIVE_MAXIMUM_EXCEEDED,
    "topic_alias_invalid": RC_TOPIC_ALIAS_INVALID, "not_authorized": RC_NOT_AUTHORIZED,
    "store_error": RC_QUOTA_EXCEEDED,
}

# MQTT 5.0 properties (section 2.2.2.2): identifier -> (name, type, where it may
# stand). WILL stands for a CONNECT's Will Properties.
WILL = 16
_BYTE, _U16, _U32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_ACKS = (PUBACK, PUBREC, PUBREL, PUBCOMP)
PROPERTIES = {
    0x01: ("payload_format_indicator", _BYTE, (PUBLISH, WILL)),
    0x02: ("message_expiry_interval", _U32, (PUBLISH, WILL)),
    0x03: ("content_type", _UTF8, (PUBLISH, WILL)),
    0x08: ("response_topic", _UTF8, (PUBLISH, WILL)),
    0x09: ("correlation_data", _BINARY, (PUBLISH, WILL)),
    0x0B: ("subscription_identifier", _VARINT, (PUBLISH, SUBSCRIBE)),
    0x11: ("session_expiry_interval", _U32, (CONNECT, CONNACK, DISCONNECT)),
    0x12: ("assigned_client_identifier", _UTF8, (CONNACK,)),
    0x13: ("server_keep_alive", _U16, (CONNACK,)),
    0x15: ("authentication_method", _UTF8, (CONNECT, CONNACK, AUTH)),
    0x16: ("authentication_data", _BINARY, (CONNECT, CONNACK, AUTH)),
    0x17: ("request_problem_information", _BYTE, (CONNECT,)),
    0x18: ("will_delay_interval", _U32, (WILL,)),
    0x19: ("request_response_information", _BYTE, (CONNECT,)),
    0x1A: ("response_information", _UTF8, (CONNACK,)),
    0x1C: ("server_reference", _UTF8, (CONNACK, DISCONNECT)),
    0x1F: ("reason_string", _UTF8, (CONNACK, SUBACK, UNSUBACK, DISCONNECT, AUTH) + _ACKS),
    0x21: ("receive_maximum", _U16, (CONNECT, CONNACK)),
    0x22: ("topic_alias_maximum", _U16, (CONNECT, CONNACK)),
    0x23: ("topic_alias", _U16, (PUBLISH,)),
    0x24: ("maximum_qos", _BYTE, (CONNACK,)),
    0x25: ("retain_available", _BYTE, (CONNACK,)),
    0x26: ("user_property", _PAIR, (CONNECT, CONNACK, PUBLISH, WILL, SUBSCRIBE, SUBACK,
                                   UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH) + _ACKS),
    0x27: ("maximum_packet_size", _U32, (CONNECT, CONNACK)),
    0x28: ("wildcard_subscription_available", _BYTE, (CONNACK,)),
    0x29: ("subscription_identifier_available", _BYTE, (CONNACK,)),
    0x2A: ("shared_subscription_available", _BYTE, (CONNACK,)),
}
PROPERTY_IDS = {name: pid for pid, (name, _, _) in PROPERTIES.items()}
#: Properties that may appear more than once; their value is a list.
MULTI_PROPERTIES = frozenset(("user_property", "subscription_identifier"))
#: Property values the spec restricts [MQTT-3.1.2-*, 3.3.2.3.2, 3.2.2.3.*]: name -> allowed.
_PROPERTY_RANGES = {
    "payload_format_indicator": (0, 1), "request_problem_information": (0, 1),
    "request_response_information": (0, 1), "maximum_qos": (0, 1), "retain_available": (0, 1),
    "wildcard_subscription_available": (0, 1), "subscription_identifier_available": (0, 1),
    "shared_subscription_available": (0, 1),
}
#: PUBLISH properties a broker forwards unchanged to 5.0 subscribers [MQTT-3.3.2-*].
FORWARDED_PROPERTIES = ("payload_format_indicator", "message_expiry_interval", "content_type",
                        "response_topic", "correlation_data", "user_property")


def forwarded_properties(properties):
    """Those of a PUBLISH's (or a will's) properties that travel with the message."""
    return {k: v for k, v in properties.items() if k in FORWARDED_PROPERTIES}

MAX_REMAINING_LENGTH = 268_435_455   # 2.2.3: four varint bytes
MAX_PACKET_ID = 65535
MAX_TOPIC_BYTES = 65535

# Outbound QoS 1/2 states (mosquitto's mosq_ms_wait_for_puback/pubrec/pubcomp).
WAIT_ACK = 0      # PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2)
WAIT_COMP = 1     # PUBREL sent, waiting for PUBCOMP

#: Every EMQ X 2.x metric name, in the order of the REST API page.
METRIC_NAMES = (
    "packets/disconnect", "messages/dropped", "messages/qos2/received",
    "packets/suback", "packets/pubcomp/received", "packets/unsuback",
    "packets/pingresp", "packets/puback/missed", "packets/pingreq",
    "messages/retained", "packets/sent", "messages/qos2/dropped",
    "packets/unsubscribe", "packets/pubrec/missed", "packets/connack",
    "messages/received", "packets/pubrec/sent", "packets/publish/received",
    "packets/pubcomp/sent", "bytes/received", "packets/connect",
    "packets/puback/received", "messages/sent", "packets/publish/sent",
    "bytes/sent", "packets/pubrel/missed", "packets/puback/sent",
    "messages/qos0/received", "packets/subscribe", "packets/pubrel/sent",
    "messages/forward", "messages/qos2/sent", "packets/received",
    "packets/pubrel/received", "messages/qos1/received", "messages/qos1/sent",
    "packets/pubrec/received", "packets/pubcomp/missed", "messages/qos0/sent",
)

#: Every EMQ X 2.x stat name (each has a "/max" high-water mark).
STAT_NAMES = ("clients", "retained", "routes", "sessions", "subscribers",
              "subscriptions", "topics")

#: Metric names counted for each packet type received / sent.
_RECEIVED_METRIC = {
    CONNECT: "packets/connect", PUBLISH: "packets/publish/received",
    PUBACK: "packets/puback/received", PUBREC: "packets/pubrec/received",
    PUBREL: "packets/pubrel/received", PUBCOMP: "packets/pubcomp/received",
    SUBSCRIBE: "packets/subscribe", UNSUBSCRIBE: "packets/unsubscribe",
    PINGREQ: "packets/pingreq", DISCONNECT: "packets/disconnect",
}
_SENT_METRIC = {
    CONNACK: "packets/connack", PUBLISH: "packets/publish/sent",
    PUBACK: "packets/puback/sent", PUBREC: "packets/pubrec/sent",
    PUBREL: "packets/pubrel/sent", PUBCOMP: "packets/pubcomp/sent",
    SUBACK: "packets/suback", UNSUBACK: "packets/unsuback",
    PINGRESP: "packets/pingresp",
}
_QOS_RECEIVED = ("messages/qos0/received", "messages/qos1/received", "messages/qos2/received")
_QOS_SENT = ("messages/qos0/sent", "messages/qos1/sent", "messages/qos2/sent")

_ROUTE_CACHE_SIZE = 10000   # topics whose match result is cached
#: Packets from a client whose replies wait for the disk when the broker keeps
#: state (besides a QoS 1/2 PUBLISH): PUBREC (our PUBREL), PUBREL (our PUBCOMP),
#: SUBSCRIBE and UNSUBSCRIBE.
_DURABLE_REPLIES = frozenset((PUBREC, PUBREL, SUBSCRIBE, UNSUBSCRIBE))
_NO_LOCAL, _RETAIN_AS_PUBLISHED = 0x04, 0x08   # SUBSCRIBE option bits kept in the router
#: Bytes one recv asks for, adaptively. An idle client's reader waits in a
#: recv holding a buffer of the current size, so idle connections shrink to 256.
_RECV_MIN, _RECV_MAX = 256, 65536

#: Default settings; every one can be given to Broker() as a keyword.
DEFAULTS = {
    "node": "emqx_lite@127.0.0.1",
    "max_packet_size": 1024 * 1024,    # bytes (remaining length)
    "max_clientid_len": 1024,
    "max_topic_length": 4096,          # characters in a topic name or filter (EMQ X's limit)
    "max_topic_levels": 128,           # '/'-separated levels in a topic name or filter
    "max_subscriptions": 0,            # filters per session (0 = unlimited)
    "max_keepalive": 0,                # ceiling on a client's keepalive, also for 0 (0 = none)
    "connect_timeout": 15.0,           # seconds until the first packet must be CONNECT
    "keepalive_backoff": 1.5,          # close after keepalive * this of silence
    "max_inflight": 32,                # QoS 1/2 messages unacknowledged per client
    "retry_interval": 20.0,            # seconds before an unacked PUBLISH/PUBREL is resent
    "max_awaiting_rel": 100,           # QoS 2 ids received and waiting for PUBREL
    "await_rel_timeout": 20.0,         # seconds an id waits for its PUBREL
    "max_mqueue_len": 1000,            # messages queued per session (0 = unbounded)
    "mqueue_store_qos0": True,         # queue QoS 0 messages for offline sessions
    "session_expiry_interval": 7200.0, # seconds an offline persistent session is kept
    "max_outbuf": 1024 * 1024,         # bytes buffered for one client before it counts as slow
    "send_timeout": 15.0,              # seconds a blocked write may take before the client is closed
    "flow_control_timeout": 1.0,       # seconds a QoS 1/2 publisher's ack may be held (0 = off)
    "max_topic_alias": 256,            # MQTT 5.0 Topic Alias Maximum we give clients (0 = none)
    "topic_alias_out": True,           # use topic aliases toward 5.0 clients that take them
    "sys_interval": 60.0,              # seconds between $SYS broker/stats/metrics publishes
    "max_clients": 102400,             # connections per listener
    "acceptors": 1,                    # reported by the REST API (one accept loop)
    "allow_anonymous": True,           # accept clients no auth plugin vouches for
    "acl_file": None,                  # EMQ X acl.conf rules (None: EMQ X's default acl.conf)
    "acl_nomatch": "allow",            # decision when no ACL rule matches
    "auth_username": {},               # emqx_auth_username table: username -> password
    "auth_clientid": {},               # emqx_auth_clientid table: client id -> password
    "module_subscription": (),         # emqx_modules: [(topic with %c/%u, qos)] on connect
    "module_rewrite": (),              # emqx_modules: [(filter, regex, replacement with $N)]
    "journal": 1000,                   # packets the journal keeps (0: off); the command line: 0
    # Durable state (node.data_dir): None or "" keeps everything in memory
    "data_dir": None,                  # directory of emqx_lite.db
    "data_sync": "normal",             # "normal": survives a process crash; "full": power loss too
    # The REST API (listener.api.mgmt):
    "api_max_clients": 4096,           # connections; at the limit the idlest is closed for a new one
    "api_idle_timeout": 15.0,          # seconds an idle or half-sent request may hold a connection
    "api_cors_origins": (),            # other sites' origins allowed to call the API (CORS)
    "api_max_auth_failures": 10,       # failed logins per source address and window, then 429
    "api_auth_failure_window": 60.0,   # seconds of that window
    "api_password_iterations": 600_000,  # PBKDF2-SHA256 cost of a dashboard user's password
    "api_certfile": None,              # serve the API over HTTPS with this certificate chain
    "api_keyfile": None,
    "api_cacertfile": None,            # CA certificates for client certificates
    "api_verify": False,               # ask for a client certificate (verify_peer)
    "api_fail_if_no_peer_cert": False, # and require one
    "prometheus_auth": True,           # Basic auth on the Prometheus text, as on the API
    # The emqx_retainer plugin's limits (0: none):
    "retainer_max_messages": 1000000,  # retained messages kept; a new topic beyond is not retained
    "retainer_max_payload_size": 1024 * 1024,  # bytes; a larger payload is not retained
    "retainer_expiry_interval": 0.0,   # seconds a retained message is kept
}

#: Plugins active when the broker starts (EMQ X 2.x defaults).
PLUGINS_ACTIVE = {"emqx_auth_clientid": False, "emqx_auth_username": False,
                  "emqx_bridge_mqtt": True, "emqx_dashboard": True, "emqx_modules": True,
                  "emqx_retainer": True}


###############################################################################
# Exceptions ##################################################################
###############################################################################

class MQTTError(Exception):
    """A client broke the protocol; the connection is closed.

    ``reason`` is the shutdown reason counted per listener (EMQ X names).
    """
    reason = "protocol_error"


class MalformedPacket(MQTTError):
    """The bytes do not form a valid packet (MQTT 5.0 reason code 0x81)."""
    reason = "parser_error"


class ProtocolError(MQTTError):
    """A valid packet that is not allowed here (MQTT 5.0 reason code 0x82)."""
    reason = "protocol_error"


class PacketTooLarge(MalformedPacket):
    """Remaining length above max_packet_size (MQTT 5.0 reason code 0x95)."""
    reason = "frame_too_large"


class ConfigError(ValueError):
    """A configuration or ACL file is wrong; the message names file, line and key."""


class ReceiveMaximumExceeded(ProtocolError):
    """More QoS 2 PUBLISHes awaiting PUBREL than the Receive Maximum we gave (0x93)."""
    reason = "receive_maximum"


class TopicAliasInvalid(ProtocolError):
    """A Topic Alias of 0 or above the Topic Alias Maximum we gave (0x94)."""
    reason = "topic_alias_invalid"


class AuthenticationFailed(MQTTError):
    """A 5.0 re-authentication failed (DISCONNECT 0x87)."""
    reason = "not_authorized"


class StoreUnavailable(MQTTError):
    """A QoS 1/2 PUBLISH arrived while the data file cannot be written (3.x
    has no way to refuse it but closing the connection)."""
    reason = "store_error"


class ConnectRefused(MQTTError):
    """CONNECT refused with a CONNACK return code, then the socket is closed."""
    reason = "connack_refused"

    def __init__(self, return_code, message):
        super().__init__(message)
        self.return_code = return_code


###############################################################################
# Topics ######################################################################
###############################################################################

def validate_topic_name(topic):
    """A PUBLISH topic: non-empty, no wildcards [MQTT-3.3.2-2, MQTT-4.7.3-1]."""
    if not topic:
        raise MalformedPacket("empty topic name [MQTT-4.7.3-1]")
    if "+" in topic or "#" in topic:
        raise MalformedPacket("wildcard in topic name %r [MQTT-3.3.2-2]" % topic)
    if "\x00" in topic:
        raise MalformedPacket("U+0000 in topic [MQTT-4.7.3-2]")
    if len(topic) > MAX_TOPIC_BYTES // 4 and len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise MalformedPacket("topic longer than 65535 bytes")


def topic_within_limits(topic, settings):
    """max_topic_length and max_topic_levels, which protect the broker's trie."""
    return (len(topic) <= settings["max_topic_length"]
            and topic.count("/") < settings["max_topic_levels"])


def parse_share(topic_filter):
    """Split an EMQ X 2.x shared filter: '$share/g/t' -> ('g', 't'); '$queue/t' -> ('$queue', 't').

    Returns (None, filter) for a normal subscription.
    """
    if topic_filter.startswith("$queue/"):
        return "$queue", topic_filter[7:]
    if topic_filter.startswith("$share/"):
        group, sep, rest = topic_filter[7:].partition("/")
        if group and sep:
            return group, rest
        return "", ""  # invalid: rejected by validate_topic_filter
    return None, topic_filter


def validate_topic_filter(topic_filter):
    """Return True when the filter is valid [MQTT-4.7.1-1..3, MQTT-4.7.3-1, -2]."""
    group, real = parse_share(topic_filter)
    if group is not None and (not group or "+" in group or "#" in group):
        return False
    if not real or "\x00" in real or len(real.encode("utf-8")) > MAX_TOPIC_BYTES:
        return False
    levels = real.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic_filter, topic):
    """True if a (non-shared) filter matches a topic name, with the '$' rule [MQTT-4.7.2-1]."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    flevels, tlevels = topic_filter.split("/"), topic.split("/")
    for i, f in enumerate(flevels):
        if f == "#":
            return True
        if i >= len(tlevels) or (f != "+" and f != tlevels[i]):
            return False
    return len(flevels) == len(tlevels)


###############################################################################
# Codec: primitives ###########################################################
###############################################################################

def encode_varint(n):
    """Remaining-length encoding (2.2.3)."""
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def decode_varint(data, pos):
    """Return (value, next_pos), or (None, pos) if more bytes are needed.

    Raises MalformedPacket after four continuation bytes [MQTT-2.2.3].
    """
    value = 0
    for i in range(4):
        if pos + i >= len(data):
            return None, pos
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise MalformedPacket("remaining length longer than 4 bytes")


def encode_string(s):
    raw = s.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def encode_binary(b):
    return len(b).to_bytes(2, "big") + b


def _decode_binary(body, pos):
    if pos + 2 > len(body):
        raise MalformedPacket("truncated length prefix")
    n = (body[pos] << 8) | body[pos + 1]
    end = pos + 2 + n
    if end > len(body):
        raise MalformedPacket("string or binary runs past the packet")
    return body[pos + 2:end], end


def _decode_string(body, pos):
    raw, pos = _decode_binary(body, pos)
    try:
        text = raw.decode("utf-8")  # rejects surrogates and overlongs [MQTT-1.5.3-1]
    except UnicodeDecodeError:
        raise MalformedPacket("invalid UTF-8 string [MQTT-1.5.3-1]") from None
    if "\x00" in text:
        raise MalformedPacket("string contains U+0000 [MQTT-1.5.3-2]")
    return text, pos


def _decode_u16(body, pos):
    if pos + 2 > len(body):
        raise MalformedPacket("truncated two-byte integer")
    return (body[pos] << 8) | body[pos + 1], pos + 2


def _fixed_header(packet_type, flags, remaining):
    return bytes((packet_type << 4 | flags,)) + encode_varint(remaining)


def _decode_u32(body, pos):
    if pos + 4 > len(body):
        raise MalformedPacket("truncated four-byte integer")
    return int.from_bytes(body[pos:pos + 4], "big"), pos + 4


def _decode_byte(body, pos):
    if pos >= len(body):
        raise MalformedPacket("truncated byte")
    return body[pos], pos + 1


def _decode_varint_field(body, pos):
    value, end = decode_varint(body, pos)
    if value is None:
        raise MalformedPacket("truncated variable byte integer")
    return value, end


def _decode_pair(body, pos):
    key, pos = _decode_string(body, pos)
    value, pos = _decode_string(body, pos)
    return (key, value), pos


def _decode_bytes(body, pos):
    value, pos = _decode_binary(body, pos)
    return bytes(value), pos


#: Property type -> (decode(body, pos) -> (value, pos), encode(value) -> bytes).
_PROPERTY_CODECS = {
    _BYTE: (_decode_byte, lambda v: bytes((v,))),
    _U16: (_decode_u16, lambda v: v.to_bytes(2, "big")),
    _U32: (_decode_u32, lambda v: v.to_bytes(4, "big")),
    _VARINT: (_decode_varint_field, encode_varint),
    _UTF8: (_decode_string, encode_string),
    _BINARY: (_decode_bytes, encode_binary),
    _PAIR: (_decode_pair, lambda kv: encode_string(kv[0]) + encode_string(kv[1])),
}


def decode_properties(body, pos, where):
    """MQTT 5.0 properties at ``body[pos:]`` of a packet of type ``where``
    (or WILL): ({name: value}, next_pos). User Properties and Subscription
    Identifiers are lists, in order. An unknown identifier is a Malformed
    Packet, and so is a property out of place (section 2.2.2.2); one repeated
    or out of range is a Protocol Error."""
    if pos < len(body) and body[pos] == 0:   # no properties: the common case, kept cheap
        return {}, pos + 1
    length, start = _decode_varint_field(body, pos)
    end = start + length
    if end > len(body):
        raise MalformedPacket("properties run past the packet")
    view, pos, props = body[:end], start, {}
    while pos < end:
        pid, pos = _decode_varint_field(view, pos)
        spec = PROPERTIES.get(pid)
        if spec is None:
            raise MalformedPacket("unknown property 0x%02x" % pid)
        name, kind, allowed = spec
        if where not in allowed:   # a Malformed Packet (5.0 section 2.2.2.2)
            raise MalformedPacket("property %s is not allowed in %s" % (
                name, "Will Properties" if where == WILL else PACKET_NAMES[where]))
        value, pos = _PROPERTY_CODECS[kind][0](view, pos)
        if name in MULTI_PROPERTIES:
            props.setdefault(name, []).append(value)
        elif name in props:
            raise ProtocolError("property %s appears twice [MQTT-2.2.2-2]" % name)
        else:
            props[name] = value
        allowed_values = _PROPERTY_RANGES.get(name)
        if allowed_values is not None and value not in allowed_values:
            raise ProtocolError("property %s = %r is not allowed" % (name, value))
    return props, end


def encode_properties(props):
    """{name: value} -> the property length and properties (b"\\x00" for none)."""
    if not props:
        return b"\x00"
    out = []
    for name, value in props.items():
        pid = PROPERTY_IDS[name]
        encode = _PROPERTY_CODECS[PROPERTIES[pid][1]][1]
        for item in (value if name in MULTI_PROPERTIES else (value,)):
            out.append(encode_varint(pid) + encode(item))
    data = b"".join(out)
    return encode_varint(len(data)) + data


###############################################################################
# Codec: packets ##############################################################
###############################################################################

class _Packet:
    """Packets compare and print by their fields (handy in tests and logs)."""
    __slots__ = ()

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, ", ".join(
            "%s=%r" % (name, getattr(self, name)) for name in self.__slots__))


class Will(_Packet):
    """The will message of a CONNECT (3.1.2.5); 5.0 adds Will Properties."""
    __slots__ = ("topic", "payload", "qos", "retain", "properties")

    def __init__(self, topic, payload, qos, retain, properties=None):
        self.topic, self.payload, self.qos, self.retain = topic, payload, qos, retain
        self.properties = properties


class Connect(_Packet):
    """``bridge``: a 3.x protocol level with the bridge bit (0x80), which
    mosquitto's and EMQ X's bridges send: what the client subscribes to does
    not come back to it as its own messages, and keeps its retain flag."""
    __slots__ = ("proto_name", "proto_ver", "clean_session", "keepalive",
                 "client_id", "will", "username", "password", "properties", "bridge")

    def __init__(self, proto_name, proto_ver, clean_session, keepalive, client_id,
                 will=None, username=None, password=None, properties=None, bridge=False):
        self.proto_name, self.proto_ver = proto_name, proto_ver
        self.clean_session, self.keepalive, self.client_id = clean_session, keepalive, client_id
        self.will, self.username, self.password = will, username, password
        self.properties, self.bridge = properties, bridge


class Publish(_Packet):
    __slots__ = ("topic", "payload", "qos", "retain", "dup", "packet_id", "properties")

    def __init__(self, topic, payload, qos=0, retain=False, dup=False, packet_id=None,
                 properties=None):
        self.topic, self.payload, self.qos, self.retain = topic, payload, qos, retain
        self.dup, self.packet_id, self.properties = dup, packet_id, properties


class Subscribe(_Packet):
    __slots__ = ("packet_id", "topics", "properties")

    def __init__(self, packet_id, topics, properties=None):
        self.packet_id, self.topics, self.properties = packet_id, topics, properties


class Unsubscribe(_Packet):
    __slots__ = ("packet_id", "topics", "properties")

    def __init__(self, packet_id, topics, properties=None):
        self.packet_id, self.topics, self.properties = packet_id, topics, properties


class Connack(_Packet):
    __slots__ = ("session_present", "return_code", "properties")

    def __init__(self, session_present, return_code, properties=None):
        self.session_present, self.return_code = session_present, return_code
        self.properties = properties


class Suback(_Packet):
    __slots__ = ("packet_id", "return_codes", "properties")

    def __init__(self, packet_id, return_codes, properties=None):
        self.packet_id, self.return_codes, self.properties = packet_id, return_codes, properties


class Ack(_Packet):
    """PUBACK, PUBREC, PUBREL, PUBCOMP and UNSUBACK: a packet id (MQTT 5.0 adds
    a reason code)."""
    __slots__ = ("packet_id", "reason_code", "properties")

    def __init__(self, packet_id, reason_code=0, properties=None):
        self.packet_id, self.reason_code, self.properties = packet_id, reason_code, properties


class Unsuback(Suback):
    """UNSUBACK in 5.0: a reason code per filter (3.1.1's is an Ack). (No
    ``__slots__`` of its own: its fields are Suback's.)"""


class Disconnect(_Packet):
    """DISCONNECT in 5.0, and AUTH: a reason code and properties (3.1.1's
    DISCONNECT is Empty)."""
    __slots__ = ("reason_code", "properties")

    def __init__(self, reason_code=0, properties=None):
        self.reason_code, self.properties = reason_code, properties


class Auth(Disconnect):
    """AUTH (5.0 only): a reason code and properties, as DISCONNECT."""


class Empty(_Packet):
    """PINGREQ, PINGRESP and DISCONNECT (3.1.1: no variable header, no payload)."""
    __slots__ = ()


EMPTY = Empty()


def decode_connect(flags, body, version=None):
    """Decode a CONNECT body. Raises ConnectRefused for an unknown protocol level."""
    name, pos = _decode_string(body, 0)
    if pos >= len(body):
        raise MalformedPacket("CONNECT without protocol level")
    level = body[pos]
    pos += 1
    bridge = level & 0x80 and level & 0x7F in (MQTT_V31, MQTT_V311)
    if bridge:
        level &= 0x7F
    if name not in ("MQTT", "MQIsdp"):
        raise ProtocolError("unknown protocol name %r [MQTT-3.1.2-1]" % name)
    if level not in SUPPORTED_LEVELS or PROTOCOL_NAMES[level] != name:
        raise ConnectRefused(CONNACK_UNACCEPTABLE_PROTOCOL,
                             "unsupported protocol %s level %d [MQTT-3.1.2-2]" % (name, level))
    if pos + 3 > len(body):
        raise MalformedPacket("truncated CONNECT variable header")
    cflags = body[pos]
    keepalive = (body[pos + 1] << 8) | body[pos + 2]
    pos += 3
    properties = None
    if level == MQTT_V5:
        properties, pos = decode_properties(body, pos, CONNECT)
    if cflags & 0x01:
        raise MalformedPacket("CONNECT reserved flag set [MQTT-3.1.2-3]")
    will_flag, will_qos, will_retain = cflags & 0x04, (cflags >> 3) & 0x03, bool(cflags & 0x20)
    if not will_flag and (will_qos or will_retain):
        raise MalformedPacket("will QoS/retain without will flag [MQTT-3.1.2-13, -15]")
    if will_qos == 3:
        raise MalformedPacket("will QoS 3 [MQTT-3.1.2-14]")
    has_user, has_password = cflags & 0x80, cflags & 0x40
    if has_password and not has_user:
        raise MalformedPacket("password flag without username flag [MQTT-3.1.2-22]")
    client_id, pos = _decode_string(body, pos)
    will = None
    if will_flag:
        will_properties = None
        if level == MQTT_V5:
            will_properties, pos = decode_properties(body, pos, WILL)
        will_topic, pos = _decode_string(body, pos)
        will_payload, pos = _decode_binary(body, pos)
        validate_topic_name(will_topic)
        will = Will(will_topic, bytes(will_payload), will_qos, will_retain, will_properties)
    username = password = None
    if has_user:
        username, pos = _decode_string(body, pos)
    if has_password:
        password, pos = _decode_binary(body, pos)
        password = bytes(password)
    if pos != len(body):
        raise MalformedPacket("trailing bytes after CONNECT payload")
    return Connect(name, level, bool(cflags & 0x02), keepalive, client_id, will,
                   username, password, properties, bool(bridge))


# Encoders: ``encode_<type>(pkt, version) -> bytes``, one per packet type. The
# version is the client's protocol level (None before CONNECT); encoders marked
# "client side" serve tests and bridges: a broker never sends those packets.

def encode_connect(pkt, version):
    """Client side."""
    v5 = pkt.proto_ver == MQTT_V5
    flags = 0x02 if pkt.clean_session else 0
    payload = encode_string(pkt.client_id)
    if pkt.will:
        flags |= 0x04 | pkt.will.qos << 3 | (0x20 if pkt.will.retain else 0)
        if v5:
            payload += encode_properties(pkt.will.properties)
        payload += encode_string(pkt.will.topic) + encode_binary(pkt.will.payload)
    if pkt.username is not None:
        flags |= 0x80
        payload += encode_string(pkt.username)
    if pkt.password is not None:
        flags |= 0x40
        payload += encode_binary(pkt.password)
    level = pkt.proto_ver | (0x80 if pkt.bridge else 0)
    body = (encode_string(pkt.proto_name) + bytes((level, flags))
            + pkt.keepalive.to_bytes(2, "big")
            + (encode_properties(pkt.properties) if v5 else b"") + payload)
    return _fixed_header(CONNECT, 0, len(body)) + body


def encode_connack(pkt, version):
    # MQTT 3.1 has no Session Present flag: that byte is reserved there.
    present = 1 if pkt.session_present and version != MQTT_V31 else 0
    if version != MQTT_V5:
        return bytes((CONNACK << 4, 2, present, pkt.return_code))
    body = bytes((present, pkt.return_code)) + encode_properties(pkt.properties)
    return _fixed_header(CONNACK, 0, len(body)) + body


def decode_connack(flags, body, version=None):
    """Client side."""
    if len(body) < 2 or body[0] & 0xFE or (version != MQTT_V5 and len(body) != 2):
        raise MalformedPacket("CONNACK body must be 2 bytes, flags 0 or 1 [MQTT-3.2.2-1]")
    properties = decode_properties(body, 2, CONNACK)[0] if version == MQTT_V5 else None
    return Connack(bool(body[0]), body[1], properties)


def decode_publish(flags, body, version=None):
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("PUBLISH QoS 3 [MQTT-3.3.1-4]")
    dup = bool(flags & 0x08)
    if dup and not qos:
        raise MalformedPacket("DUP set on a QoS 0 PUBLISH [MQTT-3.3.1-2]")
    topic, pos = _decode_string(body, 0)
    if topic or version != MQTT_V5:   # 5.0: empty when a Topic Alias stands for it
        validate_topic_name(topic)
    packet_id = None
    if qos:
        packet_id, pos = _decode_u16(body, pos)
        if not packet_id:
            raise MalformedPacket("packet identifier 0 [MQTT-2.3.1-1]")
    properties = None
    if version == MQTT_V5:
        properties, pos = decode_properties(body, pos, PUBLISH)
    return Publish(topic, body[pos:], qos, bool(flags & 0x01), dup, packet_id, properties)


def encode_publish(pkt, version):
    topic = encode_string(pkt.topic)
    pid = pkt.packet_id.to_bytes(2, "big") if pkt.qos else b""
    if version == MQTT_V5:
        pid += encode_properties(pkt.properties)
    flags = (0x08 if pkt.dup else 0) | pkt.qos << 1 | (0x01 if pkt.retain else 0)
    return _fixed_header(PUBLISH, flags, len(topic) + len(pid) + len(pkt.payload)) + topic + pid + pkt.payload


def _decode_ack(flags, body, version=None):
    """PUBACK, PUBREC, PUBREL, PUBCOMP; and UNSUBACK before 5.0. In 5.0 the
    reason code and the properties may follow [MQTT-3.4.2-1]."""
    if len(body) != 2 and (version != MQTT_V5 or len(body) < 2):
        raise MalformedPacket("acknowledgement body must be 2 bytes")
    packet_id = (body[0] << 8) | body[1]
    if not packet_id:
        raise MalformedPacket("packet identifier 0 [MQTT-2.3.1-1]")
    if len(body) == 2:
        return Ack(packet_id)
    properties = decode_properties(body, 3, PUBACK)[0] if len(body) > 3 else None
    return Ack(packet_id, body[2], properties)


decode_puback = decode_pubrec = decode_pubrel = decode_pubcomp = _decode_ack


def _ack_encoder(packet_type):
    """The encoder of PUBACK, PUBREC, PUBREL (flags 0b0010), PUBCOMP or UNSUBACK."""
    first = packet_type << 4 | FIXED_FLAGS[packet_type]

    def encode(pkt, version):
        if version == MQTT_V5 and (pkt.reason_code or pkt.properties):
            body = (pkt.packet_id.to_bytes(2, "big") + bytes((pkt.reason_code,))
                    + (encode_properties(pkt.properties) if pkt.properties else b""))
            return bytes((first,)) + encode_varint(len(body)) + body
        return bytes((first, 2, pkt.packet_id >> 8, pkt.packet_id & 0xFF))
    encode.__name__ = "encode_" + PACKET_NAMES[packet_type].lower()
    return encode


encode_puback, encode_pubrec, encode_pubrel, encode_pubcomp = map(
    _ack_encoder, (PUBACK, PUBREC, PUBREL, PUBCOMP))
_encode_unsuback_v3 = _ack_encoder(UNSUBACK)


def _decode_filters(body, with_qos, version):
    """SUBSCRIBE's and UNSUBSCRIBE's body: (packet_id, [filter] or [(filter,
    options)], properties). A filter is a UTF-8 string like any other
    [MQTT-1.5.3-1, -2]. The options byte is the requested QoS before 5.0; 5.0
    adds No Local (bit 2), Retain As Published (3) and Retain Handling (4-5)."""
    packet_id, pos = _decode_u16(body, 0)
    if not packet_id:
        raise MalformedPacket("packet identifier 0 [MQTT-2.3.1-1]")
    properties = None
    if version == MQTT_V5:
        properties, pos = decode_properties(body, pos, SUBSCRIBE if with_qos else UNSUBSCRIBE)
    reserved = 0xC0 if version == MQTT_V5 else 0xFC
    topics = []
    while pos < len(body):
        topic_filter, pos = _decode_string(body, pos)
        if not with_qos:
            topics.append(topic_filter)
            continue
        if pos >= len(body):
            raise MalformedPacket("SUBSCRIBE topic without QoS byte")
        options = body[pos]
        pos += 1
        if options & reserved or (options & 0x03 == 3 and version != MQTT_V5):
            raise MalformedPacket("SUBSCRIBE requested QoS byte invalid [MQTT-3.8.3-4]")
        if options & 0x03 == 3:
            raise ProtocolError("SUBSCRIBE Maximum QoS 3 (5.0 section 3.8.3.1)")
        if options & 0x30 == 0x30:
            raise ProtocolError("Retain Handling 3 [MQTT-3.8.3-5]")
        topics.append((topic_filter, options))
    return packet_id, topics, properties


def decode_subscribe(flags, body, version=None):
    packet_id, topics, properties = _decode_filters(body, True, version)
    if not topics:
        raise ProtocolError("SUBSCRIBE without topic filters [MQTT-3.8.3-3]")
    return Subscribe(packet_id, topics, properties)


def encode_subscribe(pkt, version):
    """Client side."""
    body = pkt.packet_id.to_bytes(2, "big") + (
        encode_properties(pkt.properties) if version == MQTT_V5 else b"") + b"".join(
        encode_string(t) + bytes((q,)) for t, q in pkt.topics)
    return _fixed_header(SUBSCRIBE, 2, len(body)) + body


def encode_suback(pkt, version):
    """Before 5.0 every failure reason is 0x80 [MQTT-3.9.3-2]."""
    if version == MQTT_V5:
        codes = encode_properties(pkt.properties) + bytes(pkt.return_codes)
    else:
        codes = bytes(c if c < 0x80 else SUBACK_FAILURE for c in pkt.return_codes)
    body = pkt.packet_id.to_bytes(2, "big") + codes
    return _fixed_header(SUBACK, 0, len(body)) + body


def encode_unsuback(pkt, version):
    """5.0: a reason code per filter (an Unsuback); before: the packet id only."""
    if version != MQTT_V5:
        return _encode_unsuback_v3(pkt, version)
    body = (pkt.packet_id.to_bytes(2, "big") + encode_properties(pkt.properties)
            + bytes(pkt.return_codes))
    return _fixed_header(UNSUBACK, 0, len(body)) + body


def decode_unsuback(flags, body, version=None):
    """Client side."""
    if version != MQTT_V5:
        return _decode_ack(flags, body)
    packet_id, pos = _decode_u16(body, 0)
    properties, pos = decode_properties(body, pos, UNSUBACK)
    return Unsuback(packet_id, list(body[pos:]), properties)


def decode_suback(flags, body, version=None):
    """Client side."""
    packet_id, pos = _decode_u16(body, 0)
    properties = None
    if version == MQTT_V5:
        properties, pos = decode_properties(body, pos, SUBACK)
    codes = list(body[pos:])
    if not codes or (version != MQTT_V5 and any(c not in (0, 1, 2, SUBACK_FAILURE) for c in codes)):
        raise MalformedPacket("SUBACK return codes must be 0, 1, 2 or 0x80 [MQTT-3.9.3-2]")
    return Suback(packet_id, codes, properties)


def encode_unsubscribe(pkt, version):
    """Client side."""
    body = pkt.packet_id.to_bytes(2, "big") + (
        encode_properties(pkt.properties) if version == MQTT_V5 else b"") + b"".join(
        encode_string(t) for t in pkt.topics)
    return _fixed_header(UNSUBSCRIBE, 2, len(body)) + body


def decode_unsubscribe(flags, body, version=None):
    packet_id, topics, properties = _decode_filters(body, False, version)
    if not topics:
        raise ProtocolError("UNSUBSCRIBE without topic filters [MQTT-3.10.3-2]")
    return Unsubscribe(packet_id, topics, properties)


def decode_empty(flags, body, version=None):
    if body:
        raise MalformedPacket("packet must have no body")
    return EMPTY


def _empty_encoder(packet_type):
    """The encoder of PINGREQ, PINGRESP or DISCONNECT: a fixed header only."""
    data = bytes((packet_type << 4, 0))

    def encode(pkt, version):
        return data
    encode.__name__ = "encode_" + PACKET_NAMES[packet_type].lower()
    return encode


encode_pingreq, encode_pingresp = map(_empty_encoder, (PINGREQ, PINGRESP))   # PINGREQ: client side
_encode_disconnect_v3 = _empty_encoder(DISCONNECT)


def _decode_reason(packet_type, packet_class):
    """The decoder of 5.0's DISCONNECT or AUTH: a reason code (absent: 0) and
    properties; DISCONNECT before 5.0 has no body."""
    def decode(flags, body, version=None):
        if version != MQTT_V5:
            if packet_type == AUTH:
                raise ProtocolError("AUTH is a 5.0 packet")
            return decode_empty(flags, body)
        if not body:
            return packet_class()
        properties = decode_properties(body, 1, packet_type)[0] if len(body) > 1 else None
        return packet_class(body[0], properties)
    return decode


decode_disconnect = _decode_reason(DISCONNECT, Disconnect)
decode_auth = _decode_reason(AUTH, Auth)


def _reason_encoder(packet_type):
    """The encoder of 5.0's DISCONNECT or AUTH (before 5.0: DISCONNECT's fixed header)."""
    def encode(pkt, version):
        if version != MQTT_V5:
            return _encode_disconnect_v3(pkt, version)
        if not (pkt.reason_code or pkt.properties):
            return bytes((packet_type << 4, 0))
        body = bytes((pkt.reason_code,)) + (
            encode_properties(pkt.properties) if pkt.properties else b"")
        return _fixed_header(packet_type, 0, len(body)) + body
    encode.__name__ = "encode_" + PACKET_NAMES[packet_type].lower()
    return encode


encode_disconnect, encode_auth = map(_reason_encoder, (DISCONNECT, AUTH))


#: Decoders for all 14 packet types (3.1.1 section 3), by packet type.
DECODERS = {
    CONNECT: decode_connect, CONNACK: decode_connack, PUBLISH: decode_publish,
    PUBACK: decode_puback, PUBREC: decode_pubrec, PUBREL: decode_pubrel,
    PUBCOMP: decode_pubcomp, SUBSCRIBE: decode_subscribe, SUBACK: decode_suback,
    UNSUBSCRIBE: decode_unsubscribe, UNSUBACK: decode_unsuback, PINGREQ: decode_empty,
    PINGRESP: decode_empty, DISCONNECT: decode_disconnect, AUTH: decode_auth,
}

#: Encoders for all 14 packet types: encode(packet object, version) -> bytes.
ENCODERS = {
    CONNECT: encode_connect, CONNACK: encode_connack, PUBLISH: encode_publish,
    PUBACK: encode_puback, PUBREC: encode_pubrec, PUBREL: encode_pubrel,
    PUBCOMP: encode_pubcomp, SUBSCRIBE: encode_subscribe, SUBACK: encode_suback,
    UNSUBSCRIBE: encode_unsubscribe, UNSUBACK: encode_unsuback, PINGREQ: encode_pingreq,
    PINGRESP: encode_pingresp, DISCONNECT: encode_disconnect, AUTH: encode_auth,
}

#: The packet types a server accepts from a client.
CLIENT_PACKETS = frozenset((CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP,
                            SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT, AUTH))


def encode_packet(packet_type, pkt, version=MQTT_V311):
    return ENCODERS[packet_type](pkt, version)


def split_packet(data, pos=0, max_size=MAX_REMAINING_LENGTH):
    """Frame the packet at ``data[pos:]``: (first_byte, body, end) or None when
    more bytes are needed. Raises PacketTooLarge as soon as the remaining
    length is known to exceed ``max_size``, before the body has arrived."""
    if len(data) - pos < 2:
        return None
    remaining, start = decode_varint(data, pos + 1)
    if remaining is None:
        return None
    if remaining > max_size:
        raise PacketTooLarge("packet of %d bytes exceeds max_packet_size %d"
                             % (remaining, max_size))
    end = start + remaining
    if end > len(data):
        return None
    return data[pos], data[start:end], end


def decode_packet(first_byte, body, version=None, accept=CLIENT_PACKETS):
    """Check the fixed-header flags and decode one packet (by default, one a
    client may send to a server). Raises only MQTTError subclasses."""
    packet_type, flags = first_byte >> 4, first_byte & 0x0F
    decoder = DECODERS.get(packet_type) if packet_type in accept else None
    if decoder is None:
        raise ProtocolError("packet type %d is not accepted here" % packet_type)
    if packet_type != PUBLISH and flags != FIXED_FLAGS[packet_type]:
        raise MalformedPacket("%s with invalid fixed-header flags 0x%x [MQTT-2.2.2-2]"
                              % (PACKET_NAMES[packet_type], flags))
    return decoder(flags, body, version)


###############################################################################
# Subscription tree ###########################################################
###############################################################################

class _TrieNode:
    __slots__ = ("children", "subs", "shared", "rr")

    def __init__(self):
        self.children = {}   # level -> _TrieNode
        self.subs = {}       # client_id -> (session, qos)
        self.shared = {}     # group -> {client_id: (session, qos)} in join order
        self.rr = {}         # group -> next round-robin index


class _Route(int):
    """A subscription's route (see TopicTree.add) merged from several
    overlapping subscriptions, with all their Subscription Identifiers
    (``ids``; an int subclass cannot have slots)."""


def _subscription_ids(route):
    """The Subscription Identifiers behind a route: () if none."""
    return getattr(route, "ids", None) or ((route >> 4,) if route > 0x0F else ())


def _merge_routes(a, b):
    """One delivery for two overlapping subscriptions of one client: the
    higher QoS's options, every Subscription Identifier of both."""
    high = b if b[1] & 0x03 > a[1] & 0x03 else a
    route = _Route(high[1] & 0x0F | 1 << 4)   # above 0x0F: it has identifiers
    route.ids = tuple(sorted(set(_subscription_ids(a[1]) + _subscription_ids(b[1]))))
    return high[0], route


class TopicTree:
    """A trie of topic filters (paho-testing's matcher shape).

    Not thread-safe by itself: owned by ``BrokerCore.lock``.
    """

    def __init__(self):
        self.root = _TrieNode()

    def _node(self, topic_filter, create):
        node = self.root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                if not create:
                    return None
                child = node.children[level] = _TrieNode()
            node = child
        return node

    def add(self, topic_filter, group, session, qos):
        """Add or replace a subscription; return True if the filter had no subscriber before.
        ``qos`` is the granted QoS, with 5.0's No Local and Retain As Published
        bits above it as in SUBSCRIBE's options byte, and its Subscription
        Identifier from bit 4 up."""
        node = self._node(topic_filter, True)
        was_empty = not node.subs and not node.shared
        if group is None:
            node.subs[session.client_id] = (session, qos)
        else:
            node.shared.setdefault(group, {})[session.client_id] = (session, qos)
        return was_empty

    def remove(self, topic_filter, group, client_id):
        """Remove a subscription; return True if the filter has no subscriber left."""
        path = [self.root]
        for level in topic_filter.split("/"):
            child = path[-1].children.get(level)
            if child is None:
                return False
            path.append(child)
        node = path[-1]
        if group is None:
            if node.subs.pop(client_id, None) is None:
                return False
        else:
            members = node.shared.get(group)
            if not members or members.pop(client_id, None) is None:
                return False
            if not members:
                del node.shared[group]
                node.rr.pop(group, None)
        now_empty = not node.subs and not node.shared
        # Prune empty branches so the trie does not grow with dead filters.
        levels = topic_filter.split("/")
        for i in range(len(levels), 0, -1):
            n = path[i]
            if n.children or n.subs or n.shared:
                break
            del path[i - 1].children[levels[i - 1]]
        return now_empty

    def match(self, topic):
        """Return ({key: (session, qos)}, shared): one entry per client, highest
        QoS over overlapping filters, plus one member of each matching shared
        group chosen round robin; ``shared`` tells whether any group matched."""
        result = {}
        shared = False
        levels = topic.split("/")
        n = len(levels)
        dollar = topic.startswith("$")
        stack = [(self.root, 0)]
        matched = []
        while stack:
            node, i = stack.pop()
            if i == n:
                matched.append(node)
                hash_child = node.children.get("#")
                if hash_child is not None:
                    matched.append(hash_child)  # "sport/#" matches "sport" [MQTT-4.7.1-2]
                continue
            children = node.children
            wild = not (i == 0 and dollar)  # [MQTT-4.7.2-1]
            if wild:
                hash_child = children.get("#")
                if hash_child is not None:
                    matched.append(hash_child)
                plus = children.get("+")
                if plus is not None:
                    stack.append((plus, i + 1))
            child = children.get(levels[i])
            if child is not None:
                stack.append((child, i + 1))
        for node in matched:
            for client_id, entry in node.subs.items():
                prev = result.get(client_id)
                if prev is None:
                    result[client_id] = entry
                elif entry[1] > 0x0F or prev[1] > 0x0F:   # Subscription Identifiers: keep all
                    result[client_id] = _merge_routes(prev, entry)
                elif entry[1] & 0x03 > prev[1] & 0x03:
                    result[client_id] = entry
            for group, members in node.shared.items():
                shared = True
                index = node.rr.get(group, 0) % len(members)
                node.rr[group] = index + 1
                client_id, entry = next(itertools.islice(members.items(), index, None))
                key = ("$share", group, id(node), client_id)
                result[key] = entry
        return result, shared


###############################################################################
# Durable state (SQLite) ######################################################
###############################################################################
#
# With a data directory, what the broker promises outlives its process: one
# SQLite file (WAL mode) holds the retained messages, the persistent sessions
# (subscriptions, queued and inflight QoS 1/2 messages, inbound QoS 2 ids,
# expiry clocks), the dashboard users, the auth plugins' tables and the
# plugins' states. Threads never touch SQLite themselves: they record what
# changed in the Store (a dictionary write under a leaf lock) and go on; the
# Store's writer thread commits everything recorded since its last commit in
# one transaction (group commit). Output that depends on a change, such as
# the PUBACK of a message routed to a persistent session, is held by its
# Connection until the commit that covers the change (``Connection.barrier``).
# QoS 0 traffic and clean sessions record nothing.

STORE_FILE = "emqx_lite.db"
_APPLICATION_ID = 0x454D514C   # "EMQL": PRAGMA application_id of our files
SCHEMA_VERSION = 3

#: Schema migrations: _MIGRATIONS[n] turns a version-n file into version n + 1
#: (version 0 is a new, empty file). A step runs in the transaction that sets
#: the new PRAGMA user_version, so a crash leaves the old version intact.
_MIGRATIONS = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value);
    CREATE TABLE retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL,
                           qos INTEGER NOT NULL, properties BLOB, expires_at REAL,
                           sender TEXT);
    CREATE TABLE sessions (client_id TEXT PRIMARY KEY, expiry_interval INTEGER,
                           created_at REAL NOT NULL, disconnected_at REAL);
    CREATE TABLE subscriptions (client_id TEXT, topic_filter TEXT, route INTEGER NOT NULL,
                                PRIMARY KEY (client_id, topic_filter)) WITHOUT ROWID;
    CREATE TABLE messages (mid INTEGER PRIMARY KEY, client_id TEXT NOT NULL,
                           topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL,
                           retain INTEGER NOT NULL, properties BLOB, expires_at REAL,
                           sender TEXT, packet_id INTEGER, state INTEGER);
    CREATE INDEX messages_by_client ON messages (client_id, mid);
    CREATE TABLE awaiting_rel (client_id TEXT, packet_id INTEGER, received_at REAL,
                               PRIMARY KEY (client_id, packet_id)) WITHOUT ROWID;
    CREATE TABLE users (tbl TEXT, name TEXT, hash TEXT NOT NULL, tags TEXT NOT NULL,
                        PRIMARY KEY (tbl, name)) WITHOUT ROWID;
    CREATE TABLE plugins (name TEXT PRIMARY KEY, active INTEGER NOT NULL);
    """,
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    """
    CREATE TABLE bridge_queue (bridge TEXT, seq INTEGER, topic TEXT NOT NULL,
                               payload BLOB NOT NULL, qos INTEGER NOT NULL,
                               retain INTEGER NOT NULL, properties BLOB, expires_at REAL,
                               sender TEXT, PRIMARY KEY (bridge, seq)) WITHOUT ROWID;
    """,
]

#: Record kind -> (table, its number of columns, its key columns). A record
#: is keyed (kind, key values...) and its row is the table's columns in order.
_STORE_TABLES = {
    "retained": ("retained", 6, ("topic",)),
    "session": ("sessions", 4, ("client_id",)),
    "sub": ("subscriptions", 3, ("client_id", "topic_filter")),
    "msg": ("messages", 11, ("mid",)),
    "rel": ("awaiting_rel", 3, ("client_id", "packet_id")),
    "user": ("users", 4, ("tbl", "name")),
    "plugin": ("plugins", 2, ("name",)),
    "setting": ("settings", 2, ("key",)),
    "bridgeq": ("bridge_queue", 9, ("bridge", "seq")),
}
#: Rows per statement: rows are written many to a statement (SQLite runs each
#: statement without the GIL, once), in a few shapes that are compiled once;
#: 64 x 11 parameters stay under SQLite's oldest limit of 999.
_ROWS_PER_STATEMENT = (64, 8, 1)


@functools.lru_cache(maxsize=None)
def _rows_sql(kind, delete, rows):
    """INSERT OR REPLACE (or DELETE by key) of ``rows`` rows of ``kind``."""
    table, width, key = _STORE_TABLES[kind]
    if not delete:
        one = "(%s)" % ",".join("?" * width)
        return "INSERT OR REPLACE INTO %s VALUES %s" % (table, ",".join([one] * rows))
    if len(key) == 1:
        return "DELETE FROM %s WHERE %s IN (%s)" % (table, key[0], ",".join("?" * rows))
    one = "(%s)" % ",".join("?" * len(key))
    return "DELETE FROM %s WHERE (%s) IN (VALUES %s)" % (table, ",".join(key),
                                                        ",".join([one] * rows))


def _write_rows(db, kind, delete, rows):
    """Write (or delete, given keys) ``rows`` of ``kind`` in few statements."""
    done = 0
    for size in _ROWS_PER_STATEMENT:
        while len(rows) - done >= size:
            chunk = rows[done:done + size]
            db.execute(_rows_sql(kind, delete, size), [v for row in chunk for v in row])
            done += size


_PURGE_SQL = tuple("DELETE FROM %s WHERE client_id = ?" % table
                   for table in ("sessions", "subscriptions", "messages", "awaiting_rel"))
_MESSAGE_STATE_SQL = "UPDATE messages SET packet_id = ?, state = ? WHERE mid = ?"
_DATA_SYNC = {"normal": "NORMAL", "full": "FULL"}   # node.data_sync -> PRAGMA synchronous


class StoreError(Exception):
    """The data directory cannot be used, or a change could not be written."""


class _StateChange(tuple):
    """A message row already on disk gets (client_id, packet_id, state)."""
    __slots__ = ()


def _record_change(records, fresh, key, row):
    """Record that ``key`` now has ``row`` (None: deleted) in ``records``,
    the changes not yet committed. A row deleted before it ever reached the
    disk is simply forgotten; a state change of a row still waiting is folded
    into that row. ``fresh`` holds the keys whose rows are not on disk."""
    if row is None:
        if key in fresh:
            fresh.discard(key)
            del records[key]
            return
    elif type(row) is _StateChange:
        pending = records.get(key)
        if type(pending) is tuple:   # not written yet: write it with its new state
            row = pending[:9] + row[1:]
        elif pending is None and key in records:
            return   # deleted meanwhile
    records[key] = row


class Store:
    """The broker's state on disk: ``<data_dir>/emqx_lite.db``.

    Opening checks the file (ours, not corrupt, not from a newer version),
    migrates an older schema and locks it (an flock: a second broker on the
    same directory gets "in use"; a backup may read it meanwhile). ``load()`` reads
    everything back once; after ``start()`` every change goes through
    ``put``/``delete``/``message_state``/``purge``, which return the change's
    sequence number, and the writer thread commits them in batches.

    ``lock`` guards ``_records``, ``_fresh``, ``_purged``, ``seq``,
    ``_holding``, ``_groups``, ``_draining``, ``_writer_idle``, ``failed``
    and ``_stopping`` (a leaf lock: nothing is taken while it is held). ``committed`` (the last
    sequence number on disk) is written by the writer thread only and read
    without the lock. Changes recorded between ``begin_group`` and
    ``end_group`` reach the disk in one transaction; and as the writer takes
    every change recorded so far, a change on disk has every earlier one
    there too.
    """

    FAILURE_LOG_INTERVAL = 60.0   # seconds between reminders while writes fail
    RETRY_INTERVAL = 1.0          # seconds between attempts while writes fail
    HEARTBEAT_INTERVAL = 10.0     # an idle writer notes the time this often

    def __init__(self, directory, sync="normal"):
        if sync not in _DATA_SYNC:
            raise ValueError("data_sync must be normal or full, not %r" % (sync,))
        self.directory = directory
        self.path = os.path.join(directory, STORE_FILE)
        self.sync = sync
        #: guards the pending changes, seq, _holding, failed, _stopping (a leaf lock)
        self.lock = threading.Lock()
        self._work = threading.Condition(self.lock)       # the writer waits for changes
        self._committed_cv = threading.Condition(self.lock)   # callers wait for a commit
        self._records = {}      # (kind, key...) -> row, None (deleted) or _StateChange
        self._fresh = set()     # keys of _records whose rows have never been written
        self._purged = []       # client ids whose session rows all go, before _records
        self.seq = 0            # changes recorded so far
        self.committed = 0      # changes on disk
        self._holding = set()   # Connections holding output until a commit
        self._groups = 0        # groups being recorded (begin_group .. end_group)
        self._draining = False  # the writer waits for them to end before it takes a batch
        self._drained = threading.Condition(self.lock)   # new groups wait for that
        self.failed = None      # why the last commit failed, until one succeeds
        self._stopping = False
        self._writer_idle = False   # the writer waits for changes (to be notified)
        self._local = threading.local()   # .seq: the last change this thread recorded
        self._thread = None
        self.db = self._open()
        row = self.db.execute("SELECT max(mid) FROM messages").fetchone()
        self._mids = itertools.count((row[0] or 0) + 1)   # message row ids (next() is atomic)

    # --- opening ------------------------------------------------------------------
    def _open(self):
        """Open, check, lock and migrate the file; StoreError names the problem."""
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise StoreError("cannot use data directory %s: %s" % (self.directory, exc.strerror)) \
                from None
        # One broker per file: an flock held until stop() (SQLite's own locks
        # are short, so that a backup can read the file while the broker runs).
        # This descriptor is closed only after SQLite's: closing a descriptor
        # of the file would drop SQLite's POSIX locks on it.
        try:
            self._lock_fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError("cannot open %s: %s" % (self.path, exc.strerror)) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise StoreError("%s is in use by another broker (it is locked)" % self.path) \
                from None
        try:
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None,
                                 check_same_thread=False)
        except sqlite3.Error as exc:
            os.close(self._lock_fd)
            raise StoreError("cannot open %s: %s" % (self.path, exc)) from None
        try:
            db.execute("BEGIN")
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            db.execute("COMMIT")
            if app_id != _APPLICATION_ID and (app_id or tables):
                raise StoreError("%s is not an emqx_lite database (application id %#x, %d "
                                 "schema objects); move it away or choose another data "
                                 "directory" % (self.path, app_id, tables))
            if version > SCHEMA_VERSION:
                raise StoreError("%s was written by a newer emqx_lite (schema version %d; "
                                 "this one reads up to %d)" % (self.path, version,
                                                               SCHEMA_VERSION))
            check = db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise StoreError("%s is corrupt: %s" % (self.path, "; ".join(
                    str(r[0]) for r in check[:3])))
            if db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise StoreError("%s: SQLite refused WAL mode" % self.path)
            db.execute("PRAGMA synchronous = " + _DATA_SYNC[self.sync])
            for step in range(version, SCHEMA_VERSION):
                self._migrate(db, step)
            return db
        except sqlite3.OperationalError as exc:
            self._close(db)
            raise StoreError("cannot use %s: %s" % (self.path, exc)) from None
        except sqlite3.DatabaseError as exc:
            self._close(db)
            raise StoreError("%s is corrupt or not a database: %s" % (self.path, exc)) from None
        except BaseException:
            self._close(db)
            raise

    def _close(self, db):
        db.close()
        os.close(self._lock_fd)   # after SQLite's descriptor (see _open)

    @staticmethod
    def _migrate(db, version):
        """Run the step from ``version`` to ``version + 1`` in one transaction."""
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _MIGRATIONS[version].split(";"):
                if statement.strip():
                    db.execute(statement)
            if version == 0:
                db.execute("PRAGMA application_id = %d" % _APPLICATION_ID)
            db.execute("PRAGMA user_version = %d" % (version + 1))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        _log.info("Data file schema upgraded to version %d", version + 1)

    def load(self):
        """Everything on disk, as {table: [rows]} and the last moment the file
        was known alive (the time of its last commit)."""
        db = self.db
        alive = db.execute("SELECT value FROM meta WHERE key = 'last_alive'").fetchone()
        return {
            "last_alive": alive[0] if alive else None,
            "retained": db.execute("SELECT * FROM retained").fetchall(),
            "sessions": db.execute("SELECT * FROM sessions").fetchall(),
            "subscriptions": db.execute("SELECT * FROM subscriptions").fetchall(),
            "messages": db.execute("SELECT * FROM messages ORDER BY client_id, mid").fetchall(),
            "awaiting_rel": db.execute("SELECT * FROM awaiting_rel").fetchall(),
            "users": db.execute("SELECT * FROM users").fetchall(),
            "plugins": db.execute("SELECT * FROM plugins").fetchall(),
            "settings": db.execute("SELECT * FROM settings").fetchall(),
            "bridge_queue": db.execute(
                "SELECT * FROM bridge_queue ORDER BY bridge, seq").fetchall(),
        }

    # --- recording changes (any thread) ---------------------------------------------
    def next_mid(self):
        """A new message row id."""
        return next(self._mids)

    def put(self, key, row, new=False):
        """Record ``key``'s new row (None deletes it); ``new``: it was never
        stored before, so a delete before the next commit costs nothing.
        Returns the change's sequence number."""
        with self.lock:
            records = self._records
            if new and key not in records:   # the common case: a new message row
                self._fresh.add(key)
                records[key] = row
            else:
                _record_change(records, self._fresh, key, row)
            seq = self.seq = self.seq + 1
            if self._writer_idle:
                self._work.notify()
        self._local.seq = seq
        return seq

    def delete(self, key):
        return self.put(key, None)

    def message_state(self, client_id, mid, packet_id, state):
        """A stored message got a packet id, or moved on to WAIT_COMP."""
        return self.put(("msg", mid), _StateChange((client_id, packet_id, state)))

    def purge(self, client_id):
        """A persistent session ended: every row of it goes."""
        with self.lock:
            records = self._records
            for key in [k for k, row in records.items() if self._client_of(k, row) == client_id]:
                del records[key]
                self._fresh.discard(key)
            self._purged.append(client_id)
            seq = self.seq = self.seq + 1
            if self._writer_idle:
                self._work.notify()
        self._local.seq = seq
        return seq

    @staticmethod
    def _client_of(key, row):
        kind = key[0]
        if kind in ("session", "sub", "rel"):
            return key[1]
        if kind == "msg" and row is not None:
            return row[0] if type(row) is _StateChange else row[1]
        return None

    def begin_group(self):
        """What the calling thread records until end_group() is committed
        together. Called with no lock held: it waits while the writer is
        taking a batch."""
        with self.lock:
            while self._draining:
                self._drained.wait()
            self._groups += 1

    def end_group(self):
        with self.lock:
            self._groups -= 1
            if self._draining and not self._groups:
                self._work.notify()

    def local_seq(self):
        """The sequence number of the last change the calling thread recorded."""
        return getattr(self._local, "seq", 0)

    def depend(self, seq):
        """The calling thread's next acknowledgement relies on change ``seq``
        (recorded by another thread) as on its own."""
        if seq > self.local_seq():
            self._local.seq = seq

    def hold(self, conn):
        """``conn`` holds output until ``conn.barrier`` is committed; the
        writer flushes it then (called with conn.out_lock held)."""
        with self.lock:
            self._holding.add(conn)

    def wait(self, seq=None, timeout=30.0):
        """Block until change ``seq`` (default: the calling thread's last) is on
        disk; StoreError if writes are failing or it takes over ``timeout``."""
        seq = self.local_seq() if seq is None else seq
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.committed < seq:
                if self.failed is not None:
                    raise StoreError("cannot write %s: %s" % (self.path, self.failed))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreError("writing %s takes longer than %gs" % (self.path, timeout))
                self._committed_cv.wait(left)

    # --- the writer thread ----------------------------------------------------------
    def start(self):
        self._thread = _start_thread(self._run, "emqx_lite-store")

    def stop(self):
        """Commit what is recorded, then close the file (and its lock)."""
        with self.lock:
            self._stopping = True
            self._work.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if self._records or self._purged:   # never started, or the last commit failed
                self._commit(self._purged, self._records)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('last_alive', ?)",
                            (time.time(),))
        except sqlite3.Error as exc:
            _log.error("Could not write %s at stop: %s", self.path, exc)
        self._close(self.db)

    def _run(self):
        last_log = 0.0
        while True:
            with self.lock:
                # Changes that cancelled out (a row deleted before it was ever
                # written) still count: whoever waits for them is released.
                idle = False
                while self.seq == self.committed and not self._stopping and not idle:
                    self._writer_idle = True
                    idle = not self._work.wait(self.HEARTBEAT_INTERVAL)
                    self._writer_idle = False
                if self._stopping and (self.failed is not None or self.seq == self.committed):
                    return
            if idle and self.seq == self.committed:
                self._heartbeat()
                continue
            with self.lock:
                self._draining = True   # no group is cut in two
                while self._groups:
                    self._work.wait()
                self._draining = False
                self._drained.notify_all()
                records, fresh, purged = self._records, self._fresh, self._purged
                self._records, self._fresh, self._purged = {}, set(), []
                upto = self.seq
            try:
                if records or purged:
                    self._commit(purged, records)
            except sqlite3.Error as exc:
                now = time.monotonic()
                with self.lock:
                    self._requeue(records, fresh, purged)
                    first = self.failed is None
                    self.failed = str(exc)
                    holding = [c for c in self._holding if c.barrier > self.committed]
                    self._holding.clear()
                    self._committed_cv.notify_all()
                if first or now - last_log >= self.FAILURE_LOG_INTERVAL:
                    last_log = now
                    _log.error("Cannot write %s: %s. QoS 1/2 messages are refused until it "
                               "can be written again; QoS 0 keeps flowing", self.path, exc)
                for conn in holding:   # their acknowledgements would be a lie
                    conn.refuse_unsent()
                retry_at = time.monotonic() + self.RETRY_INTERVAL
                with self.lock:   # new changes wait too: they would fail the same way
                    while not self._stopping and time.monotonic() < retry_at:
                        self._work.wait(retry_at - time.monotonic())
                continue
            self.committed = upto
            with self.lock:
                recovered, self.failed = self.failed, None
                holding = [c for c in self._holding if c.barrier <= upto]
                self._holding.difference_update(holding)
                self._committed_cv.notify_all()
            if recovered is not None:
                _log.warning("Writing %s again; QoS 1/2 messages are accepted", self.path)
            for conn in holding:
                conn.flush()
                session = conn.session   # what queued while its output waited
                if session is not None and session.mqueue and not conn.blocked:
                    session.drain()
                    conn.flush()

    def _heartbeat(self):
        """Idle: note that the broker is alive (sessions online now count as
        disconnected from the last such note after a crash)."""
        try:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('last_alive', ?)",
                            (time.time(),))
        except sqlite3.Error:
            pass   # the next commit reports what is wrong

    def _requeue(self, records, fresh, purged):
        """A failed batch goes back in front of what was recorded since (lock held)."""
        newer, newer_fresh, newer_purged = self._records, self._fresh, self._purged
        for client_id in newer_purged:
            for key in [k for k, row in records.items() if self._client_of(k, row) == client_id]:
                del records[key]
                fresh.discard(key)
        for key, row in newer.items():
            if key in newer_fresh and key not in records:
                fresh.add(key)
            _record_change(records, fresh, key, row)
        self._records, self._fresh = records, fresh
        self._purged = purged + newer_purged

    def _commit(self, purged, records):
        """One transaction: the purged sessions, then every recorded row."""
        upserts, deletes, states = collections.defaultdict(list), \
            collections.defaultdict(list), []
        for key, row in records.items():
            if row is None:
                deletes[key[0]].append(key[1:])
            elif type(row) is _StateChange:
                states.append((row[1], row[2], key[1]))
            else:
                upserts[key[0]].append(row)
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for client_id in purged:
                for sql in _PURGE_SQL:
                    db.execute(sql, (client_id,))
            for kind, keys in deletes.items():
                _write_rows(db, kind, True, keys)
            for kind, rows in upserts.items():
                _write_rows(db, kind, False, rows)
            if states:
                db.executemany(_MESSAGE_STATE_SQL, states)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('last_alive', ?)", (time.time(),))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


###############################################################################
# Messages and sessions #######################################################
###############################################################################

def _wall_deadline(monotonic_deadline, clock=SystemClock):
    """A monotonic deadline as wall-clock time (what a file can keep)."""
    if monotonic_deadline is None:
        return None
    return clock.time() + (monotonic_deadline - clock.monotonic())


def _monotonic_deadline(wall_deadline, clock=SystemClock):
    if wall_deadline is None:
        return None
    return clock.monotonic() + (wall_deadline - clock.time())


class Message:
    """An application message on its way through the broker.

    The encoded PUBLISH header is cached per first byte and protocol, so a
    message sent to many subscribers is encoded once (only the packet id
    differs per client). ``properties`` are the 5.0 properties a broker
    forwards [MQTT-3.3.2-*]; 3.x subscribers never see them.
    """
    __slots__ = ("topic", "payload", "qos", "retain", "sender", "sys", "properties",
                 "expires_at", "_heads", "_encoded_properties", "_now")

    def __init__(self, topic, payload, qos=0, retain=False, sender=None, sys=False,
                 properties=None, clock=SystemClock):
        self.topic, self.payload, self.qos, self.retain = topic, payload, qos, retain
        self.sender, self.sys = sender, sys
        self.properties = properties or None
        expiry = properties.get("message_expiry_interval") if properties else None
        #: time (on the broker's clock) after which it is never delivered [MQTT-3.3.2-5]
        self.expires_at = None
        if expiry is not None:
            self._now = clock.monotonic
            self.expires_at = clock.monotonic() + expiry
        self._heads = {}
        self._encoded_properties = None

    def expired(self, now):
        return self.expires_at is not None and now >= self.expires_at

    @property
    def publisher(self):
        """The client id that published it (a will: its client's; $SYS: None)."""
        return self.sender

    def with_subscription_ids(self, ids):
        """This message for one subscriber whose matching subscriptions have
        these Subscription Identifiers [MQTT-3.3.4-3, -4]: a copy that shares
        everything but its 5.0 properties."""
        copy = Message(self.topic, self.payload, self.qos, self.retain, self.sender, self.sys)
        copy.properties = dict(self.properties or {}, subscription_identifier=list(ids))
        copy.expires_at = self.expires_at
        if self.expires_at is not None:
            copy._now = self._now
        return copy

    def chunks(self, qos, retain=False, dup=False, packet_id=None, v5=False):
        """The PUBLISH packet for one subscriber, as a tuple of bytes to join."""
        first = 0x30 | (0x08 if dup else 0) | qos << 1 | (0x01 if retain else 0)
        key = first | 0x100 if v5 else first
        head = self._heads.get(key)
        if head is None:
            topic = self.topic.encode("utf-8")
            remaining = 2 + len(topic) + (2 if qos else 0) + len(self.payload)
            if v5:
                remaining += len(self.encoded_properties())
            head = (bytes((first,)) + encode_varint(remaining)
                    + len(topic).to_bytes(2, "big") + topic)
            if v5 and not qos and self.expires_at is None:
                head += self._encoded_properties   # the same for every subscriber
            self._heads[key] = head
        if v5:
            props = self._encoded_properties
            if self.expires_at is not None:   # the time left, in the same four bytes [MQTT-3.3.2-6]
                left = max(1, math.ceil(self.expires_at - self._now()))
                props = encode_properties(dict(self.properties, message_expiry_interval=left))
            elif not qos:
                return head, self.payload
            if qos:
                return head, packet_id.to_bytes(2, "big") + props, self.payload
            return head, props, self.payload
        if qos:
            return head, packet_id.to_bytes(2, "big"), self.payload
        return head, self.payload

    def chunks_aliased(self, qos, retain, dup, packet_id, alias, known):
        """The 5.0 PUBLISH for a client that takes Topic Aliases: the topic
        goes as ``alias`` (3.3.2.3.4), empty if the client ``known``s it."""
        first = 0x30 | (0x08 if dup else 0) | qos << 1 | (0x01 if retain else 0)
        key = (first, alias, known)   # subscribers tend to share alias numbers: cache them
        cached = self._heads.get(key) if self.expires_at is None else None
        if cached is None:
            props = dict(self.properties or (), topic_alias=alias)
            if self.expires_at is not None:
                props["message_expiry_interval"] = max(
                    1, math.ceil(self.expires_at - self._now()))
            props = encode_properties(props)
            topic = b"" if known else self.topic.encode("utf-8")
            remaining = 2 + len(topic) + (2 if qos else 0) + len(props) + len(self.payload)
            head = (bytes((first,)) + encode_varint(remaining) + len(topic).to_bytes(2, "big")
                    + topic)
            cached = (head, props) if qos else (head + props, None)
            if self.expires_at is None:
                self._heads[key] = cached
        head, props = cached
        if qos:
            return head, packet_id.to_bytes(2, "big") + props, self.payload
        return head, self.payload

    def row(self, mid, client_id, qos, retain, packet_id, state, clock=SystemClock):
        """This message, queued or in flight for a persistent session, as the
        Store's messages table keeps it (expiry as wall-clock time)."""
        return (mid, client_id, self.topic, self.payload, qos, int(retain),
                self.encoded_properties() if self.properties else None,
                _wall_deadline(self.expires_at, clock), self.sender, packet_id, state)

    @classmethod
    def from_row(cls, topic, payload, qos, retain, properties, expires_at, sender,
                 clock=SystemClock):
        """A message read back from the Store."""
        props = decode_properties(properties, 0, PUBLISH)[0] if properties else None
        msg = cls(topic, bytes(payload), qos, bool(retain), sender, False, props, clock)
        msg.expires_at = _monotonic_deadline(expires_at, clock)
        return msg

    def encoded_properties(self):
        """The 5.0 property length and properties, encoded once."""
        if self._encoded_properties is None:
            self._encoded_properties = encode_properties(self.properties)
        return self._encoded_properties

    def size(self, qos, v5):
        """The size of this message's PUBLISH packet, fixed header included."""
        remaining = 2 + len(self.topic.encode("utf-8")) + (2 if qos else 0) + len(self.payload)
        if v5:
            remaining += len(self.encoded_properties())
        return 1 + len(encode_varint(remaining)) + remaining


class FlowControl:
    """Publisher flow control: a consuming client's full queue paces the QoS
    1/2 publishers that feed it.

    A client that consumes more slowly than QoS 1/2 publishers publish would
    otherwise see its queue overflow and lose the oldest messages. Instead,
    while its queue is at ``high`` or more, the PUBACK/PUBREC of the
    publishers feeding it are held, in order [MQTT-4.6.0-2, -3], so that their
    own inflight windows pace them; they are released once the queue is back
    to ``high // 2``. A client that is offline, not reading (its connection
    is ``blocked``) or has acknowledged nothing for ``timeout`` holds nobody
    back, and no ack is held longer than ``timeout``.

    The rules live here; the state stays under its owner's lock: a session's
    ``waiters`` (publisher connections to release) under ``Session.lock``; a
    publisher connection's ``held`` acks, the ``waiting_on`` sessions and
    ``held_since`` under its ``out_lock``. The entries: ``congested`` while
    routing (Batch), ``settle`` after a session's queue or connection changed
    (Session), ``send_ack`` for a publisher's ack (Connection) and ``expire``
    (the service thread). No lock is held when any of them is called.
    """

    def __init__(self, settings, clock=SystemClock):
        self.now = clock.monotonic
        self.holding = set()   # publishers with acks held (added and removed under their out_lock)
        self.timeout = settings["flow_control_timeout"]
        mark = max(2 * settings["max_inflight"], 64)
        if settings["max_mqueue_len"]:
            mark = min(mark, max(1, settings["max_mqueue_len"] // 2))
        self.high = mark if self.timeout else float("inf")   # "never" when off

    def congested(self, session):
        """True while publishers feeding ``session`` should wait. Read without
        the session's lock: a hint (see the lock table)."""
        conn = session.conn
        return (conn is not None and len(session.mqueue) >= self.high and not conn.blocked
                and self.now() - session.last_ack < self.timeout)

    def send_ack(self, publisher, data, congested):
        """Send a publisher's PUBACK/PUBREC ``data``, or hold it behind the
        acks already held while a session of ``congested`` (those the
        publisher's batch fed, emptied here) is still over the mark."""
        if congested:
            with publisher.out_lock:
                if publisher.waiting_on:
                    publisher.waiting_on.update(congested)
                else:
                    publisher.waiting_on = set(congested)
            for session in congested:
                with session.lock:
                    waits = self.congested(session)
                    if waits:
                        if session.waiters is None:
                            session.waiters = set()
                        session.waiters.add(publisher)
                if not waits:
                    self.release(publisher, session)
            congested.clear()
        with publisher.out_lock:
            if publisher.waiting_on or publisher.held:
                if not publisher.held:
                    publisher.held_since = self.now()
                    self.holding.add(publisher)
                publisher.held.append(data)
            else:
                publisher.write_locked((data,), flush=False)

    def release(self, publisher, session=None):
        """Send a publisher's held acks once no session is left to wait for
        (``session=None``: whatever it waits for, the timeout case)."""
        with publisher.out_lock:
            if session is None:
                publisher.waiting_on = ()
            elif publisher.waiting_on:
                publisher.waiting_on.discard(session)
            if publisher.waiting_on or not publisher.held:
                return
            held, publisher.held, publisher.held_since = publisher.held, [], None
            self.holding.discard(publisher)
            publisher.write_locked(held, flush=True)

    def settle(self, session):
        """Release the publishers waiting on ``session`` once its queue is
        back to half the mark, or it went offline."""
        if not session.waiters:
            # Read without the lock: a waiter added after this session's last
            # change found it as it is now, and the next change settles it.
            return
        with session.lock:
            waiters = session.waiters
            if not waiters or (session.conn is not None
                               and len(session.mqueue) > self.high // 2):
                return
            session.waiters = None
        for publisher in waiters:
            self.release(publisher, session)

    def expire(self, publisher, now):
        """Service thread, for each of ``holding``: no ack is held longer
        than ``timeout``."""
        with publisher.out_lock:
            held_since = publisher.held_since
            if held_since is None or publisher._closed:
                self.holding.discard(publisher)
                return
        if now - held_since > self.timeout:
            self.release(publisher)


class Batch:
    """Deliveries one thread has routed but not yet handed to their sessions.

    A reader routes every PUBLISH of one recv into its Batch; ``run()`` then
    takes each target session's lock once for all of its messages (in the
    order they were routed [MQTT-4.6.0-6]) and writes each touched connection
    once. Other callers (REST, wills, $SYS) make a Batch per message. A Batch
    belongs to one thread.

    With durable state, what ``run()`` records for persistent sessions (their
    queued and inflight messages, and the inbound QoS 2 ids in ``rels``) is
    committed as one group: a crash keeps all of it or none, so a QoS 2
    PUBLISH is never known as received without its deliveries, or delivered
    without being known as received.
    """
    __slots__ = ("deliveries", "touched", "congested", "rels", "store")

    def __init__(self):
        self.deliveries = {}   # Session -> [(msg, qos, retain), ...]
        self.touched = set()   # Connections appended to, to flush
        self.congested = None  # Sessions a QoS 1/2 message went to that are over the mark (a set)
        self.rels = []         # (Session, packet id): inbound QoS 2 ids to write
        self.store = None      # the Store, once a persistent session is in the batch

    def add(self, session, msg, qos, retain=False):
        if qos and session.store is not None:   # QoS 0 is never written
            self.store = session.store
        if qos and not retain and session.core.flow.congested(session):
            if self.congested is None:
                self.congested = set()
            self.congested.add(session)
        items = self.deliveries.get(session)
        if items is None:
            self.deliveries[session] = [(msg, qos, retain)]
        else:
            items.append((msg, qos, retain))

    def run(self):
        store = self.store
        if store is not None:
            self.store = None
            store.begin_group()
        try:
            if self.deliveries:
                deliveries, self.deliveries = self.deliveries, {}
                for session, items in deliveries.items():
                    session.deliver(items, self.touched)
            if self.rels:
                rels, self.rels = self.rels, []
                for session, packet_id in rels:
                    session.record_rel(packet_id)
        finally:
            if store is not None:
                store.end_group()
        if self.touched:
            for conn in self.touched:
                conn.flush()
                session = conn.session
                if session is not None and session.mqueue and not conn.blocked:
                    session.drain()   # queued while its buffer was full; now it is not
                    conn.flush()
            self.touched.clear()


class TopicAliases:
    """Topic aliases from the broker to one 5.0 connection: the most recently
    used topics keep their alias; a new topic takes a free alias, or the
    least recently used one's (a client must accept a remapped alias,
    3.3.2.3.4). Guarded by the owning Session's lock."""
    __slots__ = ("maximum", "by_topic")

    def __init__(self, maximum):
        self.maximum = maximum
        self.by_topic = collections.OrderedDict()   # topic -> alias, least recent first

    def alias(self, topic):
        """-> (alias, known): known means the client has this topic under it."""
        by_topic = self.by_topic
        alias = by_topic.get(topic)
        if alias is not None:
            by_topic.move_to_end(topic)
            return alias, True
        if len(by_topic) < self.maximum:
            alias = len(by_topic) + 1
        else:
            alias = by_topic.popitem(last=False)[1]
        by_topic[topic] = alias
        return alias, False


class Session:
    """The state MQTT keeps for a client id (3.1.2.4), online or offline.

    Every attribute but ``client_id`` is guarded by ``self.lock``. Methods
    append to the client's buffer under that lock and never send: ``deliver``
    adds the connection to the caller's set to flush, the others return it
    (or None) for the caller to flush after releasing every lock.

    A persistent session of a broker with a data directory (``store``)
    records every change of its QoS 1/2 state in the Store. A QoS 2 PUBLISH
    (and a PUBREL) leaves only once its row is on disk: sent earlier, a crash
    could leave the client holding a message the restarted broker would send
    again as new. A QoS 1 PUBLISH leaves at once: a crash before its row is
    written at worst delivers it twice, which QoS 1 allows, and a PUBACK that
    comes before the commit cancels the row without any write.
    """

    __slots__ = ("core", "client_id", "clean_session", "lock", "conn", "subscriptions",
                 "inflight", "awaiting_rel", "mqueue", "mqueue_dropped", "deliver_msg",
                 "enqueue_msg", "_next_id", "created_at", "disconnected_at", "last_ack",
                 "waiters", "expiry_interval", "v5", "window", "max_packet", "aliases",
                 "store", "seq")

    def __init__(self, core, client_id, clean_session):
        self.core = core
        self.client_id = client_id
        self.clean_session = clean_session
        #: guards everything below, and the ``conn`` pointer
        self.lock = threading.Lock()
        self.conn = None
        self.subscriptions = {}          # filter as subscribed -> granted QoS
        self.inflight = {}               # packet id -> [msg, qos, state, sent_at, mid], in send order
        self.awaiting_rel = {}           # packet id of an inbound QoS 2 PUBLISH -> received_at
        self.mqueue = collections.deque()  # (msg, qos, retain, mid) waiting to be sent
        self.mqueue_dropped = 0
        self.deliver_msg = 0             # PUBLISH packets handed to the client
        self.enqueue_msg = 0             # messages put in the queue
        self._next_id = 0
        self.created_at = core.wall()
        self.disconnected_at = None      # set while a persistent session is offline
        self.last_ack = core.now()       # when the client last acknowledged anything
        self.waiters = None              # publishers whose acks wait for this queue (FlowControl)
        self.expiry_interval = None      # 5.0 Session Expiry Interval; None: 3.x rules
        # What the connected client allows, set by attach():
        self.v5 = False                  # it speaks 5.0 (PUBLISH carries properties)
        self.window = core.settings["max_inflight"]   # QoS 1/2 in flight: min(ours, its Receive Maximum)
        self.max_packet = 0              # its Maximum Packet Size (0: no limit)
        self.aliases = None              # TopicAliases toward it, if it takes them
        # On disk (a persistent session of a broker with a data directory):
        self.store = None                # the Store keeping its rows, or None
        self.seq = 0                     # the Store's number of its last change
        # ``mid`` above: its QoS 1/2 messages' row ids there (None: not stored)

    # --- delivery (called by any thread routing a message) -----------------
    def deliver(self, items, touched):
        """Send or queue messages, [(msg, qos, retain), ...], in order, under
        one lock round trip. A connection written to is added to ``touched``
        for the caller to flush. A slow client (its buffer over max_outbuf)
        has QoS 0 dropped and QoS 1/2 queued; so has a full inflight window."""
        max_outbuf = self.core.settings["max_outbuf"]
        chunks = []
        barrier = 0
        with self.lock:
            conn, max_inflight, max_packet = self.conn, self.window, self.max_packet
            for msg, qos, retain in items:
                if msg.expires_at is not None and msg.expired(self.core.now()):
                    self.core.counts()["messages/dropped"] += 1
                elif conn is None:
                    self._enqueue_locked(msg, qos, retain)
                elif max_packet and msg.size(qos, self.v5) > max_packet:
                    self.core.counts()["messages/dropped"] += 1   # too large for it [MQTT-3.1.2-25]
                elif conn.out_bytes >= max_outbuf:
                    if qos:
                        self._enqueue_locked(msg, qos, retain)
                    else:
                        self.core.counts()["messages/dropped"] += 1
                elif qos and (self.mqueue or len(self.inflight) >= max_inflight):
                    self._enqueue_locked(msg, qos, retain)
                else:
                    chunks.extend(self._publish_chunks_locked(msg, qos, retain))
                    if qos == 2:
                        barrier = self.seq
            if chunks:
                conn.write(chunks, flush=False, barrier=barrier)
                touched.add(conn)

    def _enqueue_locked(self, msg, qos, retain):
        s = self.core.settings
        if qos == 0 and (self.conn is not None or not s["mqueue_store_qos0"]):
            self.core.counts()["messages/dropped"] += 1
            return
        limit = s["max_mqueue_len"]
        if limit and len(self.mqueue) >= limit:
            self._forget_locked(self.mqueue.popleft()[3])  # EMQ X drops the oldest message
            self.mqueue_dropped += 1
            self.core.counts()["messages/dropped"] += 1
        mid = None
        if self.store is not None and qos:   # QoS 0 is never written
            mid = self._store_message_locked(msg, qos, retain, None, None)
        self.mqueue.append((msg, qos, retain, mid))
        self.enqueue_msg += 1

    def _store_message_locked(self, msg, qos, retain, packet_id, state):
        """Write a new row for a queued (no packet id) or inflight message; its id."""
        mid = self.store.next_mid()
        self.seq = self.store.put(("msg", mid), msg.row(mid, self.client_id, qos, retain,
                                                        packet_id, state, self.core.clock),
                                  new=True)
        return mid

    def _forget_locked(self, mid):
        """A stored message is done with (acknowledged, expired or dropped)."""
        if mid is not None and self.store is not None:
            self.seq = self.store.delete(("msg", mid))

    def _save_locked(self):
        """Write this session's row: expiry settings and clock."""
        disconnected = self.disconnected_at
        if disconnected is not None:
            disconnected = self.core.wall() - (self.core.now() - disconnected)
        self.seq = self.store.put(("session", self.client_id), (
            self.client_id, self.expiry_interval, self.created_at, disconnected))

    def keep(self, store):
        """Keep this session on disk with ``store`` from now on (it is
        persistent), or, with None, no longer (its rows go)."""
        with self.lock:
            if store is None:
                if self.store is not None:
                    self.seq = self.store.purge(self.client_id)
                    self.store = None
                return
            self.store = store
            self._save_locked()

    def _publish_chunks_locked(self, msg, qos, retain, dup=False, packet_id=None, mid=None):
        """One PUBLISH for this session's client: assigns the packet id and
        records QoS 1/2 in the inflight window (and on disk: a new row, or
        the queued row ``mid`` gets its packet id); returns the bytes to write."""
        if qos and packet_id is None:
            packet_id = self._packet_id_locked()
            if self.store is None:
                pass
            elif mid is None:
                mid = self._store_message_locked(msg, qos, retain, packet_id, WAIT_ACK)
            else:   # a queued row gets its packet id
                self.seq = self.store.message_state(self.client_id, mid, packet_id, WAIT_ACK)
            self.inflight[packet_id] = [msg, qos, WAIT_ACK, self.core.now(), mid]
        self.deliver_msg += 1
        core = self.core
        if not msg.sys:   # $SYS messages are not counted (EMQ X)
            counts = core.counts()
            counts["packets/publish/sent"] += 1
            counts[_QOS_SENT[qos]] += 1
        aliases = self.aliases
        if aliases is not None:
            chunks = msg.chunks_aliased(qos, retain, dup, packet_id, *aliases.alias(msg.topic))
        else:
            chunks = msg.chunks(qos, retain, dup, packet_id, self.v5)
        if core.observed:   # the journal is on, or a test injected faults
            conn = self.conn
            if conn is not None and conn.faults is not None and conn._faulted(PUBLISH, chunks):
                return ()   # as if lost on the way: its retry (inflight) runs as usual
            journal = self.core.journal
            if journal is not None:
                journal.record(self.client_id, "out", PUBLISH, (msg, qos, retain, dup, packet_id))
        return chunks

    def _send_publish_locked(self, conn, msg, qos, retain, dup=False, packet_id=None,
                             mid=None):
        """Append one PUBLISH to ``conn``'s buffer (the caller flushes). For
        a persistent session, a QoS 2 one leaves once its row is on disk (see
        the class docstring)."""
        chunks = self._publish_chunks_locked(msg, qos, retain, dup, packet_id, mid)
        conn.write(chunks, flush=False, barrier=self.seq if qos == 2 else 0)

    def _packet_id_locked(self):
        """Next free packet id, skipping ids still in flight [MQTT-2.3.1-2]."""
        while True:
            self._next_id = self._next_id % MAX_PACKET_ID + 1
            if self._next_id not in self.inflight:
                return self._next_id

    def _drain_locked(self):
        """Move queued messages to the client while the window and buffer allow."""
        conn = self.conn
        if conn is None or not self.mqueue:
            return None
        max_outbuf = self.core.settings["max_outbuf"]
        sent = False
        while self.mqueue and conn.out_bytes < max_outbuf:
            msg, qos, retain, mid = self.mqueue[0]
            if qos and len(self.inflight) >= self.window:
                break
            self.mqueue.popleft()
            if msg.expired(self.core.now()) or (
                    self.max_packet and msg.size(qos, self.v5) > self.max_packet):
                self.core.counts()["messages/dropped"] += 1
                self._forget_locked(mid)
                continue
            self._send_publish_locked(conn, msg, qos, retain, mid=mid)
            sent = True
        return conn if sent else None

    def drain(self):
        with self.lock:
            conn = self._drain_locked()
        self.core.flow.settle(self)
        return conn

    # --- connection lifecycle ---------------------------------------------
    def attach(self, conn):
        """Bind a freshly connected client: resend the inflight window in order
        with DUP set [MQTT-4.4.0-1], then the queue. Called by BrokerCore.attach,
        which decides whether ``conn`` still owns the client id."""
        with self.lock:
            self.conn = conn
            self.disconnected_at = None
            if self.store is not None:
                self._save_locked()   # online: its expiry clock stops
            self.v5 = conn.proto_ver == MQTT_V5
            self.window = min(self.core.settings["max_inflight"], conn.receive_maximum)
            self.max_packet = conn.max_packet_out
            # A new connection starts with no aliases [MQTT-3.3.2-7].
            self.aliases = TopicAliases(conn.alias_max_out) if conn.alias_max_out else None
            now = self.core.now()
            for packet_id, entry in self.inflight.items():
                msg, qos, state = entry[:3]
                entry[3] = now
                if state == WAIT_ACK:
                    self._send_publish_locked(conn, msg, qos, False, True, packet_id)
                else:
                    conn.send_ack(PUBREL, packet_id, barrier=self.seq)
            self._drain_locked()

    def detach(self, conn):
        """The client went away; keep state only if this is still its session."""
        with self.lock:
            if self.conn is not conn:
                return
            self.conn = None
            self.disconnected_at = self.core.now()
            if self.store is not None:
                self._save_locked()   # its expiry clock starts
        self.core.flow.settle(self)

    # --- acknowledgements from the client -----------------------------------
    def puback(self, packet_id):
        """PUBACK for a QoS 1 message (4.3.2). Returns a Connection to flush or None."""
        return self._complete(packet_id, 1, "packets/puback/missed")

    def pubrec(self, packet_id):
        """PUBREC for a QoS 2 message: answer PUBREL (4.3.3). Returns True if known."""
        with self.lock:
            entry = self.inflight.get(packet_id)
            if entry is None or entry[1] != 2:
                self.core.counts()["packets/pubrec/missed"] += 1
                return False
            entry[2], entry[3] = WAIT_COMP, self.core.now()
            self.last_ack = entry[3]
            if self.store is not None and entry[4] is not None:   # before PUBREL leaves
                self.seq = self.store.message_state(self.client_id, entry[4], packet_id,
                                                    WAIT_COMP)
            return True

    def pubcomp(self, packet_id, refused=False):
        """PUBCOMP for a QoS 2 message that had its PUBREC (4.3.3); or, with
        ``refused``, a 5.0 PUBREC with an error code, which ends it too."""
        return self._complete(packet_id, 2, "packets/pubcomp/missed", refused)

    def _complete(self, packet_id, qos, missed, refused=False):
        """The last ack of an outbound QoS ``qos`` message: free its slot in
        the window, then send what the queue holds. Returns a Connection to
        flush or None."""
        with self.lock:
            entry = self.inflight.get(packet_id)
            if entry is None or entry[1] != qos or (qos == 2 and entry[2] != WAIT_COMP
                                                    and not refused):
                self.core.counts()[missed] += 1
                return None
            del self.inflight[packet_id]
            self._forget_locked(entry[4])
            self.last_ack = self.core.now()
            conn = self._drain_locked()
        self.core.flow.settle(self)
        return conn

    def change_expiry(self, expiry_interval):
        """5.0 DISCONNECT's new Session Expiry Interval; False if the session
        had 0, which may not change [MQTT-3.14.2-2]."""
        with self.lock:
            if self.expiry_interval == 0 and expiry_interval:
                return False
            self.expiry_interval = expiry_interval
            self.clean_session = expiry_interval == 0
            if self.store is not None and not self.clean_session:
                self._save_locked()   # (one that became clean goes when its connection does)
            return True

    # --- inbound QoS 2 (the client publishes) -------------------------------
    def await_rel(self, packet_id):
        """Record an inbound QoS 2 id. Returns 'new', 'dup' (already routed) or 'full'."""
        with self.lock:
            if packet_id in self.awaiting_rel:
                return "dup"
            limit = self.core.settings["max_awaiting_rel"]
            if limit and len(self.awaiting_rel) >= limit:
                return "full"
            self.awaiting_rel[packet_id] = self.core.now()
            return "new"   # the caller's Batch writes it with the message's deliveries

    def record_rel(self, packet_id):
        """Write an inbound QoS 2 id (Batch.run, in the group of its deliveries)."""
        with self.lock:
            if self.store is not None and packet_id in self.awaiting_rel:
                self.seq = self.store.put(("rel", self.client_id, packet_id),
                                          (self.client_id, packet_id, self.core.wall()),
                                          new=True)

    def release(self, packet_id):
        """PUBREL: forget the id [MQTT-4.3.3-?]. Returns False if it was unknown."""
        with self.lock:
            known = self.awaiting_rel.pop(packet_id, None) is not None
            if known and self.store is not None:   # on disk before PUBCOMP leaves
                self.seq = self.store.delete(("rel", self.client_id, packet_id))
            return known

    # --- timers (service thread) --------------------------------------------
    def retry(self, now):
        """Resend PUBLISH (DUP) / PUBREL older than retry_interval; expire old
        awaiting-PUBREL ids. Returns a Connection to flush or None."""
        s = self.core.settings
        with self.lock:
            if self.awaiting_rel:
                deadline = now - s["await_rel_timeout"]
                for packet_id in [p for p, t in self.awaiting_rel.items() if t <= deadline]:
                    del self.awaiting_rel[packet_id]
                    if self.store is not None:
                        self.seq = self.store.delete(("rel", self.client_id, packet_id))
            conn = self.conn
            if conn is None or not self.inflight or (conn.faults is not None
                                                     and conn.faults.frozen()):
                return None   # (a frozen client gets its messages once, at the thaw)
            deadline = now - s["retry_interval"]
            resent = False
            for packet_id, entry in self.inflight.items():
                msg, qos, state, sent_at = entry[:4]
                if sent_at > deadline:
                    continue
                entry[3] = now
                resent = True
                if state == WAIT_ACK:
                    self._send_publish_locked(conn, msg, qos, False, True, packet_id)
                else:
                    conn.send_ack(PUBREL, packet_id, barrier=self.seq)
            return conn if resent else None

    # --- reading (REST / Python API) ----------------------------------------
    def info(self):
        with self.lock:
            return {
                "client_id": self.client_id,
                "clean_sess": self.clean_session,
                "connected": self.conn is not None,
                "subscriptions": len(self.subscriptions),
                "max_inflight": self.window,
                "inflight_len": len(self.inflight),
                "mqueue_len": len(self.mqueue),
                "mqueue_dropped": self.mqueue_dropped,
                "awaiting_rel_len": len(self.awaiting_rel),
                "awaiting_ack": sum(1 for e in self.inflight.values() if e[2] == WAIT_ACK),
                "awaiting_comp": sum(1 for e in self.inflight.values() if e[2] == WAIT_COMP),
                "deliver_msg": self.deliver_msg,
                "enqueue_msg": self.enqueue_msg,
                "created_at": self.created_at,
                "expiry_interval": (self.core.settings["session_expiry_interval"]
                                    if self.expiry_interval is None else self.expiry_interval),
            }


###############################################################################
# Authentication ##############################################################
###############################################################################

class UserTable:
    """Name -> password table; used for the dashboard (REST) users and the MQTT
    auth plugins.

    A password is kept only as a salted PBKDF2-SHA256 hash that carries its
    own parameters (``pbkdf2_sha256$<iterations>$<salt>$<hash>``, base64), and
    is compared in constant time. A hash made with fewer iterations than the
    table's is made again at the next successful check. An unknown name costs
    one hash too, so timing does not tell which names exist.

    A successful check is remembered for ``VERIFIED_TTL`` seconds under a
    keyed hash of the name and password (the key never leaves the process),
    so a client that sends its credentials with every request pays the hash
    once; a user's entries are dropped when the password changes or the user
    is deleted.
    """
    VERIFIED_TTL = 120.0     # seconds a verified (name, password) is remembered
    VERIFIED_MAX = 1024      # remembered pairs at most (the oldest go first)

    def __init__(self, users=None, tags="", iterations=4096):
        self.iterations = iterations
        #: guards _users and _verified (only Store.lock is taken under it)
        self.lock = threading.Lock()
        self._users = {}      # name -> [encoded hash, tags]
        self._verified = {}   # keyed hash of (name, password) -> (name, expires)
        self._cache_key = os.urandom(32)
        self._nobody = None   # the hash an unknown name is checked against (made when needed)
        #: f(name, [hash, tags] or None): told of every change, in order, with
        #: ``lock`` held (the Store records it; its lock comes after this one)
        self.on_change = None
        for name, password in (users or {}).items():
            self.add(name, password, tags)

    def _changed_locked(self, name, record):
        if self.on_change is not None:
            self.on_change(name, None if record is None else list(record))

    def rows(self):
        """[(name, hash, tags)] of every user."""
        with self.lock:
            return [(name, r[0], r[1]) for name, r in self._users.items()]

    def load(self, rows):
        """Replace every user with stored (name, hash, tags) rows."""
        for _, encoded, _ in rows:
            self._parse(encoded)
        with self.lock:
            self._users = {name: [encoded, tags] for name, encoded, tags in rows}
            self._verified.clear()

    # --- hashes ----------------------------------------------------------------
    def _encode(self, password, salt=None):
        salt = salt or os.urandom(16)
        digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, self.iterations)
        return "pbkdf2_sha256$%d$%s$%s" % (self.iterations, base64.b64encode(salt).decode(),
                                           base64.b64encode(digest).decode())

    @staticmethod
    def _parse(encoded):
        """'pbkdf2_sha256$N$salt$hash' -> (N, salt, hash); ValueError if malformed."""
        scheme, iterations, salt, digest = encoded.split("$")
        if scheme != "pbkdf2_sha256" or not iterations.isdigit() or int(iterations) < 1:
            raise ValueError("not a pbkdf2_sha256 hash: %r" % encoded)
        return int(iterations), base64.b64decode(salt, validate=True), \
            base64.b64decode(digest, validate=True)

    @classmethod
    def _matches(cls, encoded, password):
        iterations, salt, digest = cls._parse(encoded)
        return hmac.compare_digest(
            digest, hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations))

    def _cache_id(self, name, password):
        return hmac.new(self._cache_key, name.encode("utf-8") + b"\0" + password.encode("utf-8"),
                        "sha256").digest()

    def _forget_locked(self, name):
        for key in [k for k, (n, _) in self._verified.items() if n == name]:
            del self._verified[key]

    # --- the table -----------------------------------------------------------------
    def add(self, name, password, tags=""):
        """Add a user; False if the name is taken."""
        record = [self._encode(password), tags]
        with self.lock:
            if name in self._users:
                return False
            self._users[name] = record
            self._changed_locked(name, record)
        return True

    def import_hash(self, name, encoded, tags=""):
        """Add or replace a user from a stored hash (``password_hash()``'s format)."""
        self._parse(encoded)
        with self.lock:
            self._users[name] = [encoded, tags]
            self._forget_locked(name)
            self._changed_locked(name, (encoded, tags))

    def password_hash(self, name):
        """The stored hash of a user's password, or None."""
        with self.lock:
            record = self._users.get(name)
        return None if record is None else record[0]

    def cached(self, name, password):
        """True if this name and password were verified a moment ago (no hashing)."""
        key = self._cache_id(name, password)
        with self.lock:
            hit = self._verified.get(key)
        return hit is not None and hit[1] > time.monotonic()

    def check(self, name, password):
        """True if the password is right, False if wrong, None if no such user."""
        if isinstance(password, bytes):
            try:
                password = password.decode("utf-8")
            except UnicodeDecodeError:
                return False
        key = self._cache_id(name, password)
        now = time.monotonic()
        with self.lock:
            hit = self._verified.get(key)
            if hit is not None and hit[1] > now:
                return True
            record = self._users.get(name)
        if record is not None:
            encoded = record[0]
        else:
            encoded = self._nobody = self._nobody or self._encode(secrets.token_hex(16))
        right = self._matches(encoded, password)
        if record is None:
            return None
        if not right:
            return False
        upgraded = self._encode(password) if self._parse(encoded)[0] < self.iterations else None
        with self.lock:
            if self._users.get(name) is record and record[0] == encoded:
                if upgraded is not None:
                    record[0] = upgraded
                    self._changed_locked(name, record)
                if len(self._verified) >= self.VERIFIED_MAX:
                    self._verified.pop(next(iter(self._verified)))
                self._verified[key] = (name, now + self.VERIFIED_TTL)
        return True

    def set_password(self, name, password):
        encoded = self._encode(password)
        with self.lock:
            record = self._users.get(name)
            if record is None:
                return False
            record[0] = encoded
            self._forget_locked(name)
            self._changed_locked(name, record)
        return True

    def set_tags(self, name, tags):
        with self.lock:
            record = self._users.get(name)
            if record is None:
                return False
            record[1] = tags
            self._changed_locked(name, record)
        return True

    def delete(self, name):
        with self.lock:
            self._forget_locked(name)
            known = self._users.pop(name, None) is not None
            if known:
                self._changed_locked(name, None)
        return known

    def get(self, name):
        with self.lock:
            record = self._users.get(name)
        return None if record is None else {"username": name, "tags": record[1]}

    def list(self):
        with self.lock:
            return [{"username": n, "tags": r[1]} for n, r in self._users.items()]

    def __contains__(self, name):
        with self.lock:
            return name in self._users


###############################################################################
# ACL files ###################################################################
###############################################################################
#
# acl.conf's Erlang terms become ACL rules, checked as emqttd_access_rule does.

# --- ACL (acl.conf) -----------------------------------------------------------

#: EMQ X 2.x's default etc/acl.conf
DEFAULT_ACL = """\
%% Allow the "dashboard" user to subscribe to $SYS/#
{allow, {user, "dashboard"}, subscribe, ["$SYS/#"]}.

%% Allow clients from 127.0.0.1 to publish and subscribe to $SYS/# and #
{allow, {ipaddr, "127.0.0.1"}, pubsub, ["$SYS/#", "#"]}.

%% Deny everyone else subscribing to $SYS/# and to exactly "#"
{deny, all, subscribe, ["$SYS/#", {eq, "#"}]}.

%% Allow anything else
{allow, all}.
"""

ACL_ACTIONS = ("publish", "subscribe", "pubsub")
_ACL_TOKEN = re.compile(r"""\s+ | %[^\n]*             # skipped: whitespace, comments
                           | "(?:[^"\\]|\\.)*"         # string
                           | '(?:[^'\\]|\\.)*' | [a-z][A-Za-z0-9_@]*   # atom
                           | [{}\[\],.]""", re.X)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "s": " ", "e": "\x1b"}


class _Atom(str):
    """An Erlang atom (a plain str is an Erlang string)."""


def _acl_tokens(text, filename):
    """Yield (kind, value, line): kind is atom, string, one of {}[],. or eof."""
    pos, line = 0, 1
    while pos < len(text):
        m = _ACL_TOKEN.match(text, pos)
        if not m:
            what = "unterminated quote" if text[pos] in "\"'" else "unexpected %r" % text[pos]
            raise ConfigError("%s:%d: %s" % (filename, line, what))
        tok = m[0]
        if tok[0] in "\"'":
            body = re.sub(r"\\(.)", lambda e: _ESCAPES.get(e[1], e[1]), tok[1:-1], flags=re.S)
            yield ("string" if tok[0] == '"' else "atom"), body, line
        elif tok[0].isalpha():
            yield "atom", tok, line
        elif tok[0] in "{}[],.":
            yield tok, tok, line
        line, pos = line + tok.count("\n"), m.end()
    yield "eof", None, line


def _acl_terms(text, filename):
    """Yield (line, term) for each ``Term.``: tuples, lists, str and _Atom."""
    tokens = list(_acl_tokens(text, filename))
    pos = 0

    def take(*kinds):
        nonlocal pos
        kind, value, line = tokens[pos]
        if kind not in kinds:
            got = "end of file" if kind == "eof" else repr(value)
            raise ConfigError("%s:%d: expected %s, got %s"
                              % (filename, line, " or ".join(kinds), got))
        pos += 1
        return kind, value

    def term():
        kind, value = take("atom", "string", "{", "[")
        if kind in ("atom", "string"):
            return _Atom(value) if kind == "atom" else value
        close, items = "}" if kind == "{" else "]", []
        if tokens[pos][0] != close:
            items.append(term())
            while take(",", close)[0] == ",":
                items.append(term())
        else:
            take(close)
        return tuple(items) if kind == "{" else items

    while tokens[pos][0] != "eof":
        line = tokens[pos][2]
        value = term()
        take(".")
        yield line, value


def _acl_who(term):
    """all | {user, U} | {client, C} | {ipaddr, CIDR} | {'and'|'or', [Who]} -> compiled tuple."""
    if term == "all" and isinstance(term, _Atom):
        return ("all",)
    if isinstance(term, tuple) and len(term) == 2 and isinstance(term[0], _Atom):
        kind, arg = term
        if kind in ("user", "client") and isinstance(arg, _Atom) and arg == "all":
            return ("all",)
        if kind in ("user", "client") and type(arg) is str:
            return (str(kind), arg)
        if kind == "ipaddr" and type(arg) is str:
            try:
                return ("ipaddr", ipaddress.ip_network(arg, strict=False))
            except ValueError:
                raise ValueError("bad address %r" % arg) from None
        if kind in ("and", "or") and isinstance(arg, list):
            return (str(kind), [_acl_who(t) for t in arg])
    raise ValueError("expected all, {user, U}, {client, C}, {ipaddr, CIDR}, {'and'|'or', [...]}")


def _acl_rule(term):
    """{A, all} | {A, Who, Action, [Topic | {eq, Topic}]} -> (permission, who, action, topics)."""
    if not (isinstance(term, tuple) and len(term) in (2, 4) and term[0] in ("allow", "deny")
            and isinstance(term[0], _Atom)):
        raise ValueError("expected {allow|deny, all} or {allow|deny, Who, Action, Topics}")
    if len(term) == 2:
        if term[1] != "all" or not isinstance(term[1], _Atom):
            raise ValueError("expected {%s, all}" % term[0])
        return str(term[0]), ("all",), "pubsub", None
    permission, who, action, topics = term
    if action not in ACL_ACTIONS or not isinstance(action, _Atom):
        raise ValueError("expected publish, subscribe or pubsub, got %r" % action)
    if not isinstance(topics, list):
        raise ValueError("expected a list of topics")
    compiled = []
    for t in topics:
        if type(t) is str:
            compiled.append(("filter", t))
        elif isinstance(t, tuple) and len(t) == 2 and t[0] == "eq" and type(t[1]) is str:
            compiled.append(("eq", t[1]))
        else:
            raise ValueError("expected a topic string or {eq, Topic}, got %r" % (t,))
    return str(permission), _acl_who(who), str(action), compiled


def parse_acl(text, filename="<string>"):
    """acl.conf text -> [(permission, who, action, topics)] (``topics`` None = any topic).

    ``who`` is ("all",), ("user", name), ("client", id), ("ipaddr", ip_network)
    or ("and"|"or", [who, ...]); ``topics`` is [("filter"|"eq", topic), ...].
    """
    rules = []
    for line, term in _acl_terms(text, filename):
        try:
            rules.append(_acl_rule(term))
        except ValueError as exc:
            raise ConfigError("%s:%d: %s" % (filename, line, exc)) from None
    return rules


@functools.lru_cache(maxsize=1024)
def _peer_address(peer_ip):
    """The client's address as an ip_address (IPv4-mapped IPv6 as IPv4), or None."""
    try:
        addr = ipaddress.ip_address(peer_ip)
    except ValueError:
        return None
    return getattr(addr, "ipv4_mapped", None) or addr


def _acl_who_matches(who, client_id, username, addr):
    """``addr``: the client's address from _peer_address (None never matches ipaddr)."""
    kind = who[0]
    if kind in ("and", "or"):
        results = (_acl_who_matches(w, client_id, username, addr) for w in who[1])
        return all(results) if kind == "and" else any(results)
    if kind == "ipaddr":
        return addr is not None and addr in who[1]
    return kind == "all" or (username if kind == "user" else client_id) == who[1]


def _acl_topic_matches(kind, rule_topic, topic, client_id, username):
    """{eq, T} is compared as a string; %u/%c levels are replaced (None never matches)."""
    if kind == "eq":
        return topic == rule_topic
    values, levels = {"%u": username, "%c": client_id}, []
    for level in rule_topic.split("/"):
        if level in values:
            level = values[level]
            if level is None or re.search(r"[/+#]", level):   # must stay one literal level
                return False
        levels.append(level)
    return topic_matches("/".join(levels), topic)


class Acl:
    """The internal ACL (emqttd_acl_internal): first matching rule wins, else ``nomatch``.

    For subscribe, the subscribed filter is matched as if it were a topic name
    (EMQ X 2.x: rule "#" matches subscription "a/+"; rule "a/b" does not).
    """

    def __init__(self, rules, nomatch="allow"):
        if nomatch not in ("allow", "deny"):
            raise ValueError("nomatch must be allow or deny, got %r" % nomatch)
        self.rules, self.nomatch = list(rules), nomatch

    def check(self, action, topic, client_id, username, ipaddress):
        """True if ``action`` ("publish" or "subscribe") on ``topic`` is allowed."""
        if action not in ("publish", "subscribe"):
            raise ValueError("action must be publish or subscribe, got %r" % action)
        for permission, who, rule_action, topics in self.rules:
            if rule_action not in (action, "pubsub") \
                    or not _acl_who_matches(who, client_id, username, _peer_address(ipaddress)):
                continue
            if topics is None or any(_acl_topic_matches(kind, t, topic, client_id, username)
                                     for kind, t in topics):
                return permission == "allow"
        return self.nomatch == "allow"

    def for_client(self, client_id, username, ipaddress):
        """The rules that can apply to one client, with its decision cache."""
        return ClientAcl(self, client_id, username, ipaddress)


class ClientAcl:
    """One client's view of the ACL: only the rules whose ``who`` matches it,
    and a small cache of decisions (EMQ X's per-client ACL cache, which the
    REST API's ``clean_acl_cache`` empties)."""
    CACHE_SIZE = 32

    def __init__(self, acl, client_id, username, ipaddress):
        self.client_id, self.username = client_id, username
        addr = _peer_address(ipaddress)
        self.rules = [(permission == "allow", action, topics)
                      for permission, who, action, topics in acl.rules
                      if _acl_who_matches(who, client_id, username, addr)]
        self.nomatch = acl.nomatch == "allow"
        self.cache = {}   # (action, topic) -> allowed; only its owner's reader thread fills it

    def check(self, action, topic):
        key = (action, topic)
        allowed = self.cache.get(key)
        if allowed is None:
            allowed = self.nomatch
            for allow, rule_action, topics in self.rules:
                if rule_action in (action, "pubsub") and (topics is None or any(
                        _acl_topic_matches(kind, t, topic, self.client_id, self.username)
                        for kind, t in topics)):
                    allowed = allow
                    break
            if len(self.cache) >= self.CACHE_SIZE:
                self.cache.clear()
            self.cache[key] = allowed
        return allowed


###############################################################################
# Broker core #################################################################
###############################################################################

#: The normative statements a traced packet exercises (``--trace``), per
#: protocol, direction, packet and case; checked against the OASIS texts'
#: appendices of mandatory statements.
SPEC_STATEMENTS = {
    ("3.1.1", "in", "CONNECT", "clean"): ["MQTT-3.1.0-1", "MQTT-3.1.2-6"],
    ("3.1.1", "in", "CONNECT", "persistent"): ["MQTT-3.1.0-1", "MQTT-3.1.2-4"],
    ("3.1.1", "out", "CONNACK", "present"): ["MQTT-3.2.0-1", "MQTT-3.2.2-2"],
    ("3.1.1", "out", "CONNACK", ""): ["MQTT-3.2.0-1", "MQTT-3.2.2-1"],
    ("3.1.1", "in", "PUBLISH", "qos0"): ["MQTT-3.3.4-1", "MQTT-4.5.0-1"],
    ("3.1.1", "in", "PUBLISH", "qos1"): ["MQTT-4.3.2-2", "MQTT-3.3.4-1"],
    ("3.1.1", "in", "PUBLISH", "qos2"): ["MQTT-4.3.3-2", "MQTT-3.3.4-1"],
    ("3.1.1", "in", "PUBLISH", "retain"): ["MQTT-3.3.1-5"],
    ("3.1.1", "in", "PUBLISH", "retain empty"): ["MQTT-3.3.1-10", "MQTT-3.3.1-11"],
    ("3.1.1", "out", "PUBLISH", ""): ["MQTT-3.8.4-6", "MQTT-3.3.1-9"],
    ("3.1.1", "out", "PUBLISH", "retain"): ["MQTT-3.3.1-6", "MQTT-3.3.1-8"],
    ("3.1.1", "out", "PUBLISH", "dup"): ["MQTT-3.3.1-1", "MQTT-4.4.0-1"],
    ("3.1.1", "out", "PUBACK", ""): ["MQTT-4.3.2-2", "MQTT-2.3.1-6"],
    ("3.1.1", "out", "PUBREC", ""): ["MQTT-4.3.3-2", "MQTT-2.3.1-6"],
    ("3.1.1", "in", "PUBREL", ""): ["MQTT-3.6.1-1", "MQTT-4.3.3-2"],
    ("3.1.1", "out", "PUBCOMP", ""): ["MQTT-4.3.3-2"],
    ("3.1.1", "in", "PUBREC", ""): ["MQTT-4.3.3-1"],
    ("3.1.1", "out", "PUBREL", ""): ["MQTT-4.3.3-1", "MQTT-2.3.1-6"],
    ("3.1.1", "in", "PUBACK", ""): ["MQTT-4.3.2-1"],
    ("3.1.1", "in", "PUBCOMP", ""): ["MQTT-4.3.3-1"],
    ("3.1.1", "in", "SUBSCRIBE", ""): ["MQTT-3.8.4-1", "MQTT-3.8.4-4"],
    ("3.1.1", "out", "SUBACK", ""): ["MQTT-3.8.4-2", "MQTT-3.8.4-5"],
    ("3.1.1", "in", "UNSUBSCRIBE", ""): ["MQTT-3.10.4-1", "MQTT-3.10.4-4"],
    ("3.1.1", "out", "UNSUBACK", ""): ["MQTT-3.10.4-4", "MQTT-3.10.4-5"],
    ("3.1.1", "in", "PINGREQ", ""): ["MQTT-3.12.4-1"],
    ("3.1.1", "out", "PINGRESP", ""): ["MQTT-3.12.4-1"],
    ("3.1.1", "in", "DISCONNECT", ""): ["MQTT-3.14.4-3", "MQTT-3.1.2-10"],
    ("5.0", "in", "CONNECT", "clean"): ["MQTT-3.1.0-1", "MQTT-3.1.2-4"],
    ("5.0", "in", "CONNECT", "persistent"): ["MQTT-3.1.0-1", "MQTT-3.1.2-5"],
    ("5.0", "out", "CONNACK", "present"): ["MQTT-3.2.0-1", "MQTT-3.2.2-3"],
    ("5.0", "out", "CONNACK", ""): ["MQTT-3.2.0-1", "MQTT-3.2.2-2"],
    ("5.0", "in", "PUBLISH", "qos0"): ["MQTT-3.3.4-1", "MQTT-4.5.0-1"],
    ("5.0", "in", "PUBLISH", "qos1"): ["MQTT-4.3.2-4", "MQTT-3.3.4-1"],
    ("5.0", "in", "PUBLISH", "qos2"): ["MQTT-4.3.3-8", "MQTT-4.3.3-10"],
    ("5.0", "in", "PUBLISH", "retain"): ["MQTT-3.3.1-5"],
    ("5.0", "in", "PUBLISH", "retain empty"): ["MQTT-3.3.1-6", "MQTT-3.3.1-7"],
    ("5.0", "out", "PUBLISH", ""): ["MQTT-3.8.4-8", "MQTT-3.3.1-12"],
    ("5.0", "out", "PUBLISH", "retain"): ["MQTT-3.3.1-9"],
    ("5.0", "out", "PUBLISH", "dup"): ["MQTT-3.3.1-1", "MQTT-4.4.0-1"],
    ("5.0", "out", "PUBACK", ""): ["MQTT-4.3.2-4", "MQTT-2.2.1-5"],
    ("5.0", "out", "PUBREC", ""): ["MQTT-4.3.3-8", "MQTT-2.2.1-5"],
    ("5.0", "in", "PUBREL", ""): ["MQTT-3.6.1-1", "MQTT-4.3.3-11"],
    ("5.0", "out", "PUBCOMP", ""): ["MQTT-4.3.3-11"],
    ("5.0", "in", "PUBREC", ""): ["MQTT-4.3.3-3"],
    ("5.0", "out", "PUBREL", ""): ["MQTT-4.3.3-4"],
    ("5.0", "in", "PUBACK", ""): ["MQTT-4.3.2-3"],
    ("5.0", "in", "PUBCOMP", ""): ["MQTT-4.3.3-5"],
    ("5.0", "in", "SUBSCRIBE", ""): ["MQTT-3.8.4-1", "MQTT-3.8.4-5"],
    ("5.0", "out", "SUBACK", ""): ["MQTT-3.8.4-2", "MQTT-3.8.4-6"],
    ("5.0", "in", "UNSUBSCRIBE", ""): ["MQTT-3.10.4-1", "MQTT-3.10.4-4"],
    ("5.0", "out", "UNSUBACK", ""): ["MQTT-3.10.4-4", "MQTT-3.10.4-5"],
    ("5.0", "in", "PINGREQ", ""): ["MQTT-3.12.4-1"],
    ("5.0", "out", "PINGRESP", ""): ["MQTT-3.12.4-1"],
    ("5.0", "in", "DISCONNECT", ""): ["MQTT-3.14.4-3", "MQTT-3.1.2-10"],
}


def spec_statements(entry):
    """The normative statements a journal entry's packet exercises."""
    version = "5.0" if entry.get("version") == MQTT_V5 else "3.1.1"
    kind, case = entry["type"], ""
    if kind == "CONNECT":
        case = "clean" if entry.get("clean_session") else "persistent"
    elif kind == "CONNACK":
        case = "present" if entry.get("session_present") else ""
    elif kind == "PUBLISH" and entry["direction"] == "in":
        case = ("retain empty" if not entry["payload"] else "retain") if entry["retain"] \
            else "qos%d" % entry["qos"]
    elif kind == "PUBLISH":
        case = "dup" if entry["dup"] else "retain" if entry["retain"] else ""
    return SPEC_STATEMENTS.get((version, entry["direction"], kind, case), [])


class _Note(list):
    """An inbound journal entry's note list, which knows its entry (so that
    the entry can be traced once its handler has decided)."""
    __slots__ = ("raw",)


class Journal:
    """The last ``size`` packets in and out of the broker, and what it
    decided about them: for a test that failed, a student, or a bug report.

    Recording is a tuple appended to a bounded deque (atomic, no lock); an
    entry becomes a dict only when read. Inbound packets are kept decoded,
    outbound ones as the bytes sent (decoded when read) or, for PUBLISH, as
    the message and its delivery fields. ``note`` lists what the broker
    decided: where a PUBLISH was routed (on its inbound entry), a refusal, a
    drop, a takeover.
    """
    PAYLOAD_PREVIEW = 64   # characters of payload an entry shows

    def __init__(self, size, trace=None):
        self.size = size
        self._entries = collections.deque(maxlen=size or 1)
        self._seq = itertools.count(1)
        #: f(entry, decided) for every entry as it is recorded, and again with
        #: ``decided`` once an inbound packet's handler has noted its decisions
        #: (``--trace``), or None
        self.trace = trace

    def record(self, client_id, direction, packet_type, fields, version=MQTT_V311, note=()):
        """Record one packet with ``note``; an inbound one gets a note list
        to append its handler's decisions to, which is returned."""
        if direction != "in" and self.trace is None:   # the common case, kept cheap
            self._entries.append((next(self._seq), time.time(), client_id, direction,
                                  packet_type, fields, version, note))
            return note
        notes = _Note(note)
        raw = notes.raw = (next(self._seq), time.time(), client_id, direction, packet_type,
                           fields, version, notes)
        self._entries.append(raw)
        if self.trace is not None:
            self.trace(self._entry(raw), False)
        return notes

    def traced(self, note):
        """The inbound packet of ``note`` has been handled: trace what was decided."""
        if self.trace is not None and note:
            self.trace(self._entry(note.raw), True)

    def clear(self):
        self._entries.clear()

    def query(self, client_id=None, type=None, direction=None, topic=None, since_seq=None):
        """The entries that match every given field, in ascending ``seq``
        (``topic``: also a filter with wildcards, for PUBLISH entries)."""
        rows = sorted(list(self._entries), key=lambda e: e[0])
        result = []
        for raw in rows:
            if (since_seq is not None and raw[0] <= since_seq) or (
                    client_id is not None and raw[2] != client_id) or (
                    direction is not None and raw[3] != direction) or (
                    type is not None and str(PACKET_NAMES.get(raw[4], raw[4])).upper()
                    != type.upper()):
                continue
            entry = self._entry(raw)
            if topic is not None and not (entry["topic"] == topic or (
                    raw[4] == PUBLISH and validate_topic_filter(topic)
                    and topic_matches(topic, entry["topic"]))):
                continue
            result.append(entry)
        return result

    def dump(self, path, **query):
        """Write the entries (those of ``query(**query)``) to ``path`` as JSON Lines."""
        with open(path, "w", encoding="utf-8") as f:
            for entry in self.query(**query):
                f.write(json.dumps(entry, separators=(",", ":")) + "\n")

    @staticmethod
    def lines(entries):
        """Entries as readable lines: ``<- PUBLISH c1 t/1 qos=1 id=3 'hi'``."""
        out = []
        for e in entries:
            fields = [e["type"], e["client_id"] or "-"]
            if e["topic"] is not None:
                fields.append(e["topic"])
            for name in ("qos", "packet_id", "reason_code"):
                if e[name] is not None:
                    fields.append("%s=%s" % ({"packet_id": "id"}.get(name, name), e[name]))
            fields += [flag for flag in ("retain", "dup") if e[flag]]
            if e["payload"] is not None:
                fields.append(e["payload"] if e["type"] == "CONNECT" else repr(e["payload"]))
            if e["note"]:
                fields.append("# " + e["note"])
            arrow = {"in": "<-", "out": "->"}.get(e["direction"], "!!")   # !!: a fault
            out.append("%6d %s %s" % (e["seq"], arrow, " ".join(map(str, fields))))
        return out

    def _entry(self, raw):
        seq, at, client_id, direction, packet_type, fields, version, note = raw
        entry = {"seq": seq, "time": at, "client_id": client_id, "direction": direction,
                 "type": PACKET_NAMES.get(packet_type, str(packet_type)), "packet_id": None,
                 "qos": None, "retain": None, "dup": None, "topic": None, "payload": None,
                 "reason_code": None, "note": "; ".join(self._note(n) for n in note),
                 "version": version}
        if type(fields) is tuple:   # an outbound PUBLISH: (msg, qos, retain, dup, packet_id)
            msg, qos, retain, dup, packet_id = fields
            entry.update(topic=msg.topic, payload=self._preview(msg.payload), qos=qos,
                         retain=bool(retain), dup=bool(dup), packet_id=packet_id)
            return entry
        packet = fields
        if isinstance(fields, bytes):   # an outbound control packet, as sent
            try:
                first, body, _ = split_packet(fields)
                packet = DECODERS[first >> 4](first & 0x0F, body, version)
            except (MQTTError, KeyError, TypeError):
                return entry
        for name in ("packet_id", "qos", "retain", "dup", "reason_code"):
            value = getattr(packet, name, None)
            if value is not None:
                entry[name] = value
        if isinstance(packet, Connack):
            entry["reason_code"] = packet.return_code
            entry["session_present"] = bool(packet.session_present)
        elif isinstance(packet, Suback):
            entry["reason_code"] = list(packet.return_codes)
        elif isinstance(packet, (Subscribe, Unsubscribe)):
            entry["topic"] = ", ".join(t if isinstance(t, str) else t[0] for t in packet.topics)
        elif isinstance(packet, Connect):
            entry["topic"] = None
            entry["clean_session"] = bool(packet.clean_session)
            entry["payload"] = "v%s %s keepalive=%d%s" % (
                {MQTT_V31: "3.1", MQTT_V311: "3.1.1", MQTT_V5: "5.0"}.get(packet.proto_ver,
                                                                         packet.proto_ver),
                "clean" if packet.clean_session else "persistent", packet.keepalive,
                "" if packet.will is None else " will=" + packet.will.topic)
        if isinstance(packet, Publish):
            entry["topic"] = packet.topic
            entry["payload"] = self._preview(packet.payload)
        if version != MQTT_V5 and isinstance(packet, (Ack, Unsuback)):
            entry["reason_code"] = None   # 3.x acknowledgements carry no reason code
        return entry

    @classmethod
    def _preview(cls, payload):
        text = payload[:cls.PAYLOAD_PREVIEW].decode("utf-8", "replace")
        return text + ("..." if len(payload) > cls.PAYLOAD_PREVIEW else "")

    @staticmethod
    def _note(note):
        if isinstance(note, str):
            return note
        kind, targets, shared = note   # ("routed", ((session, route), ...), shared group?)
        if not targets:
            return "no subscriber: dropped"
        return "routed to %s%s" % (", ".join("%s (subscribed qos %d)" % (s.client_id, r & 0x03)
                                             for s, r in targets),
                                   "; shared groups picked their member" if shared else "")


class Capture:
    """The messages routed to a topic filter, recorded for a test to look at
    (``Broker.capture``); recorded whether or not any client subscribes.

    ``messages`` are ``Message`` objects (``topic, payload, qos, retain`` as
    published, ``properties``, ``publisher``). ``lock`` (a Condition's) guards
    ``messages``; nothing is taken while it is held.
    """

    def __init__(self, core, topic_filter, limit=None):
        if not validate_topic_filter(topic_filter):
            raise ValueError("invalid topic filter %r" % (topic_filter,))
        self.topic_filter = topic_filter
        self.messages = []
        #: with a limit, only the last ``limit`` messages are kept; ``dropped``
        #: counts the older ones let go (a live view's reader may be slow)
        self.limit, self.dropped = limit, 0
        self.closed = False
        self._core = core
        self._changed = threading.Condition()   # its lock guards messages, dropped, closed

    def wants(self, topic, msg):
        return topic_matches(self.topic_filter, topic)

    def record(self, msg):
        """Keep ``msg`` (a tap: BrokerCore.add_tap). Returns False: a capture
        watches, it does not deliver."""
        with self._changed:
            self.messages.append(msg)
            if self.limit is not None and len(self.messages) > self.limit:
                del self.messages[0]
                self.dropped += 1
            self._changed.notify_all()
        return False

    def take(self, timeout):
        """(messages, dropped) recorded since the last take, both then
        cleared; waits up to ``timeout`` seconds for one, unless closed."""
        with self._changed:
            if not self.messages and not self.closed:
                self._changed.wait(timeout)
            taken, dropped = self.messages, self.dropped
            self.messages, self.dropped = [], 0
            return taken, dropped

    def close(self):
        """Stop recording, and wake a take() that waits."""
        self.stop()
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def wait(self, count=1, predicate=None, timeout=5.0):
        """The messages that match ``predicate`` (all, without one) once there
        are ``count`` of them; TimeoutError, showing what was captured, if
        that takes over ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for m in self.messages if predicate is None or predicate(m)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("%d message(s) on %r wanted, %d matched within %gs; "
                                       "captured: %s" % (count, self.topic_filter, len(found),
                                                         timeout, self._describe_locked()))
                self._changed.wait(left)

    def _describe_locked(self):
        shown = ["%s %r qos=%d%s from %s" % (m.topic, m.payload[:40], m.qos,
                                              " retain" if m.retain else "", m.publisher)
                 for m in self.messages[-10:]]
        more = len(self.messages) - len(shown)
        return "[%s]" % "; ".join(([] if more <= 0 else ["... %d more" % more]) + shown)

    def clear(self):
        with self._changed:
            self.messages = []

    def stop(self):
        """Stop recording (the end of a ``with`` block does it too)."""
        self._core.remove_tap(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return "<Capture %r: %d messages>" % (self.topic_filter, len(self.messages))


class BrokerCore:
    """Routing, sessions and retained messages; knows nothing about sockets.

    ``lock`` guards ``sessions``, ``connections``, ``sockets``, ``router``,
    ``retained``, ``routes``, the subscription count and the stats maxima.
    It is held for dictionary and trie work only: never while sending, and
    never while calling a Session method (lock order: core -> session).
    """

    def __init__(self, settings, authenticate=None, acl=None, auth_methods=None, store=None,
                 clock=SystemClock):
        self.settings = settings
        #: the clock every timer reads (SystemClock, or a test's ManualClock)
        self.clock = clock
        self.now, self.wall = clock.monotonic, clock.time
        #: the Store that keeps persistent sessions and retained messages, or None
        self.store = store
        #: f(client_id, username, password, ip) -> CONNACK return code (0 = accepted)
        self.authenticate = authenticate
        #: 5.0 enhanced authentication: method name -> f(client_id, username, ip) -> an
        #: exchange whose step(data) answers ("continue"|"success", data) or a reason code
        self.auth_methods = auth_methods or {}
        self.acl = acl if acl is not None else Acl([], "allow")
        self.node = settings["node"]
        self.started_at = self.wall()
        #: guards the routing tables and registries listed in the class docstring
        self.lock = threading.Lock()
        self.sessions = {}       # client_id -> Session (online and offline)
        self.connections = {}    # client_id -> Connection (CONNECTed clients only)
        self.sockets = set()     # every live Connection, CONNECTed or not
        self.router = TopicTree()
        self.retained = {}       # topic -> Message
        self.retained_at = {}    # topic -> when it was retained (the retainer's expiry_interval)
        self._retain_warned_until = 0.0   # _retain_refused logs again after this
        self.retain_refusals = 0   # messages the retainer's limits did not keep (under lock)
        self.routes = {}         # topic filter (no share prefix) -> number of subscribers
        self.subscription_count = 0
        self.sys_subscriptions = 0   # filters that can match $SYS topics [MQTT-4.7.2-1]
        self.stats_max = dict.fromkeys(STAT_NAMES, 0)
        self._route_cache = {}   # topic -> ((session, qos), ...); cleared on any subscription change
        self.flow = FlowControl(settings, clock)
        self.delayed_wills = {}  # client id -> (due, will Message): 5.0 Will Delay Interval
        self.retainer_enabled = True   # the emqx_retainer plugin
        self.modules_enabled = True    # the emqx_modules plugin (presence, rewrite, subscription)
        self.set_rewrite_rules(settings["module_rewrite"])
        #: what else sees routed messages: Captures and Bridges' forwards (replaced
        #: whole, under lock; read without it)
        self.taps = ()
        #: client ids connected with the bridge bit (a remote's bridge): what they
        #: publish is never bridged again (split horizon)
        self.bridge_clients = set()
        self.journal = None      # the Journal recording packets, or None (off)
        self.faults = None       # the Broker's Faults (refused CONNECTs), set at start
        self.observed = False    # the journal is on or faults were injected: look per packet
        #: told after a client connected, disconnected, subscribed or unsubscribed
        #: (no lock held): the Broker's awaits
        self.on_change = None
        #: guards the registry of per-thread counters (a leaf lock)
        self.counts_lock = threading.Lock()
        self._counters = {}      # id -> counters of each thread that has counted something
        self._retired = dict.fromkeys(METRIC_NAMES, 0)
        self._tls = threading.local()

    # --- metrics --------------------------------------------------------------
    def counts(self):
        """The calling thread's own metric counters, name -> count (a sparse
        defaultdict: an idle connection's thread holds only what it counted).
        Only this thread writes them."""
        try:
            return self._tls.counts
        except AttributeError:
            counts = self._tls.counts = collections.defaultdict(int)
            with self.counts_lock:
                self._counters[id(counts)] = counts
            return counts

    def retire_counts(self):
        """Fold the calling thread's counters into the totals (thread is ending)."""
        self.fold_counts([self.take_counts()])

    def take_counts(self):
        """The calling thread's counters, for fold_counts() (the thread is
        ending; until they are folded they still count where they are)."""
        counts = getattr(self._tls, "counts", None)
        if counts is not None:
            del self._tls.counts
        return counts

    def fold_counts(self, all_counts):
        """Fold ended threads' counters into the totals, under one lock."""
        with self.counts_lock:
            for counts in all_counts:
                if counts is not None:
                    del self._counters[id(counts)]
                    for name, value in counts.items():
                        self._retired[name] += value

    def metrics(self):
        with self.counts_lock:
            total = dict(self._retired)
            for counts in self._counters.values():
                for name, value in counts.copy().items():   # copy(): atomic under the GIL
                    total[name] += value
        total["packets/received"] = sum(
            total[n] for n in _RECEIVED_METRIC.values())
        total["packets/sent"] = sum(total[n] for n in _SENT_METRIC.values())
        total["messages/received"] = sum(total[n] for n in _QOS_RECEIVED)
        total["messages/sent"] = sum(total[n] for n in _QOS_SENT)
        total["messages/retained"] = len(self.retained)
        return total

    def message_totals(self):
        """(messages received, messages sent) so far: what metrics() counts
        for them, at a fraction of its cost (the dashboard's charts)."""
        received = sent = 0
        with self.counts_lock:
            for counts in [self._retired, *self._counters.values()]:
                for name in _QOS_RECEIVED:
                    received += counts.get(name, 0)   # one get: atomic under the GIL
                for name in _QOS_SENT:
                    sent += counts.get(name, 0)
        return received, sent

    def _update_stats_locked(self):
        counts = self._stat_counts_locked()
        for name, value in counts.items():
            if value > self.stats_max[name]:
                self.stats_max[name] = value

    def _stat_counts_locked(self):
        routes = len(self.routes)
        return {"clients": len(self.connections), "retained": len(self.retained),
                "routes": routes, "sessions": len(self.sessions),
                "subscribers": self.subscription_count,
                "subscriptions": self.subscription_count, "topics": routes}

    def stats(self):
        with self.lock:
            self._update_stats_locked()
            counts = self._stat_counts_locked()
            result = {}
            for name in STAT_NAMES:
                result[name + "/count"] = counts[name]
                result[name + "/max"] = self.stats_max[name]
            return result

    # --- connections and sessions --------------------------------------------
    def connection(self, client_id):
        """The connected client's Connection, or None."""
        with self.lock:
            return self.connections.get(client_id)

    def session(self, client_id):
        """The client id's Session (online or offline), or None."""
        with self.lock:
            return self.sessions.get(client_id)

    def delay_will(self, conn, msg, delay):
        """Keep ``conn``'s will until ``delay`` seconds have passed or the
        session ends; nothing if a newer connection already has the session."""
        client_id = conn.client_id
        with self.lock:
            if self.connections.get(client_id) not in (None, conn):
                return   # the client is back [MQTT-3.1.3-9]
            session = self.sessions.get(client_id)
            if session is not None and session.expiry_interval is not None:
                delay = min(delay, session.expiry_interval)
            self.delayed_wills[client_id] = (self.now() + delay, msg)

    def due_wills(self, now):
        """The delayed wills whose time has come (removed)."""
        with self.lock:
            due = [cid for cid, (at, _) in self.delayed_wills.items() if at <= now]
            return [self.delayed_wills.pop(cid)[1] for cid in due]

    def live_connections(self):
        """Every live Connection, CONNECTed or not (a copy)."""
        with self.lock:
            return list(self.sockets)

    def sessions_with_timers(self):
        """Sessions whose timers have work: messages in flight, ids awaiting
        PUBREL, or a queue while the client is online."""
        with self.lock:
            return [s for s in self.sessions.values()
                    if s.inflight or s.awaiting_rel or (s.mqueue and s.conn is not None)]

    def add_socket(self, conn):
        with self.lock:
            self.sockets.add(conn)

    def connect(self, conn, clean_start, ends_with_connection, expiry_interval):
        """Register a CONNECTed client; returns (session, session_present, old_conn).

        An existing connection with the same id is returned as ``old_conn``
        for the caller to close [MQTT-3.1.4-2]. Clean Start (3.x: clean
        session), or a new id, gets a new Session; otherwise the stored one is
        resumed [MQTT-3.2.2-2]. The session ends with its connection if
        ``ends_with_connection``; otherwise ``expiry_interval`` seconds after
        (5.0), or session_expiry_interval after (3.x: None).
        """
        client_id = conn.client_id
        with self.lock:
            old_conn = self.connections.get(client_id)
            self.delayed_wills.pop(client_id, None)   # back in time: no will [MQTT-3.1.3-9]
            session = self.sessions.get(client_id)
            if session is not None and (clean_start or session.clean_session):
                self._discard_session_locked(session)
                session = None
            present = session is not None
            if session is None:
                session = self.sessions[client_id] = Session(self, client_id,
                                                             ends_with_connection)
            with session.lock:
                session.clean_session = ends_with_connection
                session.expiry_interval = expiry_interval
            if self.store is not None:
                session.keep(None if ends_with_connection else self.store)
            self.connections[client_id] = conn
            self._update_stats_locked()
        return session, present, old_conn

    def attach(self, session, conn):
        """Bind a freshly CONNECTed client to its session, unless a newer
        connection with the same client id took over meanwhile (lock order:
        core, then session)."""
        with self.lock:
            if self.connections.get(conn.client_id) is conn:
                session.attach(conn)

    def disconnect(self, conns):
        """Connections ended: unregister them and end their clean sessions
        (the service thread, for every connection closed since its last turn)."""
        with self.lock:
            for conn in conns:
                self.sockets.discard(conn)
                session = conn.session
                if session is None or self.connections.get(conn.client_id) is not conn:
                    continue  # never CONNECTed, or taken over by a newer connection
                del self.connections[conn.client_id]
                self.bridge_clients.discard(conn.client_id)
                if session.clean_session and self.sessions.get(conn.client_id) is session:
                    self._discard_session_locked(session)

    def _discard_session_locked(self, session):
        """Remove a session and all of its subscriptions (core lock held)."""
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        session.keep(None)   # off the disk too
        with session.lock:
            filters = list(session.subscriptions)
            session.subscriptions.clear()
        for topic_filter in filters:
            self._unsubscribe_locked(session, topic_filter)

    def expire_sessions(self, now):
        """Drop offline persistent sessions once their expiry interval has
        passed: the client's (5.0) or session_expiry_interval (3.x). 0 (3.x)
        and 0xFFFFFFFF (5.0) mean never [MQTT-3.1.2-*]."""
        default = self.settings["session_expiry_interval"]
        with self.lock:
            expired = []
            for s in self.sessions.values():
                limit = default if s.expiry_interval is None else s.expiry_interval
                if (s.disconnected_at is not None and limit and limit < 0xFFFFFFFF
                        and now - s.disconnected_at >= limit
                        and s.client_id not in self.connections):
                    expired.append(s)
            wills = []
            for session in expired:
                self._discard_session_locked(session)
                will = self.delayed_wills.pop(session.client_id, None)
                if will is not None:
                    wills.append(will[1])
        return wills   # the session ended first: its delayed will is due

    def restore(self, data):
        """Start from what the Store read back (``Store.load()``): retained
        messages, and every persistent session offline, with its
        subscriptions, queue, inflight window and inbound QoS 2 ids. A session
        that was online when the broker went down counts as disconnected
        since the last write [MQTT-3.1.2-23]."""
        store, now, wall = self.store, self.now(), self.wall()

        def monotonic(at):
            return now - (wall - at)

        for topic, payload, qos, props, expires_at, sender in data["retained"]:
            msg = Message.from_row(topic, payload, qos, True, props, expires_at, sender,
                                   self.clock)
            if msg.expired(now):
                store.delete(("retained", topic))
            else:
                self.retained[topic] = msg
                self.retained_at[topic] = now   # the retainer's expiry counts from the restart
        last_alive = data["last_alive"] or wall
        for client_id, expiry, created_at, disconnected_at in data["sessions"]:
            session = self.sessions[client_id] = Session(self, client_id, False)
            session.expiry_interval, session.created_at = expiry, created_at
            session.disconnected_at = monotonic(disconnected_at or last_alive)
            session.store = store
            if disconnected_at is None:   # online when the broker went down: offline since
                session._save_locked()
        for client_id, topic_filter, route in data["subscriptions"]:
            session = self.sessions.get(client_id)
            if session is not None:
                session.subscriptions[topic_filter] = route
                self._add_route_locked(session, topic_filter, route, True)
        for mid, client_id, topic, payload, qos, retain, props, expires_at, sender, \
                packet_id, state in data["messages"]:   # in mid order: the order sent
            session = self.sessions.get(client_id)
            if session is None:
                continue
            msg = Message.from_row(topic, payload, qos, retain, props, expires_at, sender,
                                   self.clock)
            if packet_id is None:
                session.mqueue.append((msg, qos, bool(retain), mid))
            else:
                session.inflight[packet_id] = [msg, qos, state, now, mid]
                session._next_id = packet_id
        for client_id, packet_id, received_at in data["awaiting_rel"]:
            session = self.sessions.get(client_id)
            if session is not None:   # await_rel_timeout counts from now: the client
                session.awaiting_rel[packet_id] = now   # could not send PUBREL meanwhile
        self._update_stats_locked()

    # --- subscriptions -------------------------------------------------------
    def subscribe(self, session, topics, subscription_id=0):
        """Subscribe ``session`` to [(filter, options)] (with a 5.0 Subscription
        Identifier if not 0); return (return_codes, retained)
        where retained is [(msg, qos)] to send after the SUBACK [MQTT-3.3.1-6]."""
        if self.rewrite_rules and self.modules_enabled:
            topics = [(self.rewrite(t), q) for t, q in topics]
        retained = []
        with self.lock:
            if self.sessions.get(session.client_id) is not session:
                # discarded (clean session ended or taken over): never route to it again
                return [SUBACK_FAILURE] * len(topics), []
            codes = [self._subscribe_locked(session, topic_filter, qos, retained,
                                            subscription_id)
                     for topic_filter, qos in topics]
            self._update_stats_locked()
        self.changed()
        return codes, retained

    def _subscribe_locked(self, session, topic_filter, options, retained, subscription_id=0):
        """One filter of a SUBSCRIBE: the granted QoS or a failure reason code
        (the codec sends 0x80 for each before 5.0); the retained messages it
        matches are added to ``retained``. ``options`` is SUBSCRIBE's options
        byte: the QoS, and in 5.0 No Local, Retain As Published and Retain
        Handling (3.8.3.1)."""
        if not (validate_topic_filter(topic_filter)
                and topic_within_limits(topic_filter, self.settings)):
            return RC_TOPIC_FILTER_INVALID   # [MQTT-3.9.3-2]
        limit = self.settings["max_subscriptions"]
        qos, retain_handling = options & 0x03, options >> 4 & 0x03
        # What delivery needs: QoS, No Local, Retain As Published, Subscription Identifier.
        route = options & 0x0F | subscription_id << 4
        with session.lock:
            is_new = topic_filter not in session.subscriptions
            if is_new and limit and len(session.subscriptions) >= limit:
                return RC_QUOTA_EXCEEDED
            session.subscriptions[topic_filter] = route
            if session.store is not None:
                session.seq = session.store.put(("sub", session.client_id, topic_filter),
                                                (session.client_id, topic_filter, route))
        group, real = self._add_route_locked(session, topic_filter, route, is_new)
        if group is None and self.retainer_enabled and (
                retain_handling == 0 or (retain_handling == 1 and is_new)):
            now = self.now()
            retained.extend((msg.with_subscription_ids((subscription_id,)) if subscription_id
                             else msg, min(qos, msg.qos)) for msg in self.retained.values()
                            if topic_matches(real, msg.topic) and not msg.expired(now)
                            and not self._retainer_expired(msg.topic, now))
        return qos

    def set_rewrite_rules(self, rules):
        """emqx_modules' topic rewrite rules: [(filter, regex, destination)]
        (replaced whole: a message sees the old rules or the new)."""
        self.rewrite_rules = [(f, re.compile(r), d) for f, r, d in rules]

    def _retain_locked(self, topic, msg):
        """Keep ``msg`` as ``topic``'s retained message, or with an empty
        payload delete it [MQTT-3.3.1-10, -11]. The retainer's limits (EMQ X's
        emq_retainer): a payload above retainer.max_payload_size, or a new topic
        when retainer.max_message_num are kept, is delivered but not retained.
        Returns whether the retained store changed: None when refused."""
        if not msg.payload:
            self.retained_at.pop(topic, None)
            return self.retained.pop(topic, None) is not None
        s = self.settings
        limit = s["retainer_max_messages"]
        if (s["retainer_max_payload_size"] and len(msg.payload) > s["retainer_max_payload_size"]) \
                or (limit and len(self.retained) >= limit and topic not in self.retained):
            self.retain_refusals += 1
            return None
        self.retained[topic] = msg
        self.retained_at.pop(topic, None)   # kept in the order retained: oldest first
        self.retained_at[topic] = self.now()
        if len(self.retained) > self.stats_max["retained"]:
            self.stats_max["retained"] = len(self.retained)
        return True

    def _retainer_expired(self, topic, now):
        expiry = self.settings["retainer_expiry_interval"]
        return expiry and now - self.retained_at.get(topic, now) >= expiry

    def _retain_refused(self, topic):
        """Log (without the lock) that the retainer's limits turned a message
        away: once a minute at most."""
        now = time.monotonic()
        if now >= self._retain_warned_until:
            self._retain_warned_until = now + 60.0
            s = self.settings
            _log.warning("Retainer: %s not retained: above retainer.max_payload_size (%d bytes) "
                         "or retainer.max_message_num (%d) kept; %d so far (logged once a "
                         "minute)", topic, s["retainer_max_payload_size"],
                         s["retainer_max_messages"], self.retain_refusals)

    def expire_retained(self, now):
        """Drop the retained messages older than retainer.expiry_interval (0: never)."""
        expiry = self.settings["retainer_expiry_interval"]
        if not expiry:
            return
        with self.lock:
            old = list(itertools.takewhile(lambda t: now - self.retained_at[t] >= expiry,
                                           self.retained_at))   # oldest first
            for topic in old:
                del self.retained[topic], self.retained_at[topic]
                if self.store is not None:
                    self.store.delete(("retained", topic))

    def _add_route_locked(self, session, topic_filter, route, is_new):
        """Route ``topic_filter`` to ``session``; returns parse_share's (group, filter)."""
        group, real = parse_share(topic_filter)
        self._route_cache.clear()
        if self.router.add(real, group, session, route):
            self.routes[real] = 0
        if is_new:
            self.routes[real] += 1
            self.subscription_count += 1
            if real.startswith("$SYS"):
                self.sys_subscriptions += 1
        return group, real

    def unsubscribe(self, session, filters):
        """Unsubscribe; returns, per filter, whether the session had it."""
        if self.rewrite_rules and self.modules_enabled:
            filters = [self.rewrite(t) for t in filters]
        found = []
        with self.lock:
            for topic_filter in filters:
                with session.lock:
                    known = session.subscriptions.pop(topic_filter, None) is not None
                    if known and session.store is not None:
                        session.seq = session.store.delete(
                            ("sub", session.client_id, topic_filter))
                if known:
                    self._unsubscribe_locked(session, topic_filter)
                found.append(known)
        self.changed()
        return found

    def _unsubscribe_locked(self, session, topic_filter):
        group, real = parse_share(topic_filter)
        self._route_cache.clear()
        self.router.remove(real, group, session.client_id)
        self.subscription_count -= 1
        if real.startswith("$SYS"):
            self.sys_subscriptions -= 1
        self.routes[real] -= 1
        if not self.routes[real]:
            del self.routes[real]

    def rewrite(self, topic):
        """emqx_modules topic rewrite: the first rule whose filter matches
        rewrites the topic with its regex ($1.. in the replacement)."""
        for topic_filter, regex, dest in self.rewrite_rules:
            if topic_matches(topic_filter, topic):
                match = regex.search(topic)
                if match is None:
                    return topic
                result = dest
                for i, value in enumerate(match.groups(), 1):
                    result = result.replace("$%d" % i, value or "")
                return result
        return topic

    # --- publishing ------------------------------------------------------------
    def publish(self, msg, batch, note=None):
        """Route one message: store/clear it if retained, then deliver a copy to
        every matching session at min(msg QoS, granted QoS) [MQTT-3.8.4-6],
        added to ``batch`` for the caller to run.

        This is the one routing path for MQTT PUBLISH, wills, $SYS, REST and
        the Python API. Returns whether any subscription matched; with the
        journal on, ``note`` (an entry's note list) gets where it went. Match
        results are cached per topic until the next subscription change; the
        cache is read without the lock (a message racing an UNSUBSCRIBE may
        still be delivered [MQTT-3.10.4-3]).
        """
        topic = msg.topic
        if self.rewrite_rules and self.modules_enabled:
            topic = msg.topic = self.rewrite(topic)
        tapped = False   # a Bridge took it to forward
        if self.taps:
            for tap in self.taps:
                if tap.wants(topic, msg):
                    tapped = tap.record(msg) or tapped
        targets = None if msg.retain else self._route_cache.get(topic)
        shared = False
        if targets is None:
            with self.lock:
                kept = msg.retain and self.retainer_enabled and self._retain_locked(topic, msg)
                refused = kept is None   # by the retainer's limits: logged after the lock
                if kept:
                    if self.store is not None and not msg.sys:
                        self.store.put(("retained", topic), (
                            topic, msg.payload, msg.qos,
                            msg.encoded_properties() if msg.properties else None,
                            _wall_deadline(msg.expires_at, self.clock),
                            msg.sender) if msg.payload else None)
                matched, shared = self.router.match(topic)
                targets = tuple(matched.values())
                if not (shared or msg.sys):   # round robin must advance: never cache shared
                    # picks; $SYS topics (one per client for presence) would crowd the cache
                    if len(self._route_cache) >= _ROUTE_CACHE_SIZE:
                        self._route_cache.clear()
                    self._route_cache[topic] = targets
            if refused:
                self._retain_refused(topic)
        if note is not None:
            note.append(("routed", targets, shared))
        if not targets:
            if not (msg.sys or tapped):
                self.counts()["messages/dropped"] += 1
            return tapped
        qos = msg.qos
        for session, route in targets:
            if route < 4:   # the granted QoS alone (3.x, or 5.0 without options)
                batch.add(session, msg, qos if qos < route else route)
            else:
                self._add_with_options(batch, session, msg, route)
        return True

    @staticmethod
    def _add_with_options(batch, session, msg, route):
        """A delivery through a subscription with 5.0 options: No Local
        [MQTT-3.8.3-3], Retain As Published [MQTT-3.3.1-12, -13] and
        Subscription Identifiers [MQTT-3.3.4-3, -4]."""
        if route & _NO_LOCAL and session.client_id == msg.sender:
            return
        granted = route & 0x03
        if route > 0x0F:
            msg = msg.with_subscription_ids(_subscription_ids(route))
        batch.add(session, msg, msg.qos if msg.qos < granted else granted,
                  msg.retain and route & _RETAIN_AS_PUBLISHED)

    def add_tap(self, tap):
        """``tap.record(msg)`` for each message routed where ``tap.wants(topic,
        msg)`` (called without any lock held, on the routing thread)."""
        with self.lock:
            self.taps = self.taps + (tap,)

    def remove_tap(self, tap):
        with self.lock:
            self.taps = tuple(t for t in self.taps if t is not tap)

    def changed(self):
        """Something the Broker's awaits look at changed (no lock held)."""
        on_change = self.on_change
        if on_change is not None:
            on_change()

    # --- snapshots for the REST and Python APIs --------------------------------
    def client_infos(self):
        with self.lock:
            conns = sorted(self.connections.values(), key=lambda c: c.client_id)
        return [c.info() for c in conns]

    def session_infos(self):
        with self.lock:
            sessions = sorted(self.sessions.values(), key=lambda s: s.client_id)
        return [s.info() for s in sessions]

    def subscription_infos(self, client_id=None):
        with self.lock:
            sessions = [self.sessions.get(client_id)] if client_id is not None else list(self.sessions.values())
        result = []
        for session in sessions:
            if session is None:
                continue
            with session.lock:
                subs = list(session.subscriptions.items())
            result.extend({"client_id": session.client_id, "topic": t, "qos": q & 0x03}
                          for t, q in subs)
        return result

    def route_list(self):
        with self.lock:
            return list(self.routes)

    def retained_infos(self, times=False):
        """Rows of the retained messages; ``times``: with when each was
        retained (``time``, on the wall clock)."""
        now, wall = self.now(), self.wall()
        with self.lock:
            rows = [(m, self.retained_at.get(t, now)) for t, m in self.retained.items()]
        return [dict({"topic": m.topic, "payload": m.payload, "qos": m.qos},
                     **({"time": wall - (now - at)} if times else {})) for m, at in rows]


###############################################################################
# Transports: TLS and WebSocket ###############################################
###############################################################################
#
# A transport sits between the raw socket and the MQTT byte stream. It is
# sans-IO: ``feed(raw)`` turns received bytes into (mqtt_bytes, reply_bytes)
# and sets ``closed`` when the peer closed cleanly (TLS close_notify,
# WebSocket close); ``wrap(mqtt_bytes)`` turns outgoing bytes into wire bytes.
# The Connection calls both with its ``out_lock`` held, so records and frames
# reach the wire in the order they were made, and the socket itself is read
# and written exactly as for plain TCP (blocking reads by the reader thread,
# non-blocking writes by anyone). Plain TCP has no transport at all.

class TlsTransport:
    """TLS through ``ssl.MemoryBIO`` so that reads and writes can come from
    different threads (one ``SSLObject``, always used under the caller's lock)."""

    def __init__(self, context, server_hostname=None):
        """A server's side; a client's (a bridge) with the ``server_hostname``
        it checks the certificate against. A client's first ``feed(b"")``
        gives its ClientHello."""
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing,
                                    server_side=server_hostname is None,
                                    server_hostname=server_hostname)
        self.handshaken = False
        self.closed = False
        self.peer_cn = None

    def feed(self, raw):
        self.incoming.write(raw)
        if not self.handshaken:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                return b"", self.outgoing.read()
            except ssl.SSLError as exc:
                raise MalformedPacket("TLS handshake failed: %s" % exc.reason) from None
            self.handshaken = True
            cert = self.tls.getpeercert()
            for rdn in (cert or {}).get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        self.peer_cn = value
        chunks = []
        try:
            while True:
                chunk = self.tls.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.closed = True
        except ssl.SSLError as exc:
            raise MalformedPacket("TLS error: %s" % exc.reason) from None
        return b"".join(chunks), self.outgoing.read()

    def wrap(self, data):
        if data:
            self.tls.write(data)
        return self.outgoing.read()


class WebSocketTransport:
    """MQTT over WebSocket (MQTT 3.1.1 section 6) with wsproto: binary frames,
    subprotocol ``mqtt`` (or ``mqttv3.1``), any split of packets into frames."""

    SUBPROTOCOLS = ("mqtt", "mqttv3.1")

    def __init__(self, path):
        if wsproto is None:
            raise RuntimeError("WebSocket listeners need the wsproto package")
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        self.path = path
        self.open = False
        self.closed = False
        self.peer_cn = None

    def feed(self, raw):
        ev = wsproto.events
        try:
            self.ws.receive_data(raw)
            data, replies = [], []
            for event in self.ws.events():
                if isinstance(event, ev.Request):
                    offered = [p for p in event.subprotocols if p in self.SUBPROTOCOLS]
                    if event.target.split("?", 1)[0] != self.path or not offered:
                        replies.append(self.ws.send(ev.RejectConnection(status_code=404)))
                        self.closed = True
                        return b"", b"".join(replies)
                    replies.append(self.ws.send(ev.AcceptConnection(subprotocol=offered[0])))
                    self.open = True
                elif isinstance(event, ev.BytesMessage):
                    data.append(bytes(event.data))
                elif isinstance(event, ev.TextMessage):
                    raise MalformedPacket("MQTT over WebSocket needs binary frames [MQTT-6.0.0-1]")
                elif isinstance(event, ev.Ping):
                    replies.append(self.ws.send(event.response()))
                elif isinstance(event, ev.CloseConnection):
                    if self.ws.state.name == "REMOTE_CLOSING":
                        replies.append(self.ws.send(event.response()))
                    self.closed = True
                    break
            return b"".join(data), b"".join(replies)
        except wsproto.utilities.RemoteProtocolError as exc:
            raise MalformedPacket("WebSocket protocol error: %s" % exc) from None

    def wrap(self, data):
        if not data or not self.open or self.closed:
            return b""
        return self.ws.send(wsproto.events.BytesMessage(data=data))


class StackedTransport:
    """WebSocket inside TLS (``mqtt:wss``)."""

    def __init__(self, outer, inner):
        self.outer, self.inner = outer, inner

    @property
    def peer_cn(self):
        return self.outer.peer_cn

    @property
    def closed(self):
        return self.outer.closed or self.inner.closed

    def feed(self, raw):
        plain, reply = self.outer.feed(raw)
        if not plain:
            return b"", reply
        data, inner_reply = self.inner.feed(plain)
        if inner_reply:
            reply += self.outer.wrap(inner_reply)
        return data, reply

    def wrap(self, data):
        return self.outer.wrap(self.inner.wrap(data))


###############################################################################
# Connection (one reader thread per socket) ###################################
###############################################################################

class ConnectionHooks:
    """What a Connection needs from the application above it, handed over at
    construction: the service thread finishes a blocked write
    (``watch_writable(conn)`` / ``unwatch_writable(conn)``, called with the
    connection's ``out_lock`` held), its keepalive timer starts and the
    emqx_modules duties run when a client has connected (``connected(conn)``,
    after CONNACK), and a reader
    thread's last act hands its connection's bookkeeping over
    (``closed(conn, reason, counters)``)."""
    __slots__ = ("watch_writable", "unwatch_writable", "connected", "closed")

    def __init__(self, watch_writable, unwatch_writable, connected, closed):
        self.watch_writable, self.unwatch_writable = watch_writable, unwatch_writable
        self.connected, self.closed = connected, closed


class ConnectionFaults:
    """Faults injected into one connection (``Broker.faults``). ``lock``
    guards ``drop``, ``delay`` and ``close_after`` (a leaf); ``frozen_until``
    is a plain value read without it."""
    __slots__ = ("registry", "lock", "frozen_until", "thaw", "drop", "delay", "close_after")

    def __init__(self, registry):
        self.registry = registry          # the Faults that made it (timers, journal)
        self.lock = threading.Lock()
        self.frozen_until = 0.0           # monotonic time the freeze ends
        self.thaw = threading.Event()     # set to end a freeze early
        self.drop = {}                    # outbound packet type -> how many more to swallow
        self.delay = {}                   # outbound packet type -> seconds to hold each
        self.close_after = None           # inbound packets left before the connection is cut

    def frozen(self):
        return self.frozen_until > time.monotonic()

    def verdict(self, packet_type):
        """For an outbound packet: None (send it), "drop", or seconds to hold it."""
        with self.lock:
            left = self.drop.get(packet_type)
            if left:
                if left == 1:
                    del self.drop[packet_type]
                else:
                    self.drop[packet_type] = left - 1
                return "drop"
            return self.delay.get(packet_type)


class Connection:
    """One client socket: its reader thread, protocol state and outbound buffer.

    Only the reader thread touches the protocol state (``client_id``,
    ``session``, ``will``...). ``out_lock`` guards the outbound buffer
    (``_out``, ``out_bytes``, ``blocked``, ``_closed``), the acks that
    FlowControl holds (``held``, ``waiting_on``, ``held_since``) and the
    non-blocking send that drains the buffer; any thread may append and flush.
    """

    __slots__ = ("hooks", "core", "settings", "sock", "peer", "listener", "transport",
                 "client_id", "username", "proto_ver", "keepalive", "clean_session", "will",
                 "session", "acl", "connected_at", "opened_at", "last_recv", "close_reason",
                 "running", "out_lock", "_out", "_wire", "out_bytes", "blocked",
                 "blocked_since", "_closed", "_batch", "_disconnecting", "held",
                 "held_since", "waiting_on", "_recv_size", "receive_maximum",
                 "max_packet_out", "topic_aliases", "auth", "_pending", "alias_max_out",
                 "barrier", "acks_pending", "_note", "faults", "is_bridge", "timer")

    def __init__(self, hooks, core, sock, peer, listener):
        self.hooks = hooks
        self.core = core
        self.settings = core.settings
        self.sock = sock
        self.peer = peer[:2]
        self.listener = listener
        self.transport = listener.make_transport()   # None for plain TCP
        self.client_id = None
        self.username = None
        self.proto_ver = None
        self.is_bridge = False        # CONNECTed with the bridge bit (Connect.bridge)
        self.keepalive = 0
        self.clean_session = True
        self.will = None
        self.session = None
        self.acl = None               # ClientAcl once CONNECTed
        self.connected_at = None
        self.opened_at = self.last_recv = core.now()
        self.close_reason = None      # set by whoever decided to close
        self.running = None           # held by the reader thread while it runs (start_reader)
        self.timer = None             # its keepalive entry in the Broker's timer heap
        #: guards _out, _wire, out_bytes, blocked, _closed, held, waiting_on,
        #: held_since, the transport's state and the non-blocking send
        self.out_lock = threading.Lock()
        self._out = []                # MQTT bytes waiting to be written
        self._wire = b""              # encoded (TLS/WebSocket) bytes the socket has not taken yet
        self.out_bytes = 0            # bytes waiting; read without the lock as a "slow client" hint
        self.blocked = False          # the socket buffer is full; the service thread finishes
        self.blocked_since = None
        self._closed = False
        self._batch = Batch()         # what this reader routed from its current recv
        self.held = []                # PUBACK/PUBREC held by FlowControl, in order
        self.held_since = None
        self.waiting_on = ()          # congested sessions the held acks wait for (a set)
        # Durable state: packets in _out leave only once the Store has committed
        # change ``barrier`` (their acks, or the rows of the messages they carry),
        # and not while the reader thread is still settling its acks' barrier.
        self.barrier = 0
        self.acks_pending = False
        self._note = None             # with the journal on: the current packet's entry note
        self.faults = None            # ConnectionFaults once a test injects one
        self._disconnecting = False
        self._recv_size = _RECV_MIN   # bytes the next recv asks for (adaptive)
        # MQTT 5.0, from CONNECT (3.x: no limits, no aliases):
        self.receive_maximum = 65535  # QoS 1/2 PUBLISHes it takes unacknowledged
        self.max_packet_out = 0       # largest packet it takes (0: no limit)
        self.topic_aliases = None     # alias -> topic it set [MQTT-3.3.2-12]
        self.alias_max_out = 0        # aliases it takes from us: its Topic Alias Maximum
        self.auth = None              # its enhanced-authentication exchange (5.0)
        self._pending = None          # (CONNECT, assigned id) while that exchange runs

    def __repr__(self):
        return "<Connection %s %s:%s>" % (self.client_id, self.peer[0], self.peer[1])

    # --- the reader thread ----------------------------------------------------
    def start_reader(self):
        """Start the reader thread (RuntimeError if the system has none to
        give). ``running`` is set first: a takeover or a ManualClock tick that
        closes this connection, even before its thread runs, can join it."""
        self.running = _thread.allocate_lock()
        self.running.acquire()
        _start_bare_thread(self.run, self.running)

    def reading(self):
        """True while the reader thread runs."""
        return self.running is not None and self.running.locked()

    def join(self, timeout=-1):
        """Wait up to ``timeout`` seconds (-1: for ever) for the reader thread
        to end; False if it has not."""
        running = self.running
        if running is None or not running.acquire(timeout=timeout):
            return running is None
        running.release()
        return True

    def run(self):
        reason = "closed"
        try:
            self._read_loop()
            reason = "normal" if self._disconnecting else "closed"
        except ConnectRefused as exc:
            _log.info("Refused CONNECT from %s:%s: %s", self.peer[0], self.peer[1], exc)
            self._decided("refused: %s" % exc)
            code = exc.return_code
            if self.proto_ver == MQTT_V5:
                code = CONNACK_V5.get(code, code)
            self._send_bytes(encode_connack(Connack(False, code), self.proto_ver), CONNACK)
            self.flush()
            reason = exc.reason
        except MQTTError as exc:
            _log.info("Closing %s:%s (%s): %s", self.peer[0], self.peer[1],
                      self.client_id, exc)
            reason = exc.reason
            self.send_disconnect(reason)
        except OSError as exc:
            reason = "closed" if isinstance(exc, ConnectionError) else "socket_error"
        except Exception:
            _log.exception("Internal error on connection %r", self)
            reason = "internal_error"
        finally:
            try:   # what was accepted before an error is still delivered
                self._batch.run()
            except Exception:
                _log.exception("Delivering the last batch of %r failed", self)
            self._close(self.close_reason or reason)

    def _read_loop(self):
        """Read, frame and handle every complete packet of each recv, then
        run the batch they made (see the module docstring)."""
        counts = self.core.counts()
        max_size = self.settings["max_packet_size"]
        buf = b""
        while True:
            before = self.last_recv
            data = self._receive(counts)
            if self.faults is not None and self.faults.frozen():
                self.last_recv = before   # frozen: nothing arrived, as far as keepalive knows
                self._stay_frozen()
                if self.close_reason is not None:
                    return   # closed while frozen (keepalive, a kick, a fault)
            if data is None:
                return
            if not data:
                continue
            buf = buf + data if buf else data
            pos = 0
            while (framed := split_packet(buf, pos, max_size)) is not None:
                first_byte, body, pos = framed
                self.handle_packet(first_byte, body, counts)
                if self._disconnecting:
                    self._flush_batch()
                    return
            buf = buf[pos:] if pos else buf
            self._flush_batch()

    def _receive(self, counts):
        """One recv, through the transport if any: MQTT bytes, b"" when they
        were all transport bytes, or None once the peer has closed."""
        data = self.sock.recv(self._recv_size)
        if not data:
            return None
        size = self._recv_size   # grows while reads fill it, shrinks when idle (memory per client)
        if len(data) == size:
            self._recv_size = min(size * 4, _RECV_MAX)
        elif size > _RECV_MIN and len(data) < size // 16:
            self._recv_size = size // 4
        self.last_recv = self.core.now()
        counts["bytes/received"] += len(data)
        transport = self.transport
        if transport is None:
            return data
        with self.out_lock:
            data, reply = transport.feed(data)
            if reply and not self._closed:
                self._wire += reply
                self.out_bytes += len(reply)
                if not self.blocked:
                    self._send_locked()
        return None if transport.closed else data

    def _stay_frozen(self):
        """An injected freeze: handle nothing until it ends (or the connection
        is closed), then take what arrived meanwhile and send what waited."""
        faults = self.faults
        while self.close_reason is None:
            left = faults.frozen_until - time.monotonic()
            if left <= 0 or faults.thaw.wait(left):
                break
        if self.close_reason is None:
            faults.thaw.clear()
            self.last_recv = self.core.now()
            self.flush()

    def _flush_batch(self):
        """End of a batch: one write per touched connection, this one included."""
        self._batch.run()
        if self.acks_pending:
            self._settle_barrier()
        self.flush()

    def _settle_barrier(self):
        """The replies to this batch's packets leave once every change this
        thread recorded for them is on disk (the writer flushes them then)."""
        store = self.core.store
        seq = store.local_seq()
        with self.out_lock:
            self.acks_pending = False
            held = seq > self.barrier and seq > store.committed
            if held:
                self.barrier = seq
                store.hold(self)
        if held and store.failed is not None:
            self.refuse_unsent()

    def handle_packet(self, first_byte, body, counts):
        packet_type = first_byte >> 4
        if self.session is None and packet_type != CONNECT and (
                packet_type != AUTH or self._pending is None):
            raise ProtocolError("first packet must be CONNECT [MQTT-3.1.0-1]")
        name = _RECEIVED_METRIC.get(packet_type)
        if name is not None:
            counts[name] += 1
        if self.core.store is not None and (first_byte & 0x06 if packet_type == PUBLISH
                                            else packet_type in _DURABLE_REPLIES):
            self.acks_pending = True   # what this packet changes is on disk before its reply
        packet = decode_packet(first_byte, body, self.proto_ver)
        if not self.core.observed:   # the journal and faults are off: nothing to look at
            _HANDLERS[packet_type](self, packet, counts)
            return
        journal = self.core.journal
        if journal is not None:
            self._note = journal.record(self.client_id or getattr(packet, "client_id", None),
                                        "in", packet_type, packet,
                                        self.proto_ver or getattr(packet, "proto_ver", None))
        _HANDLERS[packet_type](self, packet, counts)
        if journal is not None and journal.trace is not None:
            journal.traced(self._note)
        faults = self.faults
        if faults is not None and faults.close_after is not None:
            with faults.lock:
                left = faults.close_after
                if left is not None:
                    faults.close_after = left - 1 if left > 1 else None
            if left is not None and left <= 1:
                self._decided("connection cut by an injected fault (close_after)")
                raise ConnectionResetError("cut by an injected fault")

    def _decided(self, what):
        """Note a decision on the packet being handled (with the journal on)."""
        if self._note is not None:
            self._note.append(what)

    # --- handlers, one per packet type ------------------------------------------
    def handle_connect(self, pkt, counts):
        if self.session is not None or self._pending is not None:
            raise ProtocolError("second CONNECT [MQTT-3.1.0-2]")
        faults = self.core.faults
        if faults is not None and faults.refusals:
            code = faults.refusal_for(pkt.client_id)
            if code is not None:
                self.proto_ver = pkt.proto_ver
                raise ConnectRefused(code, "refused by an injected fault")
        s = self.settings
        self.proto_ver, self.keepalive = pkt.proto_ver, pkt.keepalive
        ceiling = s["max_keepalive"]
        if ceiling and not 0 < pkt.keepalive <= ceiling:
            self.keepalive = ceiling   # a silent client is dropped even if it asked for 0
        props = pkt.properties or {}
        v5 = pkt.proto_ver == MQTT_V5
        if props.get("receive_maximum") == 0 or props.get("maximum_packet_size") == 0:
            raise ProtocolError("Receive Maximum or Maximum Packet Size of 0 [MQTT-3.1.2-*]")
        self.receive_maximum = props.get("receive_maximum", 65535)
        self.max_packet_out = props.get("maximum_packet_size", 0)
        if self.settings["topic_alias_out"]:
            self.alias_max_out = props.get("topic_alias_maximum", 0)
        client_id = pkt.client_id
        assigned = None
        if not client_id:
            if pkt.proto_ver == MQTT_V31 or (not pkt.clean_session and not v5):
                raise ConnectRefused(CONNACK_IDENTIFIER_REJECTED,
                                     "empty client id needs clean session [MQTT-3.1.3-8]")
            client_id = assigned = "emqx_lite_" + secrets.token_hex(8)   # [MQTT-3.1.3-6]
        if len(client_id) > s["max_clientid_len"]:
            raise ConnectRefused(CONNACK_IDENTIFIER_REJECTED,
                                 "client id longer than max_clientid_len")
        username = pkt.username
        if self.listener.peer_cert_as_username == "cn" and self.transport is not None \
                and self.transport.peer_cn:
            username = self.transport.peer_cn   # EMQ X's peer_cert_as_username = cn
        self.client_id, self.username = client_id, username
        method = props.get("authentication_method")
        if method is not None:   # 5.0 enhanced authentication (4.12)
            self.auth = (method, self._start_auth(method))
            self._pending = (pkt, assigned)
            self._auth_step(self.auth[1].step(props.get("authentication_data", b"")))
            return
        auth = self.core.authenticate
        if auth is not None:
            code = auth(client_id, username, pkt.password, self.peer[0])
            if code:
                raise ConnectRefused(code, "authentication failed for %r" % client_id)
        self._accept(pkt, assigned)

    def _accept(self, pkt, assigned, auth_properties=None):
        """The client is who it says: register it, CONNACK, resume its session."""
        client_id, username, v5 = self.client_id, self.username, pkt.proto_ver == MQTT_V5
        props = pkt.properties or {}
        self.clean_session, self.will = pkt.clean_session, pkt.will
        if pkt.bridge:
            self.is_bridge = True
            self.core.bridge_clients.add(client_id)
        else:
            self.core.bridge_clients.discard(client_id)   # a takeover by a plain client
        self.acl = self.core.acl.for_client(client_id, username, self.peer[0])
        self.connected_at = self.core.wall()
        if v5:   # the session lasts Session Expiry Interval seconds after the connection
            expiry = props.get("session_expiry_interval", 0)
            session, present, old_conn = self.core.connect(self, pkt.clean_session,
                                                           expiry == 0, expiry)
            self.topic_aliases = {}
        else:
            session, present, old_conn = self.core.connect(self, pkt.clean_session,
                                                           pkt.clean_session, None)
        self.session = session
        if old_conn is not None:
            self._decided("took the client id over from %s:%s" % old_conn.peer)
            old_conn.shutdown("conflict")   # takeover [MQTT-3.1.4-2]
            if self.core.store is not None:
                # What its last packets changed is recorded before this client's
                # resends are judged against it (a QoS 2 id seen, a message routed).
                old_conn.join(self.settings["connect_timeout"])
        _log.debug("Received CONNECT from %s (p%d, c%d, k%d)", client_id,
                   pkt.proto_ver, pkt.clean_session, pkt.keepalive)
        connack = Connack(present, CONNACK_ACCEPTED)
        if v5:
            connack.properties = self._connack_properties(assigned, self.keepalive != pkt.keepalive)
            connack.properties.update(auth_properties or {})
        self._send_bytes(encode_connack(connack, self.proto_ver), CONNACK)
        self.core.attach(session, self)   # writes to this connection, flushed after the batch
        self.hooks.connected(self)

    def _connack_properties(self, assigned_client_id, keepalive_changed):
        """What a 5.0 client learns in CONNACK about this server (3.2.2.3)."""
        s = self.settings
        props = {"receive_maximum": s["max_awaiting_rel"] or 65535,
                 "maximum_packet_size": s["max_packet_size"],   # a total within our limit
                 "topic_alias_maximum": s["max_topic_alias"],
                 "retain_available": 1 if self.core.retainer_enabled else 0,
                 "wildcard_subscription_available": 1,
                 "subscription_identifier_available": 1,
                 "shared_subscription_available": 1}
        if assigned_client_id is not None:
            props["assigned_client_identifier"] = assigned_client_id
        if keepalive_changed:
            props["server_keep_alive"] = self.keepalive
        return props

    def handle_publish(self, pkt, counts):
        qos = pkt.qos
        counts[_QOS_RECEIVED[qos]] += 1
        topic, properties = pkt.topic, None
        if pkt.properties:
            topic = self._resolve_alias(pkt)
            properties = forwarded_properties(pkt.properties)
        elif not topic:
            raise ProtocolError("empty topic without a Topic Alias [MQTT-3.3.2-8]")
        if not topic_within_limits(topic, self.settings):
            raise MalformedPacket("topic exceeds max_topic_length or max_topic_levels")
        reason = RC_SUCCESS
        store = self.core.store
        if qos and store is not None and store.failed is not None:
            # Acknowledging would promise what the disk cannot keep.
            if self.proto_ver != MQTT_V5:
                raise StoreUnavailable("data file not writable: QoS %d PUBLISH refused" % qos)
            _log.info("Refused QoS %d PUBLISH to %r from %s: data file not writable",
                      qos, topic, self.client_id)
            self._decided("refused: the data file cannot be written")
            reason = RC_QUOTA_EXCEEDED
        elif topic.startswith("$SYS/"):
            # Clients may not inject $SYS messages: acknowledged, not routed.
            _log.info("Dropped PUBLISH to %r from %s", topic, self.client_id)
            self._decided("clients may not publish to $SYS/: not routed")
            reason = RC_NOT_AUTHORIZED
        elif not self.acl.check("publish", topic):
            # Denied: acknowledged as usual and dropped [MQTT-3.3.5-2].
            _log.info("ACL denied PUBLISH to %r from %s", topic, self.client_id)
            self._decided("ACL denied: not routed")
            counts["messages/dropped"] += 1
            reason = RC_NOT_AUTHORIZED
        elif qos == 2:
            state = self.session.await_rel(pkt.packet_id)
            if state == "full":
                if self.proto_ver == MQTT_V5:
                    raise ReceiveMaximumExceeded("more QoS 2 PUBLISHes than Receive Maximum "
                                                 "[MQTT-3.3.4-9]")
                counts["messages/qos2/dropped"] += 1
                self._decided("too many QoS 2 ids awaiting PUBREL: dropped, no PUBREC")
                return  # no PUBREC: the client resends later
            if state == "dup":
                self._decided("QoS 2 id already received: not routed again")
                if self.session.store is not None:
                    store.depend(self.session.seq)   # its PUBREC waits for its first record
            if state == "new":
                if self.session.store is not None:
                    self._batch.rels.append((self.session, pkt.packet_id))
                    self._batch.store = self.session.store
                if not self.core.publish(Message(topic, pkt.payload, 2, pkt.retain,
                                                 self.client_id, False, properties,
                                                 self.core.clock),
                                         self._batch, self._note):
                    reason = RC_NO_MATCHING_SUBSCRIBERS
        elif not self.core.publish(Message(topic, pkt.payload, qos, pkt.retain, self.client_id,
                                           False, properties, self.core.clock),
                                   self._batch, self._note):
            reason = RC_NO_MATCHING_SUBSCRIBERS
        if qos:
            self.send_publish_ack(PUBACK if qos == 1 else PUBREC, pkt.packet_id, reason)

    def _resolve_alias(self, pkt):
        """The topic of a 5.0 PUBLISH, through its Topic Alias if it has one."""
        props = pkt.properties
        if "subscription_identifier" in props:
            raise ProtocolError("PUBLISH from a client with a Subscription Identifier "
                                "[MQTT-3.3.4-6]")
        alias = props.get("topic_alias")
        if alias is None:
            if not pkt.topic:
                raise ProtocolError("empty topic without a Topic Alias [MQTT-3.3.2-8]")
            return pkt.topic
        if not 0 < alias <= self.settings["max_topic_alias"]:
            raise TopicAliasInvalid("Topic Alias %d outside 1..%d [MQTT-3.3.2-9, -10]"
                                    % (alias, self.settings["max_topic_alias"]))
        if pkt.topic:
            self.topic_aliases[alias] = pkt.topic
            return pkt.topic
        topic = self.topic_aliases.get(alias)
        if topic is None:
            raise ProtocolError("Topic Alias %d was never set [MQTT-3.3.2-*]" % alias)
        return topic

    def handle_puback(self, pkt, counts):
        self.session.puback(pkt.packet_id)   # may send queued messages to this client

    def handle_pubrec(self, pkt, counts):
        if pkt.reason_code >= 0x80:   # 5.0: the client refused the message; it is done
            self.session.pubcomp(pkt.packet_id, refused=True)
        elif self.session.pubrec(pkt.packet_id):
            self.send_ack(PUBREL, pkt.packet_id)
        elif self.proto_ver == MQTT_V5:
            self.send_ack(PUBREL, pkt.packet_id, RC_PACKET_IDENTIFIER_NOT_FOUND)

    def handle_pubrel(self, pkt, counts):
        reason = RC_SUCCESS
        if not self.session.release(pkt.packet_id):
            counts["packets/pubrel/missed"] += 1
            reason = RC_PACKET_IDENTIFIER_NOT_FOUND
        self.send_ack(PUBCOMP, pkt.packet_id, reason)   # always answered [MQTT-4.3.3-1]

    def handle_pubcomp(self, pkt, counts):
        self.session.pubcomp(pkt.packet_id)

    def handle_subscribe(self, pkt, counts):
        subscription_ids = (pkt.properties or {}).get("subscription_identifier", [0])
        if len(subscription_ids) > 1 or not subscription_ids[0] and pkt.properties \
                and "subscription_identifier" in pkt.properties:
            raise ProtocolError("Subscription Identifier 0 or twice [MQTT-3.8.2-*]")
        check = self.acl.check
        allowed = [(f, q) for f, q in pkt.topics if check("subscribe", parse_share(f)[1])]
        if self.is_bridge:   # a remote's bridge: not its own messages back, retain as published
            allowed = [(f, q | _NO_LOCAL | _RETAIN_AS_PUBLISHED) for f, q in allowed]
        codes, retained = self.core.subscribe(self.session, allowed, subscription_ids[0])
        if len(allowed) < len(pkt.topics):   # a denied filter gets 0x87/0x80 [MQTT-3.9.3-2]
            granted = iter(codes)
            codes = [next(granted) if check("subscribe", parse_share(f)[1])
                     else RC_NOT_AUTHORIZED for f, _ in pkt.topics]
        self._send_bytes(encode_suback(Suback(pkt.packet_id, codes), self.proto_ver), SUBACK)
        for msg, qos in retained:
            self._batch.add(self.session, msg, qos, retain=True)

    def handle_unsubscribe(self, pkt, counts):
        found = self.core.unsubscribe(self.session, pkt.topics)
        codes = [RC_SUCCESS if known else RC_NO_SUBSCRIPTION_EXISTED for known in found]
        self._send_bytes(encode_unsuback(Unsuback(pkt.packet_id, codes), self.proto_ver),
                         UNSUBACK)   # [MQTT-3.10.4-4, -5]

    def handle_pingreq(self, pkt, counts):
        self._send_bytes(encode_pingresp(pkt, self.proto_ver), PINGRESP)   # [MQTT-3.12.4-1]

    def handle_disconnect(self, pkt, counts):
        if isinstance(pkt, Disconnect):   # 5.0
            expiry = (pkt.properties or {}).get("session_expiry_interval")
            if expiry is not None and not self.session.change_expiry(expiry):
                raise ProtocolError("Session Expiry Interval set after 0 [MQTT-3.14.2-2]")
            if pkt.reason_code == RC_DISCONNECT_WITH_WILL:
                self._disconnecting = True
                return
        self.will = None   # [MQTT-3.14.4-3]
        self._disconnecting = True

    # --- 5.0 enhanced authentication: AUTH exchanges (4.12) ----------------------
    def _start_auth(self, method):
        """A new exchange for ``method``, from the Broker's ``auth_methods``."""
        factory = self.core.auth_methods.get(method)
        if factory is None:
            raise ConnectRefused(RC_BAD_AUTHENTICATION_METHOD,
                                 "authentication method %r not supported [MQTT-4.12.0-1]"
                                 % method)
        return factory(self.client_id, self.username, self.peer[0])

    def _auth_step(self, answer):
        """Act on an exchange's answer: ("continue", data) sends AUTH 0x18 with
        the challenge; ("success", data) completes the CONNECT (CONNACK) or the
        re-authentication (AUTH 0x00); a reason code refuses."""
        status, data = answer if isinstance(answer, tuple) else (answer, b"")
        props = {"authentication_method": self.auth[0]}
        if data:
            props["authentication_data"] = data
        pending = self._pending
        if status == "continue":
            self._send_bytes(encode_auth(Auth(0x18, props), MQTT_V5), AUTH)
        elif status == "success":
            self._pending = None
            if pending is not None:
                self._accept(pending[0], pending[1], props)
            else:
                self._send_bytes(encode_auth(Auth(RC_SUCCESS, props), MQTT_V5), AUTH)
        elif pending is not None:
            raise ConnectRefused(status or RC_NOT_AUTHORIZED, "enhanced authentication failed")
        else:
            raise AuthenticationFailed("re-authentication failed")

    def handle_auth(self, pkt, counts):
        props = pkt.properties or {}
        if self.auth is None or props.get("authentication_method") != self.auth[0]:
            raise ProtocolError("AUTH without the CONNECT's Authentication Method "
                                "[MQTT-4.12.0-1, MQTT-4.12.0-5]")
        method, exchange = self.auth
        if pkt.reason_code == 0x19 and self._pending is None:   # re-authenticate
            self.auth = (method, self._start_auth(method))
            exchange = self.auth[1]
        elif pkt.reason_code != 0x18:
            raise ProtocolError("AUTH reason 0x%02x from a client" % pkt.reason_code)
        self._auth_step(exchange.step(props.get("authentication_data", b"")))

    # --- sending (any thread) -----------------------------------------------------
    def _observe_out(self, packet_type, data):
        """With the journal or faults on: record an outbound packet, or apply
        a fault to it (True: it is not to be sent now)."""
        if self.faults is not None and self._faulted(packet_type, (data,)):
            return True
        journal = self.core.journal
        if journal is not None:
            journal.record(self.client_id, "out", packet_type, data, self.proto_ver)
        return False

    def _faulted(self, packet_type, chunks):
        """Apply an injected fault to an outbound packet: True if it is
        dropped, or held back to be written later, instead of written now."""
        faults = self.faults
        verdict = faults.verdict(packet_type) if faults is not None else None
        if verdict is None:
            return False
        journal = self.core.journal
        if journal is not None:
            journal.record(self.client_id, "out", packet_type, b"".join(chunks), self.proto_ver,
                           ["dropped by an injected fault" if verdict == "drop"
                            else "held %gs by an injected fault" % verdict])
        if verdict != "drop":
            faults.registry.later(verdict, functools.partial(self.write, tuple(chunks)))
        return True

    def _send_bytes(self, data, packet_type, barrier=0):
        if self.core.observed and self._observe_out(packet_type, data):
            return
        with self.out_lock:
            if self._closed:
                return
            if barrier > self.barrier:
                self._raise_barrier_locked(barrier)
            self._out.append(data)
            self.out_bytes += len(data)
        name = _SENT_METRIC.get(packet_type)
        if name is not None:
            self.core.counts()[name] += 1

    def send_ack(self, packet_type, packet_id, reason=RC_SUCCESS, barrier=0):
        self._send_bytes(ENCODERS[packet_type](Ack(packet_id, reason), self.proto_ver),
                         packet_type, barrier)

    def send_publish_ack(self, packet_type, packet_id, reason=RC_SUCCESS):
        """PUBACK or PUBREC for a PUBLISH this client sent; FlowControl holds
        it while a session its messages went to is congested."""
        data = ENCODERS[packet_type](Ack(packet_id, reason), self.proto_ver)
        if self.core.observed and self._observe_out(packet_type, data):
            return
        self.core.flow.send_ack(self, data, self._batch.congested)
        self.core.counts()[_SENT_METRIC[packet_type]] += 1

    def write(self, chunks, flush=True, barrier=0):
        """Append encoded packets (any thread); with ``flush``, also send what
        is buffered with one non-blocking send. They leave once the Store has
        committed change ``barrier``."""
        with self.out_lock:
            if barrier > self.barrier:
                self._raise_barrier_locked(barrier)
            self.write_locked(chunks, flush)

    def _raise_barrier_locked(self, barrier):
        self.barrier = barrier
        store = self.core.store
        if barrier > store.committed:
            store.hold(self)

    def refuse_unsent(self):
        """The Store could not write what this connection's unsent packets
        promise: drop them and close; the client resends what it has not
        seen acknowledged."""
        with self.out_lock:
            if self._closed:
                return
            self._out.clear()
            self.held.clear()
            self.held_since = None
            self.out_bytes = len(self._wire)
        self.shutdown("store_error")

    def write_locked(self, chunks, flush):
        """``write`` with ``out_lock`` held."""
        if self._closed:
            return
        size = 0
        for chunk in chunks:
            size += len(chunk)
        self._out.extend(chunks)
        self.out_bytes += size
        if flush and not self.blocked:
            self._send_locked()

    def flush(self):
        """Write what is buffered with one non-blocking send; never blocks."""
        with self.out_lock:
            if self.blocked or self._closed or not (self._out or self._wire):
                return
            self._send_locked()

    def _send_locked(self, last=False):
        """Encode what is waiting and offer it to the socket once (out_lock held).
        What the socket does not take stays in ``_wire`` for the service thread.
        Packets waiting for a commit (``barrier``) stay in ``_out``, unless
        they are the ``last`` before a close (``_send_last``)."""
        if self.faults is not None and self.faults.frozen():
            return   # an injected freeze: everything waits for the thaw
        out = self._out
        store = self.core.store
        if out and store is not None and not last and (
                self.acks_pending or self.barrier > store.committed):
            waiting = sum(map(len, out))
            out = ()
        else:
            waiting = 0
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if self.transport is not None:
                data = self.transport.wrap(data)
            wire = self._wire + data if self._wire else data
        else:
            wire = self._wire
        sent = 0
        if wire:
            try:
                sent = self.sock.send(wire, _MSG_DONTWAIT)
            except BlockingIOError:
                pass
            except OSError:
                self._wire = b""
                self.out_bytes = 0
                self.shutdown("closed")
                return
            self.core.counts()["bytes/sent"] += sent
        self._wire = wire[sent:] if sent < len(wire) else b""
        self.out_bytes = len(self._wire) + waiting
        if self._wire:
            if not self.blocked:
                self.blocked = True
                self.blocked_since = self.core.now()
                self.hooks.watch_writable(self)
        elif self.blocked:
            self.blocked = False
            self.blocked_since = None
            self.hooks.unwatch_writable(self)

    def on_writable(self):
        """Service thread: the socket can take more of a blocked buffer."""
        with self.out_lock:
            if self._closed:
                return
            self._send_locked()
            if self.blocked:
                return
        session = self.session
        if session is not None:
            conn = session.drain()
            if conn is not None:
                conn.flush()

    # --- closing --------------------------------------------------------------------
    def send_disconnect(self, reason):
        """5.0: tell the client why the server closes its connection
        [MQTT-4.13.2-1]; it is sent with what is buffered, without blocking."""
        code = DISCONNECT_REASONS.get(reason)
        if self.proto_ver != MQTT_V5 or code is None:
            return
        if self.session is not None:
            self._send_last(encode_disconnect(Disconnect(code), MQTT_V5), DISCONNECT)
        elif self._pending is not None:   # during an AUTH exchange: CONNACK says it
            self._send_last(encode_connack(Connack(False, code), MQTT_V5), CONNACK)

    def _send_last(self, data, packet_type):
        """The last packet before the broker closes: it promises nothing, so
        it does not wait for the disk; what waits for the disk is dropped."""
        journal = self.core.journal
        if journal is not None:
            journal.record(self.client_id, "out", packet_type, data, self.proto_ver)
        with self.out_lock:
            if self._closed:
                return
            store = self.core.store
            if store is not None and (self.acks_pending or self.barrier > store.committed):
                self._out.clear()
            self._out.append(data)
            self.out_bytes += len(data)
            if not self.blocked:
                self._send_locked(last=True)
        name = _SENT_METRIC.get(packet_type)
        if name is not None:
            self.core.counts()[name] += 1

    def shutdown(self, reason):
        """Ask the reader thread to close this connection (any thread)."""
        if self.close_reason is None:
            self.close_reason = reason
            self.send_disconnect(reason)
        if self.faults is not None:
            self.faults.thaw.set()   # a frozen reader wakes up to close
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _close(self, reason):
        """Reader thread, last: close the socket, publish the will and detach
        the session. The bookkeeping (registries, listener, counters) goes to
        the service thread (``hooks.closed``), which does it for every closed
        connection under one acquisition of each lock: when thousands drop at
        once, they do not queue for those locks (and for the GIL each time)."""
        with self.out_lock:
            self._closed = True
            self._out.clear()
            self._wire = b""
            self.out_bytes = 0
            if self.blocked:
                self.blocked = False
                self.hooks.unwatch_writable(self)
        if reason != "closed":   # the peer has not closed: it gets a FIN first
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sock.close()
        if self.session is not None:
            _log.debug("Client %s disconnected (%s)", self.client_id, reason)
            if self.will is not None and reason != "shutdown":
                self._publish_will(reason)
            self.session.detach(self)
        self.hooks.closed(self, reason, self.core.take_counts())

    def _publish_will(self, reason):
        """Publish the will now, or (5.0, Will Delay Interval) when the delay
        or the session ends, whichever is first, unless the client comes
        back before [MQTT-3.1.3-9]."""
        will, self.will = self.will, None
        will_props = will.properties or {}
        properties = forwarded_properties(will_props)
        msg = Message(will.topic, will.payload, will.qos, will.retain, self.client_id, False,
                      properties, self.core.clock)
        delay = will_props.get("will_delay_interval", 0)
        session = self.session
        if delay and not session.clean_session:
            if reason != "conflict":   # taken over: the session goes on, no will
                self.core.delay_will(self, msg, delay)
            return
        batch = Batch()
        self.core.publish(msg, batch)
        batch.run()

    def info(self):
        return {"client_id": self.client_id, "username": self.username,
                "ipaddress": self.peer[0], "port": self.peer[1],
                "clean_sess": self.clean_session, "proto_ver": self.proto_ver,
                "keepalive": self.keepalive, "connected_at": self.connected_at}


#: Packet type -> Connection handler (mosquitto's handle__packet switch).
_HANDLERS = {
    CONNECT: Connection.handle_connect, PUBLISH: Connection.handle_publish,
    PUBACK: Connection.handle_puback, PUBREC: Connection.handle_pubrec,
    PUBREL: Connection.handle_pubrel, PUBCOMP: Connection.handle_pubcomp,
    SUBSCRIBE: Connection.handle_subscribe, UNSUBSCRIBE: Connection.handle_unsubscribe,
    PINGREQ: Connection.handle_pingreq, DISCONNECT: Connection.handle_disconnect,
    AUTH: Connection.handle_auth,
}


###############################################################################
# Listeners ###################################################################
###############################################################################

#: Listener type (EMQ X config name) -> protocol name in the REST API.
LISTENER_PROTOCOLS = {"tcp": "mqtt:tcp", "ssl": "mqtt:ssl", "ws": "mqtt:ws", "wss": "mqtt:wss"}


def make_ssl_context(certfile, keyfile, cacertfile=None, verify=False,
                     fail_if_no_peer_cert=False):
    """A server TLS context as EMQ X's ssl listener options describe it:
    ``verify`` (verify_peer) asks for a client certificate and checks it
    against ``cacertfile``; ``fail_if_no_peer_cert`` makes it mandatory."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    if cacertfile:
        context.load_verify_locations(cacertfile)
    if fail_if_no_peer_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif verify in (True, "verify_peer"):   # a bool, or emq.conf's word
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class Listener:
    """A listening socket of one type (tcp, ssl, ws, wss); the Broker's
    service thread accepts on it and every connection gets its transport.

    ``lock`` guards ``current_clients`` and ``shutdown_count`` (a leaf lock).
    """

    def __init__(self, type="tcp", host="0.0.0.0", port=1883, name="external",
                 max_clients=102400, acceptors=1, certfile=None, keyfile=None,
                 cacertfile=None, verify=False, fail_if_no_peer_cert=False,
                 peer_cert_as_username=None, mqtt_path="/mqtt"):
        if type not in LISTENER_PROTOCOLS:
            raise ValueError("unknown listener type %r" % type)
        self.type, self.name, self.protocol = type, name, LISTENER_PROTOCOLS[type]
        self.bind, self.max_clients, self.acceptors = host, max_clients, acceptors
        self.peer_cert_as_username, self.mqtt_path = peer_cert_as_username, mqtt_path
        self.ssl_context = None
        if type in ("ssl", "wss"):
            if not (certfile and keyfile):
                raise ValueError("listener %s.%s needs certfile and keyfile" % (type, name))
            self.ssl_context = make_ssl_context(certfile, keyfile, cacertfile, verify,
                                                fail_if_no_peer_cert)
        if type in ("ws", "wss") and wsproto is None:
            raise ValueError("listener %s.%s needs the wsproto package" % (type, name))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(1024)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.port = self.sock.getsockname()[1]
        #: guards current_clients and shutdown_count
        self.lock = threading.Lock()
        self.current_clients = 0
        self.shutdown_count = {}   # reason -> count (EMQ X esockd's shutdown_count)

    def make_transport(self):
        """A fresh transport for one accepted connection (None for plain TCP)."""
        if self.type == "tcp":
            return None
        if self.type == "ssl":
            return TlsTransport(self.ssl_context)
        if self.type == "ws":
            return WebSocketTransport(self.mqtt_path)
        return StackedTransport(TlsTransport(self.ssl_context),
                                WebSocketTransport(self.mqtt_path))

    def accept(self):
        """Accept one pending connection: (sock, peer); None when none is
        pending; False when it was closed at once for max_clients. OSError
        (EMFILE, ENFILE...) when the process or system is out of resources."""
        try:
            sock, peer = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        if _ACCEPT_INHERITS_NONBLOCK or sock.gettimeout() is not None:
            sock.setblocking(True)   # Linux: already blocking (one syscall less a connection)
        with self.lock:
            if self.current_clients >= self.max_clients:
                self.shutdown_count["max_clients"] = self.shutdown_count.get("max_clients", 0) + 1
                refused = True
            else:
                self.current_clients += 1
                refused = False
        if refused:
            sock.close()
            return False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, peer

    def count_refusal(self, reason):
        """A connection closed at once for want of resources (``reason``)."""
        with self.lock:
            self.shutdown_count[reason] = self.shutdown_count.get(reason, 0) + 1

    def connections_closed(self, reasons):
        """Connections of this listener ended, for these reasons."""
        with self.lock:
            self.current_clients -= len(reasons)
            for reason in reasons:
                if reason not in ("normal", "shutdown"):
                    self.shutdown_count[reason] = self.shutdown_count.get(reason, 0) + 1

    def info(self):
        with self.lock:
            return {"protocol": self.protocol, "listen": "%s:%d" % (self.bind, self.port),
                    "acceptors": self.acceptors, "max_clients": self.max_clients,
                    "current_clients": self.current_clients,
                    "shutdown_count": dict(self.shutdown_count) or []}

    def close(self):
        self.sock.close()


###############################################################################
# Dashboard page (HTML, CSS, JavaScript) ######################################
###############################################################################
#
# The emqx_dashboard plugin's page: plain HTML, CSS and JavaScript, no build
# step and nothing fetched from elsewhere. It calls the api/v2 routes a user
# could call, on the dashboard's own listener (dashboard.listener.http).

#: The dashboard's charts: a sample every HISTORY_INTERVAL seconds, the last
#: HISTORY_SAMPLES of them (ten minutes).
HISTORY_INTERVAL = 2
HISTORY_SAMPLES = 300
#: Live message views the dashboard's listener streams at once (each holds a task thread).
DASHBOARD_LIVE_VIEWS = 4
#: The page runs only its own script and style, and talks only to its own server.
DASHBOARD_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                 "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")

DASHBOARD_HTML = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>emqx_lite dashboard</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/dashboard.css">
<script src="/dashboard.js" defer></script>
</head>
<body>
<a class="skip-link" href="#main">Skip to content</a>

<header class="topbar">
  <div class="brand">emqx_lite <span class="brand-sub">dashboard</span></div>
  <div id="appbar" class="appbar" hidden>
    <button id="menu-toggle" class="menu-toggle" type="button" aria-expanded="false" aria-controls="nav">Menu</button>
    <nav id="nav" aria-label="Pages">
      <ul>
        <li><a href="#/overview">Overview</a></li>
        <li><a href="#/clients">Clients</a></li>
        <li><a href="#/sessions">Sessions</a></li>
        <li><a href="#/subscriptions">Subscriptions</a></li>
        <li><a href="#/topics">Topics</a></li>
        <li><a href="#/retained">Retained</a></li>
        <li><a href="#/publish">Publish</a></li>
        <li><a href="#/live">Live</a></li>
        <li><a href="#/plugins">Plugins</a></li>
        <li><a href="#/listeners">Listeners</a></li>
        <li><a href="#/bridges">Bridges</a></li>
        <li><a href="#/metrics">Metrics</a></li>
        <li><a href="#/users">Users</a></li>
        <li><a href="#/alarms">Alarms</a></li>
        <li><a href="#/journal">Journal</a></li>
        <li><a href="#/settings">Settings</a></li>
      </ul>
    </nav>
    <div class="who">
      <span id="who"></span>
      <button id="logout" type="button">Log out</button>
    </div>
  </div>
</header>

<p id="global-error" class="banner" role="alert" hidden></p>

<main id="main" tabindex="-1">
  <section id="login" class="login" aria-labelledby="login-title" hidden>
    <h1 id="login-title">Log in</h1>
    <form id="login-form" novalidate>
      <label for="login-user">User</label>
      <input id="login-user" name="username" autocomplete="username" required>
      <label for="login-password">Password</label>
      <input id="login-password" name="password" type="password" autocomplete="current-password">
      <button id="login-submit" type="submit" class="primary">Log in</button>
      <p id="login-error" class="error" role="alert"></p>
    </form>
  </section>

  <section id="page" hidden></section>
</main>

<dialog id="dialog" aria-labelledby="dialog-title"></dialog>
</body>
</html>
"""

DASHBOARD_CSS = """\
/* emqx_lite dashboard: a neutral palette, system fonts, no images. */

:root {
  --bg: #f5f6f8;
  --panel: #ffffff;
  --text: #1f2328;
  --muted: #57606a;
  --line: #d0d7de;
  --accent: #1f5fbf;
  --accent-soft: #e8f0fc;
  --danger: #b42318;
  --ok: #1a7f37;
  --in: #1f5fbf;    /* chart: messages in */
  --out: #c2410c;   /* chart: messages out */
  --conn: #1a7f37;  /* chart: connections */
  --radius: 6px;
}

* { box-sizing: border-box; }
[hidden] { display: none !important; }

body {
  margin: 0;
  background: var(--bg);
  color: var(--text);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}

h1 { font-size: 1.45rem; margin: 0 0 0.75rem; }
h2 { font-size: 1.1rem; margin: 1rem 0 0.5rem; }
a { color: var(--accent); }

/* Keyboard focus is always visible */
:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
h1:focus, h2:focus { outline: none; }

.skip-link { position: absolute; left: -999px; top: 0; background: var(--panel); padding: 0.5rem 1rem; z-index: 10; }
.skip-link:focus { left: 0.5rem; }

.visually-hidden {
  position: absolute; width: 1px; height: 1px; overflow: hidden;
  clip: rect(0 0 0 0); white-space: nowrap;
}

/* ---- Top bar and navigation ---- */
.topbar {
  display: flex; flex-wrap: wrap; align-items: center; gap: 0.5rem 1rem;
  padding: 0.5rem 1rem; background: var(--panel); border-bottom: 1px solid var(--line);
}
.brand { font-weight: 700; font-size: 1.05rem; white-space: nowrap; }
.brand-sub { font-weight: 400; color: var(--muted); }
.appbar { display: flex; flex-wrap: wrap; align-items: center; gap: 0.5rem 1rem; flex: 1; }
#nav { flex: 1; }
#nav ul { display: flex; flex-wrap: wrap; gap: 0.15rem; margin: 0; padding: 0; list-style: none; }
#nav a {
  display: block; padding: 0.3rem 0.55rem; border-radius: var(--radius);
  color: var(--text); text-decoration: none;
}
#nav a:hover { background: var(--bg); }
#nav a[aria-current="page"] { background: var(--accent-soft); color: var(--accent); font-weight: 600; }
.who { display: flex; align-items: center; gap: 0.5rem; color: var(--muted); font-size: 0.9rem; }
.menu-toggle { display: none; }

@media (max-width: 760px) {
  .menu-toggle { display: inline-block; }
  #nav { display: none; flex-basis: 100%; order: 3; }
  #nav.open { display: block; }
  #nav ul { flex-direction: column; }
  main { padding: 0.75rem; }
}

.banner { margin: 0; padding: 0.6rem 1rem; background: #fdecea; color: var(--danger); border-bottom: 1px solid #f4c7c3; }

/* ---- Page ---- */
main { padding: 1rem 1.25rem 2rem; max-width: 1400px; }
main:focus { outline: none; }
.intro, .hint { color: var(--muted); }
.hint { display: block; font-size: 0.85rem; }
.status { color: var(--ok); margin: 0.25rem 0; }
.error { color: var(--danger); font-weight: 600; margin: 0.25rem 0; }
.status:empty, .error:empty { margin: 0; }

/* ---- Controls ---- */
button, input, select, textarea { font: inherit; color: inherit; }
input, select, textarea {
  padding: 0.35rem 0.5rem; border: 1px solid var(--line); border-radius: var(--radius); background: var(--panel);
  max-width: 100%;
}
button {
  padding: 0.35rem 0.8rem; border: 1px solid var(--line); border-radius: var(--radius);
  background: var(--panel); cursor: pointer;
}
button:hover:not(:disabled) { background: var(--bg); }
button:disabled { opacity: 0.5; cursor: default; }
button.primary { background: var(--accent); border-color: var(--accent); color: #fff; }
button.primary:hover:not(:disabled) { background: #184c99; }
button.danger { color: var(--danger); border-color: #e5a5a0; }
button.danger:hover:not(:disabled) { background: #fdecea; }
button.small { padding: 0.15rem 0.55rem; font-size: 0.9rem; }
button.link { border: 0; background: none; padding: 0; color: var(--accent); text-decoration: underline; }
input.wide { width: 100%; min-width: 10rem; }

.login { max-width: 22rem; margin: 3rem auto; padding: 1.5rem; background: var(--panel); border: 1px solid var(--line); border-radius: var(--radius); }
.login form { display: grid; gap: 0.4rem; }
.login button { margin-top: 0.6rem; }

.form { display: grid; gap: 0.75rem; max-width: 34rem; }
.field { display: grid; gap: 0.2rem; }
.field.check { display: flex; align-items: center; gap: 0.5rem; }
.field label { font-weight: 600; }
.form > button { justify-self: start; }
.forms { display: flex; flex-wrap: wrap; gap: 2rem; margin-top: 1rem; }
.forms .form { flex: 1 1 18rem; }

.toolbar, .pager, .filters { display: flex; flex-wrap: wrap; align-items: center; gap: 0.5rem; margin: 0.5rem 0; }
.filters { align-items: end; gap: 0.75rem; }
.pager { margin-top: 0.75rem; }
.pageinfo { color: var(--muted); }

/* ---- Tables ---- */
.table-wrap { overflow-x: auto; background: var(--panel); border: 1px solid var(--line); border-radius: var(--radius); }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 0.4rem 0.65rem; text-align: left; border-bottom: 1px solid var(--line); white-space: nowrap; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; font-size: 0.9rem; }
tbody tr:last-child td { border-bottom: 0; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.selectable { cursor: pointer; }
tr.selectable:hover { background: var(--accent-soft); }
tr.selected, tr.selected:nth-child(even) { background: var(--accent-soft); }
td.empty, p.empty { color: var(--muted); font-style: italic; }
td.payload { white-space: pre-wrap; word-break: break-all; min-width: 12rem; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9rem; }
td button + button { margin-left: 0.4rem; }
.two-tables { display: grid; grid-template-columns: repeat(auto-fit, minmax(18rem, 1fr)); gap: 1rem; }
.two-tables h2 { margin-top: 0; }

.details { margin-top: 1rem; padding: 1rem; background: var(--panel); border: 1px solid var(--line); border-radius: var(--radius); }
.details h2 { display: inline-block; margin: 0 1rem 0.5rem 0; }
.details dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.2rem 1rem; margin: 0.5rem 0 0; }
.details dt { color: var(--muted); }
.details dd { margin: 0; word-break: break-all; }

/* ---- Overview: cards and charts ---- */
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(10rem, 1fr)); gap: 0.75rem; margin: 0 0 1rem; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: var(--radius); padding: 0.6rem 0.8rem; }
.card dt { color: var(--muted); font-size: 0.85rem; }
.card dd { margin: 0.15rem 0 0; font-size: 1.25rem; font-weight: 600; overflow-wrap: anywhere; }
.card.wide { grid-column: span 2; }
@media (max-width: 360px) { .card.wide { grid-column: auto; } }

.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 30rem), 1fr)); gap: 1rem; }
.chart { margin: 0; padding: 0.6rem 0.8rem; background: var(--panel); border: 1px solid var(--line); border-radius: var(--radius); min-width: 0; }
.chart figcaption { display: flex; flex-wrap: wrap; justify-content: space-between; gap: 0.25rem 1rem; }
.chart-title { font-weight: 600; }
.legend { display: flex; flex-wrap: wrap; gap: 1rem; }
.legend-item { display: inline-flex; align-items: center; gap: 0.3rem; }
.swatch { flex: none; }
.plot { width: 100%; overflow: hidden; }
.plot svg { display: block; }

svg .grid { stroke: #e4e7eb; stroke-width: 1; }
svg .axis { stroke: #8c959f; stroke-width: 1; }
svg .tick { fill: var(--muted); font-size: 12px; }
svg .axis-title { fill: var(--text); font-size: 12px; }
svg .line { fill: none; stroke-width: 2; stroke-linejoin: round; }
svg .dot { fill: var(--panel); stroke-width: 2; }
svg .series-in { stroke: var(--in); }
svg .series-out { stroke: var(--out); stroke-dasharray: 6 3; }
svg .series-conn { stroke: var(--conn); }

/* ---- Dialog ---- */
dialog { border: 1px solid var(--line); border-radius: var(--radius); padding: 1.25rem; max-width: min(32rem, 92vw); }
dialog::backdrop { background: rgba(31, 35, 40, 0.45); }
dialog h2 { margin-top: 0; }
.dialog-buttons { display: flex; flex-wrap: wrap; gap: 0.5rem; justify-content: flex-end; margin-top: 1rem; }
input[readonly] { background: var(--bg); color: var(--muted); }
"""

#: The page's script: log-in, a page per hash (#/clients), polling while
#: visible, hand-drawn SVG charts, the live view over fetch() (Server-Sent
#: Events with an Authorization header, which EventSource cannot send).
DASHBOARD_JS = """\
/* emqx_lite dashboard: plain JavaScript (ES2020), no libraries, no build step.

   Read it top to bottom:
     1. Helpers          building DOM nodes, formatting values
     2. API              fetch() with Basic auth; every failure becomes an ApiError
     3. Log-in           the form, sessionStorage, log-out
     4. Router           the page is named in location.hash (#/clients)
     5. Building blocks  message lines, tables, the dialog, paged lists
     6. Pages            one function each: overview (SVG charts), clients ... settings
     7. Start-up

   The page runs under a strict Content-Security-Policy (script and style only
   from this server), so nothing here uses eval or inline styles. There is no
   backslash in this file (a newline is written LF, below), so it can be
   embedded in a Python string as it is. */
"use strict";

// ---- 1. Helpers ---------------------------------------------------------------
const LF = String.fromCharCode(10);   // newline and carriage return, without a backslash
const CR = String.fromCharCode(13);
const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;

// h("button", {class: "x", onclick: f}, "text", child, ...) -> a new element.
// An attribute that is null, undefined or false is left out; true sets "".
// Children may be nested arrays; null, undefined and false are skipped.
const h = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);
const svg = (tag, attrs, ...children) =>
  build(document.createElementNS("http://www.w3.org/2000/svg", tag), attrs, children);
const add = (parent, ...children) => build(parent, {}, children);   // append

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (typeof value === "function") node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

const button = (text, onclick, attrs) =>
  h("button", Object.assign({ type: "button", onclick }, attrs), text);

const pad = (n, width = 2) => String(n).padStart(width, "0");

// "14:05:09" (or "2024-05-01 14:05:09" withDate) for a time in ms since the epoch
function clock(ms, withDate) {
  const d = new Date(ms);
  const time = pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  return withDate ? d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + time : time;
}

// Any value from the API as short text ("-" for nothing).
function show(value) {
  if (value === null || value === undefined || value === "") return "-";
  if (Array.isArray(value)) return value.length ? value.map(show).join(", ") : "-";
  if (typeof value === "object") {
    const parts = Object.entries(value).map(([k, v]) => k + ": " + show(v));
    return parts.length ? parts.join(", ") : "-";
  }
  return String(value);
}

// A payload from the API: its text, or "[base64] ..." when it is not UTF-8.
function payloadText(row, max = 200) {
  const text = (row.encoding === "base64" ? "[base64] " : "") + (row.payload || "");
  return text.length > max ? text.slice(0, max) + "..." : text;
}

// ---- 2. API -------------------------------------------------------------------
// Answers are {"code":0,"result":...} or {"code":N,"message":...}; a code
// that comes without a message is explained from this table.
const CODE_TEXT = {
  101: "badrpc", 102: "unknown error", 103: "username or password error",
  104: "empty username or password", 105: "user does not exist",
  106: "admin cannot be deleted", 107: "missing request parameter",
  108: "request parameter type error", 109: "request body is not JSON",
  110: "plugin already started", 111: "plugin not started",
  112: "client is not connected", 113: "user already exists", 114: "old password error",
};

class ApiError extends Error {
  // code: a number from the API, or a label such as "HTTP 404" or "Network error"
  constructor(code, message) {
    const label = typeof code === "number" ? "Error " + code : code;
    super(label + ": " + (message || CODE_TEXT[code] || "failed"));
    this.code = code;
  }
}

const errorText = (err) => (err instanceof ApiError ? err.message : "Error: " + err.message);
const networkError = () => new ApiError("Network error", "the dashboard's server does not answer");

// Who is logged in (sessionStorage keeps it across a reload), and the node.
const session = {
  user: sessionStorage.getItem("emqx_lite.user"),
  password: sessionStorage.getItem("emqx_lite.password"),
  node: null,
};

function authHeader() {
  const bytes = new TextEncoder().encode(session.user + ":" + session.password);
  return "Basic " + btoa(String.fromCharCode(...bytes));
}

// "nodes/<this node>/<rest>"
const nodePath = (rest) => "nodes/" + enc(session.node) + "/" + rest;

// fetch() an api/v2 path with the credentials. A network failure shows the
// banner; a 401 logs out. Resolves to the Response. credentials "omit" keeps
// the browser from showing its own log-in dialog on a 401.
async function apiFetch(method, path, body, signal) {
  const headers = { Authorization: authHeader() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch("/api/v2/" + path, {
      method, headers, signal, credentials: "omit", cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    networkTrouble(true);
    throw networkError();
  }
  networkTrouble(false);
  if (response.status === 401) {
    logOut("The server refused your credentials (HTTP 401). Please log in again.");
    throw new ApiError(401, "not logged in");
  }
  return response;
}

// The "result" of an answer, or an ApiError.
async function readResult(response) {
  const type = response.headers.get("Content-Type") || "";
  if (!type.includes("application/json")) {
    throw new ApiError("HTTP " + response.status, response.status === 404 ? "not found" : response.statusText);
  }
  const answer = await response.json().catch(() => {
    throw new ApiError("HTTP " + response.status, "the answer is not JSON");
  });
  if (answer.code !== 0) throw new ApiError(answer.code, answer.message);
  return answer.result;
}

// Call a route: await api("GET", "routes") -> its result.
const api = async (method, path, body) => readResult(await apiFetch(method, path, body));

function networkTrouble(on) {
  const banner = $("global-error");
  banner.textContent = on ? "Network error: the dashboard's server does not answer. Retrying..." : "";
  banner.hidden = !on;
}

// ---- 3. Log-in and log-out ----------------------------------------------------
async function logIn(event) {
  event.preventDefault();
  const user = $("login-user").value;
  const password = $("login-password").value;
  $("login-error").textContent = "";
  $("login-submit").disabled = true;
  try {
    const response = await fetch("/api/v2/auth", {
      method: "POST", credentials: "omit", cache: "no-store",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ username: user, password }),
    }).catch(() => { throw networkError(); });
    await readResult(response);   // code 103: "User not found" or "Password error"
    Object.assign(session, { user, password });
    sessionStorage.setItem("emqx_lite.user", user);
    sessionStorage.setItem("emqx_lite.password", password);
    $("login-password").value = "";
    await startApp();
  } catch (err) {
    $("login-error").textContent = errorText(err);
  } finally {
    $("login-submit").disabled = false;
  }
}

// After log-in (or a reload while logged in): find the node, show the app.
async function startApp() {
  const nodes = await api("GET", "management/nodes");
  session.node = nodes[0].name;
  $("who").textContent = session.user + " on " + session.node;
  $("login").hidden = true;
  $("appbar").hidden = $("page").hidden = false;
  if (!location.hash.startsWith("#/")) history.replaceState(null, "", "#/overview");
  route(false);
}

// Forget the credentials and show the log-in form (with `message`, if any).
function logOut(message) {
  leavePage();
  liveStop();
  closeDialog();
  Object.assign(session, { user: null, password: null, node: null });
  sessionStorage.removeItem("emqx_lite.user");
  sessionStorage.removeItem("emqx_lite.password");
  networkTrouble(false);
  $("appbar").hidden = $("page").hidden = true;
  $("page").replaceChildren();
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  document.title = "Log in - emqx_lite";
}

// ---- 4. Router: one page at a time, named by location.hash --------------------
let current = null;   // the page shown: {timers: Set, cleanups: []}, or null

function route(moveFocus) {
  if (!session.node) return;
  if (!location.hash.startsWith("#/") && current) return;   // e.g. the skip link
  let name = location.hash.slice(2);
  if (!PAGES[name]) {   // PAGES: at the end of section 6
    name = "overview";
    history.replaceState(null, "", "#/overview");
  }
  leavePage();
  current = { timers: new Set(), cleanups: [] };
  $("page").replaceChildren();
  document.title = PAGES[name][0] + " - emqx_lite";
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.getAttribute("href") === "#/" + name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  toggleMenu(false);
  PAGES[name][1]($("page"));
  const heading = $("page").querySelector("h1");
  if (moveFocus && heading) {   // keyboard and screen-reader users land on the new page
    heading.tabIndex = -1;
    heading.focus();
  }
}

// Stop the shown page's timers and run its clean-ups.
function leavePage() {
  if (!current) return;
  current.timers.forEach(clearTimeout);
  current.cleanups.forEach((fn) => fn());
  current = null;
}

// Run task() now, then again `ms` (a number, or a function giving one) after
// each run ends, while this page is shown; skipped while the tab is hidden.
function poll(task, ms) {
  const page = current;
  const run = async () => {
    if (page !== current) return;
    if (!document.hidden) await task().catch(() => {});
    if (page !== current) return;
    const id = setTimeout(() => { page.timers.delete(id); run(); }, typeof ms === "function" ? ms() : ms);
    page.timers.add(id);
  };
  run();
}

// The navigation folds behind the Menu button on a narrow screen.
function toggleMenu(open) {
  open = $("nav").classList.toggle("open", open);
  $("menu-toggle").setAttribute("aria-expanded", String(open));
}

// ---- 5. Building blocks ---------------------------------------------------------
// Two lines for what happened: news (role=status) and errors (role=alert).
function messageLine(id) {
  const status = h("p", { id: id + "-status", class: "status", role: "status" });
  const error = h("p", { id: id + "-error", class: "error", role: "alert" });
  return {
    nodes: [status, error],
    ok(text) { error.textContent = ""; status.textContent = text; },
    fail(err) { status.textContent = ""; error.textContent = errorText(err); },
    clearError() { error.textContent = ""; },
  };
}

// Await call(); report `done` or the error on `msg`. Resolves to true if it worked.
async function act(msg, call, done) {
  try {
    await call();
    msg.ok(done);
    return true;
  } catch (err) {
    msg.fail(err);
    return false;
  }
}

// A page's heading (and introduction) and message lines; returns the messageLine.
function pageHead(root, id, title, intro) {
  const msg = messageLine(id);
  add(root, h("h1", {}, title), intro ? h("p", { class: "intro" }, intro) : null, msg.nodes);
  return msg;
}

// A labelled form field: <div><label>text</label> control hint</div>
function field(text, control, hint) {
  const hintNode = hint ? h("span", { class: "hint", id: control.id + "-hint" }, hint) : null;
  if (hintNode) control.setAttribute("aria-describedby", hintNode.id);
  return h("div", { class: "field" }, h("label", { for: control.id }, text), control, hintNode);
}

// A table in a box that scrolls sideways on a narrow screen.
// columns: [[heading, field name, or row => text, node or array of nodes], ...]
// options: {key(row), selected (a key), onSelect(row), empty (text)}
function table(id, caption, columns, rows, options = {}) {
  const cell = (get, row) => {
    const value = typeof get === "function" ? get(row) : row[get];
    return h("td", {}, value instanceof Node || Array.isArray(value) ? value : show(value));
  };
  const body = rows.map((row) => {
    const key = options.key ? options.key(row) : null;
    const tr = h("tr", { class: key !== null && key === options.selected ? "selected" : null },
      columns.map(([, get]) => cell(get, row)));
    if (options.onSelect) {
      tr.classList.add("selectable");
      tr.addEventListener("click", (e) => {
        if (!e.target.closest("button, a, input, select")) options.onSelect(row);
      });
    }
    return tr;
  });
  if (!rows.length) {
    body.push(h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, options.empty || "None.")));
  }
  return h("div", { class: "table-wrap", tabindex: 0, role: "region", "aria-label": caption },
    h("table", { id }, h("caption", { class: "visually-hidden" }, caption),
      h("thead", {}, h("tr", {}, columns.map(([name]) => h("th", { scope: "col" }, name)))),
      h("tbody", {}, body)));
}

// Put `node` in `holder` instead of what was there, keeping the sideways
// scroll and the keyboard focus (on the control with the same label).
function fill(holder, node) {
  const old = holder.firstElementChild;
  const key = (n) => n.getAttribute("aria-label") || n.id || "";
  const focused = old && old.contains(document.activeElement) ? key(document.activeElement) : "";
  const left = old ? old.scrollLeft : 0;
  holder.replaceChildren(node);
  node.scrollLeft = left;
  const controls = [node, ...node.querySelectorAll("button, a, input, select")];
  const again = focused && controls.find((n) => key(n) === focused);
  if (again) again.focus();
}

// The one in-page dialog (a modal <dialog>; Escape closes it). The focus
// goes back where it was when it closes (see boot()).
let dialogReturn = null;

function openDialog(title, content, buttons) {
  dialogReturn = document.activeElement;
  $("dialog").replaceChildren(h("h2", { id: "dialog-title" }, title), ...content,
    h("div", { class: "dialog-buttons" }, buttons));
  $("dialog").showModal();
}

function closeDialog() {
  if ($("dialog").open) $("dialog").close();
}

// Ask a question in the dialog: true for `okLabel`, false for Cancel or Escape.
function confirmDialog(title, text, okLabel) {
  return new Promise((resolve) => {
    const dialog = $("dialog");
    const done = (answer) => {
      dialog.removeEventListener("close", onClose);
      closeDialog();
      resolve(answer);
    };
    const onClose = () => done(false);
    const cancel = button("Cancel", () => done(false), { id: "dialog-cancel" });
    openDialog(title, [h("p", { id: "dialog-text" }, text)],
      [button(okLabel, () => done(true), { id: "dialog-ok", class: "danger" }), cancel]);
    dialog.setAttribute("aria-describedby", "dialog-text");
    dialog.addEventListener("close", onClose);
    cancel.focus();   // the safe answer is the default
  });
}

// A list over a paged route (clients, sessions, ...): a search box where the
// API has a route per id, paging, a table, and the details of a clicked row.
// cfg: {id, title, noun, list (path), one(query) (path), searchLabel,
//       columns, key(row), details (bool), actions(row, page), refresh (ms)}
function listPage(root, cfg) {
  const id = cfg.id;
  const state = { page: 1, size: 20, query: "", selected: null, rows: [], asked: 0, failed: false };
  const page = { msg: messageLine(id), load };
  const holder = h("div");
  const info = h("span", { id: id + "-pageinfo", class: "pageinfo" });
  const goTo = (n) => { state.page = n; load(); };
  const prev = button("Previous", () => goTo(state.page - 1), { id: id + "-prev" });
  const next = button("Next", () => goTo(state.page + 1), { id: id + "-next" });
  const size = h("select", { id: id + "-size", onchange: () => { state.size = Number(size.value); goTo(1); } },
    [10, 20, 50, 100].map((n) => h("option", { value: n, selected: n === state.size }, n)));
  const details = h("section", { id: id + "-details", class: "details", "aria-label": cfg.noun, hidden: true });
  const search = h("input", { id: id + "-search", type: "search", autocomplete: "off" });
  const find = (query) => { search.value = state.query = query; goTo(1); };

  add(root, h("h1", {}, cfg.title),
    cfg.one && h("form", {
      class: "toolbar", role: "search", onsubmit: (e) => { e.preventDefault(); find(search.value); },
    },
      h("label", { for: search.id }, cfg.searchLabel), search,
      h("button", { type: "submit", id: id + "-search-button" }, "Search"), button("Show all", () => find(""))),
    page.msg.nodes, holder,
    h("div", { class: "pager" }, prev, info, next, h("label", { for: size.id }, "Rows per page"), size,
      button("Refresh", load, { id: id + "-refresh" })),
    details);

  // With details, the first column is a button that shows them.
  const columns = cfg.columns.map(([name, get], i) => (i === 0 && cfg.details
    ? [name, (row) => button(cfg.key(row), () => select(row),
      { class: "link", "aria-label": "Details of " + cfg.key(row) })]
    : [name, get]));
  if (cfg.actions) columns.push(["Actions", (row) => cfg.actions(row, page)]);

  const render = () => fill(holder, table(id + "-table", cfg.title, columns, state.rows, {
    key: cfg.key, selected: state.selected, empty: state.query ? "No match." : "None.",
    onSelect: cfg.details ? select : null,
  }));

  function select(row) {
    state.selected = row ? cfg.key(row) : null;
    render();
    showDetails();
    if (row) details.querySelector("h2").focus();
  }

  function showDetails() {
    details.hidden = state.selected === null;
    if (details.hidden) return;
    const row = state.rows.find((r) => cfg.key(r) === state.selected);
    details.replaceChildren(h("h2", { tabindex: -1 }, cfg.noun + " " + state.selected),
      button("Close", () => select(null)),
      row ? h("dl", {}, Object.entries(row).map(([k, v]) => [h("dt", {}, k), h("dd", {}, show(v))]))
        : h("p", {}, "Not in the list any more."));
  }

  async function load() {
    const asked = ++state.asked;   // only the latest answer is shown
    let result;
    try {
      result = await api("GET", state.query ? cfg.one(state.query)
        : cfg.list + "?curr_page=" + state.page + "&page_size=" + state.size);
    } catch (err) {
      page.msg.fail(err);
      state.failed = true;
      return;
    }
    if (state.failed) page.msg.clearError();   // (an action's error stays)
    state.failed = false;
    if (asked !== state.asked) return;
    if (!state.query && !result.objects.length && state.page > 1 && result.total_page >= 1) {
      state.page = result.total_page;   // past the end (rows went away): the last page
      return load();
    }
    state.rows = result.objects;
    render();
    info.textContent = state.query
      ? state.rows.length + " found for " + JSON.stringify(state.query)
      : "Page " + state.page + " of " + Math.max(1, result.total_page) + " (" + result.total_num + " in all)";
    prev.disabled = Boolean(state.query) || state.page <= 1;
    next.disabled = Boolean(state.query) || state.page >= result.total_page;
    showDetails();
  }

  poll(load, cfg.refresh || 5000);
}

// A page whose content load() builds (a table, mostly), refreshed every `ms`.
function simplePage(root, id, title, load, ms) {
  const msg = pageHead(root, id, title);
  const holder = add(root, h("div")).lastChild;
  poll(async () => {
    try {
      fill(holder, await load());
      msg.clearError();
    } catch (err) {
      msg.fail(err);
    }
  }, ms);
  return holder;
}

// ---- 6. Pages -------------------------------------------------------------------

// -- Overview: cards, and charts of the last ten minutes
function overviewPage(root) {
  const msg = pageHead(root, "overview", "Overview");
  const cards = [["Node", "ov-node"], ["Version", "ov-version"], ["Uptime", "ov-uptime"],
    ["Connections", "ov-connections"], ["Subscriptions", "ov-subscriptions"], ["Topics", "ov-topics"],
    ["Retained", "ov-retained"], ["Messages received", "ov-received"], ["Messages sent", "ov-sent"]];
  const charts = [
    chart("chart-messages", "Messages per second", "messages/s", false, [
      { key: "messages_in", label: "in", cls: "series-in", id: "chart-in-latest", unit: "/s" },
      { key: "messages_out", label: "out", cls: "series-out", id: "chart-out-latest", unit: "/s" }]),
    chart("chart-connections", "Connections", "connections", true, [
      { key: "connections", label: "connections", cls: "series-conn", id: "chart-conn-latest", unit: "" }]),
  ];
  add(root, h("dl", { class: "cards" }, cards.map(([label, id]) =>
    h("div", { class: id === "ov-node" ? "card wide" : "card" }, h("dt", {}, label), h("dd", { id }, "-")))),
  h("div", { class: "charts" }, charts.map((c) => c.figure)));

  poll(async () => {
    try {
      const node = enc(session.node);
      const [nodes, stats, metrics] = await Promise.all([api("GET", "management/nodes"),
        api("GET", "monitoring/stats/" + node), api("GET", "monitoring/metrics/" + node)]);
      const info = nodes.find((n) => n.name === session.node) || nodes[0];
      const values = {
        "ov-node": info.name, "ov-version": info.version, "ov-uptime": info.uptime,
        "ov-connections": stats["clients/count"], "ov-subscriptions": stats["subscriptions/count"],
        "ov-topics": stats["topics/count"], "ov-retained": stats["retained/count"],
        "ov-received": metrics["messages/received"], "ov-sent": metrics["messages/sent"],
      };
      for (const [id, value] of Object.entries(values)) $(id).textContent = show(value);
      msg.clearError();
    } catch (err) {
      msg.fail(err);
    }
  }, 2000);

  // The server samples every `interval` seconds; the page asks as often.
  let interval = 2;
  let samples = [];
  const draw = () => charts.forEach((c) => c.draw(samples));
  poll(async () => {
    try {
      const history = await api("GET", nodePath("history"));
      interval = history.interval || 2;
      samples = history.samples;
      draw();
    } catch (err) {
      msg.fail(err);
    }
  }, () => interval * 1000);
  window.addEventListener("resize", draw);
  current.cleanups.push(() => window.removeEventListener("resize", draw));
}

// A chart: a <figure> with a caption, a legend with the latest values as
// text ("in 20.0/s"), and an SVG line chart drawn to the figure's width.
// series: [{key (a sample's field), label, cls (colour), id (of the latest value), unit}]
function chart(id, caption, yTitle, integers, series) {
  const plot = h("div", { class: "plot" });
  const figure = h("figure", { id, class: "chart" },
    h("figcaption", {}, h("span", { class: "chart-title" }, caption + ", last 10 minutes"),
      h("span", { class: "legend" }, series.map((s) => h("span", { class: "legend-item" },
        svg("svg", { width: 22, height: 10, "aria-hidden": "true" },
          svg("line", { x1: 1, y1: 5, x2: 21, y2: 5, class: "line " + s.cls })),
        s.label + " ", h("strong", { id: s.id }, "-"))))),
    plot);
  const format = (v) => (integers ? String(Math.round(v)) : v.toFixed(1));

  function draw(samples) {
    const last = samples[samples.length - 1];
    const latest = series.map((s) => (last ? format(last[s.key]) + s.unit : "-"));
    series.forEach((s, i) => { $(s.id).textContent = latest[i]; });
    // Sizes in pixels, so the text stays legible at any width.
    const width = Math.max(280, plot.clientWidth || 600);
    const height = 240;
    const m = { left: 56, right: 14, top: 12, bottom: 42 };   // room for the axes' labels
    const w = width - m.left - m.right;
    const ht = height - m.top - m.bottom;
    // Time from 1 to 10 minutes back; values from 0 to a round number.
    const end = last ? last.time : Date.now();
    const start = Math.max(end - 600000, Math.min(samples.length ? samples[0].time : end, end - 60000));
    const shown = samples.filter((p) => p.time >= start);
    const yTicks = niceTicks(Math.max(0, ...shown.flatMap((p) => series.map((s) => p[s.key]))), integers);
    const top = yTicks[yTicks.length - 1];
    const x = (t) => m.left + ((t - start) / (end - start)) * w;
    const y = (v) => m.top + ht - (v / top) * ht;
    const text = (attrs, words) =>
      svg("text", Object.assign({ class: "tick", "text-anchor": "middle" }, attrs), words);

    const grid = yTicks.map((v) => [svg("line", { class: "grid", x1: m.left, x2: m.left + w, y1: y(v), y2: y(v) }),
      text({ x: m.left - 6, y: y(v) + 4, "text-anchor": "end" }, v >= 10000 ? v / 1000 + "k" : v)]);
    const step = [10, 15, 30, 60, 120, 300, 600].map((s) => s * 1000)
      .find((s) => (end - start) / s <= Math.max(2, Math.floor(w / 80))) || 600000;
    for (let t = Math.ceil(start / step) * step; x(t) <= width - 28; t += step) {   // room for the label
      grid.push(svg("line", { class: "grid", x1: x(t), x2: x(t), y1: m.top, y2: m.top + ht }),
        text({ x: x(t), y: m.top + ht + 16 }, step < 60000 ? clock(t) : clock(t).slice(0, 5)));
    }
    plot.replaceChildren(svg("svg", { width, height, viewBox: "0 0 " + width + " " + height, role: "img",
      "aria-label": caption + ", now " + series.map((s, i) => s.label + " " + latest[i]).join(", ") },
    grid,
    svg("line", { class: "axis", x1: m.left, y1: m.top + ht, x2: m.left + w, y2: m.top + ht }),
    svg("line", { class: "axis", x1: m.left, y1: m.top, x2: m.left, y2: m.top + ht }),
    text({ class: "axis-title", x: m.left + w / 2, y: height - 6 }, "time"),
    text({ class: "axis-title", transform: "translate(14 " + (m.top + ht / 2) + ") rotate(-90)" }, yTitle),
    shown.length ? null : text({ x: m.left + w / 2, y: m.top + ht / 2 }, "No samples yet"),
    series.map((s) => [svg("polyline", { class: "line " + s.cls,   // a line, and a dot at the latest value
      points: shown.map((p) => x(p.time).toFixed(1) + "," + y(p[s.key]).toFixed(1)).join(" ") }),
    last && svg("circle", { class: "dot " + s.cls, cx: x(last.time), cy: y(last[s.key]), r: 3 })])));
  }

  return { figure, draw };
}

// 0 and four or five round steps (1, 2 or 5 times a power of ten) up to at least `max`.
function niceTicks(max, integers) {
  const target = Math.max(max, integers ? 4 : 1);
  const power = Math.pow(10, Math.floor(Math.log10(target / 4)));
  let step = [1, 2, 5, 10].map((f) => f * power).find((s) => s >= target / 4);
  if (integers) step = Math.max(1, Math.round(step));
  const ticks = [0];
  while (ticks[ticks.length - 1] < target) ticks.push(Number((ticks.length * step).toPrecision(6)));
  return ticks;
}

// -- Clients, sessions, subscriptions, topics, retained messages: paged lists
function clientsPage(root) {
  listPage(root, {
    id: "clients", title: "Clients", noun: "Client", refresh: 2000, details: true,
    list: nodePath("clients"), one: (q) => nodePath("clients/" + enc(q)),
    searchLabel: "Client ID (exact)", key: (r) => r.client_id,
    columns: [["Client ID"], ["Username", "username"], ["IP address", "ipaddress"], ["Port", "port"],
      ["Clean session", "clean_sess"], ["Protocol", "proto_ver"], ["Keepalive (s)", "keepalive"],
      ["Connected at", "connected_at"]],
    actions: (row, page) => button("Kick", async () => {
      await act(page.msg, () => api("DELETE", "clients/" + enc(row.client_id)), "Kicked " + row.client_id + ".");
      page.load();
    }, { class: "danger small", "aria-label": "Kick " + row.client_id }),
  });
}

function sessionsPage(root) {
  listPage(root, {
    id: "sessions", title: "Sessions", noun: "Session", details: true,
    list: nodePath("sessions"), one: (q) => nodePath("sessions/" + enc(q)),
    searchLabel: "Client ID (exact)", key: (r) => r.client_id,
    columns: [["Client ID"], ["Clean session", "clean_sess"], ["Subscriptions", "subscriptions"],
      ["Max inflight", "max_inflight"], ["Inflight", "inflight_len"], ["Queued", "mqueue_len"],
      ["Dropped", "mqueue_dropped"], ["Awaiting PUBREL", "awaiting_rel_len"],
      ["Delivered", "deliver_msg"], ["Enqueued", "enqueue_msg"], ["Created at", "created_at"]],
  });
}

function subscriptionsPage(root) {
  listPage(root, {
    id: "subscriptions", title: "Subscriptions", noun: "Subscription",
    list: nodePath("subscriptions"), one: (q) => nodePath("subscriptions/" + enc(q)),
    searchLabel: "Client ID (exact)", key: (r) => r.client_id + " " + r.topic,
    columns: [["Client ID", "client_id"], ["Topic filter", "topic"], ["QoS", "qos"]],
  });
}

function topicsPage(root) {
  listPage(root, {
    id: "topics", title: "Topics", noun: "Topic", list: "routes", one: (q) => "routes/" + enc(q),
    searchLabel: "Topic filter (exact)", key: (r) => r.topic,
    columns: [["Topic filter", "topic"], ["Node", "node"]],
  });
}

function retainedPage(root) {
  listPage(root, {
    id: "retained", title: "Retained messages", noun: "Retained message", details: true,
    list: nodePath("retained"), key: (r) => r.topic,
    columns: [["Topic"], ["Payload", (r) => payloadText(r, 80)], ["QoS", "qos"],
      ["Stored at", (r) => (r.time ? clock(r.time, true) : "-")]],
  });
}

// -- Publish: a form for POST mqtt/publish (remembered while the tab is open)
const published = { topic: "test/dashboard", payload: "hello", qos: "0", retain: false };

function publishPage(root) {
  const msg = messageLine("publish");
  const topic = h("input", { id: "pub-topic", value: published.topic, required: true, autocomplete: "off" });
  const payload = h("textarea", { id: "pub-payload", rows: 4 }, published.payload);
  const qos = h("select", { id: "pub-qos" },
    [0, 1, 2].map((q) => h("option", { value: q, selected: String(q) === published.qos }, q)));
  const retain = h("input", { id: "pub-retain", type: "checkbox", checked: published.retain });
  const sender = h("input", { id: "pub-client", autocomplete: "off", placeholder: "http" });
  const submit = (e) => {
    e.preventDefault();
    const body = { topic: topic.value, payload: payload.value, qos: Number(qos.value), retain: retain.checked };
    Object.assign(published, body, { qos: qos.value });
    if (sender.value) body.client_id = sender.value;
    act(msg, () => api("POST", "mqtt/publish", body),
      "Published to " + body.topic + " at " + clock(Date.now()) + ".");
  };
  add(root, h("h1", {}, "Publish"),
    h("form", { id: "publish-form", class: "form", onsubmit: submit },
      field("Topic", topic), field("Payload", payload), field("QoS", qos),
      h("div", { class: "field check" }, retain, h("label", { for: retain.id }, "Retain")),
      field("Publisher client ID", sender, 'Optional; the server says "http" without one.'),
      h("button", { type: "submit", id: "pub-submit", class: "primary" }, "Publish")),
    msg.nodes);
}

// -- Live: messages as they are routed (Server-Sent Events read with fetch(),
// because EventSource cannot send the Authorization header). The view keeps
// running while you visit other pages (publish, then come back); Stop or Log
// out ends it. Newest first, at most 200 rows.
const live = { controller: null, filter: "#", status: "Stopped.", error: "", count: 0, tbody: h("tbody") };

function livePage(root) {
  const input = h("input", { id: "live-topic", value: live.filter, required: true, autocomplete: "off" });
  const clear = () => { live.tbody.replaceChildren(); live.count = 0; liveShow(); };
  add(root, h("h1", {}, "Live messages"),
    h("form", { class: "toolbar", onsubmit: (e) => { e.preventDefault(); liveStart(input.value); } },
      h("label", { for: input.id }, "Topic filter"), input,
      h("button", { type: "submit", id: "live-start", class: "primary" }, "Start"),
      button("Stop", () => liveStop(), { id: "live-stop" }), button("Clear", clear, { id: "live-clear" })),
    h("p", { id: "live-status", class: "status", role: "status" }),
    h("p", { id: "live-error", class: "error", role: "alert" }),
    h("div", { class: "table-wrap", tabindex: 0, role: "region", "aria-label": "Live messages" },
      h("table", { id: "live-table" }, h("caption", { class: "visually-hidden" }, "Live messages, newest first"),
        h("thead", {}, h("tr", {},
          ["Time", "Topic", "QoS", "Retain", "Payload"].map((c) => h("th", { scope: "col" }, c)))),
        live.tbody)));
  liveShow();
}

// Show the view's state on its page (if shown) and in the navigation.
function liveShow(status, error) {
  if (status !== undefined) Object.assign(live, { status, error: error || "" });
  const running = live.controller !== null;
  if ($("live-status")) {
    const count = live.count ? " " + live.count + " received (the last 200 are shown)." : "";
    $("live-status").textContent = live.status + count;
    $("live-error").textContent = live.error;
    $("live-start").textContent = running ? "Restart" : "Start";
    $("live-stop").disabled = !running;
  }
  document.querySelector('#nav a[href="#/live"]').textContent = running ? "Live (on)" : "Live";
}

async function liveStart(filter) {
  liveStop();
  const controller = new AbortController();
  const mine = () => live.controller === controller;   // not stopped or restarted since
  Object.assign(live, { controller, filter });
  liveShow("Connecting...");
  try {
    const response = await apiFetch("GET", nodePath("live?topic=" + enc(filter)), undefined, controller.signal);
    if (!(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
      await readResult(response);   // an error answer ({"code":102,...}): throws
      throw new ApiError("HTTP " + response.status, "not an event stream");
    }
    liveShow("Live: messages on " + filter + " show up as they are routed.");
    await readEvents(response.body, liveEvent);
    if (mine()) liveShow("Stopped: the server ended the live view.");
  } catch (err) {
    if (mine()) liveShow("Stopped.", err.name === "AbortError" ? "" : errorText(err));
  } finally {
    if (mine()) live.controller = null;
    liveShow();
  }
}

function liveStop() {
  const controller = live.controller;
  live.controller = null;
  if (controller) controller.abort();
  liveShow("Stopped.");
}

function liveEvent(type, data) {
  if (type === "dropped") live.error = JSON.parse(data).count + " messages were skipped: too many to show.";
  if (type === "message") {
    const m = JSON.parse(data);
    live.tbody.prepend(h("tr", {}, h("td", {}, clock(m.time)), h("td", {}, m.topic), h("td", {}, m.qos),
      h("td", {}, m.retain ? "yes" : "no"), h("td", { class: "payload" }, payloadText(m))));
    while (live.tbody.rows.length > 200) live.tbody.lastElementChild.remove();
    live.count += 1;
  }
  liveShow();
}

// Read a text/event-stream body, calling onEvent(type, data) per event;
// comments (": keepalive") are skipped. Resolves when the stream ends.
async function readEvents(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let type = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf(LF)) >= 0) {
      let line = buffer.slice(0, end);
      buffer = buffer.slice(end + 1);
      if (line.endsWith(CR)) line = line.slice(0, -1);
      const colon = line.indexOf(":");
      const name = colon < 0 ? line : line.slice(0, colon);
      const text = colon < 0 ? "" : line.slice(colon + (line[colon + 1] === " " ? 2 : 1));
      if (line === "") {   // a blank line ends an event
        if (data.length) onEvent(type, data.join(LF));
        type = "message";
        data = [];
      } else if (name === "event") type = text;
      else if (name === "data") data.push(text);
    }
  }
}

// -- Plugins: start and stop them; each one's settings in the dialog
function pluginsPage(root) {
  const msg = pageHead(root, "plugins", "Plugins");
  const holder = add(root, h("div")).lastChild;

  async function load() {
    const plugins = await api("GET", nodePath("plugins")).catch((err) => msg.fail(err));
    if (!plugins) return;
    const actions = (p) => [
      button(p.active ? "Stop" : "Start", () => toggle(p), { class: (p.active ? "danger" : "primary") + " small",
        "aria-label": (p.active ? "Stop " : "Start ") + p.name }),
      button("Settings", () => pluginSettings(p.name, msg),
        { class: "small", "aria-label": "Settings of " + p.name })];
    fill(holder, table("plugins-table", "Plugins", [["Name", "name"], ["Version", "version"],
      ["Description", "description"], ["Status", (p) => (p.active ? "active" : "stopped")], ["Actions", actions]],
    plugins));
  }

  async function toggle(plugin) {
    const stop = plugin.active;
    const dashboard = stop && plugin.name === "emqx_dashboard";
    if (dashboard && !await confirmDialog("Stop the dashboard?",
      "emqx_dashboard serves this page. If you stop it, this page will go away: it stops " +
      "working until the plugin is started again (through the REST API).", "Stop dashboard")) {
      msg.ok("The dashboard keeps running.");
      return;
    }
    const done = await act(msg, () => api("PUT", nodePath("plugins/" + enc(plugin.name)), { active: !stop }),
      (stop ? "Stopped " : "Started ") + plugin.name + ".");
    if (done && dashboard) dashboardStopped();
    else load();
  }
  load();
}

// The page after its own plugin was stopped: nothing polls any more.
function dashboardStopped() {
  leavePage();
  liveStop();
  history.replaceState(null, "", "#/stopped");
  const heading = h("h1", { tabindex: -1 }, "The dashboard was stopped");
  $("page").replaceChildren(heading,
    h("p", {}, "emqx_dashboard is stopped, so this page has no server to talk to any more. Start the " +
      "plugin again through the REST API (PUT /api/v2/nodes/" + session.node + "/plugins/emqx_dashboard " +
      'with {"active": true}), then reload this page.'),
    h("p", {}, h("a", { href: "#/plugins" }, "Back to the plugins")));
  heading.focus();
}

// The settings form of one plugin, in the dialog; saved with one PUT.
async function pluginSettings(name, msg) {
  const path = nodePath("plugin_configs/" + enc(name));
  const got = await api("GET", path).catch((err) => msg.fail(err));
  if (!got) return;
  const secret = (row) => row.secret || row.key.toLowerCase().includes("password");
  // A PUT replaces the whole settings: a table entry left out is removed, so each
  // entry (auth.username.x, or the rows of auth.client.1.*) gets a Remove box. A
  // row with "$" names a new entry: $name asks for a name, $n/$id take the next number.
  const group = (key) => key.replace(/^((?:auth|module)[.][a-z]+[.](?:rule[.])?[0-9]+)[.].*$/, "$1");
  const next = 1 + Math.max(0, ...got.map((r) => Number((r.key.match(/[.]([0-9]+)(?:[.]|$)/) || [])[1] || 0)));
  const rows = got.map((r) => Object.assign({}, r, { key: r.key.replace(/[$](?:n|id)(?![a-z])/, String(next)),
    template: r.key.includes("$"), named: r.key.includes("$name") }));
  const inputs = rows.map((r, i) => h("input", {
    id: "cfg-" + i, value: r.value, autocomplete: "off",
    required: r.required && !secret(r) && !r.template,
    type: secret(r) ? "password" : "text", placeholder: secret(r) ? "unchanged" : null,
  }));
  const names = rows.map((r, i) => (r.named ? h("input", { id: "cfg-name-" + i, autocomplete: "off" }) : null));
  const entry = (r) => !r.template && r.required && /^(auth[.]username[.]|auth[.]client[.]|module[.])/.test(r.key);
  const firsts = new Set();
  const removes = rows.map((r, i) => {
    if (!entry(r) || firsts.has(group(r.key))) return null;
    firsts.add(group(r.key));
    return h("input", { type: "checkbox", id: "cfg-remove-" + i, "aria-label": "Remove " + group(r.key) });
  });
  const result = messageLine("dialog");
  const save = async (e) => {
    e.preventDefault();
    const gone = new Set(rows.filter((r, i) => removes[i] && removes[i].checked).map((r) => group(r.key)));
    const body = {};   // every key, but a password left empty (it stays as it is)
    rows.forEach((r, i) => {
      const key = r.named ? r.key.replace("$name", names[i].value.trim()) : r.key;
      if (gone.has(group(r.key)) || (r.template && !inputs[i].value)) return;
      if (r.named && !names[i].value.trim()) return;
      if (!(secret(r) && !inputs[i].value)) body[key] = inputs[i].value;
    });
    if (await act(result, () => api("PUT", path, body), "")) {
      closeDialog();
      msg.ok("Saved the settings of " + name + ".");
    }
  };
  const fieldOf = (r, i) => {
    const label = r.template ? "New: " + r.key : r.key + (r.required ? " (required)" : "");
    const hint = r.desc + (secret(r) && !r.template ? " Leave it empty to keep the current one." : "");
    const rows = [r.named ? field("New entry's name (" + r.key + ")", names[i]) : null,
      field(label, inputs[i], hint)];
    if (removes[i]) rows.push(h("div", { class: "field" }, h("label", { for: removes[i].id }, removes[i],
      " Remove " + group(r.key))));
    return rows;
  };
  openDialog("Settings of " + name, [h("form", { id: "plugin-settings", class: "form", onsubmit: save },
    rows.length ? rows.map(fieldOf) : h("p", {}, "This plugin has no settings."), result.nodes)],
  [h("button", { type: "submit", form: "plugin-settings", id: "dialog-ok", class: "primary" }, "Save"),
    button("Cancel", closeDialog, { id: "dialog-cancel" })]);
  if (inputs.length) inputs[0].focus();
}

// -- Listeners, metrics and stats, alarms: tables refreshed on a timer
function listenersPage(root) {
  simplePage(root, "listeners", "Listeners", async () => table("listeners-table", "Listeners",
    [["Protocol", "protocol"], ["Listen on", "listen"], ["Acceptors", "acceptors"],
      ["Max clients", "max_clients"], ["Current clients", "current_clients"],
      ["Closed connections by reason", "shutdown_count"]],
    await api("GET", "monitoring/listeners/" + enc(session.node))), 5000);
}

// -- Bridges (emqx_bridge_mqtt): state, remote, counters and last error; start and stop
function bridgesPage(root) {
  const msg = pageHead(root, "bridges", "Bridges");
  const holder = add(root, h("div")).lastChild;
  const verb = (b) => (b.state === "stopped" ? "Start" : "Stop");
  const toggle = (b) => act(msg, () => api("POST", nodePath("bridges/" + enc(b.name) + "/" +
    verb(b).toLowerCase())), verb(b) + (b.state === "stopped" ? "ed " : "ped ") + b.name).then(load);
  async function load() {
    try {
      const bridges = await api("GET", nodePath("bridges"));
      fill(holder, table("bridges-table", "Bridges", [["Name", "name"], ["State", "state"],
        ["Remote", "remote"], ["Protocol", "proto_ver"], ["Forwarded", "forwarded"],
        ["Received", "received"], ["Dropped", "dropped"], ["Queued", "queued"],
        ["Last error", (b) => b.last_error || "-"],
        ["Actions", (b) => button(verb(b), () => toggle(b),
          { class: "small", "aria-label": verb(b) + " bridge " + b.name })]], bridges,
      { empty: "No bridges: they are configured with bridge.mqtt.<name>.* keys." }));
    } catch (err) {
      msg.fail(err);
    }
  }
  poll(load, 2000);
}

function metricsPage(root) {
  const filter = h("input", { id: "metrics-filter", type: "search", autocomplete: "off" });
  const rows = (obj) => Object.entries(obj).filter(([name]) => name.includes(filter.value.trim())).sort();
  const columns = [["Name", (p) => p[0]], ["Value", (p) => p[1]]];
  const holder = simplePage(root, "metrics", "Metrics and stats", async () => {
    const [metrics, stats] = await Promise.all([api("GET", "monitoring/metrics/" + enc(session.node)),
      api("GET", "monitoring/stats/" + enc(session.node))]);
    return h("div", { class: "two-tables" },
      h("section", {}, h("h2", {}, "Metrics"), table("metrics-table", "Metrics", columns, rows(metrics))),
      h("section", {}, h("h2", {}, "Stats"), table("stats-table", "Stats", columns, rows(stats))));
  }, 2000);
  holder.before(h("div", { class: "toolbar" },
    h("label", { for: filter.id }, "Show the names containing"), filter));
}

function alarmsPage(root) {
  simplePage(root, "alarms", "Alarms", async () => {
    const alarms = await api("GET", nodePath("alarms"));
    if (!alarms.length) return h("p", { id: "alarms-empty", class: "empty" }, "No alarms.");
    return table("alarms-table", "Alarms", Object.keys(alarms[0]).map((k) => [k, k]), alarms);
  }, 5000);
}

// -- Users: the dashboard's users; add one, change a password, delete one
function usersPage(root) {
  const msg = pageHead(root, "users", "Users");
  const holder = add(root, h("div")).lastChild;
  const input = (id, type, value) =>
    h("input", { id, type, value, autocomplete: type === "password" ? "new-password" : "off" });
  const newUser = { name: input("user-new-name", "text"), password: input("user-new-password", "password"),
    tags: input("user-new-tags", "text", "viewer") };
  const pwd = { user: input("pwd-user", "text", session.user), old: input("pwd-old", "password"),
    new: input("pwd-new", "password") };

  async function load() {
    const users = await api("GET", "users").catch((err) => msg.fail(err));
    if (!users) return;
    fill(holder, table("users-table", "Users", [["User", "username"], ["Tags", "tags"],
      ["Actions", (u) => button("Delete", () => remove(u.username),
        { class: "danger small", "aria-label": "Delete " + u.username })]], users));
  }

  async function remove(name) {
    const sure = await confirmDialog("Delete the user " + name + "?",
      name + " will no longer be able to log in.", "Delete user");
    if (sure) await act(msg, () => api("DELETE", "users/" + enc(name)), "Deleted the user " + name + ".");
    load();
  }

  async function addUser(e) {
    e.preventDefault();
    const body = { username: newUser.name.value, password: newUser.password.value, tags: newUser.tags.value };
    if (await act(msg, () => api("POST", "users", body), "Added the user " + body.username + ".")) {
      newUser.name.value = newUser.password.value = "";
    }
    load();
  }

  async function changePassword(e) {
    e.preventDefault();
    const [user, newPassword] = [pwd.user.value, pwd.new.value];
    const body = { old_pwd: pwd.old.value, new_pwd: newPassword };
    const path = "change_pwd/" + enc(user);
    if (await act(msg, () => api("PUT", path, body), "Changed the password of " + user + ".")) {
      pwd.old.value = pwd.new.value = "";
      if (user === session.user) {   // ours: the next calls need the new one
        session.password = newPassword;
        sessionStorage.setItem("emqx_lite.password", newPassword);
      }
    }
  }

  add(root, h("div", { class: "forms" },
    h("form", { id: "user-add", class: "form", onsubmit: addUser }, h("h2", {}, "Add a user"),
      field("User", newUser.name), field("Password", newUser.password), field("Tags", newUser.tags),
      h("button", { type: "submit", class: "primary" }, "Add user")),
    h("form", { id: "user-password", class: "form", onsubmit: changePassword }, h("h2", {}, "Change a password"),
      field("User", pwd.user), field("Old password", pwd.old), field("New password", pwd.new),
      h("button", { type: "submit", class: "primary" }, "Change password"))));
  load();
}

// -- Journal: the broker's record of the last packets in and out, filtered
function journalPage(root) {
  const msg = pageHead(root, "journal", "Journal",
    "The last packets in and out of the broker, and what it decided about them.");
  const input = (id, attrs) => h("input", Object.assign({ id, autocomplete: "off" }, attrs));
  const filters = {
    client_id: input("journal-client"),
    type: input("journal-type", { placeholder: "PUBLISH" }),
    direction: h("select", { id: "journal-direction" },
      ["", "in", "out", "fault"].map((v) => h("option", { value: v }, v || "any"))),
    topic: input("journal-topic", { placeholder: "a/+/c" }),
    limit: input("journal-limit", { type: "number", min: 1, value: 100 }),
  };
  const holder = h("div");

  async function load(e) {
    if (e) e.preventDefault();
    const query = new URLSearchParams();
    for (const [name, control] of Object.entries(filters)) if (control.value) query.set(name, control.value);
    try {
      const entries = (await api("GET", nodePath("journal?" + query))).reverse();   // newest first
      const time = (r) => clock(r.time * 1000) + "." + pad(Math.floor(r.time * 1000) % 1000, 3);   // seconds
      fill(holder, table("journal-table", "Journal entries", [["Seq", "seq"], ["Time", time],
        ["Dir.", "direction"], ["Type", "type"], ["Client ID", "client_id"], ["Topic", "topic"],
        ["QoS", "qos"], ["Retain", "retain"], ["Packet ID", "packet_id"], ["Reason", "reason_code"],
        ["Payload", "payload"], ["Note", "note"]], entries, { empty: "No entries match." }));
      msg.ok(entries.length + " entries, newest first.");
    } catch (err) {
      msg.fail(err);
    }
  }

  msg.nodes[0].before(h("form", { id: "journal-form", class: "filters", onsubmit: load },
    field("Client ID", filters.client_id), field("Packet type", filters.type),
    field("Direction", filters.direction), field("Topic (name or filter)", filters.topic),
    field("Limit (the last N)", filters.limit),
    h("button", { type: "submit", id: "journal-refresh", class: "primary" }, "Refresh")));
  add(root, holder);
  load();
}

// -- Settings: the broker's configuration, saved one key at a time. Rows are
// {key, value, desc, required}; EMQ X's own {key, value, datatpye, app,
// runtime} (sic) works too: a key with runtime false cannot be saved.
function settingsPage(root) {
  const msg = pageHead(root, "settings", "Settings",
    "The broker's settings. Some can only be changed in its configuration file, and take effect after a restart.");
  const holder = add(root, h("div")).lastChild;
  const save = (r) => act(msg, () => api("PUT", nodePath("configs/" + enc(r.app || "emqx")),
    { key: r.key, value: r.input.value }), "Saved " + r.key + " = " + r.input.value + ".");
  const about = (r) => [r.desc || r.datatpye, r.required && "required",
    r.runtime === false && "set in the configuration file"].filter(Boolean).join("; ");
  api("GET", nodePath("configs")).then((rows) => {
    for (const r of rows) {
      r.input = h("input", { value: r.value, "aria-label": r.key, class: "wide", readonly: r.runtime === false });
    }
    fill(holder, table("settings-table", "Settings", [["Key", "key"], ["Value", "input"], ["About", about],
      ["", (r) => button("Save", () => save(r),
        { class: "small", "aria-label": "Save " + r.key, disabled: r.runtime === false })]], rows));
  }, (err) => msg.fail(err));
}

// The pages, by the name in the URL (#/name): [title, function(root)]
const PAGES = {
  overview: ["Overview", overviewPage], clients: ["Clients", clientsPage],
  sessions: ["Sessions", sessionsPage], subscriptions: ["Subscriptions", subscriptionsPage],
  topics: ["Topics", topicsPage], retained: ["Retained", retainedPage], publish: ["Publish", publishPage],
  live: ["Live", livePage], plugins: ["Plugins", pluginsPage], listeners: ["Listeners", listenersPage],
  bridges: ["Bridges", bridgesPage],
  metrics: ["Metrics", metricsPage], users: ["Users", usersPage], alarms: ["Alarms", alarmsPage],
  journal: ["Journal", journalPage], settings: ["Settings", settingsPage],
};

// ---- 7. Start-up ------------------------------------------------------------------
function boot() {
  $("login-form").addEventListener("submit", logIn);
  $("logout").addEventListener("click", () => logOut(""));
  $("menu-toggle").addEventListener("click", () => toggleMenu());
  $("dialog").addEventListener("close", () => {
    if (dialogReturn && dialogReturn.isConnected) dialogReturn.focus();
    dialogReturn = null;
  });
  window.addEventListener("hashchange", () => route(true));
  if (session.user === null) {
    logOut("");
    $("login-user").focus();
  } else {
    startApp().catch((err) => { if (session.user !== null) logOut(errorText(err)); });
  }
}

boot();
"""


###############################################################################
# REST API (EMQ X api/v2 blueprint) ###########################################
###############################################################################

#: The plugins emqx_lite really has, with EMQ X 2.x's names (listed alphabetically).
PLUGINS = {
    "emqx_auth_clientid": "EMQ X Authentication with ClientId/Password",
    "emqx_auth_username": "EMQ X Authentication with Username/Password",
    "emqx_bridge_mqtt": "EMQ X Bridge MQTT",
    "emqx_dashboard": "EMQ X Dashboard",
    "emqx_modules": "EMQ X Modules",
    "emqx_retainer": "EMQ X Retainer",
}

#: The paths GET / lists (emqttd_http:api_list/0).
API_PATHS = [
    "api/v2/management/nodes", "api/v2/monitoring/nodes", "api/v2/monitoring/listeners",
    "api/v2/monitoring/metrics", "api/v2/monitoring/stats", "api/v2/nodes/{node}/clients",
    "api/v2/clients/{clientid}", "api/v2/nodes/{node}/sessions", "api/v2/sessions/{clientid}",
    "api/v2/nodes/{node}/subscriptions", "api/v2/subscriptions/{clientid}", "api/v2/routes",
    "api/v2/mqtt/publish", "api/v2/mqtt/subscribe", "api/v2/mqtt/unsubscribe",
    "api/v2/nodes/{node}/plugins", "api/v2/users", "api/v2/auth",
]

#: mqtt/publish ``properties`` (EMQX 5's names) -> JSON type.
_REST_PROPERTIES = {"payload_format_indicator": int, "message_expiry_interval": int,
                    "content_type": str, "response_topic": str, "correlation_data": str,
                    "user_properties": dict}


class ApiError(Exception):
    """An EMQ X API error: HTTP 200 with {"code": N, "message": ...} (spec §4)."""

    def __init__(self, code, message=None):
        super().__init__(message)
        self.code, self.message = code, message


class Throttled(Exception):
    """Too many failed logins from one address: HTTP 429 until ``retry_after``."""

    def __init__(self, address, retry_after):
        self.retry_after = max(1, int(retry_after + 0.999))
        super().__init__("too many failed logins from %s; retry in %d s"
                         % (address, self.retry_after))


#: Headers on every API response (OWASP's REST set): no MIME sniffing, nothing
#: cached (responses carry broker state to authenticated users), no framing.
SECURITY_HEADERS = (("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store"),
                    ("X-Frame-Options", "DENY"),
                    ("Content-Security-Policy", "frame-ancestors 'none'"))
_STATE_CHANGING = frozenset(("POST", "PUT", "DELETE", "PATCH"))


def _raw_path(uri):
    """The path of a request URI as the client sent it (absolute form too), undecoded."""
    if "://" in uri:
        uri = "/" + uri.split("://", 1)[1].partition("/")[2]
    return uri.split("?", 1)[0].split("#", 1)[0]


def _needs_auth(path, settings):
    """Every /api/v2/ path but exactly /api/v2/auth needs Basic auth, checked
    before routing: an unknown path answers 401 to a stranger (spec §1.2).
    So does the Prometheus text, unless ``prometheus_auth`` is off."""
    if path in _PROMETHEUS_PATHS:
        return settings["prometheus_auth"]
    return path.startswith("/api/v2/") and path != "/api/v2/auth"


def _basic_credentials(header):
    """'Basic base64(name:password)' -> (name, password); None if absent or malformed."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        text = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    name, colon, password = text.partition(":")
    return (name, password) if colon and name else None


class ApiGuard:
    """Who may use the REST API: credentials checked against the users table,
    failed logins counted per source address.

    After ``max_failures`` failures within ``window`` seconds an address gets
    Throttled (429) for the rest of the window, without its passwords being
    hashed; a credential verified a moment ago (``UserTable.cached``) still
    passes, so an operator's session survives someone guessing from the same
    address. Each throttled address is logged once per window.

    ``lock`` guards ``_failures`` (a leaf lock).
    """
    MAX_ADDRESSES = 10000   # addresses remembered at most (expired windows are dropped first)

    def __init__(self, users, max_failures=10, window=60.0):
        self.users, self.max_failures, self.window = users, max_failures, window
        #: guards _failures
        self.lock = threading.Lock()
        self._failures = {}   # source address -> [window start, failures]

    def check(self, name, password, address):
        """``users.check()`` for a login from ``address``; raises Throttled."""
        if self.users.cached(name, password):
            return True
        now = time.monotonic()
        with self.lock:
            entry = self._failures.get(address)
            if entry is not None and now - entry[0] < self.window \
                    and self.max_failures and entry[1] >= self.max_failures:
                raise Throttled(address, entry[0] + self.window - now)
        result = self.users.check(name, password)
        if result is not True:
            self._count_failure(address, now)
        return result

    def _count_failure(self, address, now):
        with self.lock:
            entry = self._failures.get(address)
            if entry is None or now - entry[0] >= self.window:
                if len(self._failures) >= self.MAX_ADDRESSES:
                    self._failures = {a: e for a, e in self._failures.items()
                                      if now - e[0] < self.window}
                    if len(self._failures) >= self.MAX_ADDRESSES:
                        self._failures.pop(next(iter(self._failures)))
                entry = self._failures[address] = [now, 0]
            entry[1] += 1
            throttled_now = entry[1] == self.max_failures
        if throttled_now:
            _log.warning("REST API: %d failed logins from %s; its logins are refused for %d s",
                         self.max_failures, address, self.window)


class _NotFound(Exception):
    """Answered as EMQ X does: HTTP 404 with an empty body."""


def _kmg(n):
    """EMQ X's memory format: '69.17M', '2.00G', '512.00K', or the integer."""
    for factor, suffix in ((1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
        if n > factor:
            return "%.2f%s" % (n / factor, suffix)
    return n


def _process_memory():
    """(total, used) bytes of this process: resident set, and its anonymous
    (heap and stack) part; from /proc where there is one."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        rss = int(fields["VmRSS"].split()[0]) * 1024
        anon = int(fields.get("RssAnon", fields["VmRSS"]).split()[0]) * 1024
        return rss, anon
    except (OSError, KeyError, ValueError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024
        return peak, peak


def _limits():
    """(max_fds, process_available) from the process limits."""
    try:
        import resource
        fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    except (ImportError, OSError, AttributeError):
        return 0, 0
    if nproc == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/kernel/threads-max") as f:
                nproc = int(f.read())
        except (OSError, ValueError):
            nproc = 0
    return (fds if fds != resource.RLIM_INFINITY else 0), nproc


def _unquote(segment):
    """Decode a captured URL segment as mochiweb_util:unquote does: %XX and '+'
    as a space (spec §1.3); one trailing '/' is not part of the value."""
    from urllib.parse import unquote_plus
    if segment.endswith("/"):
        segment = segment[:-1]
    return unquote_plus(segment)


def _page(rows, args):
    """EMQ X pagination (spec §6)."""
    try:
        page = int(args.get("curr_page", "1"))
        size = int(args.get("page_size", "20"))
    except ValueError:
        raise _NotFound() from None
    if size <= 0:
        raise _NotFound()
    start = (max(page, 1) - 1) * size
    return {"current_page": page, "page_size": size, "total_num": len(rows),
            "total_page": -(-len(rows) // size), "objects": rows[start:start + size]}


def _label_value(text):
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


#: A bridge's counters in the Prometheus text: info() key -> (type, help)
_BRIDGE_FAMILIES = {
    "forwarded": ("counter", "Messages the bridge delivered to its remote"),
    "received": ("counter", "Messages the bridge received from its remote"),
    "dropped": ("counter", "Messages for the remote the bridge dropped, for any reason"),
    "dropped_overflow": ("counter", "QoS 1/2 messages dropped, oldest first, from a full queue"),
    "dropped_qos0": ("counter", "QoS 0 messages dropped while the remote was down or slow"),
    "dropped_refused": ("counter", "Messages the remote refused with a reason code"),
    "queued": ("gauge", "QoS 1/2 messages waiting for the remote's acknowledgement"),
}


def prometheus_text(metrics, stats, node, bridges=()):
    """``metrics`` and ``stats`` in Prometheus's text exposition format (0.0.4).

    Family names are EMQX's Prometheus plugin's: ``emqx_`` and the key with
    ``/`` as ``_`` (``messages/received`` -> ``emqx_messages_received``).
    Metrics are counters (``messages/retained``, a count of what is stored,
    is a gauge), stats are gauges; every sample has a ``node`` label.
    ``bridges`` (Bridge.info() rows) add ``emqx_bridge_<counter>`` families
    with a ``bridge`` label too.
    """
    label = '{node="%s"}' % _label_value(node)
    lines = []
    for kind, values in (("metric", metrics), ("stat", stats)):
        for key in sorted(values):
            name = "emqx_" + key.replace("/", "_")
            gauge = kind == "stat" or key == "messages/retained"
            lines += ["# HELP %s The EMQ X %s %s%s." % (
                          name, kind, key, "" if gauge else ", counted since the broker started"),
                      "# TYPE %s %s" % (name, "gauge" if gauge else "counter"),
                      "%s%s %d" % (name, label, values[key])]
    if bridges:
        for key, (kind, about) in _BRIDGE_FAMILIES.items():
            name = "emqx_bridge_" + key
            lines += ["# HELP %s %s." % (name, about), "# TYPE %s %s" % (name, kind)]
            lines += ['%s{node="%s",bridge="%s"} %d' % (name, _label_value(node),
                                                       _label_value(b["name"]), b[key])
                      for b in bridges]
    return "\n".join(lines) + "\n"


#: Paths of the Prometheus text (``prometheus.auth = off`` serves them open).
_PROMETHEUS_PATHS = frozenset(("/api/v2/prometheus/stats", "/metrics"))


def _payload_row(payload):
    """A payload as JSON carries it: text if it is UTF-8, else base64."""
    try:
        return {"payload": payload.decode("utf-8"), "encoding": "utf-8"}
    except UnicodeDecodeError:
        return {"payload": base64.b64encode(payload).decode("ascii"), "encoding": "base64"}


class LiveViews:
    """The live message views (``nodes/{node}/live``) one HTTP server streams:
    each holds one of its task threads, so there are at most ``limit``.

    ``lock`` guards ``captures`` and ``closed`` (a leaf lock).
    """
    QUEUE = 1000   # messages kept for a view whose reader is slow; older ones are dropped

    def __init__(self, broker, limit):
        self.broker, self.limit = broker, limit
        #: guards captures and closed
        self.lock = threading.Lock()
        self.captures = set()
        self.closed = False

    def open(self, topic_filter):
        """A Capture of ``topic_filter`` for a new view; ApiError 102 if the
        filter is invalid or every view is taken."""
        core = self.broker._require_started()
        try:
            capture = Capture(core, topic_filter, limit=self.QUEUE)
        except ValueError as exc:
            raise ApiError(102, str(exc)) from None
        with self.lock:
            if self.closed or len(self.captures) >= self.limit:
                raise ApiError(102, "%d live views are open, the most this server streams at "
                                    "once: close one" % self.limit)
            self.captures.add(capture)
        core.add_tap(capture)
        return capture

    def release(self, capture):
        capture.close()
        with self.lock:
            self.captures.discard(capture)

    def close(self):
        """End every view (the server stops)."""
        with self.lock:
            self.closed = True
            captures = list(self.captures)
        for capture in captures:
            capture.close()

    def stream(self, capture):
        """The view's Server-Sent Events: a ``message`` event a message, a
        ``dropped`` event when a slow reader lost some, and a comment every
        second, by which a reader that has gone is noticed."""
        try:
            yield ": live view of %s\n\n" % capture.topic_filter
            while not capture.closed:
                messages, dropped = capture.take(1.0)
                events = ["event: dropped\ndata: {\"count\":%d}\n\n" % dropped] if dropped else []
                for msg in messages:
                    row = {"topic": msg.topic, "qos": msg.qos, "retain": bool(msg.retain),
                           "time": int(time.time() * 1000)}
                    row.update(_payload_row(msg.payload))
                    events.append("event: message\ndata: %s\n\n"
                                  % json.dumps(row, separators=(",", ":")))
                yield "".join(events) or ": keepalive\n\n"
        finally:
            self.release(capture)


#: The Faults methods the REST API offers.
_FAULT_ACTIONS = ("disconnect", "freeze", "drop_next", "delay", "refuse_connect", "close_after",
                  "pause_listener", "clear")


def create_api_blueprint(broker, live_views):
    """The EMQ X 2.x api/v2 routes, as a Flask blueprint bound to ``broker``
    (and emqx_lite's own: journal, faults, retained, history, live, prometheus)."""
    from flask import Blueprint, Response, request

    bp = Blueprint("emqx_api_v2", __name__, url_prefix="/api/v2")
    rule = bp.route

    def ok(result=()):
        return _json({"code": 0, "result": list(result) if isinstance(result, tuple) else result})

    def check_node(node):
        if _unquote(node) != broker.node:
            raise _NotFound()

    def params(**required):
        """Parse the JSON body and check required keys: 109 -> 107 -> 108 (spec §3)."""
        raw = request.get_data()
        if not raw.strip():
            body = {}
        else:
            try:
                body = json.loads(raw)
            except ValueError:
                raise ApiError(109, "Body not json") from None
            if not isinstance(body, dict):
                body = {}   # an array or a scalar has no keys (spec §13)
        for key in required:
            if key not in body:
                raise ApiError(107, "params error")
        for key, kind in required.items():
            value = body[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ApiError(108, "params type error")
        return body

    def optional(body, key, kind, default):
        value = body.get(key, default)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ApiError(108, "params type error")
        return value

    def client_row(c):
        """Connection.info() as EMQ X shows it."""
        return dict(c, username=c["username"] if c["username"] is not None else "undefined",
                    connected_at=_strftime(c["connected_at"]))

    def session_row(s):
        # Both key sets (decision 2): the page's names and 2.3.11's, all real numbers.
        return {"client_id": s["client_id"], "clean_sess": s["clean_sess"],
                "subscriptions": s["subscriptions"], "max_inflight": s["max_inflight"],
                "inflight_len": s["inflight_len"], "mqueue_len": s["mqueue_len"],
                "mqueue_dropped": s["mqueue_dropped"], "awaiting_rel_len": s["awaiting_rel_len"],
                "deliver_msg": s["deliver_msg"], "enqueue_msg": s["enqueue_msg"],
                "inflight_queue": s["inflight_len"], "message_queue": s["mqueue_len"],
                "message_dropped": s["mqueue_dropped"], "awaiting_rel": s["awaiting_rel_len"],
                "awaiting_ack": s["awaiting_ack"], "awaiting_comp": s["awaiting_comp"],
                "expiry_interval": s["expiry_interval"],
                "created_at": _strftime(s["created_at"])}

    def broker_info():
        return {"version": __version__, "sysdescr": "EMQ X Lite",
                "uptime": _uptime_text(broker.core.wall() - broker.core.started_at),
                "datetime": _strftime(broker.core.wall()),
                "otp_release": "Python/" + ".".join(map(str, sys.version_info[:3])),
                "node_status": "Running"}

    def node_info():
        total, used = _process_memory()
        max_fds, available = _limits()
        load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
        return {"name": broker.node,
                "otp_release": "Python/" + ".".join(map(str, sys.version_info[:3])),
                "memory_total": _kmg(total), "memory_used": _kmg(used),
                "process_available": available, "process_used": broker.thread_count(),
                "max_fds": max_fds, "clients": len(broker.core.connections),
                "node_status": "Running",
                "load1": "%.2f" % load[0], "load5": "%.2f" % load[1], "load15": "%.2f" % load[2]}

    def sorted_stats():
        stats = broker.stats()
        return {name: stats[name] for name in sorted(stats)}

    # --- Per node: management/nodes, monitoring/{nodes,listeners,metrics,stats} -------
    def per_node(path, info, every_node):
        """``<path>``: ``every_node(info())``, the shape the page gives for all
        nodes; ``<path>/{node}``: ``info()`` for this node."""
        name = path.rsplit("/", 2)[-2] + "_" + path.rsplit("/", 1)[-1]

        def one_node(node):
            check_node(node)
            return ok(info())

        bp.add_url_rule(path, "all_" + name, lambda: ok(every_node(info())),
                        strict_slashes=False)
        bp.add_url_rule(path + "/<node>", "one_" + name, one_node, strict_slashes=False)

    def keyed(result):
        return {broker.node: result}

    per_node("/management/nodes", broker_info, lambda i: [dict({"name": broker.node}, **i)])
    per_node("/monitoring/nodes", node_info, lambda i: [i])
    per_node("/monitoring/listeners", broker.listener_infos,
             lambda i: keyed(i[::-1]))   # decision 1; EMQ X's order
    per_node("/monitoring/metrics", broker.metrics, keyed)
    per_node("/monitoring/stats", sorted_stats, keyed)

    # --- Clients, sessions, subscriptions: nodes/{node}/<x>[/{id}], <x>/{id} -----------
    def per_client(name, rows, rows_of, check_paging=False, aliases=()):
        """The GET routes of a per-client resource: ``nodes/{node}/<name>`` (all
        rows, paged; also under ``aliases``), ``nodes/{node}/<name>/{id}`` and
        ``<name>/{id}`` ({"objects": [...]}, [] for an unknown id, spec §7.6)."""
        def list_all(node):
            check_node(node)
            return ok(_page(rows(), request.args))

        def get_one(client_id):
            return ok({"objects": rows_of(_unquote(client_id))})

        def get_on_node(node, client_id):
            check_node(node)
            if check_paging:
                _page([], request.args)   # bad paging parameters are a 404 here too (spec §6)
            return get_one(client_id)

        for prefix in ("/nodes/<node>/",) + aliases:
            bp.add_url_rule(prefix + name, "list_" + name, list_all, strict_slashes=False)
        bp.add_url_rule("/nodes/<node>/%s/<path:client_id>" % name, "get_node_" + name,
                        get_on_node)
        bp.add_url_rule("/%s/<path:client_id>" % name, "get_" + name, get_one)

    def by_topic(rows):
        return sorted(rows, key=lambda r: (r["client_id"], r["topic"]))

    per_client("clients", lambda: [client_row(c) for c in broker.clients()],
               lambda cid: [client_row(c) for c in broker.clients() if c["client_id"] == cid],
               check_paging=True)
    per_client("sessions", lambda: [session_row(s) for s in broker.sessions()],
               lambda cid: [session_row(s) for s in broker.sessions() if s["client_id"] == cid],
               aliases=("/node/<node>/",))
    per_client("subscriptions", lambda: by_topic(broker.subscriptions()),
               lambda cid: by_topic(broker.subscriptions(cid)))

    @rule("/clients/<path:client_id>", methods=["DELETE"])
    def kick_client(client_id):
        params()
        if not broker.kick(_unquote(client_id)):
            return _json({"code": 112})
        return ok()

    @rule("/clients/<path:client_id>/clean_acl_cache", methods=["PUT"])
    def clean_acl_cache(client_id):
        params(topic=str)
        client_id = _unquote(client_id).split("/")[0]
        if not broker.clean_acl_cache(client_id):
            return _json({"code": 112})
        return ok()

    # --- Routes: routes, routes/{topic} -----------------------------------------------
    @rule("/routes")
    def list_routes():
        rows = [{"topic": t, "node": broker.node} for t in sorted(broker.routes())]
        return ok(_page(rows, request.args))

    @rule("/routes/<path:topic>")
    def get_route(topic):
        topic = _unquote(topic)
        found = topic in broker.routes()
        return ok({"objects": [{"topic": topic, "node": broker.node}] if found else []})

    # --- Publish/Subscribe/Unsubscribe: mqtt/{publish,subscribe,unsubscribe} ------------
    @rule("/mqtt/publish", methods=["POST"])
    def publish():
        body = params(topic=str)
        payload = optional(body, "payload", str, "")
        qos = optional(body, "qos", int, 0)
        retain = optional(body, "retain", bool, False)
        client_id = optional(body, "client_id", str, "http")
        if qos not in (0, 1, 2):
            raise ApiError(108, "params type error")
        properties = publish_properties(optional(body, "properties", dict, {}))
        try:
            validate_topic_name(body["topic"])
        except MalformedPacket:
            raise ApiError(102, "validate topic: %s fail" % body["topic"]) from None
        broker.publish(body["topic"], payload.encode("utf-8"), qos, retain, client_id,
                       properties)
        return ok()

    def publish_properties(given):
        """mqtt/publish's optional ``properties``, by EMQX 5's names, as the
        MQTT 5.0 properties 5.0 subscribers get."""
        props = {}
        for key, value in given.items():
            kind = _REST_PROPERTIES.get(key)
            if kind is None or not isinstance(value, kind) or isinstance(value, bool):
                raise ApiError(108, "params type error")
            if key == "user_properties":
                if not all(isinstance(v, str) for v in value.values()):
                    raise ApiError(108, "params type error")
                props["user_property"] = list(value.items())
            elif key == "correlation_data":
                props[key] = value.encode("utf-8")
            else:
                props[key] = value
        if props.get("payload_format_indicator", 0) not in (0, 1) or not (
                0 <= props.get("message_expiry_interval", 0) <= 0xFFFFFFFF):
            raise ApiError(108, "params type error")
        return props

    @rule("/mqtt/subscribe", methods=["POST"])
    def subscribe():
        body = params(client_id=str, topic=str)
        qos = optional(body, "qos", int, 0)
        if qos not in (0, 1, 2):
            raise ApiError(108, "params type error")
        topic, client_id = body["topic"], body["client_id"]
        if not validate_topic_filter(topic):
            raise ApiError(102, "validate topic: %s fail" % topic)
        if not broker.is_connected(client_id):
            raise ApiError(102, "Clientid: %s not found" % client_id)
        try:
            broker.subscribe(client_id, topic, qos)
        except KeyError:
            raise ApiError(102, "Clientid: %s not found" % client_id) from None
        return ok()

    @rule("/mqtt/unsubscribe", methods=["POST"])
    def unsubscribe():
        body = params(client_id=str, topic=str)
        topic, client_id = body["topic"], body["client_id"]
        if not validate_topic_filter(topic):
            raise ApiError(102, "validate topic: %s fail" % topic)
        if not broker.is_connected(client_id):
            raise ApiError(102, "Clientid: %s not found" % client_id)
        try:
            broker.unsubscribe(client_id, topic)
        except KeyError:
            raise ApiError(102, "Clientid: %s not found" % client_id) from None
        return ok()

    # --- Plugins: nodes/{node}/plugins[/{name}] --------------------------------------
    @rule("/nodes/<node>/plugins", strict_slashes=False)
    def list_plugins(node):
        check_node(node)
        active = broker.plugins()
        return ok([{"name": name, "version": __version__, "description": PLUGINS[name],
                    "active": active[name]} for name in sorted(PLUGINS)])

    @rule("/nodes/<node>/plugins/<name>", methods=["PUT"], strict_slashes=False)
    def set_plugin(node, name):
        body = params(active=bool)
        name = _unquote(name)
        if _unquote(node) != broker.node or name not in PLUGINS:
            raise ApiError(102, "unknown")
        if not broker.set_plugin(name, body["active"]):
            if body["active"]:
                raise ApiError(110, "already_started")
            raise ApiError(111, "not_started")
        return ok()

    # --- Settings: configs, nodes/{node}/configs[/{app}], nodes/{node}/plugin_configs/{name}
    @rule("/configs", strict_slashes=False)
    def list_configs():
        return ok({broker.node: broker.configs()})   # keyed by node, no array (EMQ X 2.3)

    @rule("/nodes/<node>/configs", strict_slashes=False)
    def list_node_configs(node):
        check_node(node)
        return ok(broker.configs())

    @rule("/configs/<app>", methods=["PUT"], strict_slashes=False)
    @rule("/nodes/<node>/configs/<app>", methods=["PUT"], strict_slashes=False)
    def set_config(app, node=None):
        if node is not None:
            check_node(node)
        body = params(key=str, value=str)
        try:
            broker.set_config(body["key"], body["value"], _unquote(app))
        except ValueError as exc:
            raise ApiError(102, str(exc)) from None
        return ok()

    @rule("/nodes/<node>/plugin_configs/<name>", strict_slashes=False)
    def get_plugin_config(node, name):
        check_node(node)
        name = _unquote(name)
        if name not in PLUGINS:
            raise _NotFound()
        return ok(broker.plugin_config(name))

    @rule("/nodes/<node>/plugin_configs/<name>", methods=["PUT"], strict_slashes=False)
    def set_plugin_config(node, name):
        check_node(node)
        name = _unquote(name)
        if name not in PLUGINS:
            raise _NotFound()
        try:
            broker.set_plugin_config(name, params())
        except ValueError as exc:
            raise ApiError(102, str(exc)) from None
        return ok()

    # --- Bridges (emqx_bridge_mqtt): nodes/{node}/bridges[/{name}/start|stop] -------------
    @rule("/nodes/<node>/bridges", strict_slashes=False)
    def list_bridges(node):
        check_node(node)
        return ok([bridge.info() for _, bridge in sorted(broker.bridges.items())])

    @rule("/nodes/<node>/bridges/<name>/<action>", methods=["POST"], strict_slashes=False)
    def bridge_action(node, name, action):
        check_node(node)
        bridge = broker.bridges.get(_unquote(name))
        if bridge is None or action not in ("start", "stop"):
            raise ApiError(102, "no bridge named %r" % _unquote(name) if bridge is None
                           else "unknown action %r (start or stop)" % action)
        if action == "start" and not broker.plugins()["emqx_bridge_mqtt"]:
            raise ApiError(102, "the emqx_bridge_mqtt plugin is stopped: start it first")
        if not (bridge.start() if action == "start" else bridge.stop()):
            raise ApiError(110, "already_started") if action == "start" \
                else ApiError(111, "not_started")
        return ok()

    @rule("/nodes/<node>/alarms", strict_slashes=False)
    def list_alarms(node):
        return ok([])   # emqx_lite raises no alarms

    # --- For the dashboard (emqx_lite's own): retained, history, live -----------------
    @rule("/nodes/<node>/retained", strict_slashes=False)
    def list_retained(node):
        check_node(node)
        rows = [dict({"topic": m["topic"], "qos": m["qos"], "time": int(m["time"] * 1000)},
                     **_payload_row(m["payload"]))
                for m in sorted(broker.core.retained_infos(times=True),
                                key=lambda m: m["topic"])]
        return ok(_page(rows, request.args))

    @rule("/nodes/<node>/history", strict_slashes=False)
    def get_history(node):
        """The dashboard's charts: a sample every ``interval`` seconds, oldest first."""
        check_node(node)
        return ok({"interval": HISTORY_INTERVAL, "samples": broker.history()})

    @rule("/nodes/<node>/live", strict_slashes=False)
    def live(node):
        """Server-Sent Events: every message routed to ``topic`` from now on."""
        check_node(node)
        capture = live_views.open(request.args.get("topic", "#"))
        response = Response(live_views.stream(capture), mimetype="text/event-stream",
                            headers={"X-Accel-Buffering": "no"})
        # also when the stream never starts (HEAD, or a reader gone at once)
        response.call_on_close(functools.partial(live_views.release, capture))
        return response

    @rule("/prometheus/stats", strict_slashes=False)
    def prometheus_stats():
        return prometheus_response(broker)

    # --- Fault injection (emqx_lite's own): nodes/{node}/faults -------------------------
    @rule("/nodes/<node>/faults", methods=["POST"], strict_slashes=False)
    def inject_fault(node):
        """{"action": "<Faults method>", <its arguments by name>}."""
        check_node(node)
        body = params(action=str)
        action = body.pop("action")
        method = getattr(broker.faults, action, None) if action in _FAULT_ACTIONS else None
        if method is None:
            raise ApiError(102, "unknown action %r (one of %s)"
                           % (action, ", ".join(_FAULT_ACTIONS)))
        try:
            method(**body)
        except TypeError as exc:
            raise ApiError(107, "params error: %s" % exc) from None
        except ValueError as exc:
            raise ApiError(108, str(exc)) from None
        except KeyError as exc:
            raise ApiError(112, exc.args[0]) from None
        return ok()

    # --- The packet journal (emqx_lite's own): nodes/{node}/journal ---------------------
    @rule("/nodes/<node>/journal", strict_slashes=False)
    def get_journal(node):
        """Journal entries matching client_id, type, direction and topic (a
        filter may have wildcards); ``limit=N``: the last N of them."""
        check_node(node)
        args = request.args
        limit = args.get("limit", "")
        if limit and not (limit.isdigit() and int(limit) > 0):
            raise ApiError(108, "limit must be a positive integer")
        entries = broker.journal.query(**{name: args.get(name) or None for name in (
            "client_id", "type", "direction", "topic")})
        return ok(entries[-int(limit):] if limit else entries)

    # --- Users (the dashboard's admin table): auth, users[/{name}], change_pwd/{name} ---
    def dashboard_required():
        if not broker.plugins()["emqx_dashboard"]:
            raise _NotFound()

    @rule("/auth", methods=["POST"], strict_slashes=False)
    def login():
        dashboard_required()
        body = params(username=str, password=str)
        result = broker.api_guard.check(body["username"], body["password"], request.remote_addr)
        if result is None:
            raise ApiError(103, "User not found")
        if not result:
            raise ApiError(103, "Password error")
        return ok()

    @rule("/users", strict_slashes=False)
    def list_users():
        dashboard_required()
        return ok(broker.users.list())

    @rule("/users", methods=["POST"], strict_slashes=False)
    def add_user():
        dashboard_required()
        body = params(username=str, password=str, tags=str)
        if not body["username"] or not body["password"]:
            raise ApiError(104, "empty username or password")
        broker._require_writable()
        if not broker.users.add(body["username"], body["password"], body["tags"]):
            raise ApiError(113, "User already exist")
        broker.sync()
        return ok()

    @rule("/users/<path:username>", strict_slashes=False)
    def get_user(username):
        dashboard_required()
        user = broker.users.get(_unquote(username))
        return ok(user if user is not None else [])

    @rule("/users/<path:username>", methods=["PUT"])
    def update_user(username):
        dashboard_required()
        body = params(tags=str)
        broker._require_writable()
        if not broker.users.set_tags(_unquote(username), body["tags"]):
            raise ApiError(105, "User not found")
        broker.sync()
        return ok()

    @rule("/users/<path:username>", methods=["DELETE"])
    def delete_user(username):
        dashboard_required()
        params()
        username = _unquote(username)
        if username == "admin":
            raise ApiError(106, "admin cannot be deleted")
        broker._require_writable()
        if not broker.users.delete(username):
            raise ApiError(105, "User not found")
        broker.sync()
        return ok()

    @rule("/change_pwd/<path:username>", methods=["PUT"])
    def change_password(username):
        dashboard_required()
        body = params(old_pwd=str, new_pwd=str)
        username = _unquote(username)
        result = broker.api_guard.check(username, body["old_pwd"], request.remote_addr)
        if result is None:
            raise ApiError(105, "User not found")
        if not result:
            raise ApiError(114, "OldPassword error")
        if not body["new_pwd"]:
            raise ApiError(104, "empty username or password")
        broker._require_writable()
        broker.users.set_password(username, body["new_pwd"])
        broker.sync()
        return ok()

    return bp


def _json(obj, status=200):
    from flask import Response
    return Response(json.dumps(obj, separators=(",", ":")), status,
                    mimetype="application/json")


def prometheus_response(broker):
    from flask import Response
    bridges = [bridge.info() for _, bridge in sorted(broker.bridges.items())]
    return Response(prometheus_text(broker.metrics(), broker.stats(), broker.node, bridges),
                    mimetype="text/plain", content_type="text/plain; version=0.0.4; charset=utf-8")


def _empty(status):
    from flask import Response
    return Response(b"", status, mimetype="text/plain")


def create_app(broker, dashboard=False, live_views=2):
    """The WSGI application: the api/v2 blueprint, /status, / and Basic auth,
    with the cross-site and CORS rules and the security headers. The
    dashboard's (``dashboard=True``) serves the page at / and /metrics too.
    ``app.live_views`` streams at most ``live_views`` live views at once."""
    from flask import Flask, request
    from flask_httpauth import HTTPBasicAuth

    app = Flask("emqx_lite")
    app.live_views = LiveViews(broker, live_views)
    auth = HTTPBasicAuth(realm="emqx control center")
    cors_origins = frozenset(broker.settings["api_cors_origins"])

    @auth.verify_password
    def verify_password(username, password):
        return bool(username) and broker.api_guard.check(
            username, password or "", request.remote_addr) is True

    @auth.error_handler
    def unauthorized(status):
        return _empty(status)

    def cross_site():
        """True if the request comes from another site's page: its Origin is
        not this server's, or the browser says so in Sec-Fetch-Site."""
        origin = request.headers.get("Origin")
        if origin is not None:
            return origin.lower() != (request.scheme + "://" + request.host).lower()
        return request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none")

    @app.before_request
    def admit():
        origin = (request.headers.get("Origin") or "").lower()
        if request.method == "OPTIONS" and origin in cors_origins \
                and "Access-Control-Request-Method" in request.headers:
            return _cors_preflight()
        if request.method in _STATE_CHANGING and cross_site() and origin not in cors_origins:
            # A page on another site can make a browser send a form (text/plain or
            # urlencoded, no preflight) with its cached Basic credentials.
            _log.warning("REST API: refused a cross-site %s %s from %s (Origin %s)",
                         request.method, request.path, request.remote_addr,
                         request.headers.get("Origin", "none"))
            return _json({"code": 403, "message": "cross-site request refused"}, 403)
        if _needs_auth(request.path, broker.settings):
            return auth.login_required(lambda: None)()
        return None

    def _cors_preflight():
        response = _empty(204)
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, DELETE"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Max-Age"] = "600"
        return response

    @app.after_request
    def add_headers(response):
        for name, value in SECURITY_HEADERS:
            response.headers.setdefault(name, value)
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() in cors_origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    @app.route("/status")
    def status():
        return app.response_class("Node %s is started\nemqx_lite is running" % broker.node,
                                  mimetype="text/plain")

    if dashboard:
        def page(text, kind):
            response = app.response_class(text, mimetype=kind)
            response.headers["Content-Security-Policy"] = DASHBOARD_CSP
            return response

        app.add_url_rule("/", "dashboard", lambda: page(DASHBOARD_HTML, "text/html"))
        app.add_url_rule("/dashboard.css", "dashboard_css",
                         lambda: page(DASHBOARD_CSS, "text/css"))
        app.add_url_rule("/dashboard.js", "dashboard_js",
                         lambda: page(DASHBOARD_JS, "text/javascript"))
        app.add_url_rule("/metrics", "metrics", lambda: prometheus_response(broker))
    else:
        @app.route("/")
        def index():
            return _json({"paths": API_PATHS})

    app.register_blueprint(create_api_blueprint(broker, app.live_views))

    @app.errorhandler(ApiError)
    def api_error(exc):
        body = {"code": exc.code}
        if exc.message is not None:
            body["message"] = exc.message
        return _json(body)

    @app.errorhandler(StoreError)
    def store_error(exc):
        # A change that could not be written, as EMQ X answers a mnesia abort.
        return _json({"code": 102, "message": str(exc)})

    @app.errorhandler(Throttled)
    def throttled(exc):
        response = _json({"code": 429, "message": str(exc)}, 429)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.errorhandler(_NotFound)
    @app.errorhandler(404)
    @app.errorhandler(405)
    def not_found(exc):
        return _empty(404)

    @app.errorhandler(Exception)
    def internal_error(exc):
        from werkzeug.exceptions import HTTPException
        if isinstance(exc, HTTPException):
            return _empty(exc.code if exc.code in (400, 401, 413) else 404)
        _log.exception("REST API handler failed")
        return _empty(404)   # EMQ X answers a failed handler with an empty 404

    # Route on the raw request path, as EMQ X does, so %2F, %2B and %23 in a
    # client id or topic reach the handler undecoded and are decoded once.
    wsgi_app = app.wsgi_app

    def raw_path_app(environ, start_response):
        raw = environ.get("REQUEST_URI") or environ.get("RAW_URI")
        if raw:
            environ["PATH_INFO"] = _raw_path(raw)
        return wsgi_app(environ, start_response)

    app.wsgi_app = raw_path_app
    return app


###############################################################################
# REST API server (waitress: limits, credentials first, TLS) ##################
###############################################################################
#
# waitress serves the application with poll(), so no descriptor number is too
# large for it, and with these changes of its channel and server:
# - a request's credentials are settled when its headers are in, before its
#   body is read: a credential verified a moment ago passes at once, one that
#   is missing or malformed gets 401, and any other is checked by the
#   verifier pool (the hash is slow on purpose) while the channel reads
#   nothing more; a request to a path without authentication may carry a
#   small body only;
# - an idle connection, and a request not complete, is closed after
#   api_idle_timeout; at api_max_clients the idlest connection is closed to
#   admit a new one;
# - with api_certfile the channel speaks TLS through the same sans-IO
#   TlsTransport as MQTT, under the channel's tls_lock.

_API_MAX_HEADER = 32 * 1024        # bytes of request line and headers
_PUBLIC_BODY_MAX = 64 * 1024       # bytes of body for a path without authentication
_VERIFIER_THREADS = 2              # password hashes computed at once
_ACCEPT_BURST = 64                 # connections accepted per turn of the loop


def _api_body_max(max_packet_size):
    """The largest body a legal request needs: a publish of max_packet_size
    payload bytes, each JSON-escaped as \\u00XX at worst, plus headroom."""
    return 6 * max_packet_size + 64 * 1024


class _Refusal(WaitressError):
    """A response the server sends before the application sees the request."""

    def __init__(self, code, reason, headers=(), body=b""):
        super().__init__(body)
        self.code, self.reason, self.headers = code, reason, list(headers)

    def to_response(self, ident=None):
        kind = "application/json" if self.body else "text/plain"
        return ("%d %s" % (self.code, self.reason),
                [("Content-Type", kind)] + self.headers, self.body)

    @classmethod
    def unauthorized(cls):
        return cls(401, "Unauthorized", [("WWW-Authenticate", 'Basic realm="emqx control center"')])

    @classmethod
    def throttled(cls, exc):
        return cls(429, "Too Many Requests", [("Retry-After", str(exc.retry_after))],
                   json.dumps({"code": 429, "message": str(exc)}).encode())


class _ApiErrorTask(WaitressErrorTask):
    """waitress's error response, with the security headers."""

    def execute(self):
        self.response_headers.extend(SECURITY_HEADERS)
        super().execute()


class _ApiRequestParser(WaitressParser):
    """waitress's request parser that lets its channel judge the headers
    before any of the body is taken, and keeps what arrives meanwhile."""

    def __init__(self, adj, channel):
        super().__init__(adj)
        self.channel = channel
        self.started = time.time()   # the first byte of this request
        self.judged = False

    def received(self, data):
        if self.channel.held is not None:   # the credentials are being checked
            self.channel.held += data
            return len(data)
        consumed = super().received(data)
        if self.headers_finished and not self.judged:
            self.judged = True
            if self.error is None:
                self.channel.judge(self)
        return consumed


class _ApiChannel(WaitressChannel):
    """One HTTP connection to the API (runs in waitress's loop thread, except
    ``send``, which a task thread may call too)."""
    error_task_class = _ApiErrorTask

    def __init__(self, server, sock, addr, adj, map=None):
        self.held = None            # bytes received while the credentials are checked
        self.tls = server.tls_transport()   # None for plain HTTP
        self.tls_out = bytearray()  # TLS records not yet sent
        #: guards tls and tls_out (a leaf lock; the send under it is non-blocking)
        self.tls_lock = threading.Lock()
        self.closing_since = None   # a close waiting for tls_out to drain
        super().__init__(server, sock, addr, adj, map)
        self.parser_class = functools.partial(_ApiRequestParser, channel=self)

    def readable(self):
        return self.held is None and super().readable()

    # --- credentials before the body ---------------------------------------------
    def judge(self, request):
        """Called when a request's headers are in, before its body is read."""
        # A CORS preflight carries no credentials; the application answers it.
        if request.command == "OPTIONS" or not _needs_auth(_raw_path(request.request_uri),
                                                            self.server.settings):
            if request.chunked or request.content_length > _PUBLIC_BODY_MAX:
                request.error = RequestEntityTooLarge(
                    "a request without credentials may carry %d bytes" % _PUBLIC_BODY_MAX)
                request.completed = True
            return
        credentials = _basic_credentials(request.headers.get("AUTHORIZATION"))
        if credentials is None:
            request.error, request.completed = _Refusal.unauthorized(), True
        elif not self.server.guard.users.cached(*credentials):
            self.held = bytearray()
            request.deferred = (request.completed, request.expect_continue)
            request.completed = request.expect_continue = False
            self.server.verify(self, request, credentials)

    def resume(self, request, refusal):
        """The verifier's answer (loop thread): go on reading, or refuse."""
        if self.held is None or self.request is not request or not self.connected:
            return
        held, self.held = bytes(self.held), None
        request.completed, expect_continue = request.deferred
        if refusal is not None:
            request.error, request.completed, held = refusal, True, b""
        with self.requests_lock:
            if request.completed:
                self.requests.append(request)
                if len(self.requests) == 1:
                    self.server.add_task(self)
                self.request = None
        if expect_continue and not request.completed and not self.requests:
            self.send_continue()
        if held:
            self.received(held)

    # --- TLS ------------------------------------------------------------------------
    def handle_read(self):
        if self.tls is None:
            return super().handle_read()
        try:
            raw = self.socket.recv(self.adj.recv_bytes)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return self.abort()
        if not raw:
            return self.abort()
        try:
            with self.tls_lock:
                plain, reply = self.tls.feed(raw)
                self.tls_out += reply
        except MalformedPacket:   # a failed handshake or a broken record
            return self.abort()
        if not self._send_tls():
            return None
        if plain:
            self.last_activity = time.time()
            self.received(plain)
        if self.tls.closed:
            self.will_close = True
        return None

    def send(self, data, do_close=True):
        """waitress's send of response bytes: encrypted first with TLS. Takes
        nothing while earlier records still wait for the socket."""
        if self.tls is None:
            return super().send(data, do_close)
        with self.tls_lock:
            if not self._send_tls_locked():
                return 0
            self.tls_out += self.tls.wrap(bytes(data))
            self._send_tls_locked()
        return len(data)

    def _send_tls_locked(self):
        """Send what the socket takes of tls_out; True when all is sent."""
        while self.tls_out:
            try:
                sent = self.socket.send(self.tls_out)
            except (BlockingIOError, InterruptedError):
                return False
            del self.tls_out[:sent]
        return True

    def _send_tls(self):
        """_send_tls_locked for the loop thread; False if the connection failed."""
        try:
            with self.tls_lock:
                self._send_tls_locked()
            return True
        except OSError:
            self.abort()
            return False

    def writable(self):
        return bool(self.tls_out) or super().writable()

    def handle_write(self):
        if self.tls is not None and (not self._send_tls() or self.tls_out):
            return   # failed, or the socket is full: the rest at the next POLLOUT
        super().handle_write()

    def handle_close(self):
        if self.tls_out and self.connected:
            if self.closing_since is None:   # send the last records first
                self.closing_since = time.time()
            return
        super().handle_close()

    def abort(self):
        """Close now, whatever is unsent."""
        with self.tls_lock:
            self.tls_out.clear()
        super().handle_close()

    def since(self):
        """When this connection last made progress: the start of the request
        it is sending, else its last activity."""
        request = self.request
        return request.started if request is not None else self.last_activity


class _Task:
    """A job for a waitress dispatcher."""

    def __init__(self, service):
        self.service = service

    def cancel(self):
        pass


class _ApiServer(WaitressServer):
    """waitress's TCP server for the API: poll(), timeouts, the verifier pool."""
    channel_class = _ApiChannel

    def __init__(self, app, guard, settings, host, port, threads=4):
        s = self.settings = settings
        self.guard = guard
        self.live_views = app.live_views
        self.idle_timeout = s["api_idle_timeout"]
        self.ssl_context = None
        if s["api_certfile"] or s["api_keyfile"]:
            if not (s["api_certfile"] and s["api_keyfile"]):
                raise ValueError("the REST API's TLS needs both api_certfile and api_keyfile")
            self.ssl_context = make_ssl_context(s["api_certfile"], s["api_keyfile"],
                                                s["api_cacertfile"], s["api_verify"],
                                                s["api_fail_if_no_peer_cert"])
        adj = WaitressAdjustments(
            host=host, port=port, threads=threads, ident="emqx_lite",
            clear_untrusted_proxy_headers=True, asyncore_use_poll=True,
            connection_limit=s["api_max_clients"], cleanup_interval=1,
            channel_timeout=max(1, int(self.idle_timeout)),
            max_request_header_size=_API_MAX_HEADER,
            max_request_body_size=_api_body_max(s["max_packet_size"]) + 1,
            url_scheme="https" if self.ssl_context else "http")
        super().__init__(app, adj=adj)
        #: checks credentials, a few at once, beside the task threads (started here,
        #: like them, so the thread count stays flat while the server runs)
        self.verifier = WaitressDispatcher()
        self.verifier.set_thread_count(_VERIFIER_THREADS)

    def tls_transport(self):
        return TlsTransport(self.ssl_context) if self.ssl_context is not None else None

    def verify(self, channel, request, credentials):
        """Check credentials in the verifier pool; the channel hears in the loop thread."""
        address = channel.addr[0] if isinstance(channel.addr, tuple) else str(channel.addr)

        def service():
            try:
                ok = self.guard.check(*credentials, address) is True
                refusal = None if ok else _Refusal.unauthorized()
            except Throttled as exc:
                refusal = _Refusal.throttled(exc)
            except Exception:   # pragma: no cover - a bug must not leave the channel waiting
                _log.exception("REST API: checking credentials failed")
                refusal = _Refusal.unauthorized()
            try:
                self.trigger.pull_trigger(lambda: channel.resume(request, refusal))
            except OSError:   # the server is stopping
                pass

        self.verifier.add_task(_Task(service))

    def maintenance(self, now):
        """Close connections idle, or sending one request, for longer than
        api_idle_timeout, and those whose last TLS records never drain."""
        cutoff = now - self.idle_timeout
        for channel in list(self.active_channels.values()):
            if channel.closing_since is not None and channel.closing_since < cutoff:
                channel.abort()
            elif not channel.requests and channel.held is None and channel.since() < cutoff:
                channel.will_close = True

    def handle_accept(self):
        """Accept a burst of connections: waitress takes one per turn of its
        loop, and every turn walks all the connections it holds."""
        for _ in range(_ACCEPT_BURST):
            count = len(self._map)
            super().handle_accept()
            if len(self._map) == count or len(self._map) >= self.adj.connection_limit:
                return

    def readable(self):
        if self.accepting and len(self._map) >= self.adj.connection_limit:
            idle = [c for c in self.active_channels.values()
                    if not c.requests and c.held is None and not c.will_close]
            if idle:
                min(idle, key=_ApiChannel.since).will_close = True
        return super().readable()

    def stop(self, thread):
        """End the live views and let the requests being served finish (the
        dashboard stopped from its own page answers that request), stop the
        task and verifier threads; then close every connection from inside
        the loop, which then ends, and join ``thread`` (the one in ``run()``,
        if started). Once the task threads are gone nothing else wakes the
        loop, so its last wake-up is ours."""
        self.live_views.close()
        self.task_dispatcher.shutdown()
        self.verifier.shutdown()
        if thread is not None:
            def close_all():
                for channel in list(self._map.values()):
                    channel.close()
            self.trigger.pull_trigger(close_all)
            thread.join()
        else:
            self.close()


###############################################################################
# Settings: values and emq.conf keys #########################################
###############################################################################
#
# Every setting has an emq.conf key (EMQ X 2.x names where EMQ X has one) and a
# value parser; the configuration file, the REST API's configs routes and the
# plugins' settings all read values through them.

# --- configuration values ----------------------------------------------------

_DURATION_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}   # and "ms"
_SIZE_UNITS = {"GB": 1024 ** 3, "MB": 1024 ** 2, "KB": 1024, "B": 1}


def _parser(pattern, expected, convert=lambda m: m[0]):
    """A value parser: the text must match ``pattern``; returns ``convert(match)``."""
    def parse(text):
        m = re.fullmatch(pattern, text)
        if not m:
            raise ValueError("expected %s, got %r" % (expected, text))
        return convert(m)
    return parse


def _seconds(m):
    return float(m[1]) / 1000 if m[2] == "ms" else float(m[1]) * _DURATION_UNITS[m[2] or "s"]


#: Value parsers: str -> value, or ValueError("expected ..., got ...").
parse_int = _parser(r"[0-9]+", "an integer", lambda m: int(m[0]))
parse_bool = _parser(r"(?i)on|off|true|false", "on, off, true or false",
                     lambda m: m[0].lower() in ("on", "true"))
parse_bytesize = _parser(r"(?i)([0-9]+)(GB|MB|KB|B)?", "a size like 64KB",    # 1KB = 1024
                         lambda m: int(m[1]) * _SIZE_UNITS[(m[2] or "B").upper()])
parse_duration = _parser(r"([0-9]+(?:\.[0-9]+)?)(ms|[wdhms])?", "a duration like 20s", _seconds)
_string = _parser(r"(?s).+", "a value")
_directory = _parser(r"(?s).*", "a directory")   # empty: none
_data_sync = _parser("normal|full", "normal or full")
_qos = _parser(r"[012]", "0, 1 or 2", lambda m: int(m[0]))
_mqtt_path = _parser(r"/.*", "a path like /mqtt")
_verify = _parser("verify_peer|verify_none", "verify_peer or verify_none")
_ORIGIN = r"https?://(?:[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?"
_origins = _parser(r"(?i)\s*{0}(?:\s*,\s*{0})*\s*".format(_ORIGIN),
                   "origins like https://ops.example.com, http://localhost:3000",
                   lambda m: tuple(o.strip().lower() for o in m[0].split(",")))
# EMQ X closes a silent connection after keepalive * backoff * 2; ours after keepalive *
# keepalive_backoff, so keepalive_backoff = backoff * 2 (EMQ X default 0.75 -> 1.5).
_backoff = _parser(r"0\.[5-9][0-9]*|[1-9][0-9]*(\.[0-9]+)?", "a number >= 0.5",
                   lambda m: float(m[0]) * 2)


def parse_address(text):
    """'0.0.0.0:1883', '1883', '[::1]:1883' or '::1:1883' -> (host, port), host default 0.0.0.0."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        host = host if sep else "0.0.0.0"
    try:
        if ":" in host or host[:1].isdigit():
            ipaddress.ip_address(host)
        elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", host):
            raise ValueError
        if not re.fullmatch(r"[0-9]+", port) or int(port) > 65535:
            raise ValueError
    except ValueError:
        raise ValueError("expected an address like 0.0.0.0:1883, got %r" % text) from None
    return host, int(port)


def _rewrite_rule(text):
    """'"x/# ^x/y/(.+)$ z/y/$1"' (quotes optional) -> ('x/#', '^x/y/(.+)$', 'z/y/$1')."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    parts = text.split()
    if len(parts) != 3:
        raise ValueError("expected '<filter> <regex> <destination>', got %r" % text)
    try:
        re.compile(parts[1])
    except re.error as exc:
        raise ValueError("bad regex %r: %s" % (parts[1], exc)) from None
    return tuple(parts)


def _fmt_duration(seconds):
    for unit, size in _DURATION_UNITS.items():
        n = seconds / size
        if n == int(n) and (n or unit == "s"):
            return "%d%s" % (n, unit)
    return "%rs" % float(seconds)


def _fmt_bytesize(size):
    for unit, scale in _SIZE_UNITS.items():
        if size and size % scale == 0:
            return "%d%s" % (size // scale, unit)
    return "0"


def _fmt_address(host, port):
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


#: value parser -> formatter for render_config (default: str)
_FORMAT = {parse_duration: _fmt_duration, parse_bytesize: _fmt_bytesize,
           parse_bool: lambda v: "true" if v else "false", _backoff: lambda v: repr(v / 2),
           _origins: ", ".join,
           _verify: lambda v: "verify_peer" if v in (True, "verify_peer") else "verify_none"}

# --- configuration keys ------------------------------------------------------

#: emq.conf key -> (Broker setting, value parser)
SETTING_KEYS = {
    "node.name": ("node", _string),
    "node.data_dir": ("data_dir", _directory),
    "node.data_sync": ("data_sync", _data_sync),
    "mqtt.allow_anonymous": ("allow_anonymous", parse_bool),
    "mqtt.acl_nomatch": ("acl_nomatch", _parser("allow|deny", "allow or deny")),
    "mqtt.acl_file": ("acl_file", _string),
    "mqtt.max_clientid_len": ("max_clientid_len", parse_int),
    "mqtt.max_packet_size": ("max_packet_size", parse_bytesize),
    "mqtt.keepalive_backoff": ("keepalive_backoff", _backoff),
    "mqtt.client.idle_timeout": ("connect_timeout", parse_duration),
    "mqtt.session.max_inflight": ("max_inflight", parse_int),
    "mqtt.session.retry_interval": ("retry_interval", parse_duration),
    "mqtt.session.max_awaiting_rel": ("max_awaiting_rel", parse_int),
    "mqtt.session.await_rel_timeout": ("await_rel_timeout", parse_duration),
    "mqtt.session.expiry_interval": ("session_expiry_interval", parse_duration),
    "mqtt.mqueue.max_length": ("max_mqueue_len", parse_int),
    "mqtt.mqueue.store_qos0": ("mqueue_store_qos0", parse_bool),
    "mqtt.broker.sys_interval": ("sys_interval", parse_duration),
    # emqx_lite's own keys, for limits EMQ X 2.x does not name in emq.conf:
    "mqtt.max_topic_length": ("max_topic_length", parse_int),
    "mqtt.max_topic_levels": ("max_topic_levels", parse_int),
    "mqtt.max_subscriptions": ("max_subscriptions", parse_int),
    "mqtt.max_keepalive": ("max_keepalive", parse_int),
    "mqtt.client.max_outbuf": ("max_outbuf", parse_bytesize),
    "mqtt.client.send_timeout": ("send_timeout", parse_duration),
    "mqtt.max_topic_alias": ("max_topic_alias", parse_int),
    "mqtt.topic_alias_out": ("topic_alias_out", parse_bool),
    "mqtt.journal": ("journal", parse_int),
    # The REST API's listener (EMQ X 2.x names max_clients; the rest are emqx_lite's):
    "listener.api.mgmt.max_clients": ("api_max_clients", parse_int),
    "listener.api.mgmt.idle_timeout": ("api_idle_timeout", parse_duration),
    "listener.api.mgmt.cors_origins": ("api_cors_origins", _origins),
    "listener.api.mgmt.max_auth_failures": ("api_max_auth_failures", parse_int),
    "listener.api.mgmt.auth_failure_window": ("api_auth_failure_window", parse_duration),
    "listener.api.mgmt.certfile": ("api_certfile", _string),
    "listener.api.mgmt.keyfile": ("api_keyfile", _string),
    "listener.api.mgmt.cacertfile": ("api_cacertfile", _string),
    "listener.api.mgmt.verify": ("api_verify", _verify),
    "listener.api.mgmt.fail_if_no_peer_cert": ("api_fail_if_no_peer_cert", parse_bool),
    "dashboard.password_iterations": ("api_password_iterations", parse_int),
    "prometheus.auth": ("prometheus_auth", parse_bool),
    # The plugins' (EMQ X keeps them in etc/plugins/<plugin>.conf):
    "retainer.max_message_num": ("retainer_max_messages", parse_int),
    "retainer.max_payload_size": ("retainer_max_payload_size", parse_bytesize),
    "retainer.expiry_interval": ("retainer_expiry_interval", parse_duration),
}

#: The settings a running broker takes (the REST API's configs routes): its
#: limits and timeouts apply to what connects, subscribes or publishes from
#: then on. The others need a restart, and the API refuses them.
RUNTIME_KEYS = frozenset((
    "mqtt.allow_anonymous", "mqtt.acl_nomatch", "mqtt.max_clientid_len", "mqtt.max_packet_size",
    "mqtt.keepalive_backoff", "mqtt.client.idle_timeout", "mqtt.session.max_inflight",
    "mqtt.session.retry_interval", "mqtt.session.max_awaiting_rel",
    "mqtt.session.await_rel_timeout", "mqtt.session.expiry_interval", "mqtt.mqueue.max_length",
    "mqtt.mqueue.store_qos0", "mqtt.broker.sys_interval", "mqtt.max_topic_length",
    "mqtt.max_topic_levels", "mqtt.max_subscriptions", "mqtt.max_keepalive",
    "mqtt.client.max_outbuf", "mqtt.client.send_timeout", "mqtt.max_topic_alias",
    "mqtt.topic_alias_out", "listener.api.mgmt.max_auth_failures",
    "listener.api.mgmt.auth_failure_window", "prometheus.auth", "retainer.max_message_num",
    "retainer.max_payload_size", "retainer.expiry_interval"))

#: value parser -> the data type the configs routes name (cuttlefish's names)
_DATATYPES = {parse_int: "integer", parse_bool: "flag", parse_bytesize: "bytesize",
              parse_duration: "duration", _backoff: "float", _qos: "integer"}


def _refuse_unknown(values, plugin):
    """ValueError naming the first of ``values``' keys (none are ``plugin``'s)."""
    if values:
        raise ValueError("%s: not a setting of %s" % (sorted(values)[0], plugin))


def setting_app(key):
    """The application a setting belongs to, as the configs routes name it."""
    return {"retainer": "emqx_retainer", "dashboard": "emqx_dashboard"}.get(
        key.split(".", 1)[0], "emqx")


def format_setting(key, value):
    """A setting's value as emq.conf text ('' for none)."""
    parse = SETTING_KEYS[key][1]
    return "" if value is None or value == () else _FORMAT.get(parse, str)(value)


_ALL, _TLS = ("tcp", "ssl", "ws", "wss"), ("ssl", "wss")
#: listener.<type>.<name>.<option> -> (value parser, listener types that take it)
LISTENER_OPTIONS = {
    "acceptors": (parse_int, _ALL),
    "max_clients": (parse_int, _ALL),
    "keyfile": (_string, _TLS),
    "certfile": (_string, _TLS),
    "cacertfile": (_string, _TLS),
    "verify": (_verify, _TLS),
    "fail_if_no_peer_cert": (parse_bool, _TLS),
    "peer_cert_as_username": (_parser("cn|dn", "cn or dn"), _TLS),
    "mqtt_path": (_mqtt_path, ("ws", "wss")),
}
LISTENER_DEFAULTS = dict(dict.fromkeys(LISTENER_OPTIONS), acceptors=1, max_clients=102400)

def _host_port(text):
    """'host:port' for a bridge's remote (a port alone names no host)."""
    if ":" not in text:
        raise ValueError("expected host:port, got %r" % text)
    return parse_address(text)


#: bridge.mqtt.<name>.<option> -> value parser (EMQ X's emqx_bridge_mqtt keys)
BRIDGE_OPTIONS = {
    "address": lambda text: _host_port(text),
    "proto_ver": _parser("mqttv3|mqttv4|mqttv5", "mqttv3, mqttv4 or mqttv5",
                         lambda m: {"mqttv3": MQTT_V31, "mqttv4": MQTT_V311,
                                    "mqttv5": MQTT_V5}[m[0]]),
    "clientid": _string,
    "clean_start": parse_bool,
    "username": _string,
    "password": _string,
    "keepalive": parse_duration,
    "reconnect_interval": parse_duration,
    "retry_interval": parse_duration,
    "max_inflight": parse_int,
    "bridge_mode": parse_bool,
    "ssl": parse_bool,
    "cacertfile": _string,
    "certfile": _string,
    "keyfile": _string,
    "ciphers": _string,
    "tls_versions": _parser(r"(?i)\s*tlsv1\.[23](\s*,\s*tlsv1\.[23])*\s*",
                            "versions like tlsv1.2,tlsv1.3",
                            lambda m: tuple(v.strip().lower() for v in m[0].split(","))),
    "verify": _verify,
    "forwards": _parser(r"(?s).*", "filters like a/#,b/#",
                        lambda m: tuple(f.strip() for f in m[0].split(",") if f.strip())),
    "forward_mountpoint": _directory,
    "receive_mountpoint": _directory,
    "queue.max_total_size": parse_bytesize,
    "queue.replayq_dir": _directory,
}
#: What a bridge takes unless its configuration says otherwise (EMQ X's defaults;
#: the queue bound is kept to what memory holds).
BRIDGE_DEFAULTS = {
    "address": None, "proto_ver": MQTT_V311, "clientid": None, "clean_start": True,
    "username": None, "password": None, "keepalive": 60.0, "reconnect_interval": 30.0,
    "retry_interval": 20.0, "max_inflight": 32, "bridge_mode": True, "ssl": False,
    "cacertfile": None, "certfile": None, "keyfile": None, "ciphers": None,
    "tls_versions": None, "verify": "verify_peer", "forwards": (), "forward_mountpoint": "",
    "receive_mountpoint": "", "queue.max_total_size": 64 * 1024 * 1024,
    "queue.replayq_dir": "", "subscriptions": (),
}


def bridge_config(name, options):
    """A bridge's settings from ``{option: text or value}`` (``subscription.<n>.
    topic``/``.qos`` among them): BRIDGE_DEFAULTS completed and checked.
    ValueError naming the option."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError("bridge name %r: letters, digits, _ and - only" % name)
    config, subs = dict(BRIDGE_DEFAULTS), {}
    for option, value in options.items():
        m = re.fullmatch(r"subscription\.([0-9]+)\.(topic|qos)", option)
        text = value if isinstance(value, str) else (
            ("on" if value else "off") if isinstance(value, bool) else
            ",".join(value) if isinstance(value, (list, tuple)) else str(value))
        try:
            if m:
                subs.setdefault(int(m[1]), {})[m[2]] = _qos(text) if m[2] == "qos" \
                    else _string(text)
            elif option in BRIDGE_OPTIONS:
                config[option] = BRIDGE_OPTIONS[option](text)
            else:
                raise ValueError("unknown option")
        except ValueError as exc:
            raise ValueError("bridge.mqtt.%s.%s: %s" % (name, option, exc)) from None
    for n, sub in sorted(subs.items()):
        if "topic" not in sub or not validate_topic_filter(sub["topic"]):
            raise ValueError("bridge.mqtt.%s.subscription.%d.topic: a topic filter is needed"
                             % (name, n))
    config["subscriptions"] = tuple((s["topic"], s.get("qos", 1)) for _, s in sorted(subs.items()))
    for topic_filter in config["forwards"]:
        if not validate_topic_filter(topic_filter):
            raise ValueError("bridge.mqtt.%s.forwards: %r is not a topic filter"
                             % (name, topic_filter))
    if config["address"] is None:
        raise ValueError("bridge.mqtt.%s.address: missing (host:port)" % name)
    for option, ok, what in (
            ("max_inflight", 1 <= config["max_inflight"] <= 65535, "1 to 65535"),
            ("keepalive", config["keepalive"] <= 65535, "at most 65535s"),
            ("reconnect_interval", config["reconnect_interval"] >= 0.1, "at least 100ms"),
            ("retry_interval", config["retry_interval"] >= 0.1, "at least 100ms"),
            ("forward_mountpoint", not set("+#") & set(config["forward_mountpoint"]),
             "a topic prefix without + or #"),
            ("receive_mountpoint", not set("+#") & set(config["receive_mountpoint"]),
             "a topic prefix without + or #")):
        if not ok:
            raise ValueError("bridge.mqtt.%s.%s: expected %s" % (name, option, what))
    if config["clientid"] is None:
        config["clientid"] = "bridge_" + name
    return config


###############################################################################
# Configuration files (emq.conf) ##############################################
###############################################################################
#
# emqx_lite reads EMQ X 2.x's emq.conf format: ``key = value`` lines (cuttlefish)
# become Broker keyword arguments. The command line uses it; embedders may too.


def parse_conf(text, filename="<string>"):
    """emq.conf text -> [(lineno, key, value)].

    As cuttlefish: a comment is a line whose first non-blank character is ``#``;
    a ``#`` later in a line is part of the value. Blank lines are skipped.
    """
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([^=\s]+)\s*=\s*(.*)", line)
        if not m:
            raise ConfigError("%s:%d: expected 'key = value', got %r" % (filename, lineno, line))
        entries.append((lineno, m[1], m[2]))
    return entries


def env_overrides(environ, prefix="EMQX_LITE_"):
    """Configuration entries from environment variables, to append to parse_conf()'s.

    Rule: ``EMQX_LITE_<KEY>`` where ``__`` separates key levels and the key is
    lowercased: ``EMQX_LITE_MQTT__MAX_PACKET_SIZE=64KB`` sets mqtt.max_packet_size,
    ``EMQX_LITE_LISTENER__TCP__EXTERNAL=0.0.0.0:1884`` listener.tcp.external.
    Returns [("$EMQX_LITE_...", key, value)] sorted by variable, so that
    config_settings() errors name the variable.
    """
    entries = []
    for var in sorted(environ):
        if var.startswith(prefix):
            levels = var[len(prefix):].lower().split("__")
            if not all(levels):
                raise ConfigError("$%s: expected %sLEVEL__LEVEL..., e.g. %sMQTT__MAX_PACKET_SIZE"
                                  % (var, prefix, prefix))
            entries.append(("$" + var, ".".join(levels), environ[var]))
    return entries


class _ConfigReader:
    """What config_settings() collects, entry by entry: one method per kind
    of key (``_KEY_KINDS``), then ``settings()`` puts the pieces together."""

    def __init__(self):
        self.values = {}      # Broker setting -> value
        self.addresses = {}   # (listener type, name) -> (host, port)
        self.options = []     # (where, key, (type, name), option, value)
        self.pairs = {}       # n -> {"clientid"|"password": (where, key, value)}
        self.subs = {}        # n -> {"at": (where, key), "topic": ..., "qos": ...}
        self.rewrites = {}    # n -> (filter, regex, destination)
        self.user = {}        # "login"/"password" -> value
        self.bridge_at = {}   # bridge name -> where its first key was

    # --- one method per kind of key: (match, value, where) ---------------------------
    def setting(self, m, value, where):
        name, parse = SETTING_KEYS[m[0]]
        self.values[name] = parse(value)

    def api_address(self, m, value, where):
        self.values["http_bind"], self.values["http_port"] = parse_address(value)

    def bridge(self, m, value, where):
        name, option = m[1], m[2]
        sub = re.fullmatch(r"subscription\.([0-9]+)\.(topic|qos)", option)
        if sub:
            (_qos if sub[2] == "qos" else _string)(value)
        elif option in BRIDGE_OPTIONS:
            BRIDGE_OPTIONS[option](value)
        else:
            raise ValueError("unknown bridge option %r" % option)
        self.bridge_at.setdefault(name, where)
        self.values.setdefault("bridges", {}).setdefault(name, {})[option] = value

    def dashboard_address(self, m, value, where):
        self.values["dashboard_bind"], self.values["dashboard_port"] = parse_address(value)

    def listener(self, m, value, where):
        ltype, lname, option = m.groups()
        if option is None:
            self.addresses[ltype, lname] = parse_address(value)
            return
        if option not in LISTENER_OPTIONS:
            raise ValueError("unknown listener option %r" % option)
        parse, types = LISTENER_OPTIONS[option]
        if ltype not in types:
            raise ValueError("not an option of %s listeners" % ltype)
        self.options.append((where, m[0], (ltype, lname), option, parse(value)))

    def client_pair(self, m, value, where):
        self.pairs.setdefault(int(m[1]), {})[m[2]] = (where, m[0], _string(value))

    def auth_client(self, m, value, where):
        self.values.setdefault("auth_clientid", {})[m[1]] = _string(value)

    def auth_username(self, m, value, where):
        self.values.setdefault("auth_username", {})[m[1]] = _string(value)

    def dashboard_user(self, m, value, where):
        self.user[m[1]] = _string(value)

    def module_subscription(self, m, value, where):
        sub = self.subs.setdefault(int(m[1]), {"at": (where, m[0])})
        sub[m[2]] = _qos(value) if m[2] == "qos" else _string(value)

    def module_rewrite(self, m, value, where):
        self.rewrites[int(m[1])] = _rewrite_rule(value)

    # --- the pieces together ----------------------------------------------------------
    def settings(self):
        settings = self.values
        for where, key, lst, _, _ in self.options:
            if lst not in self.addresses:
                raise ConfigError("%s: %s: listener.%s.%s has no address line"
                                  % ((where, key) + lst))
        if self.addresses:
            settings["listeners"] = [self._listener(t, n, host, port)
                                     for (t, n), (host, port) in self.addresses.items()]
        for n, pair in sorted(self.pairs.items()):
            if len(pair) != 2:
                where, key, _ = next(iter(pair.values()))
                raise ConfigError("%s: %s: auth.client.%d needs .clientid and .password"
                                  % (where, key, n))
            settings.setdefault("auth_clientid", {})[pair["clientid"][2]] = pair["password"][2]
        for n, sub in self.subs.items():
            if "topic" not in sub:
                raise ConfigError("%s: %s: module.subscription.%d has no .topic"
                                  % (sub["at"] + (n,)))
        if self.subs:
            settings["module_subscription"] = [(s["topic"], s.get("qos", 1))
                                               for _, s in sorted(self.subs.items())]
        if self.rewrites:
            settings["module_rewrite"] = [rule for _, rule in sorted(self.rewrites.items())]
        if self.user:
            settings["users"] = {self.user.get("login", "admin"): self.user.get("password", "public")}
        for name, options in settings.get("bridges", {}).items():
            try:
                bridge_config(name, options)
            except ValueError as exc:
                raise ConfigError("%s: %s" % (self.bridge_at[name], exc)) from None
        return settings

    def _listener(self, ltype, lname, host, port):
        lst = dict(type=ltype, name=lname, host=host, port=port, **LISTENER_DEFAULTS)
        lst["mqtt_path"] = "/mqtt" if ltype in ("ws", "wss") else None
        lst.update((opt, v) for _, _, at, opt, v in self.options if at == (ltype, lname))
        return lst


#: emq.conf key pattern -> _ConfigReader method; the first that matches the whole key wins.
_KEY_KINDS = [
    (re.compile("|".join(map(re.escape, SETTING_KEYS))), _ConfigReader.setting),
    (re.compile(r"listener\.api\.mgmt"), _ConfigReader.api_address),
    (re.compile(r"dashboard\.listener\.http"), _ConfigReader.dashboard_address),
    (re.compile(r"bridge\.mqtt\.([A-Za-z0-9_-]+)\.(.+)"), _ConfigReader.bridge),
    (re.compile(r"listener\.(tcp|ssl|ws|wss)\.([A-Za-z0-9_-]+)(?:\.(.+))?"),
     _ConfigReader.listener),
    (re.compile(r"auth\.client\.([0-9]+)\.(clientid|password)"), _ConfigReader.client_pair),
    (re.compile(r"auth\.client\.(.+)"), _ConfigReader.auth_client),
    (re.compile(r"auth\.username\.(.+)"), _ConfigReader.auth_username),
    (re.compile(r"dashboard\.default_user\.(login|password)"), _ConfigReader.dashboard_user),
    (re.compile(r"module\.subscription\.([0-9]+)\.(topic|qos)"),
     _ConfigReader.module_subscription),
    (re.compile(r"module\.rewrite\.rule\.([0-9]+)"), _ConfigReader.module_rewrite),
]


def config_settings(entries, filename="<string>"):
    """[(lineno or "$VAR", key, value)] -> Broker keyword arguments (only those set).

    Later entries win. Besides SETTING_KEYS: ``listener.<tcp|ssl|ws|wss>.<name> =
    address`` (+ LISTENER_OPTIONS) -> listeners; ``listener.api.mgmt`` ->
    http_bind/http_port; ``auth.username.<name>`` and ``auth.client.<id>`` (or
    ``auth.client.<n>.clientid``/``.password``) = password; ``dashboard.default_user.
    login``/``.password`` -> users; ``module.subscription.<n>.topic``/``.qos`` (default
    1); ``module.rewrite.rule.<n> = "<filter> <regex> <dest>"``.
    """
    reader = _ConfigReader()
    for where, key, value in entries:
        where = where if isinstance(where, str) else "%s:%d" % (filename, where)
        try:
            for pattern, read in _KEY_KINDS:
                m = pattern.fullmatch(key)
                if m:
                    read(reader, m, value, where)
                    break
            else:
                raise ValueError("unknown key")
        except ValueError as exc:
            raise ConfigError("%s: %s: %s" % (where, key, exc)) from None
    return reader.settings()


def _render_settings(settings):
    lines = ["## Broker"]
    for key, (name, parse) in SETTING_KEYS.items():
        if name in settings:
            value = settings[name]
            lines.append("## %s is not set" % key if value is None or value == ()
                         else "%s = %s" % (key, _FORMAT.get(parse, str)(value)))
    return lines


def _render_auth(settings):
    lines = ["## Authentication and dashboard users"]
    users = settings.get("users") or {}
    if len(users) == 1:
        (login, password), = users.items()
        lines += ["dashboard.default_user.login = " + login,
                  "dashboard.default_user.password = " + password]
    elif users:
        lines.append("## %d dashboard users: only one can be written here" % len(users))
    lines += ["auth.username.%s = %s" % kv for kv in (settings.get("auth_username") or {}).items()]
    for n, (client_id, password) in enumerate((settings.get("auth_clientid") or {}).items(), 1):
        lines += ["auth.client.%d.clientid = %s" % (n, client_id),
                  "auth.client.%d.password = %s" % (n, password)]
    return lines


def _render_modules(settings):
    lines = ["## Modules"]
    for n, (topic, qos) in enumerate(settings.get("module_subscription") or (), 1):
        lines += ["module.subscription.%d.topic = %s" % (n, topic),
                  "module.subscription.%d.qos = %d" % (n, qos)]
    for n, rule in enumerate(settings.get("module_rewrite") or (), 1):
        lines.append('module.rewrite.rule.%d = "%s"' % (n, " ".join(rule)))
    return lines


def _render_bridges(settings):
    bridges = settings.get("bridges") or {}
    if not bridges:
        return []
    return ["## Bridges"] + ["bridge.mqtt.%s.%s = %s" % (name, option, value)
                             for name, options in bridges.items()
                             for option, value in options.items()]


def _render_listeners(settings):
    lines = ["## Listeners"]
    if settings.get("http_port") is not None:
        lines.append("listener.api.mgmt = " + _fmt_address(settings.get("http_bind") or "0.0.0.0",
                                                           settings["http_port"]))
    if settings.get("dashboard_port") is not None:
        lines.append("dashboard.listener.http = " + _fmt_address(
            settings.get("dashboard_bind") or "0.0.0.0", settings["dashboard_port"]))
    for lst in settings.get("listeners") or ():
        prefix = "listener.%s.%s" % (lst["type"], lst["name"])
        lines.append("%s = %s" % (prefix, _fmt_address(lst["host"], lst["port"])))
        lines += ["%s.%s = %s" % (prefix, opt, _FORMAT.get(parse, str)(lst[opt]))
                  for opt, (parse, _) in LISTENER_OPTIONS.items() if lst.get(opt) is not None]
    return lines


#: Settings that a part above writes besides SETTING_KEYS'.
_RENDERED = {"listeners", "http_bind", "http_port", "dashboard_bind", "dashboard_port", "users",
             "auth_username", "auth_clientid", "module_subscription", "module_rewrite",
             "bridges"}


def _render_python_only(settings):
    written = _RENDERED | {name for name, _ in SETTING_KEYS.values()}
    rest = [name for name in settings if name not in written]
    if not rest:
        return []
    return ["## Settings without an emq.conf key (Python only):"] + [
        "##   %s = %r" % (name, settings[name]) for name in rest]


def render_config(settings):
    """Settings as emq.conf text (``--print-config``).

    config_settings(parse_conf(render_config(s))) == s for what config_settings
    returns; settings without an emq.conf key are listed as comments.
    """
    parts = [["## emqx_lite configuration (EMQ X 2.x emq.conf syntax)"]]
    parts += [render(settings) for render in (_render_settings, _render_auth, _render_modules,
                                              _render_listeners, _render_bridges,
                                              _render_python_only)]
    return "\n\n".join("\n".join(part) for part in parts if part) + "\n"


def load_config(path=None, environ=None):
    """Broker keyword arguments from an emq.conf-style file (if any) and then
    the EMQX_LITE_... variables of ``environ``: ``Broker(**load_config(p))``."""
    entries = []
    if path is not None:
        with open(path, encoding="utf-8") as f:
            entries = parse_conf(f.read(), path)
    return config_settings(entries + env_overrides(environ or {}), path or "<environment>")


###############################################################################
# Bridges (emqx_bridge_mqtt) ##################################################
###############################################################################
#
# A bridge is this broker as an MQTT client of another one (EMQX, mosquitto,
# HiveMQ, another emqx_lite): the messages routed here to its ``forwards``
# filters go to the remote, and what its ``subscriptions`` bring there is
# published here. Each bridge has one thread that owns its socket: it
# connects, reads, writes what the socket takes and keeps time, in a selector
# loop. Local clients only append to the bridge's queue (a tap on routing,
# BrokerCore.add_tap) and wake it: a slow or dead remote never stalls them.
# Its settings (BRIDGE_OPTIONS) are with the others, above.

_BRIDGE_ACCEPTS = frozenset((CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK,
                             UNSUBACK, PINGRESP, DISCONNECT))
_BRIDGE_BACKOFF = 0.5     # seconds before the first reconnect; doubled up to reconnect_interval
_BRIDGE_CONNECT_TIMEOUT = 10.0   # seconds for TCP, TLS and CONNACK together
_BRIDGE_FINGERPRINTS = 10000     # forwarded messages remembered to spot their echo
_BRIDGE_QOS0_QUEUE = 10000       # QoS 0 messages waiting for the bridge's thread, at most
_BRIDGE_MAX_OUT = 1024 * 1024    # bytes the socket has not taken, beyond which QoS 0 is dropped

class _BridgeDown(Exception):
    """The connection to the remote ended (the message says why)."""


class _Forward:
    """A message waiting for the remote: queued, then in flight under a packet id."""
    __slots__ = ("seq", "msg", "topic", "qos", "size", "packet_id", "state", "sent_at",
                 "stored")

    def __init__(self, seq, msg, topic, qos, stored=False):
        self.seq, self.msg, self.topic, self.qos = seq, msg, topic, qos
        self.stored = stored   # a row in the data file
        self.size = len(msg.payload) + len(topic) + 32
        self.packet_id = self.sent_at = None
        self.state = WAIT_ACK


class Bridge:
    """One bridge: this broker as an MQTT client of a remote (emqx_bridge_mqtt).

    Local -> remote: messages routed here whose topic matches ``forwards``
    are published to the remote under ``forward_mountpoint`` (``${node}`` is
    this node's name), QoS and retain flag kept. QoS 1/2 messages wait in a
    queue bounded by ``queue.max_total_size`` bytes (the oldest go first when
    it is full; kept in the data file with ``queue.replayq_dir`` set) until the
    remote acknowledges them; QoS 0 messages go only while connected.
    Remote -> local: ``subscriptions`` are made at every connect; what they
    bring is published here under ``receive_mountpoint``.

    No loops: a message this bridge published here is never forwarded back;
    on 5.0 the remote subscriptions have No Local, on 3.x the bridge bit asks
    the remote for the same, and where the remote refuses the bit the echo of
    a forwarded message is recognised by its topic and payload and dropped.

    ``lock`` guards ``queue``, ``queued_bytes``, ``inflight``, the counters,
    ``state`` and ``last_error`` (a leaf lock, but Store.lock is taken under
    it to record the queue in order). The rest belongs to the bridge's thread.
    """

    def __init__(self, broker, name, options):
        #: the bridge.mqtt.<name>.* options as given, and what they mean
        self.options, self.config = dict(options), bridge_config(name, options)
        self.broker, self.name, config = broker, name, self.config
        self.tag = "$bridge/" + name   # the sender of what it publishes here
        #: serialises start() and stop() (taken with no lock held; joins the thread)
        self._control = threading.Lock()
        self.lock = threading.Lock()
        self.queue = collections.deque()   # _Forward, in order, not yet acknowledged
        self.queued_bytes = 0
        self.inflight = {}                 # packet id -> _Forward
        self.counts = dict.fromkeys(("forwarded", "received", "dropped", "dropped_qos0",
                                     "dropped_overflow", "dropped_refused"), 0)
        self.state, self.last_error, self.connected_at = "stopped", None, None
        self._seq = 0
        self._qos0 = collections.deque()   # QoS 0 messages to send now
        self._waking = False   # a wake-up is on its way to the thread (under lock)
        self._thread = None
        self._stop = threading.Event()
        self._wake_r = self._wake_w = None
        self._overflow_logged = 0.0
        self._fingerprints = collections.OrderedDict()   # (topic, payload hash) -> count
        self._inbound = set()   # QoS 2 packet ids from the remote whose PUBREL has not come
        self._mountpoint = config["forward_mountpoint"].replace("${node}", broker.node)
        self._durable = False   # the queue in the data file (decided at start())
        self.sock = self.tls = self._selector = None
        self._out, self._in = bytearray(), bytearray()
        self.proto_ver = config["proto_ver"]
        self._bridge_bit = config["bridge_mode"] and self.proto_ver != MQTT_V5

    # --- local side: the tap ------------------------------------------------------
    def wants(self, topic, msg):
        if msg.sender == self.tag or msg.sender in self.broker.core.bridge_clients:
            return False   # it came from a bridge: never bridged again (no loops)
        return any(topic_matches(f, topic) for f in self.config["forwards"])

    def record(self, msg):
        """A message for the remote (BrokerCore.publish's thread). Returns True:
        it is taken for delivery."""
        topic = self._mountpoint + msg.topic
        if not msg.qos:
            with self.lock:
                if self.state != "connected" or len(self._qos0) >= _BRIDGE_QOS0_QUEUE:
                    self.counts["dropped"] += 1
                    self.counts["dropped_qos0"] += 1
                    return True
                self._qos0.append((topic, msg))
                wake, self._waking = not self._waking, True
            if wake:
                self._wake()
            return True
        store = self.broker.core.store if self._durable else None
        with self.lock:
            self._seq += 1
            entry = _Forward(self._seq, msg, topic, msg.qos, stored=store is not None)
            self.queue.append(entry)
            self.queued_bytes += entry.size
            if store is not None:
                store.put(("bridgeq", self.name, entry.seq),
                          (self.name, entry.seq, topic, msg.payload, msg.qos, int(msg.retain),
                           msg.encoded_properties() if msg.properties else None,
                           _wall_deadline(msg.expires_at, self.broker.clock), msg.sender),
                          new=True)
            dropped = self._trim_locked(store)
            wake, self._waking = not self._waking, True
        if dropped:
            self._overflowed(dropped)
        if wake:   # once until the thread has looked (a wake-up per message costs a syscall)
            self._wake()
        return True

    def _trim_locked(self, store):
        """Drop the oldest queued messages beyond the bound; those in flight
        (at the front, at most a window of them) stay."""
        dropped, limit = 0, self.config["queue.max_total_size"]
        in_flight = []
        while self.queue and self.queued_bytes > limit:
            entry = self.queue.popleft()
            if entry.packet_id is not None:
                in_flight.append(entry)
                continue
            self.queued_bytes -= entry.size
            dropped += 1
            if entry.stored:
                self.broker.core.store.delete(("bridgeq", self.name, entry.seq))
        self.queue.extendleft(reversed(in_flight))
        self.counts["dropped"] += dropped
        self.counts["dropped_overflow"] += dropped
        return dropped

    def _overflowed(self, dropped):
        now = time.monotonic()
        if now >= self._overflow_logged:
            self._overflow_logged = now + 60.0
            _log.warning("Bridge %s: its queue is full (queue.max_total_size %s): dropped the "
                         "oldest message(s); %d dropped so far (logged once a minute)",
                         self.name, _fmt_bytesize(self.config["queue.max_total_size"]),
                         self.counts["dropped_overflow"])

    def restore(self, rows):
        """The queue from the data file: [(seq, topic, payload, qos, retain,
        properties, expires_at, sender)] in order."""
        with self.lock:
            for seq, topic, payload, qos, retain, props, expires_at, sender in rows:
                msg = Message.from_row(topic, payload, qos, retain, props, expires_at, sender,
                                       self.broker.clock)
                entry = _Forward(seq, msg, topic, qos, stored=True)
                self.queue.append(entry)
                self.queued_bytes += entry.size
                self._seq = max(self._seq, seq)

    # --- start, stop, status ----------------------------------------------------------
    def start(self):
        """Start it (False if it runs, or the broker is stopping)."""
        with self._control:
            if self._thread is not None or self.broker._stopping:
                return False
            self._start_locked()
            return True

    def _start_locked(self):
        self._stop.clear()
        self._durable = bool(self.config["queue.replayq_dir"]) and self.broker.core.store is not None
        if self.config["queue.replayq_dir"] and not self._durable:
            _log.warning("Bridge %s: queue.replayq_dir is set but the broker keeps no data "
                         "file (node.data_dir): its queue is in memory only", self.name)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._set_state("connecting")
        self.broker.core.add_tap(self)
        self._thread = _start_thread(self._run, "emqx_lite-bridge-" + self.name)
        _log.info("Bridge %s started: %s:%d", self.name, *self.config["address"])

    def stop(self):
        """Stop it (False if it was not running)."""
        with self._control:
            thread = self._thread
            if thread is None:
                return False
            self._stop_locked(thread)
            return True

    def _stop_locked(self, thread):
        self._stop.set()
        self._wake()
        thread.join()
        self._thread = None
        self.broker.core.remove_tap(self)
        for sock in (self._wake_r, self._wake_w):
            sock.close()
        self._wake_r = self._wake_w = None
        with self.lock:   # in flight stays in flight: resent at the next connect
            self._qos0.clear()
        self._set_state("stopped")
        _log.info("Bridge %s stopped", self.name)

    def info(self):
        host, port = self.config["address"]
        with self.lock:
            return {"name": self.name, "state": self.state,
                    "remote": _fmt_address(host, port),
                    "proto_ver": {MQTT_V31: "mqttv3", MQTT_V311: "mqttv4",
                                  MQTT_V5: "mqttv5"}[self.config["proto_ver"]],
                    "clientid": self.config["clientid"],
                    "forwards": list(self.config["forwards"]),
                    "subscriptions": [{"topic": t, "qos": q}
                                      for t, q in self.config["subscriptions"]],
                    "forwarded": self.counts["forwarded"], "received": self.counts["received"],
                    "dropped": self.counts["dropped"],
                    "dropped_overflow": self.counts["dropped_overflow"],
                    "dropped_qos0": self.counts["dropped_qos0"],
                    "dropped_refused": self.counts["dropped_refused"], "queued": len(self.queue),
                    "queued_bytes": self.queued_bytes, "inflight": len(self.inflight),
                    "last_error": self.last_error,
                    "connected_at": _strftime(self.connected_at) if self.connected_at
                    else None}

    def _set_state(self, state, error=None):
        with self.lock:
            changed = state != self.state
            self.state = state
            if error is not None:
                self.last_error = error
            if state == "connected":
                self.connected_at = self.broker.core.wall()
        if changed:
            self.broker._sys_publish("bridges/%s/status" % self.name, state, retain=True)

    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except (OSError, AttributeError):   # full (it is awake anyway) or stopped
            pass

    # --- the thread ------------------------------------------------------------------
    def _run(self):
        attempt, logged = 0, None
        while not self._stop.is_set():
            self._set_state("connecting")
            try:
                self._session()
                error = "the remote closed the connection"
            except _BridgeDown as exc:
                error = str(exc)
            except (OSError, MQTTError, ssl.SSLError, StoreError) as exc:
                error = "%s: %s" % (type(exc).__name__, exc)
            except Exception as exc:   # a bug must not leave it "connecting" for ever
                _log.exception("Bridge %s failed", self.name)
                error = "internal error: %s: %s" % (type(exc).__name__, exc)
            finally:
                self._close_socket()
            if self._stop.is_set():
                break
            connected = self.state == "connected"
            self._set_state("disconnected", error)
            attempt = 0 if connected else attempt + 1
            if error != logged or connected:   # a crash loop logs each new error once
                _log.warning("Bridge %s: %s; reconnecting", self.name, error)
                logged = error
            delay = min(self.config["reconnect_interval"],
                        _BRIDGE_BACKOFF * 2 ** min(attempt, 16))
            self._stop.wait(delay * random.uniform(0.5, 1.0))
        core = self.broker.core
        core.fold_counts([core.take_counts()])

    def _close_socket(self):
        if self._selector is not None:
            self._selector.close()
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = self.tls = self._selector = None
        with self.lock:
            self._qos0.clear()

    def _session(self):
        """One connection: connect, CONNACK, subscribe, then serve until it ends."""
        c = self.config
        host, port = c["address"]
        self.sock = sock = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._selector.register(sock, selectors.EVENT_READ)
        self._out = bytearray()
        self._in = bytearray()
        self._last_in = self._last_out = time.monotonic()
        deadline = time.monotonic() + _BRIDGE_CONNECT_TIMEOUT
        try:
            sock.connect((host, port))
        except BlockingIOError:
            pass
        except socket.gaierror as exc:
            raise _BridgeDown("cannot resolve %s: %s" % (host, exc)) from None
        self._wait(deadline, write=True)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise _BridgeDown("cannot connect to %s: %s" % (_fmt_address(host, port),
                                                           os.strerror(error)))
        if c["ssl"]:
            self.tls = TlsTransport(self._ssl_context(), server_hostname=host)
            self._send_raw(self.tls.feed(b"")[1])   # the ClientHello
            while not self.tls.handshaken:
                self._wait(deadline)
                self._read()
        connect = Connect("MQTT" if self.proto_ver != MQTT_V31 else "MQIsdp", self.proto_ver,
                          c["clean_start"], int(c["keepalive"]), c["clientid"], None,
                          c["username"], c["password"].encode() if c["password"] else None,
                          {"session_expiry_interval": 0 if c["clean_start"] else 0xFFFFFFFF}
                          if self.proto_ver == MQTT_V5 else None, self._bridge_bit)
        self._send(encode_connect(connect, self.proto_ver))
        connack, early = None, []
        while connack is None:
            self._wait(deadline)
            for first_byte, body in self._read():
                if connack is not None:   # what a kept session sends at once
                    early.append((first_byte, body))
                    continue
                if first_byte >> 4 != CONNACK:
                    raise _BridgeDown("%s before CONNACK" % PACKET_NAMES[first_byte >> 4])
                connack = decode_packet(first_byte, body, self.proto_ver, _BRIDGE_ACCEPTS)
        if connack.return_code:
            if connack.return_code == CONNACK_UNACCEPTABLE_PROTOCOL and self._bridge_bit:
                self._bridge_bit = False   # the remote does not know the bridge bit
                raise _BridgeDown("the remote refused the bridge bit (protocol level 0x%x): "
                                  "connecting without it" % (0x80 | self.proto_ver))
            raise _BridgeDown("the remote refused the connection: CONNACK %d (%s)" % (
                connack.return_code, _CONNACK_NAMES.get(connack.return_code, "refused")))
        props = connack.properties or {}
        self._max_qos = props.get("maximum_qos", 2)
        self._window = min(c["max_inflight"], props.get("receive_maximum", 65535))
        if not connack.session_present:
            self._inbound.clear()   # a new session: its ids start afresh
        self._next_id = 0
        self._resend(connack.session_present)
        if c["subscriptions"]:
            options = _NO_LOCAL | _RETAIN_AS_PUBLISHED if self.proto_ver == MQTT_V5 else 0
            self._send(encode_subscribe(Subscribe(self._packet_id(), [
                (t, q | options) for t, q in c["subscriptions"]]), self.proto_ver))
        self._set_state("connected")
        _log.info("Bridge %s connected to %s", self.name, _fmt_address(host, port))
        for first_byte, body in early:
            self._handle(first_byte >> 4,
                         decode_packet(first_byte, body, self.proto_ver, _BRIDGE_ACCEPTS))
        self._serve()

    def _ssl_context(self):
        c = self.config
        context = ssl.create_default_context(cafile=c["cacertfile"])
        if c["verify"] == "verify_none":
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if c["certfile"]:
            context.load_cert_chain(c["certfile"], c["keyfile"])
        if c["ciphers"]:
            context.set_ciphers(c["ciphers"])
        if c["tls_versions"]:
            versions = [getattr(ssl.TLSVersion, "TLSv1_%s" % v[-1]) for v in c["tls_versions"]]
            context.minimum_version, context.maximum_version = min(versions), max(versions)
        return context

    # --- bytes in and out ----------------------------------------------------------------
    def _select(self, timeout, write=False):
        """Wait up to ``timeout`` seconds for the socket (or a wake-up); write
        what it takes. Returns (readable, writable)."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write or self._out else 0)
        self._selector.modify(self.sock, events)
        readable = writable = False
        for key, mask in self._selector.select(timeout):
            if key.fileobj is self._wake_r:
                self._drain_wake()
            else:
                readable, writable = bool(mask & selectors.EVENT_READ), bool(
                    mask & selectors.EVENT_WRITE)
        if writable:
            self._flush()
        return readable, writable

    def _wait(self, deadline, write=False):
        """Until the socket is readable (or writable); _BridgeDown at
        ``deadline`` or when stopping."""
        while True:
            if self._stop.is_set():
                raise _BridgeDown("stopped")
            left = deadline - time.monotonic()
            if left <= 0:
                raise _BridgeDown("the remote did not answer within %gs"
                                  % _BRIDGE_CONNECT_TIMEOUT)
            readable, writable = self._select(left, write)
            if readable or (write and writable):
                return

    def _drain_wake(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _read(self):
        """Read what is there; the complete packets, as (first byte, body)."""
        try:
            raw = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return []
        if not raw:
            raise _BridgeDown("the remote closed the connection")
        self._last_in = time.monotonic()
        if self.tls is not None:
            raw, reply = self.tls.feed(raw)
            if reply:
                self._send_raw(reply)
        self._in += raw
        packets, pos = [], 0
        while True:
            framed = split_packet(self._in, pos)
            if framed is None:
                break
            first_byte, body, pos = framed
            packets.append((first_byte, bytes(body)))
        del self._in[:pos]
        return packets

    def _send(self, data):
        self._send_raw(self.tls.wrap(data) if self.tls is not None else data)

    def _send_raw(self, data):
        """Queue bytes for the remote; the loop sends them all in one go
        (one send per turn, not per message: each send gives the GIL up)."""
        self._out += data
        self._last_out = time.monotonic()

    def _flush(self):
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            del self._out[:sent]

    # --- the connected loop --------------------------------------------------------------
    def _serve(self):
        keepalive = self.config["keepalive"]
        while not self._stop.is_set():
            self._send_queued()
            now = time.monotonic()
            timeout = 1.0
            if keepalive:
                if now - self._last_in > keepalive * 1.5:
                    raise _BridgeDown("no answer from the remote for %gs (keepalive)"
                                      % (keepalive * 1.5))
                if now - self._last_out >= keepalive:
                    self._send(encode_pingreq(EMPTY, self.proto_ver))
                timeout = min(timeout, keepalive / 2)
            self._retry(now)
            self._flush()
            readable, _ = self._select(timeout)
            if readable:
                for first_byte, body in self._read():
                    self._handle(first_byte >> 4,
                                 decode_packet(first_byte, body, self.proto_ver, _BRIDGE_ACCEPTS))
        if self.sock is not None:   # stopping: say goodbye
            self._send(encode_disconnect(Disconnect(), self.proto_ver))
            self._flush()

    def _packet_id(self):
        for _ in range(MAX_PACKET_ID):
            self._next_id = self._next_id % MAX_PACKET_ID + 1
            if self._next_id not in self.inflight:
                return self._next_id
        raise _BridgeDown("no free packet id")

    def _send_queued(self):
        """QoS 0 messages, then queued QoS 1/2 ones while the window has room."""
        with self.lock:
            self._waking = False
            qos0, self._qos0 = self._qos0, collections.deque()
            fresh = []
            if len(self.inflight) < self._window:
                for entry in self.queue:
                    if entry.packet_id is None:
                        entry.packet_id = self._packet_id()
                        self.inflight[entry.packet_id] = entry
                        fresh.append(entry)
                        if len(self.inflight) >= self._window:
                            break
        sent = dropped = 0
        for topic, msg in qos0:
            if len(self._out) > _BRIDGE_MAX_OUT:   # the remote reads slowly: QoS 0 goes
                dropped += 1
                continue
            self._publish(topic, msg, 0, None, False)
            sent += 1
        if qos0:
            with self.lock:
                self.counts["forwarded"] += sent
                self.counts["dropped"] += dropped
                self.counts["dropped_qos0"] += dropped
        for entry in fresh:
            self._send_entry(entry, False)

    def _publish(self, topic, msg, qos, packet_id, dup):
        properties = None
        if self.proto_ver == MQTT_V5 and msg.properties:
            properties = forwarded_properties(msg.properties)
            if msg.expires_at is not None:
                properties["message_expiry_interval"] = max(
                    0, int(msg.expires_at - self.broker.clock.monotonic()))
        if not qos:
            packet_id = None
        if not (dup or self._bridge_bit or self.proto_ver == MQTT_V5) and any(
                topic_matches(f, topic) for f, _ in self.config["subscriptions"]):
            key = (topic, hash(msg.payload))   # our own marking: its echo will come
            self._fingerprints[key] = self._fingerprints.get(key, 0) + 1
            if len(self._fingerprints) > _BRIDGE_FINGERPRINTS:
                self._fingerprints.popitem(last=False)
        self._send(encode_publish(Publish(topic, msg.payload, qos, msg.retain, dup, packet_id,
                                          properties), self.proto_ver))

    def _send_entry(self, entry, dup):
        """A queued message's PUBLISH (or its PUBREL once the remote has it).
        At the remote's Maximum QoS 0 it is done once sent."""
        entry.sent_at = time.monotonic()
        if entry.state == WAIT_COMP:
            self._send(encode_pubrel(Ack(entry.packet_id), self.proto_ver))
            return
        qos = min(entry.qos, self._max_qos)
        self._publish(entry.topic, entry.msg, qos, entry.packet_id, dup)
        if not qos:
            self._complete(entry.packet_id)

    def _resend(self, session_present):
        """After a (re)connect: what was in flight goes again, in order (DUP
        when the remote kept the session); a QoS 2 message whose PUBREC came
        goes on with PUBREL, or is done if the remote forgot the session."""
        with self.lock:
            entries = sorted(self.inflight.values(), key=lambda e: e.seq)
            self.inflight.clear()
            for entry in entries:
                if entry.state == WAIT_COMP and not session_present:
                    # The remote forgot the exchange (some deliver at PUBREL): sent
                    # again as new, at least once rather than maybe never.
                    entry.state = WAIT_ACK
                self.inflight[entry.packet_id] = entry
        for entry in entries:
            self._send_entry(entry, session_present and entry.state == WAIT_ACK)

    def _retry(self, now):
        """3.x: resend what waited retry_interval for its ack (5.0 resends only
        on a new connection [MQTT-4.4.0-1])."""
        if self.proto_ver == MQTT_V5:
            return
        cutoff = now - self.config["retry_interval"]
        with self.lock:
            late = [e for e in self.inflight.values() if e.sent_at is not None
                    and e.sent_at <= cutoff]
        for entry in late:
            self._send_entry(entry, True)

    def _complete(self, packet_id, entry=None, refused=False):
        """The remote has this message (or refused it): off the queue and the disk."""
        store = self.broker.core.store
        with self.lock:
            entry = self.inflight.pop(packet_id, None) or entry
            if entry is None:
                return
            try:
                self.queue.remove(entry)
                self.queued_bytes -= entry.size
            except ValueError:
                pass
            if refused:
                self.counts["dropped"] += 1
                self.counts["dropped_refused"] += 1
            else:
                self.counts["forwarded"] += 1
            if entry.stored and store is not None:
                store.delete(("bridgeq", self.name, entry.seq))

    # --- packets from the remote ---------------------------------------------------------
    def _handle(self, packet_type, pkt):
        if packet_type == PUBLISH:
            self._received(pkt)
        elif packet_type == PUBACK:
            self._complete(pkt.packet_id, refused=pkt.reason_code >= 0x80)
        elif packet_type == PUBREC:
            if pkt.reason_code >= 0x80:
                self._complete(pkt.packet_id, refused=True)
                return
            with self.lock:
                entry = self.inflight.get(pkt.packet_id)
                if entry is not None:
                    entry.state, entry.sent_at = WAIT_COMP, time.monotonic()
            self._send(encode_pubrel(Ack(pkt.packet_id), self.proto_ver))
        elif packet_type == PUBCOMP:
            self._complete(pkt.packet_id)
        elif packet_type == PUBREL:
            self._inbound.discard(pkt.packet_id)
            self._send(encode_pubcomp(Ack(pkt.packet_id), self.proto_ver))
        elif packet_type == SUBACK:
            refused = [t for (t, _), code in zip(self.config["subscriptions"], pkt.return_codes)
                       if code >= 0x80]
            if refused:
                with self.lock:
                    self.last_error = "the remote refused the subscription(s) %s" % ", ".join(
                        refused)
                _log.warning("Bridge %s: %s", self.name, self.last_error)
        elif packet_type == DISCONNECT:
            reason = getattr(pkt, "reason_code", 0)
            raise _BridgeDown("the remote disconnected (reason 0x%02x)" % reason)

    def _received(self, pkt):
        """A PUBLISH from the remote: published here, then acknowledged (after
        the data file has it, when a persistent session here got it)."""
        if pkt.qos == 2 and pkt.packet_id in self._inbound:   # a resend: delivered already
            self._send(encode_pubrec(Ack(pkt.packet_id), self.proto_ver))
            return
        if self._fingerprints:
            key = (pkt.topic, hash(bytes(pkt.payload)))
            count = self._fingerprints.get(key)
            if count:   # the echo of what this bridge forwarded: not published again
                if count == 1:
                    del self._fingerprints[key]
                else:
                    self._fingerprints[key] = count - 1
                self._ack(pkt)
                return
        properties = forwarded_properties(pkt.properties) if pkt.properties else None
        core = self.broker.core
        msg = Message(self.config["receive_mountpoint"] + pkt.topic, bytes(pkt.payload),
                      pkt.qos, pkt.retain, self.tag, False, properties, core.clock)
        batch = Batch()
        core.publish(msg, batch)
        batch.run()
        with self.lock:
            self.counts["received"] += 1
        if pkt.qos and core.store is not None:
            core.store.wait()   # what this promises is on disk first
        if pkt.qos == 2:
            self._inbound.add(pkt.packet_id)
        self._ack(pkt)

    def _ack(self, pkt):
        if pkt.qos == 1:
            self._send(encode_puback(Ack(pkt.packet_id), self.proto_ver))
        elif pkt.qos == 2:
            self._inbound.add(pkt.packet_id)
            self._send(encode_pubrec(Ack(pkt.packet_id), self.proto_ver))


#: CONNACK return code -> what it means (3.1.1 table 3.1; 5.0 reason codes too)
_CONNACK_NAMES = {
    CONNACK_UNACCEPTABLE_PROTOCOL: "unacceptable protocol version",
    CONNACK_IDENTIFIER_REJECTED: "identifier rejected",
    CONNACK_SERVER_UNAVAILABLE: "server unavailable",
    CONNACK_BAD_USERNAME_PASSWORD: "bad user name or password",
    CONNACK_NOT_AUTHORIZED: "not authorized",
    0x84: "unsupported protocol version", 0x85: "client identifier not valid",
    0x86: "bad user name or password", 0x87: "not authorized", 0x88: "server unavailable",
    0x89: "server busy", 0x8A: "banned",
}


###############################################################################
# Application control #########################################################
###############################################################################

#: accept() errors that mean "out of resources": the connection is refused.
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


def _spare_descriptor():
    """A descriptor held in reserve (see Broker._refuse_pending), or None."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _read_int(path):
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def os_ceilings():
    """What the operating system lets thread-per-connection reach, each
    connection needing a descriptor and a thread (a task with a stack and a
    guard page: two memory maps): ({limit name: value}, the connections they
    allow together, or None if unknown)."""
    try:
        import resource
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        unlimited = resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):
        nofile = nproc = unlimited = None
    limits = {   # name -> (limit, what one connection takes of it)
        "open files (ulimit -n)": (None if nofile == unlimited else nofile, 1),
        "threads-max": (_read_int("/proc/sys/kernel/threads-max"), 1),
        "pid_max": (_read_int("/proc/sys/kernel/pid_max"), 1),
        "vm.max_map_count": (_read_int("/proc/sys/vm/max_map_count"), 2),
        # root is not held to ulimit -u
        "processes (ulimit -u)": (None if nproc == unlimited or os.geteuid() == 0 else nproc,
                                  1),
    }
    allowed = min((limit // each for limit, each in limits.values() if limit is not None),
                  default=None)
    return {name: limit for name, (limit, _) in limits.items()}, allowed


def _nofile_limit():
    try:
        import resource
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return "unknown"


#: Packet types a fault may drop or hold: those the broker sends.
_SERVER_PACKETS = {name: t for t, name in PACKET_NAMES.items()
                   if t in (CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK,
                            PINGRESP, DISCONNECT, AUTH)}


class Faults:
    """Network faults for testing clients (``Broker.faults``): each acts on a
    live connection (KeyError if the client is not connected) and is
    recorded in the journal. ``lock`` guards ``refusals`` and ``_timers``
    (a leaf: nothing is taken while it is held)."""

    def __init__(self, broker):
        self._broker = broker
        self.lock = threading.Lock()
        self.refusals = []        # [return code, client id or None, count left], in order
        self._timers = set()      # threading.Timer objects still pending

    # --- the faults -----------------------------------------------------------------
    def disconnect(self, client_id):
        """The TCP connection dies as on a network failure: no DISCONNECT;
        the will is published."""
        conn = self._conn(client_id)
        self._journal(client_id, "disconnect", "connection cut")
        conn.close_reason = conn.close_reason or "closed"
        if conn.faults is not None:
            conn.faults.thaw.set()
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def freeze(self, client_id, seconds):
        """Stop reading from and writing to the client for ``seconds``: what
        it sends and what it is sent waits, nothing is dropped; its
        keepalive clock keeps running."""
        seconds = self._seconds(seconds)
        conn = self._conn(client_id)
        faults = self._faults_of(conn)
        faults.thaw.clear()
        faults.frozen_until = time.monotonic() + seconds
        self._journal(client_id, "freeze", "frozen for %gs" % seconds)
        self.later(seconds, conn.flush)   # what waited goes out when it ends

    def drop_next(self, client_id, packet_type, count=1):
        """Swallow the next ``count`` packets of ``packet_type`` ("PUBACK",
        "PUBLISH"...) the broker sends the client, so that its retries run."""
        kind, count = self._packet_type(packet_type), self._positive("count", count)
        faults = self._faults_of(self._conn(client_id))
        with faults.lock:
            faults.drop[kind] = faults.drop.get(kind, 0) + count
        self._journal(client_id, "drop_next", "the next %d %s dropped"
                      % (count, PACKET_NAMES[kind]))

    def delay(self, client_id, packet_type, seconds):
        """Hold every ``packet_type`` packet to the client for ``seconds``
        (packets of other types overtake it), until clear()."""
        kind, seconds = self._packet_type(packet_type), self._seconds(seconds)
        faults = self._faults_of(self._conn(client_id))
        with faults.lock:
            faults.delay[kind] = seconds
        self._journal(client_id, "delay", "%s held %gs" % (PACKET_NAMES[kind], seconds))

    def refuse_connect(self, return_code, client_id=None, count=1):
        """The next ``count`` CONNECTs (from ``client_id``, or anyone) get
        CONNACK ``return_code`` (3.x codes 1-5, mapped for 5.0 clients)."""
        if not isinstance(return_code, int) or not 1 <= return_code <= 255:
            raise ValueError("return_code must be a CONNACK code 1..255, not %r" % (return_code,))
        count = self._positive("count", count)
        self._broker._require_started()
        with self.lock:
            self.refusals.append([return_code, client_id, count])
        self._journal(client_id, "refuse_connect", "the next %d CONNECT(s) get %d"
                      % (count, return_code))

    def close_after(self, client_id, packets):
        """Cut the connection (as a network failure) once the client has sent
        ``packets`` more packets; the last one is handled, its reply not sent."""
        packets = self._positive("packets", packets)
        faults = self._faults_of(self._conn(client_id))
        with faults.lock:
            faults.close_after = packets
        self._journal(client_id, "close_after", "cut after %d more packets" % packets)

    def pause_listener(self, seconds):
        """Accept no connection for ``seconds``: the kernel still completes
        TCP handshakes, and their CONNECTs are answered when the pause ends."""
        seconds = self._seconds(seconds)
        self._broker._pause_listeners(seconds)
        self._journal(None, "pause_listener", "listeners paused %gs" % seconds)

    def clear(self):
        """End every fault: thaw, stop dropping and holding (what is held goes
        now), accept again, refuse no more."""
        with self.lock:
            self.refusals.clear()
            timers, self._timers = self._timers, set()
        broker = self._broker
        core = broker.core
        for conn in (core.live_connections() if core is not None else ()):
            faults = conn.faults
            if faults is not None:
                with faults.lock:
                    faults.drop.clear()
                    faults.delay.clear()
                    faults.close_after = None
                faults.frozen_until = 0.0
                faults.thaw.set()
                conn.flush()
        for timer in timers:   # what they hold is sent now
            timer.cancel()
            timer.join()
            timer.action()
        if broker._service is not None:
            broker._pause_listeners(0)

    # --- used by connections ---------------------------------------------------------
    def refusal_for(self, client_id):
        """The CONNACK code an injected refusal gives this CONNECT, or None."""
        with self.lock:
            for refusal in self.refusals:
                if refusal[1] is None or refusal[1] == client_id:
                    refusal[2] -= 1
                    if not refusal[2]:
                        self.refusals.remove(refusal)
                    return refusal[0]
        return None

    def later(self, seconds, action):
        """Run ``action`` in ``seconds`` on a timer thread; clear() runs what
        is still pending at once (and joins the threads)."""
        timer = None

        def run():
            with self.lock:
                if timer not in self._timers:
                    return   # clear() took it and runs the action itself
                self._timers.discard(timer)
            action()

        timer = threading.Timer(seconds, run)
        timer.daemon = True
        timer.action = action
        with self.lock:
            self._timers.add(timer)
        timer.start()

    # --- helpers -------------------------------------------------------------------
    def _conn(self, client_id):
        conn = self._broker._require_started().connection(client_id)
        if conn is None:
            raise KeyError("client %r is not connected" % (client_id,))
        return conn

    def _faults_of(self, conn):
        if conn.faults is None:
            session = conn.session
            if session is not None:
                with session.lock:   # full topics from now on: a dropped or held PUBLISH
                    session.aliases = None   # must not leave the client without its alias
            conn.faults = ConnectionFaults(self)
        self._broker.core.observed = True
        return conn.faults

    @staticmethod
    def _packet_type(packet_type):
        kind = _SERVER_PACKETS.get(str(packet_type).upper()) if not isinstance(
            packet_type, int) else packet_type
        if kind not in _SERVER_PACKETS.values():
            raise ValueError("not a packet type the broker sends: %r (one of %s)"
                             % (packet_type, ", ".join(sorted(_SERVER_PACKETS))))
        return kind

    @staticmethod
    def _positive(name, value):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError("%s must be a positive integer, not %r" % (name, value))
        return value

    @staticmethod
    def _seconds(seconds):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError("seconds must be a number >= 0, not %r" % (seconds,))
        return float(seconds)

    def _journal(self, client_id, action, what):
        journal = self._broker.journal
        if journal.size:
            journal.record(client_id, "fault", action, None, note=["injected: " + what])


class Broker:
    """The embeddable broker: listeners, the service thread, the REST API.

    ``Broker(mqtt_port=0, http_port=0)`` binds ephemeral ports; read them back
    from ``mqtt_port`` / ``http_port`` (and ``ssl_port``, ``ws_port``,
    ``wss_port``) after ``start()`` (or inside ``with``). ``None`` for a port
    means no such listener; ``http_port=None`` runs without the REST API.
    ``dashboard_port`` (default None: none) serves the dashboard, its
    ``/metrics`` and the REST API again while the emqx_dashboard plugin runs;
    read the port back from ``dashboard_port``. TLS listeners take ``certfile``/``keyfile`` (and ``cacertfile``,
    ``verify``, ``fail_if_no_peer_cert``); ``listeners`` replaces all of that
    with a list of ``Listener`` keyword dicts (what a config file gives).
    Every key of ``DEFAULTS`` can be given as a keyword argument. The methods
    below are thread-safe.
    """

    def __init__(self, bind="0.0.0.0", mqtt_port=1883, http_port=8080, *,
                 http_bind=None, ssl_port=None, ws_port=None, wss_port=None,
                 certfile=None, keyfile=None, cacertfile=None, verify=False,
                 fail_if_no_peer_cert=False, listeners=None, users=None,
                 authenticate=None, auth_methods=None, clock=None, dashboard_port=None,
                 dashboard_bind=None, bridges=None, **settings):
        unknown = set(settings) - set(DEFAULTS)
        if unknown:
            raise TypeError("unknown broker setting(s): %s" % ", ".join(sorted(unknown)))
        self.settings = dict(DEFAULTS, **settings)
        self.bind, self.http_bind = bind, http_bind or bind
        self._http_port_wanted = http_port
        if listeners is None:
            tls = {"certfile": certfile, "keyfile": keyfile, "cacertfile": cacertfile,
                   "verify": verify, "fail_if_no_peer_cert": fail_if_no_peer_cert}
            listeners = [dict({"type": kind, "host": bind, "port": port},
                              **(tls if kind in ("ssl", "wss") else {}))
                         for kind, port in (("tcp", mqtt_port), ("ssl", ssl_port),
                                            ("ws", ws_port), ("wss", wss_port))
                         if port is not None]
        self._listener_specs = [dict({"max_clients": self.settings["max_clients"],
                                      "acceptors": self.settings["acceptors"]}, **spec)
                                for spec in listeners]
        self.ssl_port = self.ws_port = self.wss_port = None
        #: the dashboard's management users (REST API Basic auth and users API);
        #: none without the API, so that an API-less broker pays no hashing
        if http_port is None and dashboard_port is None:
            users = {}
        self.users = UserTable(users if users is not None else {"admin": "public"},
                               tags="administrator",
                               iterations=self.settings["api_password_iterations"])
        self.api_guard = ApiGuard(self.users, self.settings["api_max_auth_failures"],
                                  self.settings["api_auth_failure_window"])
        self._default_admin = users is None
        self.authenticate = authenticate
        #: MQTT 5.0 enhanced authentication (see BrokerCore.auth_methods)
        self.auth_methods = dict(auth_methods or {})
        acl_file = self.settings["acl_file"]
        if acl_file is None:
            self.acl = Acl(parse_acl(DEFAULT_ACL, "<default acl.conf>"), self.settings["acl_nomatch"])
        else:
            with open(acl_file, encoding="utf-8") as f:
                self.acl = Acl(parse_acl(f.read(), acl_file), self.settings["acl_nomatch"])
        # The auth plugins' tables keep salted hashes only: no plain password stays.
        #: the emqx_auth_username and emqx_auth_clientid tables (change them at will)
        self.auth_username = UserTable(self.settings.pop("auth_username"))
        self.auth_clientid = UserTable(self.settings.pop("auth_clientid"))
        if self.settings["data_sync"] not in _DATA_SYNC:
            raise ValueError("data_sync must be normal or full, not %r"
                             % (self.settings["data_sync"],))
        self._store = None   # the Store while started with a data_dir
        #: the last ``journal`` packets in and out (Journal.query); none with journal=0
        self.journal = Journal(self.settings["journal"])
        #: network faults for tests (Faults)
        self.faults = Faults(self)
        #: the clock every timer reads: real time, or a test's ManualClock
        self.clock = clock if clock is not None else SystemClock()
        self._next_tick = self._next_heartbeat = self._next_sys = 0.0   # on that clock
        self._resume_listeners_at = None   # an injected pause_listener ends then
        #: guards _plugins (only Store.lock is taken under it)
        self._plugins_lock = threading.Lock()
        self._plugins = dict(PLUGINS_ACTIVE)
        self.node = self.settings["node"]
        self.core = None
        self.listeners = []
        self.mqtt_port = self.http_port = None
        #: serialises start() and stop()
        self._lifecycle_lock = threading.Lock()
        #: guards the selector's registrations made outside the service thread (leaf)
        self._selector_lock = threading.Lock()
        self._spare_fd = None   # a descriptor given back to refuse a connection when out of them
        self._refusals = {}     # kind -> (refused since logged, when logged): service thread
        #: its lock guards _state_version, bumped when clients or subscriptions
        #: change; the awaits (wait_for_client...) wait on it (a leaf)
        self._state_cv = threading.Condition()
        self._state_version = 0
        self._selector = None
        self._wake_r = self._wake_w = None
        self._service = None
        self._stopping = False
        #: connections whose reader thread runs, and those settled whose reader
        #: is still ending (under _settle_lock): stop() joins them all
        self._readers = set()
        self._ending = []
        #: the connections' timers, kept by whoever runs the timers (the service
        #: thread, or ManualClock.advance()): a heap of [due, n, kind, conn],
        #: kind "connect" (connect timeout) or "keepalive", on the broker's
        #: clock; any thread hands a connection to schedule through _timers_new
        #: (accepted, or just CONNECTed); settling a closed connection clears
        #: the conn of its keepalive entry (conn.timer). _timers_stale asks for
        #: every due to be worked out again (a timeout setting changed).
        self._timers, self._timers_new = [], collections.deque()
        self._timers_seq = itertools.count()
        self._timers_stale = False
        self._blocked = set()   # connections with a blocked write (send timeout)
        self._hooks = ConnectionHooks(self._watch_writable, self._unwatch_writable,
                                      self._client_connected, self._connection_closed)
        #: (Connection, reason, its thread's counters) closed by reader threads and
        #: not yet settled: appended and popped atomically (a deque), no lock
        self._closed = collections.deque()
        #: serialises _settle_closed() (the service thread, and ManualClock.advance)
        self._settle_lock = threading.Lock()
        self._http = self._http_thread = None
        #: the dashboard's listener: served while the emqx_dashboard plugin is active
        self._dashboard_port_wanted = dashboard_port
        self.dashboard_bind = dashboard_bind or self.http_bind
        self.dashboard_port = None
        self._dashboard_configured = (self.dashboard_bind, dashboard_port)
        #: serialises changes of settings at run time (set_config, set_plugin_config),
        #: so that the running value and the kept one agree (before _dashboard_lock)
        self._settings_lock = threading.Lock()
        #: guards _dashboard, _dashboard_thread, _dashboard_stopper and the
        #: dashboard's address (taken with no lock held; _plugins_lock under it)
        self._dashboard_lock = threading.Lock()
        self._dashboard = self._dashboard_thread = None
        self._dashboard_stopper = None   # the thread retiring a server (plugin stopped, moved)
        #: the dashboard's charts: a sample every HISTORY_INTERVAL s (service thread)
        self._history = collections.deque(maxlen=HISTORY_SAMPLES)
        #: name -> Bridge (emqx_bridge_mqtt): {name: {option: value}} as a
        #: configuration file's bridge.mqtt.<name>.<option> keys give them
        self.bridges = {name: Bridge(self, name, options)
                        for name, options in (bridges or {}).items()}
        self._last_sample = None   # (monotonic time, messages received, sent)
        self._next_sample = 0.0

    # --- lifecycle -------------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        with self._lifecycle_lock:
            if self._service is not None:
                raise RuntimeError("broker already started")
            if not _MSG_DONTWAIT:
                raise RuntimeError("emqx_lite needs non-blocking sends (MSG_DONTWAIT): "
                                   "it runs on Linux and macOS")
            self._stopping = False
            self._history.clear()
            self._last_sample = None
            self._open_store()   # before anything can change state
            self.core = BrokerCore(self.settings, self._authenticate, self.acl, self.auth_methods,
                                   self._store, self.clock)
            self.core.on_change = self._state_changed
            self.core.journal = self.journal if self.journal.size else None
            self.core.observed = self.core.journal is not None
            self.core.faults = self.faults
            self.listeners = []
            try:
                self._restore()
                self._apply_plugins()
                for spec in self._listener_specs:
                    self.listeners.append(Listener(**spec))
                for lst in reversed(self.listeners):   # the first of each type names the port
                    setattr(self, {"tcp": "mqtt_port"}.get(lst.type, lst.type + "_port"), lst.port)
                self._selector = selectors.DefaultSelector()
                self._spare_fd = _spare_descriptor()
                self._wake_r, self._wake_w = socket.socketpair()
                self._wake_r.setblocking(False)
                self._wake_w.setblocking(False)
                self._selector.register(self._wake_r, selectors.EVENT_READ, None)
                for lst in self.listeners:
                    self._selector.register(lst.sock, selectors.EVENT_READ, lst)
                if self._http_port_wanted is not None:
                    self._start_http()
                self._sync_dashboard()
            except BaseException:
                self._close_resources()
                raise
            self._publish_sys_retained()
            if self.plugins()["emqx_bridge_mqtt"]:
                for bridge in self.bridges.values():
                    bridge.start()
            now, interval = self.clock.monotonic(), self.settings["sys_interval"]
            self._next_tick = now + min(0.5, interval, 1.0)
            self._next_heartbeat = now + min(1.0, interval)
            self._next_sys = now + interval
            self._service = _start_thread(self._service_loop, "emqx_lite-service")
            if self.clock.manual:
                self.clock.attach(self)
            for lst in self.listeners:
                _log.info("Listening for MQTT (%s) on %s:%d", lst.protocol, lst.bind, lst.port)
            limits, allowed = os_ceilings()
            _log.info("Connections (a thread with a %d KiB stack and a descriptor each): about "
                      "%s fit under %s", _THREAD_STACK_SIZE // 1024,
                      "{:,}".format(allowed) if allowed is not None else "an unknown number of",
                      ", ".join("%s %s" % (name, "{:,}".format(limit))
                                for name, limit in limits.items() if limit is not None))
            if self._default_admin and self._http is not None:
                _log.warning("REST API user 'admin' still has the default password")
        return self

    def stop(self):
        """Close listeners, then every connection (no wills), then the REST API.
        Joins every thread the broker started."""
        with self._lifecycle_lock:
            if self._service is None:
                return
            if self.clock.manual:
                self.clock.detach(self)
            self.faults.clear()
            self._stopping = True   # from now on no bridge starts
            for bridge in self.bridges.values():   # they publish here: first
                bridge.stop()
            self._wake()
            self._service.join()
            self._service = None
            conns = self.core.live_connections()
            for conn in conns:
                conn.shutdown("shutdown")
            with self._settle_lock:
                readers = list(self._readers) + self._ending
            for conn in readers:
                conn.join()
            self._settle_closed()
            with self._settle_lock:
                self._readers.clear()
                self._ending = []
            self._timers.clear()
            self._timers_new.clear()
            self._blocked.clear()
            self._close_resources()

    def _close_resources(self):
        self._stop_dashboard()
        self._stop_http()
        self._close_store()
        for lst in self.listeners:
            lst.close()
        self.listeners = []
        with self._selector_lock:
            if self._selector is not None:
                self._selector.close()
                self._selector = None
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None

    # --- durable state ------------------------------------------------------------------
    def _open_store(self):
        data_dir = self.settings["data_dir"]
        if not data_dir:
            _log.info("Keeping state in memory only: it ends with the process (node.data_dir)")
            return
        self._store = Store(data_dir, self.settings["data_sync"])
        _log.info("Keeping state in %s (node.data_dir; synchronous=%s)",
                  os.path.abspath(self._store.path), self.settings["data_sync"])

    def _restore(self):
        """Start from the data file: sessions, retained messages, users, plugins."""
        store = self._store
        if store is None:
            return
        data = store.load()
        self.core.restore(data)
        tables = {"dashboard": self.users, "auth_username": self.auth_username,
                  "auth_clientid": self.auth_clientid}
        stored = collections.defaultdict(list)
        for table, name, encoded, tags in data["users"]:
            stored[table].append((name, encoded, tags))
        for table, users in tables.items():
            if table == "dashboard":
                if stored[table]:   # the file's users, once it has any (as EMQ X's mnesia)
                    users.load(stored[table])
                    if self._default_admin:
                        self._default_admin = users.check("admin", "public") is True
            else:   # those added at run time, then the configuration's, which win
                configured = users.rows()
                users.load(stored[table])
                for name, encoded, tags in configured:
                    users.import_hash(name, encoded, tags)
            users.on_change = functools.partial(self._user_changed, table)
            for name, encoded, tags in users.rows():   # rows from the configuration
                store.put(("user", table, name), (table, name, encoded, tags))
        self._restore_settings(data["settings"])
        self._restore_bridges(data["bridge_queue"])
        with self._plugins_lock:
            for name, active in data["plugins"]:
                if name in self._plugins:
                    self._plugins[name] = bool(active)
        for name, active in self.plugins().items():
            store.put(("plugin", name), (name, int(active)))
        store.start()
        _log.info("Restored %d sessions (%d messages queued or in flight) and %d retained "
                  "messages from %s", len(data["sessions"]), len(data["messages"]),
                  len(self.core.retained), store.path)

    def _restore_bridges(self, rows):
        """The bridges' queues (kept with queue.replayq_dir): sent first."""
        for name, group in itertools.groupby(rows, key=lambda row: row[0]):
            group = [row[1:] for row in group]
            bridge = self.bridges.get(name)
            if bridge is None:
                _log.warning("Data file: %d message(s) queued for a bridge %r that is no longer "
                             "configured are kept", len(group), name)
                continue
            bridge.restore(group)
            _log.info("Bridge %s: %d message(s) queued for the remote, from the data file",
                      name, len(group))

    def _restore_settings(self, rows):
        """The settings changed at run time, from the data file: they win over
        the configuration's (they were made later)."""
        changed = []
        for key, text in sorted(rows):
            try:
                if key in SETTING_KEYS:
                    self._set_setting(SETTING_KEYS[key][0], SETTING_KEYS[key][1](text))
                elif key == "plugin_configs/emqx_modules":
                    self._set_modules_config(json.loads(text))
                elif key == "plugin_configs/emqx_dashboard":
                    address = json.loads(text)["dashboard.listener.http"]
                    if self._dashboard_port_wanted is None:   # no dashboard asked for
                        continue
                    self.dashboard_bind, self._dashboard_port_wanted = parse_address(address)
                else:
                    raise ValueError("unknown key")
            except (ValueError, KeyError, TypeError) as exc:
                _log.warning("Data file: the setting %s = %r is ignored: %s", key, text, exc)
                continue
            changed.append(key)
        if changed:
            _log.info("Settings changed at run time, from the data file: %s", ", ".join(changed))

    def _user_changed(self, table, name, record):
        store = self._store
        if store is not None:
            store.put(("user", table, name),
                      None if record is None else (table, name, record[0], record[1]))

    def _close_store(self):
        store, self._store = self._store, None
        if store is not None:
            for users in (self.users, self.auth_username, self.auth_clientid):
                users.on_change = None
            store.stop()

    def sync(self):
        """Return once every change the calling thread made is on disk (at
        once without a data directory). StoreError if it cannot be written."""
        store = self._store
        if store is not None:
            store.wait()

    def _require_writable(self):
        """StoreError, before anything changes, while the data file cannot be
        written: a change made now could not be kept."""
        store = self._store
        if store is not None and store.failed is not None:
            raise StoreError("cannot write %s: %s" % (store.path, store.failed))

    # --- plugins and authentication ------------------------------------------------
    def plugins(self):
        """Plugin name -> active."""
        with self._plugins_lock:
            return dict(self._plugins)

    def set_plugin(self, name, active):
        """Start or stop a plugin at runtime; False if it already was in that state."""
        self._require_writable()
        with self._plugins_lock:
            if self._plugins[name] == active:
                return False
            self._plugins[name] = active
            if self._store is not None:
                self._store.put(("plugin", name), (name, int(active)))
        self._apply_plugins()
        self.sync()
        if name == "emqx_bridge_mqtt" and self._service is not None:
            for bridge in self.bridges.values():
                bridge.start() if active else bridge.stop()
        if name == "emqx_dashboard" and self._service is not None:
            try:
                self._sync_dashboard()
            except OSError as exc:
                _log.error("Dashboard: cannot listen on %s: %s", _fmt_address(
                    self.dashboard_bind, self._dashboard_port_wanted), exc)
        _log.info("Plugin %s %s", name, "started" if active else "stopped")
        return True

    # --- settings at run time: the configs and plugin_configs routes -------------------
    def configs(self):
        """Every setting with an emq.conf key, as the configs routes list them:
        [{"key", "value", "datatpye" (EMQ X's spelling), "app", "runtime"}]."""
        return [{"key": key, "value": format_setting(key, self.settings[name]),
                 "datatpye": _DATATYPES.get(parse, "string"), "app": setting_app(key),
                 "runtime": key in RUNTIME_KEYS}
                for key, (name, parse) in sorted(SETTING_KEYS.items())]

    def set_config(self, key, value, app=None):
        """Change the setting ``key`` to ``value`` (emq.conf text) while running,
        and keep the change in the data file. ValueError, naming the key, if it
        is unknown, not ``app``'s, cannot change at run time, or the value is bad."""
        if key not in SETTING_KEYS:
            raise ValueError("%s: unknown key" % key)
        if app is not None and app != setting_app(key) and not (
                app == "emqttd" and setting_app(key) == "emqx"):
            raise ValueError("%s is a setting of %s, not of %s" % (key, setting_app(key), app))
        if key not in RUNTIME_KEYS:
            raise ValueError("%s cannot be changed while the broker runs: set it in the "
                             "configuration file and restart" % key)
        name, parse = SETTING_KEYS[key]
        try:
            parsed = parse(value)
        except ValueError as exc:
            raise ValueError("%s: %s" % (key, exc)) from None
        self._require_writable()
        with self._settings_lock:   # what runs and what is kept stay the same
            self._set_setting(name, parsed)
            self._keep_setting(key, format_setting(key, parsed))
        self.sync()
        _log.info("Setting %s = %s (changed at run time)", key, format_setting(key, parsed))

    def _set_setting(self, name, value):
        self.settings[name] = value
        if name in ("connect_timeout", "keepalive_backoff"):
            self._timers_stale = True   # every timer is worked out again at the next tick
        if name == "acl_nomatch":
            self.acl.nomatch = value
        elif name in ("api_max_auth_failures", "api_auth_failure_window"):
            self.api_guard.max_failures = self.settings["api_max_auth_failures"]
            self.api_guard.window = self.settings["api_auth_failure_window"]

    def _keep_setting(self, key, text):
        """Record a setting changed at run time in the data file (if any)."""
        if self._store is not None:
            self._store.put(("setting", key), (key, text))

    def plugin_config(self, plugin):
        """Plugin ``plugin``'s settings as the plugin_configs route lists them:
        [{"key", "value", "desc", "required"}]. Passwords are never shown
        (their value is ""); a key with ``$`` shows how to name a new entry.
        KeyError for an unknown plugin."""
        return [{"key": key, "value": value, "desc": desc, "required": required,
                 "secret": bool(_WRITE_ONLY.fullmatch(key))}
                for key, value, desc, required in _PLUGIN_CONFIGS[plugin][0](self)]

    def set_plugin_config(self, plugin, values):
        """Replace plugin ``plugin``'s settings with ``values`` ({key: text}),
        as EMQ X 2.3 does: a key left out takes its default, and a table entry
        left out is removed; a password left "" keeps the one it has. Checked
        whole first: ValueError naming the key, and nothing changed."""
        if not all(isinstance(v, str) for v in values.values()):
            raise ValueError("every value must be a string")
        values = {k: v for k, v in values.items() if not ("$" in k and v == "")}
        for key in values:
            if "$" in key:
                raise ValueError("%s: replace the part with $ by a name" % key)
        self._require_writable()
        with self._settings_lock:
            _PLUGIN_CONFIGS[plugin][1](self, values)
        self.sync()
        _log.info("Plugin %s: settings changed (%s)", plugin, ", ".join(sorted(values)) or "none")

    def _retainer_config(self):
        return [("retainer.storage_type", "disc" if self._store is not None else "ram",
                 "Where retained messages live: disc (node.data_dir) or ram; set by node.data_dir",
                 True),
                ("retainer.max_message_num", format_setting(
                    "retainer.max_message_num", self.settings["retainer_max_messages"]),
                 "Retained messages kept at most (0: no limit)", True),
                ("retainer.max_payload_size", format_setting(
                    "retainer.max_payload_size", self.settings["retainer_max_payload_size"]),
                 "The largest payload retained (0: no limit)", True),
                ("retainer.expiry_interval", format_setting(
                    "retainer.expiry_interval", self.settings["retainer_expiry_interval"]),
                 "How long a retained message is kept (0: until replaced)", True)]

    def _set_retainer_config(self, values):
        storage = "disc" if self._store is not None else "ram"
        given = values.pop("retainer.storage_type", storage)
        if given != storage:
            raise ValueError("retainer.storage_type: %s here (node.data_dir decides), not %s"
                             % (storage, given))
        parsed = {}
        for key in ("retainer.max_message_num", "retainer.max_payload_size",
                    "retainer.expiry_interval"):
            name, parse = SETTING_KEYS[key]
            if key in values:
                try:
                    parsed[name, key] = parse(values.pop(key))
                except ValueError as exc:
                    raise ValueError("%s: %s" % (key, exc)) from None
            else:
                parsed[name, key] = DEFAULTS[name]
        _refuse_unknown(values, "emqx_retainer")
        for (name, key), value in parsed.items():
            self._set_setting(name, value)
            self._keep_setting(key, format_setting(key, value))

    def _modules_config(self):
        rows = []
        for n, (topic, qos) in enumerate(self.settings["module_subscription"], 1):
            rows += [("module.subscription.%d.topic" % n, topic,
                      "Subscribed for every client that connects (%c: client id, %u: username)",
                      True),
                     ("module.subscription.%d.qos" % n, str(qos), "Its QoS", True)]
        for n, rule in enumerate(self.settings["module_rewrite"], 1):
            rows.append(("module.rewrite.rule.%d" % n, " ".join(rule),
                         "<filter> <regex> <destination>: topics matching rewritten", True))
        return rows + [("module.subscription.$id.topic", "", "A subscription for every client",
                        False),
                       ("module.subscription.$id.qos", "", "Its QoS (default 1)", False),
                       ("module.rewrite.rule.$id", "", "A topic rewrite rule", False)]

    def _set_modules_config(self, values):
        _refuse_unknown({k: v for k, v in values.items() if not k.startswith("module.")},
                        "emqx_modules")
        try:
            parsed = config_settings([("plugin_configs", k, v) for k, v in values.items()])
        except ConfigError as exc:
            raise ValueError(str(exc).split(": ", 1)[1]) from None
        subscriptions = tuple(parsed.get("module_subscription", ()))
        rewrites = tuple(parsed.get("module_rewrite", ()))
        self.settings["module_subscription"] = subscriptions
        self.settings["module_rewrite"] = rewrites
        self.core.set_rewrite_rules(rewrites)
        self._keep_setting("plugin_configs/emqx_modules", json.dumps(values, sort_keys=True))

    def _auth_username_config(self):
        return [("auth.username.%s" % u["username"], "", "Password (never shown: \"\" keeps it)",
                 True) for u in self.auth_username.list()] + [
                ("auth.username.$name", "", "A username and its password", False)]

    def _set_auth_username_config(self, values):
        table = {}
        for key, password in values.items():
            m = re.fullmatch(r"auth\.username\.(.+)", key)
            if not m:
                raise ValueError("%s: not a setting of emqx_auth_username" % key)
            table[m[1]] = password
        self._replace_auth_table(self.auth_username, table, "auth.username.")

    def _auth_clientid_config(self):
        rows = []
        for n, user in enumerate(self.auth_clientid.list(), 1):
            rows += [("auth.client.%d.clientid" % n, user["username"], "Client id", True),
                     ("auth.client.%d.password" % n, "", "Its password (never shown: \"\" "
                                                        "keeps it)", True)]
        return rows + [("auth.client.$n.clientid", "", "A client id", False),
                       ("auth.client.$n.password", "", "Its password", False)]

    def _set_auth_clientid_config(self, values):
        pairs, table = {}, {}
        for key, value in values.items():
            m = re.fullmatch(r"auth\.client\.([0-9]+)\.(clientid|password)", key)
            if m:
                pairs.setdefault(m[1], {})[m[2]] = value
                continue
            m = re.fullmatch(r"auth\.client\.(.+)", key)
            if not m:
                raise ValueError("%s: not a setting of emqx_auth_clientid" % key)
            table[m[1]] = value
        for n, pair in sorted(pairs.items()):
            if not pair.get("clientid"):
                raise ValueError("auth.client.%s.clientid: missing or empty" % n)
            table[pair["clientid"]] = pair.get("password", "")
        self._replace_auth_table(self.auth_clientid, table, "auth.client.")

    @staticmethod
    def _replace_auth_table(users, table, prefix):
        """Make ``users`` hold exactly ``table``'s names; a password "" keeps
        the one a name has (and a new name must have one)."""
        for name, password in table.items():
            if not password and name not in users:
                raise ValueError("%s%s: a new entry needs a password" % (prefix, name))
        for user in users.list():
            if user["username"] not in table:
                users.delete(user["username"])
        for name, password in table.items():
            if password and not users.set_password(name, password):
                users.add(name, password)

    def _dashboard_config(self):
        port = self.dashboard_port or self._dashboard_port_wanted
        login = "admin" if "admin" in self.users else next(
            (u["username"] for u in self.users.list()), "")
        return [("dashboard.listener.http",
                 "" if port is None else _fmt_address(self.dashboard_bind, port),
                 "The dashboard's address, or its port (it moves there at once)", True),
                ("dashboard.default_user.login", login,
                 "A dashboard user; added if missing (it then needs the password)", True),
                ("dashboard.default_user.password", "",
                 "Its password (never shown: \"\" keeps it)", False)]

    def _set_dashboard_config(self, values):
        address = values.pop("dashboard.listener.http", None)
        login = values.pop("dashboard.default_user.login", "")
        password = values.pop("dashboard.default_user.password", "")
        _refuse_unknown(values, "emqx_dashboard")
        if address is not None:
            try:
                bind, port = parse_address(address)
            except ValueError as exc:
                raise ValueError("dashboard.listener.http: %s" % exc) from None
        if login and login not in self.users and not password:
            raise ValueError("dashboard.default_user.password: a new user %r needs one" % login)
        if password and not login:
            raise ValueError("dashboard.default_user.login: whose password is it?")
        if address is not None and (bind, port) != (self.dashboard_bind,
                                                     self.dashboard_port or
                                                     self._dashboard_port_wanted):
            try:
                self._move_dashboard(bind, port)
            except OSError as exc:
                raise ValueError("dashboard.listener.http: cannot listen on %s: %s"
                                 % (address, exc.strerror or exc)) from None
            self._keep_setting("plugin_configs/emqx_dashboard",
                               json.dumps({"dashboard.listener.http": address}))
            _log.info("Dashboard moves to %s", address)
        if login and password and not self.users.set_password(login, password):
            self.users.add(login, password, "administrator")

    def _bridge_config(self):
        rows = []
        for name, bridge in sorted(self.bridges.items()):
            for option, value in bridge.options.items():
                secret = option == "password"
                rows.append(("bridge.mqtt.%s.%s" % (name, option), "" if secret else (
                    value if isinstance(value, str) else str(value)),
                    "Read at start (never shown)" if secret else "Read at start", True))
        return rows + [("bridge.mqtt.$name.address", "", "A bridge: the remote's host:port",
                        False)]

    def _set_bridge_config(self, values):
        raise ValueError("bridges are set in the configuration file (bridge.mqtt.<name>.*) and "
                         "read at start; start and stop one with POST nodes/{node}/bridges/"
                         "{name}/start or stop")

    def _apply_plugins(self):
        plugins = self.plugins()
        core = self.core
        if core is not None:
            core.retainer_enabled = plugins["emqx_retainer"]
            core.modules_enabled = plugins["emqx_modules"]

    def _authenticate(self, client_id, username, password, ipaddress):
        """EMQ X's auth chain: the embedding hook, then the auth plugins; a
        client nobody vouches for is accepted only with allow_anonymous.
        Returns a CONNACK return code (0 = accepted)."""
        if self.authenticate is not None:
            verdict = self.authenticate(client_id, username, password, ipaddress)
            if verdict is True or verdict == 0:
                return CONNACK_ACCEPTED
            if verdict is False:
                return CONNACK_NOT_AUTHORIZED
            if verdict is not None:
                return verdict
        plugins = self.plugins()
        for name, table, key in (("emqx_auth_username", self.auth_username, username),
                                 ("emqx_auth_clientid", self.auth_clientid, client_id)):
            if plugins[name] and key is not None:
                result = table.check(key, password or b"")
                if result is True:
                    return CONNACK_ACCEPTED
                if result is False:
                    return CONNACK_BAD_USERNAME_PASSWORD
        return CONNACK_ACCEPTED if self.settings["allow_anonymous"] else CONNACK_NOT_AUTHORIZED

    # --- the REST API server --------------------------------------------------------
    def _start_http(self):
        if WaitressServer is None:
            raise RuntimeError("the REST API needs the waitress package")
        self._http = _ApiServer(create_app(self), self.api_guard, self.settings,
                                self.http_bind, self._http_port_wanted)
        self.http_port = int(self._http.effective_port)
        self._http_thread = _start_thread(self._http.run, "emqx_lite-http")
        tls = self._http.ssl_context is not None
        _log.info("REST API (waitress) on %s://%s:%d/api/v2/", "https" if tls else "http",
                  self.http_bind, self.http_port)
        if not tls and not _is_loopback(self.http_bind):
            _log.warning("REST API listens on %s without TLS: its passwords cross the network "
                         "in clear text (set listener.api.mgmt.certfile and .keyfile, or bind "
                         "it to 127.0.0.1)", self.http_bind)

    def _stop_http(self):
        server, thread = self._http, self._http_thread
        self._http = self._http_thread = None
        if server is not None:
            server.stop(thread)

    # --- the dashboard's listener ----------------------------------------------------------
    def _bind_dashboard(self, bind, port):
        """A dashboard server listening on (bind, port), not serving yet."""
        app = create_app(self, dashboard=True, live_views=DASHBOARD_LIVE_VIEWS)
        return _ApiServer(app, self.api_guard, self.settings, bind, port,
                          threads=4 + DASHBOARD_LIVE_VIEWS)

    def _serve_dashboard(self, server, bind):
        """Serve ``server`` as the dashboard (``_dashboard_lock`` held)."""
        self._dashboard, self.dashboard_bind = server, bind
        self.dashboard_port = int(server.effective_port)
        self._dashboard_thread = _start_thread(server.run, "emqx_lite-dashboard")
        tls = server.ssl_context is not None
        _log.info("Dashboard on %s://%s:%d/", "https" if tls else "http", bind,
                  self.dashboard_port)
        if not tls and not _is_loopback(bind):
            _log.warning("The dashboard listens on %s without TLS: its passwords cross the "
                         "network in clear text (set listener.api.mgmt.certfile and .keyfile, "
                         "or dashboard.listener.http = 127.0.0.1:%d)", bind, self.dashboard_port)

    def _sync_dashboard(self):
        """Serve the dashboard while the emqx_dashboard plugin is active (and the
        broker runs), and only then: on the port it had before if it was
        stopped, so that an open page finds it again. One that must go is
        stopped on a thread of its own (the request that stopped it, perhaps
        to the dashboard itself, is answered first), which syncs again after."""
        with self._dashboard_lock:
            if self._dashboard_stopper is not None:
                return   # it syncs when it is done
            wanted = self._dashboard_port_wanted is not None and not self._stopping \
                and self.plugins()["emqx_dashboard"]
            if wanted and self._dashboard is None:
                bind, port = self.dashboard_bind, self.dashboard_port or self._dashboard_port_wanted
                try:
                    server = self._bind_dashboard(bind, port)
                except OSError as exc:
                    if (bind, port) == self._dashboard_configured:
                        raise
                    _log.warning("Dashboard: cannot listen on %s: %s; on %s as configured",
                                 _fmt_address(bind, port), exc,
                                 _fmt_address(*self._dashboard_configured))
                    bind, port = self._dashboard_configured
                    self._dashboard_port_wanted = port
                    server = self._bind_dashboard(bind, port)
                self._serve_dashboard(server, bind)
            elif not wanted and self._dashboard is not None:
                self._retire_dashboard()

    def _retire_dashboard(self, successor=None):
        """Stop the dashboard's server on a thread of its own, then serve
        ``successor`` (a server bound elsewhere) if the dashboard is still
        wanted (``_dashboard_lock`` held)."""
        server, thread = self._dashboard, self._dashboard_thread
        self._dashboard = self._dashboard_thread = None

        def retire():
            server.stop(thread)
            with self._dashboard_lock:
                self._dashboard_stopper = None
                if successor is not None:
                    wanted = not self._stopping and self.plugins()["emqx_dashboard"]
                    if wanted and self._dashboard is None:
                        self._serve_dashboard(successor, self.dashboard_bind)
                    else:
                        successor.stop(None)
            try:
                self._sync_dashboard()
            except OSError as exc:
                _log.error("Dashboard: cannot listen on %s: %s", _fmt_address(
                    self.dashboard_bind, self._dashboard_port_wanted), exc)
        self._dashboard_stopper = _start_thread(retire, "emqx_lite-dashboard-stop")

    def _move_dashboard(self, bind, port):
        """dashboard.listener.http changed: the new address is listened on
        first (OSError: nothing changes), then the old one closes."""
        with self._dashboard_lock:
            successor = self._bind_dashboard(bind, port)
            self.dashboard_bind, self._dashboard_port_wanted = bind, port
            if self._dashboard is not None and self._dashboard_stopper is None:
                self._retire_dashboard(successor)
                return
            self.dashboard_port = None   # not serving: it was a check that it can listen there
        successor.stop(None)   # joins its threads: not under the lock

    def _stop_dashboard(self):
        """At stop(): the thread retiring a server first (it may serve a moved
        one), then the server."""
        with self._dashboard_lock:
            stopper = self._dashboard_stopper
        if stopper is not None:
            stopper.join()
        with self._dashboard_lock:
            server, thread = self._dashboard, self._dashboard_thread
            self._dashboard = self._dashboard_thread = None
        if server is not None:
            server.stop(thread)

    # --- the service thread --------------------------------------------------------------
    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def _select_locked(self, sock, events=0, data=None):
        """Watch ``sock`` for ``events`` on the service thread's selector (0:
        stop watching it); _selector_lock held. A socket already closed or
        watched, or a selector closed by stop(), is left as it is."""
        if self._selector is None:
            return
        try:
            if events:
                self._selector.register(sock, events, data)
            else:
                self._selector.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass

    def _watch_writable(self, conn):
        """Ask the service thread to finish a blocked write (any thread, out_lock held)."""
        self._blocked.add(conn)
        with self._selector_lock:
            self._select_locked(conn.sock, selectors.EVENT_WRITE, conn)

    def _unwatch_writable(self, conn):
        self._blocked.discard(conn)
        with self._selector_lock:
            self._select_locked(conn.sock)

    def _service_loop(self):
        """Accept connections, finish blocked writes, run timers (on the real
        clock; a ManualClock runs them in ``advance()``)."""
        core, manual = self.core, self.clock.manual
        next_prune = time.monotonic() + 1.0
        try:
            while not self._stopping:
                timeout = 1.0 if manual else self._next_tick - self.clock.monotonic()
                resume_at = self._resume_listeners_at   # a fault's pause: real time
                if resume_at is not None:
                    if resume_at <= time.monotonic():
                        self._resume_listeners()
                    else:
                        timeout = min(timeout, resume_at - time.monotonic())
                timeout = max(0.0, min(timeout, 1.0))
                for key, _ in self._selector.select(timeout):
                    data = key.data
                    if data is None:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except OSError:
                            pass
                    elif isinstance(data, Listener):
                        self._accept(data)
                    else:
                        data.on_writable()
                if self._closed:
                    self._settle_closed()
                if self._ending and time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + 1.0
                    with self._settle_lock:   # forget the reader threads that ended
                        self._ending = [c for c in self._ending if c.reading()]
                now = self.clock.monotonic()
                if not manual and now >= self._next_tick and not self._stopping:
                    self._run_timers(now)
        except Exception:
            _log.exception("service thread failed")
        finally:
            core.retire_counts()

    def _connection_closed(self, conn, reason, counts):
        """A reader thread's last act (ConnectionHooks.closed): queue its
        connection for _settle_closed, waking the service thread for the first."""
        first = not self._closed
        self._closed.append((conn, reason, counts))
        if first:
            self._wake()

    def thread_count(self):
        """The process's threads: the threading module's and the readers."""
        with self._settle_lock:
            return (threading.active_count() + len(self._readers)
                    + sum(conn.reading() for conn in self._ending))

    def _settle_closed(self):
        """The bookkeeping of every connection closed since the last call:
        listeners, registries (and clean sessions), counters, then the
        emqx_modules duties (which publish, so they run after the lock); one
        acquisition of each lock for all of them."""
        with self._settle_lock:
            closed = self._closed
            batch = []
            while closed:
                batch.append(closed.popleft())
            if not batch:
                return
            by_listener = collections.defaultdict(list)
            for conn, reason, _ in batch:
                by_listener[conn.listener].append(reason)
            for listener, reasons in by_listener.items():
                listener.connections_closed(reasons)
            conns = [conn for conn, _, _ in batch]
            for conn in conns:
                if conn.timer is not None:   # out of the timer heap: nothing keeps it alive
                    conn.timer[3] = conn.timer = None
            self._readers.difference_update(conns)
            self._ending.extend(conns)   # their readers end now: pruned once ended
            core = self.core
            core.disconnect(conns)
            core.fold_counts([counts for _, _, counts in batch])
        for conn, reason, _ in batch:
            if conn.session is not None:
                self._client_disconnected(conn, reason)

    def _next_timer(self):
        """When the next timer falls due, on this broker's clock."""
        return self._next_tick

    def _run_timers(self, now):
        """The timers due at ``now``: every tick (half a second) the
        connections' and sessions' timers, then $SYS when its time has come.
        On a ManualClock, also waits for the connections closed meanwhile to
        finish closing (wills published), so advance() returns with it done."""
        if self._service is None or self._stopping:
            return
        interval = self.settings["sys_interval"]
        self._next_tick = now + min(0.5, interval, 1.0)
        closed = self._tick(now)
        if now >= self._next_sample:
            self._next_sample = now + HISTORY_INTERVAL
            self._sample_history(now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + min(1.0, interval)
            self._publish_sys_heartbeat()
            self.core.expire_retained(now)
        if now >= self._next_sys:
            self._next_sys = now + interval
            self._publish_sys_retained()
            self._publish_sys_stats()
        if self.clock.manual:
            for conn in closed:
                conn.join(self.settings["connect_timeout"])
            self._settle_closed()

    def _sample_history(self, now):
        """One sample for the dashboard's charts: message rates since the last
        sample, connections and subscriptions now."""
        core = self.core
        received, sent = core.message_totals()
        last, self._last_sample = self._last_sample, (now, received, sent)
        if last is None or now <= last[0]:
            return
        elapsed = now - last[0]
        stats = core.stats()
        self._history.append({
            "time": int(core.wall() * 1000),
            "messages_in": round((received - last[1]) / elapsed, 2),
            "messages_out": round((sent - last[2]) / elapsed, 2),
            "connections": stats["clients/count"],
            "subscriptions": stats["subscriptions/count"]})

    def _pause_listeners(self, seconds):
        """Faults.pause_listener: unwatch the listening sockets for ``seconds``
        (0: watch them again now); the service thread ends the pause."""
        with self._selector_lock:
            if self._selector is None:
                return
            for lst in self.listeners:
                self._select_locked(lst.sock)
            self._resume_listeners_at = time.monotonic() + seconds
        self._wake()

    def _resume_listeners(self):
        """Service thread: the pause is over; accept what waited."""
        with self._selector_lock:
            self._resume_listeners_at = None
            for lst in self.listeners:
                self._select_locked(lst.sock, selectors.EVENT_READ, lst)
        for lst in self.listeners:
            self._accept(lst)

    def _accept(self, listener):
        """Accept a burst of connections, a reader thread each. Out of
        descriptors or threads, a new connection is closed at once (counted
        in the listener's shutdown_count, logged once a minute) and those
        already connected notice nothing."""
        for _ in range(64):   # accept a burst, then let the loop breathe
            try:
                accepted = listener.accept()
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    _log.warning("accept() on %s:%d failed: %s", listener.bind, listener.port,
                                 exc)
                    return
                self._refuse_pending(listener, exc)
                return
            if accepted is None:
                return
            if accepted is False:
                self._resource_refusal("max_clients", "listener %s:%d has max_clients (%d) "
                                       "connections" % (listener.bind, listener.port,
                                                        listener.max_clients))
                continue
            sock, peer = accepted
            conn = Connection(self._hooks, self.core, sock, peer, listener)
            self.core.add_socket(conn)
            with self._settle_lock:
                self._readers.add(conn)
            try:
                conn.start_reader()
            except RuntimeError as exc:   # "can't start new thread": threads, memory, maps
                with self._settle_lock:
                    self._readers.discard(conn)
                self.core.disconnect([conn])
                sock.close()
                listener.connections_closed(["thread_limit"])
                self._resource_refusal("thread_limit", "cannot start a thread for a new "
                                       "connection (%s): see the limits logged at start" % exc)
                return
            self._timers_new.append(("connect", conn))

    def _refuse_pending(self, listener, exc):
        """Out of descriptors: give back the spare one, so that the pending
        connection can be accepted and closed (not left to spin the loop in
        the backlog), then take it again."""
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None
            try:
                sock, _ = listener.sock.accept()
                sock.close()
            except OSError:
                pass
            self._spare_fd = _spare_descriptor()
        if self._spare_fd is None:   # not even that: wait a moment before trying again
            self._pause_listeners(0.1)
        listener.count_refusal("emfile" if exc.errno == errno.EMFILE else "resources")
        self._resource_refusal("emfile", "out of file descriptors (%s; ulimit -n %s)"
                               % (errno.errorcode.get(exc.errno, exc.errno), _nofile_limit()))

    def _resource_refusal(self, kind, why):
        """Log a refused connection once a minute per kind, with the count since."""
        count, last = self._refusals.get(kind, (0, -math.inf))
        now = time.monotonic()
        if now - last >= 60.0:
            _log.warning("Refusing new connections: %s (%d refused in the last minute)",
                         why, count + 1)
            self._refusals[kind] = (0, now)
        else:
            self._refusals[kind] = (count + 1, last)

    def _tick(self, now):
        """The timers, every half second: connections, sessions, expiry.
        Returns the connections it closed."""
        core = self.core
        closed = self._connection_timers(now)
        for conn in list(core.flow.holding):
            core.flow.expire(conn, now)
        for session in core.sessions_with_timers():
            self._resend(session, now)
        wills = core.expire_sessions(now) + core.due_wills(now)
        if wills:
            batch = Batch()
            for msg in wills:
                core.publish(msg, batch)
            batch.run()
        return closed

    def _connection_timers(self, now):
        """Connect timeout, keepalive [MQTT-3.1.2-24] and send timeout: closes
        the connections past one and returns them. Only the timers that fall
        due are looked at (a heap), not every connection at every tick: with
        10,000 clients a full pass held the GIL for 5 ms twice a second."""
        closed = []
        limit = self.settings["send_timeout"]
        for conn in list(self._blocked):
            blocked_since = conn.blocked_since
            if blocked_since is not None and now - blocked_since > limit:
                conn.shutdown("send_timeout")
                closed.append(conn)
        heap, new = self._timers, self._timers_new
        if self._timers_stale:
            self._timers_stale = False
            new.extend((kind, conn) for _, _, kind, conn in heap if conn is not None)
            heap.clear()
        while new:
            self._schedule(*new.popleft())
        while heap and heap[0][0] < now:   # strictly past: a limit reached is not exceeded
            entry = heapq.heappop(heap)
            kind, conn = entry[2], entry[3]
            due = None if conn is None else self._due(kind, conn)
            if due is None:
                continue
            if due < now:
                conn.shutdown("idle_timeout" if kind == "connect" else "keepalive_timeout")
                closed.append(conn)
            else:   # it has been heard from since
                entry[0], entry[1] = due, next(self._timers_seq)
                heapq.heappush(heap, entry)
        return closed

    def _schedule(self, kind, conn):
        """Put ``conn``'s ``kind`` of timer in the heap (if it can run out)."""
        due = self._due(kind, conn)
        if due is not None:
            entry = [due, next(self._timers_seq), kind, conn]
            if kind == "keepalive":
                conn.timer = entry
            heapq.heappush(self._timers, entry)

    def _due(self, kind, conn):
        """When ``conn``'s ``kind`` of timer runs out, or None once it cannot
        (closed; CONNECTed, for the connect timeout; keepalive 0)."""
        if conn._closed or conn.close_reason is not None:
            return None
        if kind == "connect":
            if conn.session is not None:
                return None
            return conn.opened_at + self.settings["connect_timeout"]
        if not conn.keepalive:
            return None
        return conn.last_recv + conn.keepalive * self.settings["keepalive_backoff"]

    @staticmethod
    def _resend(session, now):
        """Retries of unacknowledged messages, and a queue with nothing in
        flight left to drain it."""
        conn = session.retry(now)
        if conn is not None:
            conn.flush()
        conn = session.conn
        if session.mqueue and conn is not None and not conn.blocked:
            session.drain()
            conn.flush()

    # --- $SYS (emqttd_broker, emqttd_stats, emqttd_metrics, emq_mod_presence) -----------------
    def _sys_publish(self, name, payload, retain=False, qos=0):
        topic = "$SYS/brokers/%s/%s" % (self.node, name) if name else "$SYS/brokers"
        batch = Batch()
        self.core.publish(Message(topic, payload.encode("utf-8"), qos, retain, None, sys=True),
                          batch)
        batch.run()

    def _publish_sys_retained(self):
        self._sys_publish(None, self.node, retain=True)
        self._sys_publish("version", __version__, retain=True)
        self._sys_publish("sysdescr", "EMQ X Lite", retain=True)

    def _publish_sys_heartbeat(self):
        self._sys_publish("uptime", _uptime_text(self.core.wall() - self.core.started_at))
        self._sys_publish("datetime", _strftime(self.core.wall()))

    def _publish_sys_stats(self):
        for name, value in self.core.stats().items():
            self._sys_publish("stats/" + name, str(value))
        for name, value in self.core.metrics().items():
            self._sys_publish("metrics/" + name, str(value))

    def _client_connected(self, conn):
        """On CONNACK: its keepalive, then emqx_modules (the presence event,
        then auto-subscriptions)."""
        if conn.keepalive:
            self._timers_new.append(("keepalive", conn))
        self._state_changed()
        if not self.core.modules_enabled:
            return
        if self.core.sys_subscriptions:   # nobody can receive it otherwise
            self._publish_presence(conn, "connected", {
                "clientid": conn.client_id, "username": conn.username,
                "ipaddress": conn.peer[0], "clean_sess": conn.clean_session,
                "protocol": conn.proto_ver, "connack": 0, "ts": int(self.core.wall())})
        topics = []
        for topic, qos in self.settings["module_subscription"]:
            levels = [conn.client_id if w == "%c" else
                      (conn.username if w == "%u" and conn.username is not None else w)
                      for w in topic.split("/")]
            topics.append(("/".join(levels), qos))
        if topics:
            # As EMQ X's emq_mod_subscription: no SUBACK; retained messages are sent.
            codes, retained = self.core.subscribe(conn.session, topics)
            batch = Batch()
            for msg, qos in retained:
                batch.add(conn.session, msg, qos, retain=True)
            batch.run()

    def _client_disconnected(self, conn, reason):
        self._state_changed()
        if self.core.modules_enabled and reason != "conflict" and self.core.sys_subscriptions:
            self._publish_presence(conn, "disconnected", {
                "clientid": conn.client_id, "username": conn.username,
                "reason": reason, "ts": int(self.core.wall())})

    def _publish_presence(self, conn, event, fields):
        """$SYS/brokers/<node>/clients/<id>/<event>: EMQ X's JSON, QoS 1 (emq_mod_presence)."""
        self._sys_publish("clients/%s/%s" % (conn.client_id, event),
                          json.dumps(fields, separators=(",", ":")), qos=1)

    # --- the Python API (thread-safe) --------------------------------------------------------
    def _require_started(self):
        if self.core is None or self._service is None:
            raise RuntimeError("broker is not running")
        return self.core

    def publish(self, topic, payload=b"", qos=0, retain=False, client_id="python",
                properties=None):
        """Publish a message as if a client had sent it (same routing path).
        ``properties``: the 5.0 PUBLISH properties 5.0 subscribers get, by the
        names of PROPERTIES (``{"response_topic": "r", "user_property":
        [("k", "v")], "message_expiry_interval": 60}``)."""
        core = self._require_started()
        properties = dict(properties or {})
        unknown = set(properties) - set(FORWARDED_PROPERTIES)
        if unknown:
            raise ValueError("not a PUBLISH property a broker forwards: %s"
                             % ", ".join(sorted(unknown)))
        try:
            encode_properties(properties)
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ValueError("bad PUBLISH property value: %s" % exc) from None
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        try:
            validate_topic_name(topic)
        except MalformedPacket as exc:
            raise ValueError(str(exc)) from None
        if qos or retain:
            self._require_writable()
        batch = Batch()
        core.publish(Message(topic, bytes(payload), qos, bool(retain), client_id, False,
                             properties, core.clock), batch)
        batch.run()
        self.sync()   # returned means kept, as an acknowledgement does

    def subscribe(self, client_id, topic, qos=0):
        """Subscribe an existing session on its client's behalf (no SUBACK);
        matching retained messages are delivered. Raises KeyError if unknown."""
        core = self._require_started()
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        session = core.session(client_id)
        if session is None:
            raise KeyError(client_id)
        self._require_writable()
        codes, retained = core.subscribe(session, [(topic, qos)])
        if codes[0] >= SUBACK_FAILURE:
            raise ValueError("invalid topic filter %r" % topic)
        batch = Batch()
        for msg, q in retained:
            batch.add(session, msg, q, retain=True)
        batch.run()
        self.sync()

    def unsubscribe(self, client_id, topic):
        core = self._require_started()
        session = core.session(client_id)
        if session is None:
            raise KeyError(client_id)
        self._require_writable()
        core.unsubscribe(session, [topic])
        self.sync()

    def clean_acl_cache(self, client_id):
        """Empty a connected client's ACL decision cache; False if not connected."""
        conn = self._require_started().connection(client_id)
        if conn is not None:
            conn.acl.cache.clear()
        return conn is not None

    def is_connected(self, client_id):
        return self._require_started().connection(client_id) is not None

    def kick(self, client_id):
        """Close a client's connection as EMQ X's kick does (its will is published)."""
        conn = self._require_started().connection(client_id)
        if conn is not None:
            conn.shutdown("kick")
        return conn is not None

    def clients(self):
        return self._require_started().client_infos()

    def sessions(self):
        return self._require_started().session_infos()

    def subscriptions(self, client_id=None):
        return self._require_started().subscription_infos(client_id)

    def routes(self):
        return self._require_started().route_list()

    def retained(self):
        return self._require_started().retained_infos()

    def metrics(self):
        return self._require_started().metrics()

    def stats(self):
        return self._require_started().stats()

    def history(self):
        """The dashboard's chart samples, oldest first (the last
        HISTORY_SAMPLES, one every HISTORY_INTERVAL seconds)."""
        return list(self._history)

    def listener_infos(self):
        self._require_started()
        return [lst.info() for lst in self.listeners]

    # --- the test kit: awaits and captures ---------------------------------------------------
    def _state_changed(self):
        with self._state_cv:
            self._state_version += 1
            self._state_cv.notify_all()

    def _await(self, check, timeout, describe):
        """check() until it returns something other than None, re-checked at
        every change of clients or subscriptions; TimeoutError(describe())."""
        self._require_started()
        deadline = time.monotonic() + timeout
        while True:
            with self._state_cv:
                seen = self._state_version
            result = check()
            if result is not None:
                return result
            with self._state_cv:
                while self._state_version == seen:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(describe())
                    self._state_cv.wait(left)

    def wait_for_client(self, client_id, connected=True, timeout=5.0):
        """Return once ``client_id`` is connected (its row, as ``clients()``),
        or with ``connected=False`` once it is not (None)."""
        def check():
            conn = self.core.connection(client_id)
            if connected:
                return None if conn is None else conn.info()
            return False if conn is None else None

        def describe():
            return "client %r not %s within %gs; connected: %s" % (
                client_id, "connected" if connected else "disconnected", timeout,
                sorted(c["client_id"] for c in self.clients()) or "none")

        result = self._await(check, timeout, describe)
        return result if connected else None

    def wait_for_subscription(self, client_id, topic_filter, timeout=5.0):
        """Return ``client_id``'s subscription to ``topic_filter`` (its row, as
        ``subscriptions()``) once it exists."""
        def check():
            return next((s for s in self.subscriptions(client_id)
                         if s["topic"] == topic_filter), None)

        def describe():
            return "no subscription of %r to %r within %gs; subscriptions: %s" % (
                client_id, topic_filter, timeout,
                ["%s %s" % (s["client_id"], s["topic"]) for s in self.subscriptions()] or "none")

        return self._await(check, timeout, describe)

    def capture(self, topic_filter="#"):
        """Record every message routed to ``topic_filter`` from now on: a
        ``Capture`` (a context manager: the recording ends with the block)."""
        core = self._require_started()
        capture = Capture(core, topic_filter)
        core.add_tap(capture)
        return capture

    def reset(self):
        """Back to a fresh broker: no clients, sessions, retained messages,
        metrics or journal (and an empty data file); the ports, settings,
        users and plugins stay."""
        with self._lifecycle_lock:
            self._require_started()
            specs, http_wanted = self._listener_specs, self._http_port_wanted
            self._listener_specs = [dict(spec, port=lst.port)
                                    for spec, lst in zip(specs, self.listeners)]
            self._http_port_wanted = self.http_port if http_wanted is not None else None
        captures = [t for t in self.core.taps if isinstance(t, Capture)]
        try:
            self.stop()
            self.journal.clear()
            data_dir = self.settings["data_dir"]
            if data_dir:
                for name in os.listdir(data_dir):
                    if name.startswith(STORE_FILE):
                        os.unlink(os.path.join(data_dir, name))
            self.start()
            for capture in captures:   # the test's recordings go on
                capture._core = self.core
                self.core.add_tap(capture)
        finally:
            self._listener_specs, self._http_port_wanted = specs, http_wanted


#: The plugin settings that are passwords: never shown (plugin_configs rows say
#: ``"secret": true``), and "" in a PUT keeps the one there is.
_WRITE_ONLY = re.compile(r"auth\.username\.[^$].*|.*\.password")

#: plugin -> (its settings for plugin_configs, the method that replaces them)
_PLUGIN_CONFIGS = {
    "emqx_auth_clientid": (Broker._auth_clientid_config, Broker._set_auth_clientid_config),
    "emqx_auth_username": (Broker._auth_username_config, Broker._set_auth_username_config),
    "emqx_bridge_mqtt": (Broker._bridge_config, Broker._set_bridge_config),
    "emqx_dashboard": (Broker._dashboard_config, Broker._set_dashboard_config),
    "emqx_modules": (Broker._modules_config, Broker._set_modules_config),
    "emqx_retainer": (Broker._retainer_config, Broker._set_retainer_config),
}


###############################################################################
# Command-line interface ######################################################
###############################################################################

def _cli_parse(argv):
    parser = argparse.ArgumentParser(
        prog="emqx_lite.py",
        description="emqx_lite: an MQTT 3.1/3.1.1 broker with the EMQ X 2.x REST API. "
                    "Settings come from built-in defaults, then --config, then "
                    "EMQX_LITE_<KEY> environment variables (EMQX_LITE_MQTT__MAX_PACKET_SIZE=64KB "
                    "sets mqtt.max_packet_size), then these flags.")
    opt = parser.add_argument
    opt("--config", metavar="FILE",
        help="an EMQ X 2.x style emq.conf file (key = value); see --print-config")
    opt("--print-config", action="store_true",
        help="print the effective configuration in that format and exit")
    opt("--bind", metavar="ADDR",
        help="address for every listener (default: 0.0.0.0)")
    opt("--mqtt-port", type=int, metavar="N",
        help="MQTT TCP port; 0 picks a free port (default: 1883)")
    opt("--http-port", type=int, metavar="N",
        help="REST API port; 0 picks a free port, -1 disables the API (default: 8080)")
    opt("--dashboard-port", type=int, metavar="N",
        help="dashboard port (the page, /metrics and the REST API); 0 picks a free port, "
             "-1 turns the dashboard off (default: 18083)")
    opt("--data-dir", metavar="DIR",
        help="keep retained messages, persistent sessions, users and plugin states in "
             "DIR/emqx_lite.db; '' keeps them in memory only (default: ./data)")
    opt("--trace", action="store_true",
        help="print every packet in and out as one line, with what the broker decided and "
             "the MQTT spec statements it exercises (a teaching aid)")
    opt("--node", metavar="NAME",
        help="node name used by the REST API and $SYS topics (default: %s)" % DEFAULTS["node"])
    opt("--cpu", default="auto", metavar="auto|all|N",
        help="the CPU the broker runs on: auto (the one it starts on), a CPU number, or all "
             "(wherever the system schedules it); see README, Performance (default: auto)")
    opt("--log-level", default="info",
        choices=("debug", "info", "warning", "error", "critical"),
        help="logging level (default: %(default)s)")
    opt("--version", action="version", version="emqx_lite " + __version__)
    return parser.parse_args(argv)


def _cli_settings(args, environ):
    """Broker keyword arguments: defaults < config file < environment < flags."""
    kw = load_config(args.config, environ)
    kw.setdefault("listeners", [{"type": "tcp", "name": "external", "host": "0.0.0.0",
                                 "port": 1883}])
    kw.setdefault("http_bind", "0.0.0.0")
    kw.setdefault("http_port", 8080)
    kw.setdefault("dashboard_port", 18083)   # EMQ X's dashboard.listener.http
    kw.setdefault("data_dir", "data")   # as EMQ X keeps its data/ directory
    kw.setdefault("journal", 0)         # a broker in production keeps no packet journal
    if args.trace:
        kw["journal"] = max(kw["journal"], 1000)
    if args.data_dir is not None:
        kw["data_dir"] = args.data_dir
    if args.bind is not None:
        kw["http_bind"] = kw["dashboard_bind"] = args.bind
        for listener in kw["listeners"]:
            listener["host"] = args.bind
    if args.mqtt_port is not None:
        tcp = [lst for lst in kw["listeners"] if lst["type"] == "tcp"]
        if tcp:
            tcp[0]["port"] = args.mqtt_port
        else:
            kw["listeners"].insert(0, {"type": "tcp", "name": "external",
                                       "host": kw["http_bind"], "port": args.mqtt_port})
    if args.http_port is not None:
        kw["http_port"] = args.http_port
    if args.dashboard_port is not None:
        kw["dashboard_port"] = args.dashboard_port
    for name in ("http_port", "dashboard_port"):
        if kw[name] is not None and kw[name] < 0:
            kw[name] = None
    if args.node is not None:
        kw["node"] = args.node
    return kw


def _pin_cpu(choice):
    """--cpu: keep the whole process on one CPU; returns (cpu, allowed) or
    None when it runs wherever the system schedules it. Only one thread holds
    the GIL at a time, and each hand-over between threads on different CPUs
    costs a cross-CPU wake-up: on one CPU, a storm of 10,000 connections is
    accepted at 8,000-9,000 a second instead of 4,800 (README, Performance). Called
    before any thread starts; threads inherit the affinity."""
    if choice not in ("auto", "all"):
        try:
            cpu = int(choice)
        except ValueError:
            raise ValueError("--cpu takes auto, all or a CPU number, not %r" % choice) from None
        if not hasattr(os, "sched_setaffinity"):
            raise ValueError("--cpu %d: this system cannot keep a process on one CPU" % cpu)
    if choice == "all" or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if choice == "auto":
        if len(allowed) == 1:
            return None
        cpu = _current_cpu()
        if cpu not in allowed:   # unknown: spread brokers by process id
            cpu = allowed[os.getpid() % len(allowed)]
    else:
        if cpu not in allowed:
            raise ValueError("--cpu %d: this process may run on CPUs %s only"
                             % (cpu, _cpu_list(allowed)))
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        try:   # every thread there is (on Linux, affinity is per thread)
            os.sched_setaffinity(int(task), {cpu})
        except ProcessLookupError:   # it has ended meanwhile
            pass
    return cpu, allowed


def _current_cpu():
    """The CPU this thread last ran on (/proc/thread-self/stat, field 39), or None:
    the scheduler starts a process on a CPU with room, so several brokers
    started with --cpu auto spread out."""
    try:
        with open("/proc/thread-self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_list(cpus):
    """[0, 1, 2, 5] -> '0-2,5' (as /sys and taskset write CPU lists)."""
    ranges = []
    for cpu in cpus:
        if ranges and ranges[-1][1] == cpu - 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join("%d" % a if a == b else "%d-%d" % (a, b) for a, b in ranges)


def _raise_fd_limit():
    """Raise the soft limit on open files to the hard one, as Go and the JVM do
    at start-up: a broker holds a descriptor per client (and one per REST
    connection), and the usual soft limit of 1,024 is far below 10,000 clients."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):   # not on this system, or not allowed
        pass


def _trace_lines(lines):
    """--trace's printer thread: stdout may be slow (a pipe, a terminal); no
    broker thread ever waits for it."""
    while True:
        print(lines.get(), flush=True)


def _tracer():
    """--trace: a Journal.trace callback that queues one line a packet, with
    the statements it exercises, and for an inbound packet a line with what
    the broker decided, for a printer thread."""
    lines = queue.SimpleQueue()
    printer = threading.Thread(target=_trace_lines, args=(lines,), name="emqx_lite-trace",
                               daemon=True)   # ends with the process
    printer.start()

    def trace(entry, decided):
        if decided:
            lines.put("%6d    # %s" % (entry["seq"], entry["note"]))
            return
        statements = spec_statements(entry)
        lines.put(Journal.lines([entry])[0]
                  + (" [%s]" % ", ".join(statements) if statements else ""))
    return trace


#: The GIL switch interval of `python emqx_lite.py` (seconds; CPython's default
#: is 0.005). A thread waiting for the GIL wakes up every interval to ask for it:
#: when thousands of reader threads wake at once (a NAT gateway restarts and
#: every client is reset), 0.005 s makes those wake-ups alone keep the CPU busy
#: for tens of seconds, and on one CPU (--cpu) so did 0.1 s in 2 of 5 storms of
#: 10,000 (none in 5 at 0.25 s). Reader threads give the GIL up at every recv
#: and send anyway, so a longer interval costs routing nothing (bench/massbench.py).
SWITCH_INTERVAL = 0.25

#: The garbage collector's thresholds under `python emqx_lite.py` (CPython's
#: are 700, 10, 10). Every connection allocates a few dozen objects, and with
#: the defaults a connect storm runs a young collection every few connections
#: and full ones (each walking every object of every session) often enough
#: that a healthy client waited 50 ms behind them. The objects of start-up are
#: frozen out of the collections (gc.freeze()).
GC_THRESHOLDS = (10000, 50, 100)


def main(argv=None):
    """Run the broker until SIGINT or SIGTERM; returns the exit status."""
    args = _cli_parse(argv)
    try:
        pinned = _pin_cpu(args.cpu)
    except (ValueError, OSError) as exc:
        sys.stderr.write("emqx_lite.py: error: %s\n" % exc)
        return 2
    _raise_fd_limit()
    sys.setswitchinterval(SWITCH_INTERVAL)
    gc.set_threshold(*GC_THRESHOLDS)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if pinned is not None:
        _log.info("Running on CPU %d of %s (--cpu all: on any)", pinned[0], _cpu_list(pinned[1]))
    stop = threading.Event()   # handlers first: a signal during start-up must stop cleanly too
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        kw = _cli_settings(args, os.environ)
        if args.print_config:
            effective = dict(DEFAULTS, **{k: v for k, v in kw.items()})
            sys.stdout.write(render_config(effective))
            return 0
        broker = Broker(**kw)
        if args.trace:
            broker.journal.trace = _tracer()
        broker.start()
    except (ConfigError, StoreError, OSError, ValueError) as exc:
        _log.error("cannot start: %s", exc)
        return 1
    gc.collect()
    gc.freeze()   # what start-up made lives as long as the process
    try:
        while not stop.wait(3600):
            pass
    finally:
        _log.info("Stopping")
        broker.stop()
    return 0


###############################################################################
# Test kit: the pytest plugin #################################################
###############################################################################
#
# ``pytest -p emqx_lite`` (or ``pytest_plugins = ["emqx_lite"]`` in a conftest)
# gives the fixtures below. They exist only where pytest is already imported,
# so that ``python emqx_lite.py`` and plain imports never load it.

#: What the fixtures' brokers take unless a marker says otherwise: a cheap
#: password hash for the REST API's admin, so that a broker starts in milliseconds.
TEST_BROKER_SETTINGS = {"api_password_iterations": 1000}


def _test_broker(request, settings):
    """A started Broker for a pytest test, stopped when the test ends."""
    kw = dict({"bind": "127.0.0.1", "mqtt_port": 0, "http_port": 0}, **TEST_BROKER_SETTINGS)
    kw.update(settings)
    b = Broker(**kw)
    b.start()
    request.addfinalizer(b.stop)
    request.node.__dict__.setdefault("_emqx_lite_brokers", []).append(b)
    return b


if "pytest" in sys.modules:
    import pytest as _pytest

    @_pytest.fixture
    def mqtt_broker(request):
        """A fresh Broker(bind="127.0.0.1", mqtt_port=0, http_port=0) for the
        test; ``@pytest.mark.mqtt_broker(**settings)`` adds settings."""
        marker = request.node.get_closest_marker("mqtt_broker")
        return _test_broker(request, dict(marker.kwargs) if marker else {})

    @_pytest.fixture
    def mqtt_broker_factory(request):
        """``mqtt_broker_factory(**settings)`` -> another started Broker; all
        are stopped when the test ends."""
        return lambda **settings: _test_broker(request, settings)

    def pytest_configure(config):
        config.addinivalue_line("markers", "mqtt_broker(**settings): settings of the "
                                           "mqtt_broker fixture's Broker")

    @_pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item, call):
        """A failed test that used the fixtures shows the brokers' journals."""
        outcome = yield
        report = outcome.get_result()
        brokers = item.__dict__.get("_emqx_lite_brokers")
        if report.failed and brokers:
            for n, b in enumerate(brokers):
                journal = b.journal
                lines = journal.lines(journal.query()[-50:])
                report.sections.append((
                    "emqx_lite journal%s (last %d packets)" % (
                        " of broker %d" % (n + 1) if len(brokers) > 1 else "", len(lines)),
                    "\n".join(lines) or ("(no packets)" if journal.size else "(journal off)")))


if __name__ == "__main__":
    sys.exit(main())
