"""pytest suite for emqx_lite: the MQTT 3.1 / 3.1.1 broker, its listeners,
configuration and ACL, and its EMQ X 2.x REST API.

Normative statements are cited as [MQTT-x.y.z-n] (MQTT 3.1.1, OASIS standard;
in the MQTT 5.0 classes 14-20, MQTT 5.0, OASIS standard, 7 March 2019).
Wire bytes are produced by the independent builders below (never by emqx_lite's
own encoder) so that the tests check the broker against the specification and
not against itself. REST tests go over real HTTP to the broker's waitress server.

Sections (the ##### banners, in order):
  Independent byte builders; test clients (RawClient, PahoClient, Api); fixtures
  Pure tests, no sockets: the codec (property-based), topic matching
      (MATCH_TABLE: topic_matches and TopicTree), configuration and ACL parsers
  Socket tests, a real broker on port 0, in mosquitto's numbering:
      01 CONNECT, 02 SUBSCRIBE, 03 PUBLISH, 04 retained, 05 sessions,
      06 keepalive, 07 will, 08 shared subscriptions, 09 $SYS, 10 metrics,
      13 malformed input; 14-20 MQTT 5.0 (CONNECT, PUBLISH, SUBSCRIBE, sessions,
      DISCONNECT, 3.1.1 interoperation, paho in 5.0 mode, with their own
      v5 builders and RawClient5); then limits, authentication, ACL, slow consumers,
      flow control, races, embedding, listeners, the command line, the REST
      API and its hardening, and the long runs (live fuzzing, REST fuzzing,
      soak), which the TEST_KNOBS make longer; last, durable state (a data
      directory: restarts in-process, a full disk, and kill -9 of a real
      `python emqx_lite.py` under load, EMQXLITE_TEST_KILLS times).
"""

import base64
import collections
import hashlib
import ipaddress
import json
import logging
import os
import queue
import random
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request

import pytest
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

import emqx_lite
from emqx_lite import (DEFAULT_ACL, LISTENER_DEFAULTS, SETTING_KEYS, Acl, ConfigError,
                       config_settings, env_overrides, parse_acl, parse_address, parse_bool,
                       parse_bytesize, parse_conf, parse_duration, parse_int, render_config)

HOST = "127.0.0.1"
TIMEOUT = 5.0

# Packet types (MQTT 3.1.1 section 2.2.1), written out independently.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

#: The suite's knobs and their quick defaults; larger values make the fuzzing
#: and soak runs longer (README: "Longer runs"). Their prefix is not the
#: broker's EMQX_LITE_, which it reads as configuration (an unknown key there
#: stops start-up).
TEST_KNOBS = {"EMQXLITE_TEST_FUZZ_EXAMPLES": "200", "EMQXLITE_TEST_FUZZ_PACKETS": "600",
              "EMQXLITE_TEST_SOAK_SECONDS": "3", "EMQXLITE_TEST_KILLS": "20"}


def _knob(name, convert):
    return convert(os.environ.get(name, TEST_KNOBS[name]))


FUZZ_EXAMPLES = _knob("EMQXLITE_TEST_FUZZ_EXAMPLES", int)
FUZZ_PACKETS = _knob("EMQXLITE_TEST_FUZZ_PACKETS", int)
SOAK_SECONDS = _knob("EMQXLITE_TEST_SOAK_SECONDS", float)

#: The default node name, in $SYS topics and the REST API.
NODE = "emqx_lite@127.0.0.1"

#: EMQ X 2.x's metric and stat names, written out here rather than taken from
#: emqx_lite.METRIC_NAMES / STAT_NAMES: the broker's dicts are built from those.
EMQX_METRIC_NAMES = {
    "packets/disconnect", "messages/dropped", "messages/qos2/received", "packets/suback",
    "packets/pubcomp/received", "packets/unsuback", "packets/pingresp",
    "packets/puback/missed", "packets/pingreq", "messages/retained", "packets/sent",
    "messages/qos2/dropped", "packets/unsubscribe", "packets/pubrec/missed",
    "packets/connack", "messages/received", "packets/pubrec/sent",
    "packets/publish/received", "packets/pubcomp/sent", "bytes/received",
    "packets/connect", "packets/puback/received", "messages/sent", "packets/publish/sent",
    "bytes/sent", "packets/pubrel/missed", "packets/puback/sent", "messages/qos0/received",
    "packets/subscribe", "packets/pubrel/sent", "messages/forward", "messages/qos2/sent",
    "packets/received", "packets/pubrel/received", "messages/qos1/received",
    "messages/qos1/sent", "packets/pubrec/received", "packets/pubcomp/missed",
    "messages/qos0/sent",
}
EMQX_STAT_NAMES = {n + s for n in ("clients", "retained", "routes", "sessions", "subscribers",
                                   "subscriptions", "topics") for s in ("/count", "/max")}

PROTOS = [pytest.param(3, id="mqtt31"), pytest.param(4, id="mqtt311")]
#: parametrize a test over MQTT 3.1 (MQIsdp, level 3) and 3.1.1 (MQTT, level 4)
both = pytest.mark.parametrize("proto", PROTOS)


###############################################################################
# Independent byte builders
###############################################################################

def enc_varint(n):
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def enc_bytes(b):
    return len(b).to_bytes(2, "big") + b


def enc_str(s):
    return enc_bytes(s.encode("utf-8") if isinstance(s, str) else s)


def packet(first_byte, body=b""):
    return bytes((first_byte,)) + enc_varint(len(body)) + body


def gen_connect(client_id="raw", clean=True, keepalive=60, proto=4, will=None,
                username=None, password=None, proto_name=None, extra_flags=0):
    """will = (topic, payload, qos, retain). client_id may be bytes (raw)."""
    if proto_name is None:
        proto_name = "MQIsdp" if proto == 3 else "MQTT"
    flags = (0x02 if clean else 0) | extra_flags
    payload = enc_str(client_id)
    if will is not None:
        wtopic, wpayload, wqos, wretain = will
        flags |= 0x04 | (wqos << 3) | (0x20 if wretain else 0)
        payload += enc_str(wtopic) + enc_bytes(wpayload)
    if username is not None:
        flags |= 0x80
        payload += enc_str(username)
    if password is not None:
        flags |= 0x40
        payload += enc_bytes(password)
    body = enc_str(proto_name) + bytes((proto, flags)) + keepalive.to_bytes(2, "big") + payload
    return packet(0x10, body)


def gen_publish(topic, payload=b"", qos=0, pid=None, retain=False, dup=False):
    if isinstance(payload, str):
        payload = payload.encode()
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = enc_str(topic)
    if qos:
        body += (pid if pid is not None else 1).to_bytes(2, "big")
    return packet(first, body + payload)


def gen_subscribe(pid, topics, flags=0x02):
    """topics: [(filter, qos)]."""
    body = pid.to_bytes(2, "big") + b"".join(enc_str(t) + bytes((q,)) for t, q in topics)
    return packet(0x80 | flags, body)


def gen_unsubscribe(pid, topics, flags=0x02):
    body = pid.to_bytes(2, "big") + b"".join(enc_str(t) for t in topics)
    return packet(0xA0 | flags, body)


def gen_ack(ptype, pid, flags=0):
    return packet(ptype << 4 | flags, pid.to_bytes(2, "big"))


def gen_puback(pid):
    return gen_ack(PUBACK, pid)


def gen_pubrec(pid):
    return gen_ack(PUBREC, pid)


def gen_pubrel(pid, flags=0x02):
    return gen_ack(PUBREL, pid, flags)


def gen_pubcomp(pid):
    return gen_ack(PUBCOMP, pid)


def gen_pingreq():
    return b"\xc0\x00"


def gen_disconnect():
    return b"\xe0\x00"


def parse_publish(flags, body):
    """-> dict(topic, payload, qos, retain, dup, pid)."""
    tlen = int.from_bytes(body[:2], "big")
    topic = body[2:2 + tlen].decode("utf-8")
    pos = 2 + tlen
    qos = (flags >> 1) & 3
    pid = None
    if qos:
        pid = int.from_bytes(body[pos:pos + 2], "big")
        pos += 2
    return {"topic": topic, "payload": bytes(body[pos:]), "qos": qos,
            "retain": bool(flags & 1), "dup": bool(flags & 8), "pid": pid}


# --- MQTT 5.0 (OASIS standard, 7 March 2019) ----------------------------------------------
# Written out from the 5.0 specification, independently of emqx_lite's tables.

#: Property name -> (identifier, data type) (5.0 section 2.2.2.2, table 2-4).
V5_PROPERTIES = {
    "payload_format_indicator": (0x01, "byte"),
    "message_expiry_interval": (0x02, "u32"),
    "content_type": (0x03, "str"),
    "response_topic": (0x08, "str"),
    "correlation_data": (0x09, "bin"),
    "subscription_identifier": (0x0B, "varint"),
    "session_expiry_interval": (0x11, "u32"),
    "assigned_client_identifier": (0x12, "str"),
    "server_keep_alive": (0x13, "u16"),
    "authentication_method": (0x15, "str"),
    "authentication_data": (0x16, "bin"),
    "request_problem_information": (0x17, "byte"),
    "will_delay_interval": (0x18, "u32"),
    "request_response_information": (0x19, "byte"),
    "response_information": (0x1A, "str"),
    "server_reference": (0x1C, "str"),
    "reason_string": (0x1F, "str"),
    "receive_maximum": (0x21, "u16"),
    "topic_alias_maximum": (0x22, "u16"),
    "topic_alias": (0x23, "u16"),
    "maximum_qos": (0x24, "byte"),
    "retain_available": (0x25, "byte"),
    "user_property": (0x26, "pair"),
    "maximum_packet_size": (0x27, "u32"),
    "wildcard_subscription_available": (0x28, "byte"),
    "subscription_identifier_available": (0x29, "byte"),
    "shared_subscription_available": (0x2A, "byte"),
}
V5_PROPERTY_BY_ID = {pid: (name, kind) for name, (pid, kind) in V5_PROPERTIES.items()}
#: Properties that may appear more than once: parse_props gives them as lists, in order.
V5_MULTI = ("user_property", "subscription_identifier")
AUTH = 15   # packet type 15 (5.0 section 2.1.2)

_V5_ENCODE = {
    "byte": lambda v: bytes((v,)),
    "u16": lambda v: v.to_bytes(2, "big"),
    "u32": lambda v: v.to_bytes(4, "big"),
    "varint": enc_varint,
    "str": enc_str,
    "bin": enc_bytes,
    "pair": lambda kv: enc_str(kv[0]) + enc_str(kv[1]),
}


def dec_varint(data, pos):
    """-> (value, position after it) of a variable byte integer (5.0 section 1.5.5)."""
    value, mult = 0, 1
    while True:
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) * mult
        if not byte & 0x80:
            return value, pos
        mult *= 128


def _dec_bin(data, pos):
    n = int.from_bytes(data[pos:pos + 2], "big")
    assert pos + 2 + n <= len(data), "binary field runs past the packet"
    return bytes(data[pos + 2:pos + 2 + n]), pos + 2 + n


def _dec_str(data, pos):
    raw, pos = _dec_bin(data, pos)
    return raw.decode("utf-8"), pos


def _dec_pair(data, pos):
    key, pos = _dec_str(data, pos)
    value, pos = _dec_str(data, pos)
    return (key, value), pos


_V5_DECODE = {
    "byte": lambda d, p: (d[p], p + 1),
    "u16": lambda d, p: (int.from_bytes(d[p:p + 2], "big"), p + 2),
    "u32": lambda d, p: (int.from_bytes(d[p:p + 4], "big"), p + 4),
    "varint": dec_varint,
    "str": _dec_str,
    "bin": _dec_bin,
    "pair": _dec_pair,
}


def gen_props(props=None):
    """MQTT 5.0 properties (5.0 section 2.2.2): Property Length (variable byte
    integer), then each property's identifier and value. ``props`` is a dict
    or a list of (name, value) pairs, sent in that order; a user_property
    value is a (key, value) pair or a list of them (in order, duplicates
    kept). Bytes are sent as the properties themselves (malformed input)."""
    if isinstance(props, (bytes, bytearray)):
        return enc_varint(len(props)) + bytes(props)
    items = props.items() if isinstance(props, dict) else (props or ())
    out = b""
    for name, value in items:
        pid, kind = V5_PROPERTIES[name]
        for v in (value if name in V5_MULTI and isinstance(value, list) else [value]):
            out += enc_varint(pid) + _V5_ENCODE[kind](v)
    return enc_varint(len(out)) + out


def parse_props(data, pos=0):
    """-> ({name: value}, position after the properties). user_property is a
    list of (key, value) pairs in wire order, subscription_identifier a list;
    a single-valued property seen twice fails the test."""
    length, pos = dec_varint(data, pos)
    end = pos + length
    assert end <= len(data), "properties run past the packet"
    props = {}
    while pos < end:
        pid, pos = dec_varint(data, pos)
        assert pid in V5_PROPERTY_BY_ID, "unknown property identifier 0x%02x" % pid
        name, kind = V5_PROPERTY_BY_ID[pid]
        value, pos = _V5_DECODE[kind](data, pos)
        if name in V5_MULTI:
            props.setdefault(name, []).append(value)
        else:
            assert name not in props, "property %s twice [MQTT-2.2.2-2]" % name
            props[name] = value
    assert pos == end, "a property runs past the Property Length"
    return props, end


def sub_opts(qos=0, nl=False, rap=False, rh=0):
    """A SUBSCRIBE options byte (5.0 section 3.8.3.1): QoS bits 0-1, No Local
    bit 2, Retain As Published bit 3, Retain Handling bits 4-5."""
    return qos | (0x04 if nl else 0) | (0x08 if rap else 0) | (rh << 4)


def gen_connect_v5(client_id="raw5", clean_start=True, keepalive=60, properties=None,
                   will=None, username=None, password=None, extra_flags=0):
    """CONNECT with protocol level 5 (5.0 section 3.1). will = (topic, payload,
    qos, retain) or (topic, payload, qos, retain, will_properties)."""
    flags = (0x02 if clean_start else 0) | extra_flags
    payload = enc_str(client_id)
    if will is not None:
        wtopic, wpayload, wqos, wretain, *wprops = will
        flags |= 0x04 | (wqos << 3) | (0x20 if wretain else 0)
        payload += gen_props(wprops[0] if wprops else None) + enc_str(wtopic) + enc_bytes(wpayload)
    if username is not None:
        flags |= 0x80
        payload += enc_str(username)
    if password is not None:
        flags |= 0x40
        payload += enc_bytes(password)
    body = (enc_str("MQTT") + bytes((5, flags)) + keepalive.to_bytes(2, "big")
            + gen_props(properties) + payload)
    return packet(0x10, body)


def gen_publish_v5(topic, payload=b"", qos=0, pid=None, retain=False, dup=False, properties=None):
    """PUBLISH (5.0 section 3.3): topic, packet id (QoS > 0), properties, payload."""
    if isinstance(payload, str):
        payload = payload.encode()
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = enc_str(topic)
    if qos:
        body += (pid if pid is not None else 1).to_bytes(2, "big")
    return packet(first, body + gen_props(properties) + payload)


def gen_subscribe_v5(pid, topics, properties=None):
    """SUBSCRIBE (5.0 section 3.8); topics: [(filter, options byte)] (sub_opts)."""
    body = pid.to_bytes(2, "big") + gen_props(properties)
    body += b"".join(enc_str(t) + bytes((o,)) for t, o in topics)
    return packet(0x82, body)


def gen_unsubscribe_v5(pid, topics, properties=None):
    """UNSUBSCRIBE (5.0 section 3.10)."""
    body = pid.to_bytes(2, "big") + gen_props(properties) + b"".join(enc_str(t) for t in topics)
    return packet(0xA2, body)


def gen_ack_v5(ptype, pid, reason=None, properties=None, flags=0):
    """PUBACK/PUBREC/PUBREL/PUBCOMP (5.0 sections 3.4-3.7): reason None is the
    two-byte form (Success, no properties); properties None omits the
    Property Length."""
    body = pid.to_bytes(2, "big")
    if reason is not None:
        body += bytes((reason,))
        if properties is not None:
            body += gen_props(properties)
    return packet(ptype << 4 | flags, body)


def gen_puback_v5(pid, reason=None, properties=None):
    return gen_ack_v5(PUBACK, pid, reason, properties)


def gen_pubrec_v5(pid, reason=None, properties=None):
    return gen_ack_v5(PUBREC, pid, reason, properties)


def gen_pubrel_v5(pid, reason=None, properties=None):
    return gen_ack_v5(PUBREL, pid, reason, properties, flags=0x02)


def gen_pubcomp_v5(pid, reason=None, properties=None):
    return gen_ack_v5(PUBCOMP, pid, reason, properties)


def gen_disconnect_v5(reason=None, properties=None):
    """DISCONNECT (5.0 section 3.14): reason None is the empty form (0x00,
    Normal disconnection); properties None omits the Property Length."""
    if reason is None:
        return b"\xe0\x00"
    body = bytes((reason,))
    if properties is not None:
        body += gen_props(properties)
    return packet(0xE0, body)


def gen_auth_v5(reason=None, properties=None):
    """AUTH (5.0 section 3.15), in the same short forms as DISCONNECT."""
    if reason is None:
        return b"\xf0\x00"
    body = bytes((reason,))
    if properties is not None:
        body += gen_props(properties)
    return packet(AUTH << 4, body)


def parse_connack_v5(body):
    """-> dict(session_present, reason, props) (5.0 section 3.2)."""
    assert len(body) >= 3, "not a 5.0 CONNACK (no Property Length): %r" % bytes(body)
    props, end = parse_props(body, 2)
    assert end == len(body), "bytes after the CONNACK properties"
    return {"session_present": body[0], "reason": body[1], "props": props}


def parse_publish_v5(flags, body):
    """-> dict(topic, payload, qos, retain, dup, pid, props) (5.0 section 3.3)."""
    topic, pos = _dec_str(body, 0)
    qos = (flags >> 1) & 3
    pid = None
    if qos:
        pid = int.from_bytes(body[pos:pos + 2], "big")
        pos += 2
    props, pos = parse_props(body, pos)
    return {"topic": topic, "payload": bytes(body[pos:]), "qos": qos,
            "retain": bool(flags & 1), "dup": bool(flags & 8), "pid": pid, "props": props}


def parse_ack_v5(body):
    """PUBACK/PUBREC/PUBREL/PUBCOMP -> (pid, reason, props); the two-byte form
    is Success with no properties (5.0 section 3.4.2.1)."""
    pid = int.from_bytes(body[:2], "big")
    if len(body) == 2:
        return pid, 0x00, {}
    if len(body) == 3:
        return pid, body[2], {}
    props, end = parse_props(body, 3)
    assert end == len(body)
    return pid, body[2], props


def parse_suback_v5(body):
    """SUBACK/UNSUBACK -> (pid, props, [reason code per filter]) (5.0 sections 3.9, 3.11)."""
    props, pos = parse_props(body, 2)
    return int.from_bytes(body[:2], "big"), props, list(body[pos:])


def parse_disconnect_v5(body):
    """DISCONNECT -> (reason, props); an empty body is 0x00 (5.0 section 3.14.2.1)."""
    if not body:
        return 0x00, {}
    if len(body) == 1:
        return body[0], {}
    props, end = parse_props(body, 1)
    assert end == len(body)
    return body[0], props


# Reason codes (5.0 section 2.4) the tests expect, written out independently.
RC_SUCCESS, RC_DISCONNECT_WITH_WILL, RC_NO_MATCHING_SUBSCRIBERS = 0x00, 0x04, 0x10
RC_NO_SUBSCRIPTION_EXISTED = 0x11
RC_MALFORMED_PACKET, RC_PROTOCOL_ERROR = 0x81, 0x82
RC_CLIENT_ID_NOT_VALID, RC_BAD_USERNAME_OR_PASSWORD, RC_NOT_AUTHORIZED = 0x85, 0x86, 0x87
RC_SERVER_SHUTTING_DOWN, RC_BAD_AUTHENTICATION_METHOD = 0x8B, 0x8C
RC_KEEP_ALIVE_TIMEOUT, RC_SESSION_TAKEN_OVER, RC_TOPIC_FILTER_INVALID = 0x8D, 0x8E, 0x8F
RC_PACKET_ID_NOT_FOUND, RC_RECEIVE_MAXIMUM_EXCEEDED, RC_TOPIC_ALIAS_INVALID = 0x92, 0x93, 0x94
RC_PACKET_TOO_LARGE, RC_QUOTA_EXCEEDED, RC_ADMINISTRATIVE_ACTION = 0x95, 0x97, 0x98

#: The CONNACK properties of a broker with default settings (phase-1 contract):
#: Maximum QoS absent (2), no Assigned Client Identifier, no Server Keep Alive.
V5_CONNACK_DEFAULTS = {
    "receive_maximum": 100, "maximum_packet_size": 1024 * 1024, "topic_alias_maximum": 256,
    "retain_available": 1,
    "wildcard_subscription_available": 1, "subscription_identifier_available": 1,
    "shared_subscription_available": 1,
}


###############################################################################
# Test clients: one raw-socket client, one paho client, one HTTP client
###############################################################################

def wait_until(pred, timeout=TIMEOUT, interval=0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class RawClient:
    """A bare TCP MQTT client driven byte by byte: for byte-exact and malformed input."""

    def __init__(self, port, timeout=TIMEOUT):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    @classmethod
    def connected(cls, port, client_id, **connect_kw):
        """A RawClient whose CONNECT got CONNACK 0 (session present 0)."""
        r = cls(port)
        assert r.connect(client_id, **connect_kw) == (0, 0)
        return r

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by broker")
            self.buf += data

    def read_bytes(self, n):
        """Exactly the next n bytes of the stream, as sent."""
        self._fill(n)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_packet(self, timeout=None):
        """-> (type, flags, body)."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            self._fill(2)
            mult, value, i = 1, 0, 1
            while True:
                self._fill(i + 1)
                byte = self.buf[i]
                value += (byte & 0x7F) * mult
                mult *= 128
                i += 1
                if not byte & 0x80:
                    break
            self._fill(i + value)
            first = self.buf[0]
            body = self.buf[i:i + value]
            self.buf = self.buf[i + value:]
            return first >> 4, first & 0x0F, body
        finally:
            if timeout is not None:
                self.sock.settimeout(TIMEOUT)

    def read_publish(self, timeout=None):
        ptype, flags, body = self.read_packet(timeout)
        assert ptype == PUBLISH, (ptype, flags, body)
        return parse_publish(flags, body)

    def expect_nothing(self, timeout=0.3):
        """Assert no packet arrives within timeout (a check of silence, not a wait)."""
        self.sock.settimeout(timeout)
        try:
            if self.buf:
                raise AssertionError("unexpected bytes %r" % self.buf)
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        finally:
            self.sock.settimeout(TIMEOUT)
        raise AssertionError("unexpected data %r" % data)

    def connect(self, client_id="raw", **kw):
        """Send CONNECT, return (session_present, return_code)."""
        self.send(gen_connect(client_id, **kw))
        ptype, flags, body = self.read_packet()
        assert (ptype, flags, len(body)) == (CONNACK, 0, 2), (ptype, flags, body)
        return body[0], body[1]

    def subscribe(self, topics, pid=1):
        self.send(gen_subscribe(pid, topics))
        ptype, flags, body = self.read_packet()
        assert (ptype, flags) == (SUBACK, 0)
        assert int.from_bytes(body[:2], "big") == pid
        return list(body[2:])

    def expect_closed(self, timeout=TIMEOUT, strict=True):
        """True when the broker closes the connection within timeout.

        strict: the broker must send nothing more before closing (an
        unexpected packet raises AssertionError)."""
        if strict and self.buf:
            raise AssertionError("unexpected bytes before close: %r" % self.buf[:50])
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = self.sock.recv(65536)
                if not data:
                    return True
                if strict:
                    raise AssertionError("unexpected bytes before close: %r" % data[:50])
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            return True
        except socket.timeout:
            return False
        finally:
            try:
                self.sock.settimeout(TIMEOUT)
            except OSError:
                pass
        return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class PahoClient:
    """A connected paho client whose callbacks feed queues.

    transport="websockets" and ca/cert/key (TLS) reach the other listeners;
    subscribe= a filter, a (filter, qos) pair or a list of pairs, subscribed
    (SUBACK awaited) once connected."""

    def __init__(self, port, client_id="", proto=4, clean_session=True, will=None,
                 keepalive=60, connect=True, username=None, password=None,
                 max_inflight=None, transport="tcp", ca=None, cert=None, key=None,
                 subscribe=None):
        self.port = port
        self.client_id = client_id
        self.messages = queue.Queue()
        self.connacks = queue.Queue()
        self.subacks = queue.Queue()
        self.unsubacks = queue.Queue()
        self.published = queue.Queue()
        self.disconnects = queue.Queue()
        protocol = paho.MQTTv311 if proto == 4 else paho.MQTTv31
        kw = {}
        if protocol != paho.MQTTv5:
            kw["clean_session"] = clean_session
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol, transport=transport, **kw)
        self.client.on_connect = lambda c, u, f, rc, p: self.connacks.put((f.session_present, str(rc)))
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put((mid, rcs))
        self.client.on_unsubscribe = lambda c, u, mid, rcs, p: self.unsubacks.put(mid)
        self.client.on_publish = lambda c, u, mid, rc, p: self.published.put(mid)
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(str(rc))
        if ca is not None:
            self.client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos, retain)
        if username is not None:
            self.client.username_pw_set(username, password)
        if max_inflight is not None:
            # paho sends queued messages from its network thread and new ones
            # from the caller's thread: with a full window it can reorder them.
            self.client.max_inflight_messages_set(max_inflight)
        self.keepalive = keepalive
        self.session_present = None
        if connect:
            rc = self.connect()
            assert rc == "Success", rc
            if subscribe is not None:
                self.subscribe(*subscribe) if isinstance(subscribe, tuple) else self.subscribe(subscribe)

    def connect(self):
        """CONNECT and wait for the CONNACK; returns its return code as paho names it."""
        self.client.connect(HOST, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        self.session_present, rc = self.connacks.get(timeout=TIMEOUT)
        return rc

    def subscribe(self, topic, qos=0):
        """topic may be a list of (topic, qos); waits for SUBACK, returns codes."""
        if isinstance(topic, list):
            _, mid = self.client.subscribe(topic)
        else:
            _, mid = self.client.subscribe(topic, qos)
        got_mid, rcs = self.subacks.get(timeout=TIMEOUT)
        assert got_mid == mid
        return [r.value if hasattr(r, "value") else r for r in rcs]

    def unsubscribe(self, topic):
        _, mid = self.client.unsubscribe(topic)
        assert self.unsubacks.get(timeout=TIMEOUT) == mid

    def publish(self, topic, payload=b"", qos=0, retain=False, wait=True):
        info = self.client.publish(topic, payload, qos, retain)
        if wait and qos:
            info.wait_for_publish(TIMEOUT)
            assert info.is_published()
        return info

    def get(self, timeout=TIMEOUT):
        return self.messages.get(timeout=timeout)

    def expect_nothing(self, timeout=0.3):
        """Assert no message arrives within timeout (a check of silence, not a wait)."""
        try:
            msg = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError("unexpected message %s %r" % (msg.topic, msg.payload))

    def drain(self):
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def disconnect(self):
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    close = disconnect


class RawClient5(RawClient):
    """A RawClient speaking MQTT 5.0 with the v5 builders above: CONNACK,
    PUBLISH, acks, SUBACK/UNSUBACK and DISCONNECT come back parsed, with
    their reason codes and properties."""

    def __init__(self, port, timeout=TIMEOUT):
        super().__init__(port, timeout)
        #: PUBLISHes that arrived while an ack was awaited; read_packet gives them first
        self.backlog = []

    @classmethod
    def connected(cls, port, client_id, **connect_kw):
        """A RawClient5 whose CONNECT got CONNACK 0x00 (Success)."""
        r = cls(port)
        ack = r.connect(client_id, **connect_kw)
        assert ack["reason"] == 0x00, ack
        return r

    def connect(self, client_id="raw5", **kw):
        """Send a v5 CONNECT (gen_connect_v5 keywords); -> parse_connack_v5 of the reply."""
        self.send(gen_connect_v5(client_id, **kw))
        return self.read_connack()

    def read_connack(self):
        ptype, flags, body = self.read_packet()
        assert (ptype, flags) == (CONNACK, 0), (ptype, flags, body)
        return parse_connack_v5(body)

    def subscribe(self, topics, pid=1, properties=None):
        """topics: [(filter, options byte)]; -> the SUBACK's reason codes."""
        self.send(gen_subscribe_v5(pid, topics, properties))
        return self._read_codes(SUBACK, pid)

    def unsubscribe(self, topics, pid=1, properties=None):
        """-> the UNSUBACK's reason codes."""
        self.send(gen_unsubscribe_v5(pid, topics, properties))
        return self._read_codes(UNSUBACK, pid)

    def read_packet(self, timeout=None):
        if self.backlog:
            return self.backlog.pop(0)
        return super().read_packet(timeout)

    def _read_reply(self, timeout=None):
        """The next packet from the socket that is not a PUBLISH (those go to
        the backlog: a subscriber's own message may come before its PUBACK)."""
        while True:
            ptype, flags, body = RawClient.read_packet(self, timeout)
            if ptype != PUBLISH:
                return ptype, flags, body
            self.backlog.append((ptype, flags, body))

    def _read_codes(self, kind, pid):
        ptype, flags, body = self._read_reply()
        assert (ptype, flags) == (kind, 0), (ptype, flags, body)
        got_pid, _, codes = parse_suback_v5(body)
        assert got_pid == pid, (got_pid, pid)   # [MQTT-2.2.1-6]
        return codes

    def publish(self, topic, payload=b"", qos=0, pid=1, **kw):
        """Send a PUBLISH (gen_publish_v5 keywords) and complete its flow: for
        QoS 1 -> the PUBACK's reason code; for QoS 2 the PUBREC's, then (if
        below 0x80) PUBREL and a PUBCOMP 0x00."""
        self.send(gen_publish_v5(topic, payload, qos, pid if qos else None, **kw))
        if not qos:
            return None
        got_pid, reason, _ = self.read_ack(PUBACK if qos == 1 else PUBREC)
        assert got_pid == pid, (got_pid, pid)
        if qos == 2 and reason < 0x80:
            self.send(gen_pubrel_v5(pid))
            assert self.read_ack(PUBCOMP)[:2] == (pid, RC_SUCCESS)
        return reason

    def read_publish(self, timeout=None):
        ptype, flags, body = self.read_packet(timeout)
        assert ptype == PUBLISH, (ptype, flags, body)
        return parse_publish_v5(flags, body)

    def ack(self, m):
        """Acknowledge a received PUBLISH (parsed): PUBACK for QoS 1; PUBREC,
        the broker's PUBREL, then PUBCOMP for QoS 2."""
        if m["qos"] == 1:
            self.send(gen_puback_v5(m["pid"]))
        elif m["qos"] == 2:
            self.send(gen_pubrec_v5(m["pid"]))
            assert self.read_ack(PUBREL)[:2] == (m["pid"], RC_SUCCESS)
            self.send(gen_pubcomp_v5(m["pid"]))

    def read_ack(self, kind, timeout=None):
        """The next packet other than a PUBLISH must be a ``kind`` (PUBACK,
        PUBREC, PUBREL or PUBCOMP): -> (pid, reason, props)."""
        ptype, flags, body = self._read_reply(timeout)
        assert (ptype, flags) == (kind, 0x02 if kind == PUBREL else 0), (ptype, flags, body)
        return parse_ack_v5(body)

    def until_pingresp(self):
        """Send PINGREQ; -> the packets (type, flags, body) that arrive before
        its PINGRESP. The broker handles one connection's packets in order, so
        this shows everything an earlier packet made it send, and (after a
        Broker.publish has returned) everything that publish sent here."""
        self.send(gen_pingreq())
        got = []
        while True:
            ptype, flags, body = self.read_packet()
            if ptype == PINGRESP:
                return got
            got.append((ptype, flags, body))

    def pending_publishes(self):
        """until_pingresp(), every packet a PUBLISH: -> them, parsed."""
        got = self.until_pingresp()
        assert all(p[0] == PUBLISH for p in got), got
        return [parse_publish_v5(flags, body) for _, flags, body in got]

    def read_disconnect(self, timeout=None):
        ptype, flags, body = self.read_packet(timeout)
        assert (ptype, flags) == (DISCONNECT, 0), (ptype, flags, body)
        return parse_disconnect_v5(body)

    def expect_disconnect(self, timeout=TIMEOUT):
        """The broker sends DISCONNECT and closes the connection
        [MQTT-3.14.4-1] [MQTT-3.14.4-2]: -> its reason code."""
        reason, props = self.read_disconnect(timeout)
        assert "session_expiry_interval" not in props   # [MQTT-3.14.2-2]
        assert self.expect_closed(), "still open after DISCONNECT 0x%02x" % reason
        return reason

    def expect_refused(self):
        """An error in CONNECT: the broker either sends a CONNACK with a
        failure reason code and closes, or just closes [MQTT-3.2.2-7] (it
        never sends DISCONNECT before a successful CONNACK [MQTT-3.14.0-1]).
        -> the CONNACK's reason code, or None for a bare close."""
        try:
            ptype, flags, body = self.read_packet()
        except (ConnectionError, OSError):
            return None
        assert (ptype, flags) == (CONNACK, 0), (ptype, flags, body)
        ack = parse_connack_v5(body)
        assert ack["reason"] >= 0x80 and ack["session_present"] == 0, ack   # [MQTT-3.2.2-6]
        assert self.expect_closed()
        return ack["reason"]


class PahoClient5:
    """A connected paho client in MQTT 5.0 mode whose callbacks feed queues.

    connect_props: paho Properties for the CONNECT. After the CONNACK:
    session_present, reason (paho's ReasonCode) and connack_props."""

    def __init__(self, port, client_id="", clean_start=True, connect_props=None,
                 keepalive=60, username=None, password=None, will=None):
        self.messages = queue.Queue()
        self.connacks = queue.Queue()
        self.subacks = queue.Queue()
        self.unsubacks = queue.Queue()
        self.published = queue.Queue()
        self.disconnects = queue.Queue()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=paho.MQTTv5, reconnect_on_failure=False)
        c = self.client
        c.on_connect = lambda c, u, f, rc, p: self.connacks.put((f.session_present, rc, p))
        c.on_message = lambda c, u, m: self.messages.put(m)
        c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put((mid, rcs))
        c.on_unsubscribe = lambda c, u, mid, rcs, p: self.unsubacks.put((mid, rcs))
        c.on_publish = lambda c, u, mid, rc, p: self.published.put((mid, rc))
        c.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc)
        if username is not None:
            c.username_pw_set(username, password)
        if will is not None:
            topic, payload, qos, retain, props = will
            c.will_set(topic, payload, qos, retain, properties=props)
        c.connect(HOST, port, keepalive, clean_start=clean_start, properties=connect_props)
        c.loop_start()
        self.session_present, self.reason, self.connack_props = self.connacks.get(timeout=TIMEOUT)

    def subscribe(self, topics):
        """topics: [(filter, paho SubscribeOptions)]; -> the SUBACK's reason codes as ints."""
        _, mid = self.client.subscribe(topics)
        got_mid, rcs = self.subacks.get(timeout=TIMEOUT)
        assert got_mid == mid
        return rcs

    def unsubscribe(self, topics):
        _, mid = self.client.unsubscribe(topics)
        got_mid, rcs = self.unsubacks.get(timeout=TIMEOUT)
        assert got_mid == mid
        return rcs

    def publish(self, topic, payload=b"", qos=0, retain=False, properties=None):
        """-> the reason code paho reports in on_publish (the PUBACK's for QoS 1)."""
        info = self.client.publish(topic, payload, qos, retain, properties=properties)
        mid, rc = self.published.get(timeout=TIMEOUT)
        assert mid == info.mid
        return rc

    def get(self, timeout=TIMEOUT):
        return self.messages.get(timeout=timeout)

    def close(self):
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def raw_sub_and_pub(raw, sub_id, topics, pub_id, **pub_connect):
    """-> (sub, pub): RawClient ``sub_id`` connected and subscribed to ``topics``
    [(filter, qos), ...], then RawClient ``pub_id`` connected (gen_connect
    keywords in ``pub_connect``). ``raw`` makes them: the raw fixture, or the
    MQTT port of a make_broker broker."""
    new = (lambda: RawClient(raw)) if isinstance(raw, int) else raw
    sub = new()
    sub.connect(sub_id)
    sub.subscribe(topics)
    pub = new()
    pub.connect(pub_id, **pub_connect)
    return sub, pub


def fields(msg):
    """(topic, payload, qos, retain) of a message a PahoClient received."""
    return msg.topic, msg.payload, msg.qos, msg.retain


def roundtrip(port, n=50):
    """A paho pair exchanges n QoS 1 messages; returns how many arrived."""
    sub = PahoClient(port, "rt-sub-%d" % random.randrange(10 ** 9))
    pub = PahoClient(port, "rt-pub-%d" % random.randrange(10 ** 9))
    try:
        sub.subscribe("rt/t", 1)
        for i in range(n):
            pub.publish("rt/t", str(i), qos=1, wait=False)
        got = []
        try:
            while len(got) < n:
                got.append(sub.get())
        except queue.Empty:
            pass
        return len(got)
    finally:
        sub.disconnect()
        pub.disconnect()


class Clients:
    """A fixture's factory: clients of ``cls`` on ``port`` (unless port= says
    otherwise), all closed at teardown."""

    def __init__(self, cls, port):
        self.cls, self.port, self.made = cls, port, []

    def __call__(self, *args, port=None, **kw):
        c = self.cls(port or self.port, *args, **kw)
        self.made.append(c)
        return c

    def close(self):
        for c in self.made:
            try:
                c.close()
            except Exception:
                pass


class Api:
    """A tiny HTTP client for the REST API (http.client, one request each)."""

    def __init__(self, port, user="admin", password="public"):
        self.port, self.user, self.password = port, user, password

    def request(self, method, path, body=None, auth=True, headers=None, raw_body=None):
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        hdrs = dict(headers or {})
        if auth is True:
            token = base64.b64encode(("%s:%s" % (self.user, self.password)).encode()).decode()
            hdrs["Authorization"] = "Basic " + token
        elif isinstance(auth, str):
            hdrs["Authorization"] = auth
        data = raw_body if raw_body is not None else (
            json.dumps(body).encode() if body is not None else None)
        try:
            conn.request(method, path if path.startswith("/") else "/api/v2/" + path,
                         body=data, headers=hdrs)
            resp = conn.getresponse()
            content = resp.read()
            return resp.status, resp.headers, content
        finally:
            conn.close()

    def json(self, method, path, body=None, **kw):
        status, headers, content = self.request(method, path, body, **kw)
        assert status == 200, (status, content)
        assert headers["Content-Type"].startswith("application/json")
        return json.loads(content)

    def get(self, path):
        return self.json("GET", path)

    def result(self, method, path, body=None):
        reply = self.json(method, path, body)
        assert reply["code"] == 0, reply
        return reply["result"]


def _run_cli(*args, env=None, timeout=10):
    """``python emqx_lite.py ...`` run to its end, in a fresh working directory
    (where its default ./data goes)."""
    import subprocess
    import sys
    with tempfile.TemporaryDirectory(prefix="emqx_lite_cli_") as cwd:
        return subprocess.run([sys.executable, emqx_lite.__file__, *args], capture_output=True,
                              text=True, timeout=timeout, cwd=cwd,
                              env=dict(os.environ, **(env or {})))


class _CliBroker:
    """``python emqx_lite.py ...`` in a subprocess; ports read from its log lines."""

    def __init__(self, *args, env=None, cwd=None):
        import subprocess
        import sys
        self._cwd = None if cwd else tempfile.TemporaryDirectory(prefix="emqx_lite_cli_")
        self.cwd = cwd or self._cwd.name   # its default ./data lands here
        self.proc = subprocess.Popen(
            [sys.executable, emqx_lite.__file__, "--log-level", "info", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.cwd,
            env=dict(os.environ, **(env or {})))
        self.ports, self.lines = {}, []
        wanted = {"mqtt:tcp"} | (set() if "-1" in args[args.index("--http-port") + 1:][:1]
                                 else {"api"}) if "--http-port" in args else {"mqtt:tcp", "api"}
        while not wanted <= set(self.ports):
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("broker exited: %s" % "".join(self.lines))
            self.lines.append(line)
            m = re.search(r"Listening for MQTT \((mqtt:\w+)\) on [\d.]+:(\d+)", line)
            if m:
                self.ports[m.group(1)] = int(m.group(2))
            m = re.search(r"REST API \(waitress\) on http://[\d.]+:(\d+)/", line)
            if m:
                self.ports["api"] = int(m.group(1))

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=10)
        if self._cwd is not None:
            self._cwd.cleanup()
        return self.proc.returncode, "".join(self.lines) + out


###############################################################################
# Fixtures
###############################################################################

@pytest.fixture
def make_broker():
    brokers = []

    def factory(**settings):
        b = emqx_lite.Broker(HOST, mqtt_port=0, http_port=None, **settings)
        b.start()
        brokers.append(b)
        return b

    yield factory
    for b in brokers:
        b.stop()


@pytest.fixture
def broker(make_broker):
    return make_broker()


def _clients_of(cls, doc):
    """A fixture: a factory of ``cls`` clients of the test's broker, closed at teardown."""
    def fixture(broker):
        clients = Clients(cls, broker.mqtt_port)
        yield clients
        clients.close()
    fixture.__doc__ = doc
    return pytest.fixture(fixture)


client = _clients_of(PahoClient, "client(client_id=..., proto=4, clean_session=True, "
                                 "will=None, port=None) -> PahoClient.")
raw = _clients_of(RawClient, "raw(port=None) -> RawClient.")
raw5 = _clients_of(RawClient5, "raw5(port=None) -> RawClient5 (MQTT 5.0).")
paho5 = _clients_of(PahoClient5, "paho5(client_id, ..., port=None) -> PahoClient5 (paho in "
                                 "MQTT 5.0 mode).")


@pytest.fixture
def health(broker, client):
    """A healthy paho pair connected before a bad client shows up; check() proves
    the broker still routes for it afterwards."""
    sub = client(client_id="healthy-sub")
    sub.subscribe("health/#", 1)
    pub = client(client_id="healthy-pub")

    class Health:
        def check(self, n=[0]):
            n[0] += 1
            payload = b"ping-%d" % n[0]
            pub.publish("health/x", payload, qos=1)
            msg = sub.get()
            assert (msg.topic, msg.payload) == ("health/x", payload)

    h = Health()
    h.check()
    return h


#: A cheap password hash keeps REST tests fast; TestApiCredentials checks the real cost.
FAST_HASH = {"api_password_iterations": 1000}


@pytest.fixture
def api_broker():
    with emqx_lite.Broker("127.0.0.1", mqtt_port=0, http_port=0, **FAST_HASH) as b:
        yield b


@pytest.fixture
def api(api_broker):
    return Api(api_broker.http_port)


@pytest.fixture
def api_mqtt(api_broker):
    """api_mqtt(client_id, ..., subscribe=None) -> PahoClient on the REST test broker."""
    clients = Clients(PahoClient, api_broker.mqtt_port)
    yield clients
    clients.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    d = tmp_path_factory.mktemp("pki")
    files = {name: str(d / name) for name in ("ca.pem", "server.pem", "server.key",
                                               "client.pem", "client.key")}
    ca.cert_pem.write_to_path(files["ca.pem"])
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(files["server.pem"])
    server.private_key_pem.write_to_path(files["server.key"])
    client = ca.issue_cert("client-7", common_name="client-7")
    client.cert_chain_pems[0].write_to_path(files["client.pem"])
    client.private_key_pem.write_to_path(files["client.key"])
    return files


###############################################################################
# Pure tests: the codec (property-based)
###############################################################################

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=30)
_name = _text.filter(lambda t: t and "+" not in t and "#" not in t)
_pid = st.integers(1, 65535)


@st.composite
def _packets(draw):
    """(packet type, packet object) for every one of the 14 packet types."""
    kind = draw(st.sampled_from(sorted(set(emqx_lite.ENCODERS) - {emqx_lite.AUTH})))   # 3.1.1's 14
    if kind == emqx_lite.CONNECT:
        level = draw(st.sampled_from([3, 4]))
        will = draw(st.none() | st.builds(emqx_lite.Will, _name, st.binary(max_size=40),
                                          st.integers(0, 2), st.booleans()))
        username = draw(st.none() | _text)
        password = draw(st.none() | st.binary(max_size=20)) if username is not None else None
        pkt = emqx_lite.Connect(emqx_lite.PROTOCOL_NAMES[level], level, draw(st.booleans()),
                                draw(st.integers(0, 65535)), draw(_text), will, username, password)
    elif kind == emqx_lite.CONNACK:
        pkt = emqx_lite.Connack(draw(st.booleans()), draw(st.integers(0, 5)))
    elif kind == emqx_lite.PUBLISH:
        qos = draw(st.integers(0, 2))
        pkt = emqx_lite.Publish(draw(_name), draw(st.binary(max_size=100)), qos,
                                draw(st.booleans()), draw(st.booleans()) if qos else False,
                                draw(_pid) if qos else None)
    elif kind == emqx_lite.SUBSCRIBE:
        pkt = emqx_lite.Subscribe(draw(_pid), draw(st.lists(st.tuples(_text, st.integers(0, 2)),
                                                            min_size=1, max_size=5)))
    elif kind == emqx_lite.SUBACK:
        pkt = emqx_lite.Suback(draw(_pid), draw(st.lists(st.sampled_from([0, 1, 2, 0x80]),
                                                         min_size=1, max_size=5)))
    elif kind == emqx_lite.UNSUBSCRIBE:
        pkt = emqx_lite.Unsubscribe(draw(_pid), draw(st.lists(_text, min_size=1, max_size=5)))
    elif kind in (emqx_lite.PINGREQ, emqx_lite.PINGRESP, emqx_lite.DISCONNECT):
        pkt = emqx_lite.EMPTY
    else:
        pkt = emqx_lite.Ack(draw(_pid))
    return kind, pkt


class TestCodecProperties:
    @hsettings(max_examples=FUZZ_EXAMPLES * 3, deadline=None)
    @given(_packets())
    def test_decode_of_encode_is_identity_for_every_packet_type(self, typed):
        kind, pkt = typed
        data = emqx_lite.encode_packet(kind, pkt)
        first, body, size = emqx_lite.split_packet(data + b"\x00trailing")
        assert size == len(data) and first >> 4 == kind
        assert emqx_lite.decode_packet(first, body, accept=emqx_lite.DECODERS) == pkt

    @hsettings(max_examples=FUZZ_EXAMPLES * 5, deadline=None,
               suppress_health_check=[HealthCheck.too_slow])
    @given(st.integers(0, 255), st.binary(max_size=200))
    def test_arbitrary_bytes_raise_only_the_codecs_own_error(self, first, body):
        try:
            emqx_lite.decode_packet(first, body, accept=emqx_lite.DECODERS)
        except emqx_lite.MQTTError:
            pass

    @hsettings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(_packets(), st.data())
    def test_mutated_packets_raise_only_the_codecs_own_error(self, typed, data):
        raw = bytearray(emqx_lite.encode_packet(*typed))
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        try:
            framed = emqx_lite.split_packet(bytes(raw))
            if framed:
                emqx_lite.decode_packet(framed[0], framed[1], accept=emqx_lite.DECODERS)
        except emqx_lite.MQTTError:
            pass

    @hsettings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(st.integers(0, emqx_lite.MAX_REMAINING_LENGTH))
    def test_remaining_length_round_trip(self, n):
        """2.2.3: one to four bytes, up to 268,435,455."""
        encoded = emqx_lite.encode_varint(n)
        assert len(encoded) <= 4
        assert emqx_lite.decode_varint(encoded, 0) == (n, len(encoded))

# --- MQTT 5.0: the property table and round trips ------------------------------

#: The spec's property table (MQTT 5.0 section 2.2.2.2), transcribed independently:
#: identifier -> (name, type, the packets that may carry it; "Will" for Will Properties).
SPEC_PROPERTIES = {
    0x01: ("Payload Format Indicator", "Byte", {"PUBLISH", "Will"}),
    0x02: ("Message Expiry Interval", "Four Byte Integer", {"PUBLISH", "Will"}),
    0x03: ("Content Type", "UTF-8 Encoded String", {"PUBLISH", "Will"}),
    0x08: ("Response Topic", "UTF-8 Encoded String", {"PUBLISH", "Will"}),
    0x09: ("Correlation Data", "Binary Data", {"PUBLISH", "Will"}),
    0x0B: ("Subscription Identifier", "Variable Byte Integer", {"PUBLISH", "SUBSCRIBE"}),
    0x11: ("Session Expiry Interval", "Four Byte Integer", {"CONNECT", "CONNACK", "DISCONNECT"}),
    0x12: ("Assigned Client Identifier", "UTF-8 Encoded String", {"CONNACK"}),
    0x13: ("Server Keep Alive", "Two Byte Integer", {"CONNACK"}),
    0x15: ("Authentication Method", "UTF-8 Encoded String", {"CONNECT", "CONNACK", "AUTH"}),
    0x16: ("Authentication Data", "Binary Data", {"CONNECT", "CONNACK", "AUTH"}),
    0x17: ("Request Problem Information", "Byte", {"CONNECT"}),
    0x18: ("Will Delay Interval", "Four Byte Integer", {"Will"}),
    0x19: ("Request Response Information", "Byte", {"CONNECT"}),
    0x1A: ("Response Information", "UTF-8 Encoded String", {"CONNACK"}),
    0x1C: ("Server Reference", "UTF-8 Encoded String", {"CONNACK", "DISCONNECT"}),
    0x1F: ("Reason String", "UTF-8 Encoded String",
           {"CONNACK", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP", "SUBACK", "UNSUBACK",
            "DISCONNECT", "AUTH"}),
    0x21: ("Receive Maximum", "Two Byte Integer", {"CONNECT", "CONNACK"}),
    0x22: ("Topic Alias Maximum", "Two Byte Integer", {"CONNECT", "CONNACK"}),
    0x23: ("Topic Alias", "Two Byte Integer", {"PUBLISH"}),
    0x24: ("Maximum QoS", "Byte", {"CONNACK"}),
    0x25: ("Retain Available", "Byte", {"CONNACK"}),
    0x26: ("User Property", "UTF-8 String Pair",
           {"CONNECT", "CONNACK", "PUBLISH", "Will", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
            "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "DISCONNECT", "AUTH"}),
    0x27: ("Maximum Packet Size", "Four Byte Integer", {"CONNECT", "CONNACK"}),
    0x28: ("Wildcard Subscription Available", "Byte", {"CONNACK"}),
    0x29: ("Subscription Identifier Available", "Byte", {"CONNACK"}),
    0x2A: ("Shared Subscription Available", "Byte", {"CONNACK"}),
}
_SPEC_TYPE_BYTES = {"Byte": b"\x01", "Two Byte Integer": b"\x00\x01",
                    "Four Byte Integer": b"\x00\x00\x00\x01", "Variable Byte Integer": b"\x01",
                    "UTF-8 Encoded String": b"\x00\x01a", "Binary Data": b"\x00\x01a",
                    "UTF-8 String Pair": b"\x00\x01a\x00\x01b"}


def _where(name):
    return emqx_lite.WILL if name == "Will" else getattr(emqx_lite, name)


class TestV5PropertyTable:
    def test_every_property_of_the_spec_and_no_other(self):
        assert sorted(emqx_lite.PROPERTIES) == sorted(SPEC_PROPERTIES)

    @pytest.mark.parametrize("pid", sorted(SPEC_PROPERTIES), ids=lambda p: "0x%02X" % p)
    def test_name_and_places_match_the_spec(self, pid):
        name, _, places = SPEC_PROPERTIES[pid]
        ours, _, allowed = emqx_lite.PROPERTIES[pid]
        assert ours == name.lower().replace(" ", "_").replace("-", "_")
        assert {_where(p) for p in places} == set(allowed)

    @pytest.mark.parametrize("pid", sorted(SPEC_PROPERTIES), ids=lambda p: "0x%02X" % p)
    def test_type_matches_the_spec(self, pid):
        """The value bytes of the spec's type decode, and nothing is left over."""
        _, kind, places = SPEC_PROPERTIES[pid]
        block = bytes((pid,)) + _SPEC_TYPE_BYTES[kind]
        props, end = emqx_lite.decode_properties(bytes((len(block),)) + block, 0,
                                                 _where(sorted(places)[0]))
        assert end == len(block) + 1 and len(props) == 1

    @pytest.mark.parametrize("pid", sorted(SPEC_PROPERTIES), ids=lambda p: "0x%02X" % p)
    def test_a_property_out_of_place_is_malformed(self, pid):
        """Each packet carries only the properties the spec lists for it; another
        is a Malformed Packet (5.0 section 2.2.2.2)."""
        _, kind, places = SPEC_PROPERTIES[pid]
        elsewhere = [p for p in ("CONNECT", "PUBLISH", "SUBSCRIBE", "UNSUBSCRIBE", "DISCONNECT",
                                 "Will", "PINGREQ") if p not in places]
        block = bytes((pid,)) + _SPEC_TYPE_BYTES[kind]
        with pytest.raises(emqx_lite.MalformedPacket):
            emqx_lite.decode_properties(bytes((len(block),)) + block, 0, _where(elsewhere[0]))

    def test_a_repeated_property_is_a_protocol_error_but_user_property_may_repeat(self):
        twice = b"\x03\x00\x01a" * 2
        with pytest.raises(emqx_lite.ProtocolError, match="twice"):
            emqx_lite.decode_properties(bytes((len(twice),)) + twice, 0, emqx_lite.PUBLISH)
        pairs = b"\x26\x00\x01k\x00\x01v" * 2
        props, _ = emqx_lite.decode_properties(bytes((len(pairs),)) + pairs, 0, emqx_lite.PUBLISH)
        assert props == {"user_property": [("k", "v"), ("k", "v")]}

    def test_an_unknown_property_is_malformed(self):
        with pytest.raises(emqx_lite.MalformedPacket):
            emqx_lite.decode_properties(b"\x02\x7f\x00", 0, emqx_lite.PUBLISH)

    @pytest.mark.parametrize("block", [b"\x01\x02", b"\x17\x05", b"\x24\x02"])
    def test_byte_properties_out_of_range_are_protocol_errors(self, block):
        where = {0x01: emqx_lite.PUBLISH, 0x17: emqx_lite.CONNECT, 0x24: emqx_lite.CONNACK}
        with pytest.raises(emqx_lite.ProtocolError):
            emqx_lite.decode_properties(bytes((len(block),)) + block, 0, where[block[0]])


_pair = st.tuples(_text, _text)


def _v5_properties(where):
    """Properties a packet of type ``where`` may carry, drawn."""
    values = {"payload_format_indicator": st.integers(0, 1),
              "message_expiry_interval": st.integers(0, 2 ** 32 - 1),
              "content_type": _text, "response_topic": _name,
              "correlation_data": st.binary(max_size=20),
              "session_expiry_interval": st.integers(0, 2 ** 32 - 1),
              "assigned_client_identifier": _text, "server_keep_alive": st.integers(0, 65535),
              "authentication_method": _text, "authentication_data": st.binary(max_size=10),
              "request_problem_information": st.integers(0, 1),
              "will_delay_interval": st.integers(0, 2 ** 32 - 1),
              "request_response_information": st.integers(0, 1),
              "response_information": _text, "server_reference": _text, "reason_string": _text,
              "receive_maximum": st.integers(1, 65535),
              "topic_alias_maximum": st.integers(0, 65535), "topic_alias": st.integers(1, 65535),
              "maximum_qos": st.integers(0, 1), "retain_available": st.integers(0, 1),
              "user_property": st.lists(_pair, min_size=1, max_size=3),
              "maximum_packet_size": st.integers(1, 2 ** 32 - 1),
              "wildcard_subscription_available": st.integers(0, 1),
              "subscription_identifier_available": st.integers(0, 1),
              "shared_subscription_available": st.integers(0, 1),
              "subscription_identifier": st.lists(st.integers(1, 268435455), min_size=1,
                                                  max_size=2)}
    names = [n for n, _, places in emqx_lite.PROPERTIES.values() if where in places]
    return st.fixed_dictionaries({}, optional={n: values[n] for n in names})


@st.composite
def _v5_packets(draw):
    """(packet type, packet object) for every 5.0 packet type, with properties."""
    E = emqx_lite
    kind = draw(st.sampled_from(sorted(E.ENCODERS)))
    props = draw(_v5_properties(kind))
    if kind == E.CONNECT:
        will = draw(st.none() | st.builds(E.Will, _name, st.binary(max_size=40), st.integers(0, 2),
                                          st.booleans(), _v5_properties(E.WILL)))
        username = draw(st.none() | _text)
        password = draw(st.none() | st.binary(max_size=20)) if username is not None else None
        return kind, E.Connect("MQTT", 5, draw(st.booleans()), draw(st.integers(0, 65535)),
                               draw(_text), will, username, password, props)
    if kind == E.CONNACK:
        return kind, E.Connack(draw(st.booleans()), draw(st.sampled_from([0, 0x80, 0x87])), props)
    if kind == E.PUBLISH:
        qos = draw(st.integers(0, 2))
        return kind, E.Publish(draw(_name), draw(st.binary(max_size=100)), qos, draw(st.booleans()),
                               draw(st.booleans()) if qos else False, draw(_pid) if qos else None,
                               props)
    if kind == E.SUBSCRIBE:
        options = st.integers(0, 2) | st.sampled_from([0x04, 0x08, 0x1A, 0x21, 0x2E])
        return kind, E.Subscribe(draw(_pid), draw(st.lists(st.tuples(_text, options), min_size=1,
                                                           max_size=4)), props)
    if kind in (E.SUBACK, E.UNSUBACK):
        cls = E.Suback if kind == E.SUBACK else E.Unsuback
        return kind, cls(draw(_pid), draw(st.lists(st.sampled_from([0, 1, 2, 0x11, 0x80, 0x87]),
                                                   min_size=1, max_size=4)), props)
    if kind == E.UNSUBSCRIBE:
        return kind, E.Unsubscribe(draw(_pid), draw(st.lists(_text, min_size=1, max_size=4)), props)
    if kind in (E.DISCONNECT, E.AUTH):
        cls = E.Disconnect if kind == E.DISCONNECT else E.Auth
        reason = draw(st.sampled_from([0, 4, 0x18, 0x19, 0x8E]))
        return kind, (cls(reason, props or None) if reason or props else cls())
    if kind in (E.PINGREQ, E.PINGRESP):
        return kind, E.EMPTY
    reason = draw(st.sampled_from([0, 0x10, 0x87, 0x92]))
    return kind, (E.Ack(draw(_pid), reason, props or None) if reason or props
                  else E.Ack(draw(_pid)))


class TestV5CodecProperties:
    @hsettings(max_examples=FUZZ_EXAMPLES * 3, deadline=None,
               suppress_health_check=[HealthCheck.too_slow])
    @given(_v5_packets())
    def test_decode_of_encode_is_identity_for_every_5_0_packet(self, typed):
        kind, pkt = typed
        data = emqx_lite.encode_packet(kind, pkt, 5)
        first, body, size = emqx_lite.split_packet(data + b"\x00trailing")
        assert size == len(data) and first >> 4 == kind
        assert emqx_lite.decode_packet(first, body, 5, accept=emqx_lite.DECODERS) == pkt

    @hsettings(max_examples=FUZZ_EXAMPLES, deadline=None,
               suppress_health_check=[HealthCheck.too_slow])
    @given(_v5_packets(), st.data())
    def test_mutated_5_0_packets_raise_only_the_codecs_own_error(self, typed, data):
        raw = bytearray(emqx_lite.encode_packet(typed[0], typed[1], 5))
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        try:
            framed = emqx_lite.split_packet(bytes(raw))
            if framed:
                emqx_lite.decode_packet(framed[0], framed[1], 5, accept=emqx_lite.DECODERS)
        except emqx_lite.MQTTError:
            pass


###############################################################################
# Pure tests: topic matching
###############################################################################

#: (filter, topic, matches): MQTT 3.1.1 section 4.7, plus EMQ X 2.x shared
#: subscriptions ($queue/<filter>, $share/<group>/<filter>: the group's one
#: member gets what <filter> matches). The same rows drive the pure tests below
#: (topic_matches, TopicTree) and the live ones in Test02Subscribe.
MATCH_TABLE = [
    ("a/b", "a/b", True),
    ("a/b", "A/b", False),
    ("a/b", "a/b/", False),
    ("a/b", "a", False),
    ("sport/tennis/player1/#", "sport/tennis/player1", True),          # [MQTT-4.7.1-2]
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),                                         # [MQTT-4.7.1-2]
    ("sport/#", "sports", False),
    ("#", "anything/at/all", True),
    ("#", "/", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+", "finance", True),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    ("+/+/+", "a//b", True),
    ("+/tennis/#", "sport/tennis/player1", True),
    ("+/tennis/#", "sport/tennis", True),
    ("#", "$SYS/monitor/Clients", False),                               # [MQTT-4.7.2-1]
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),               # [MQTT-4.7.2-1]
    ("+/#", "$foo/bar", False),                                         # [MQTT-4.7.2-1]
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$foo/+", "$foo/bar", True),
    ("a/$b/+", "a/$b/c", True),
    ("+/$b", "a/$b", True),
    ("+/#", "a", True),                                                 # [MQTT-4.7.1-2]
    ("a/+/#", "a/b", True),
    ("a/+/#", "a", False),
    ("+/+", "a", False),
    ("a/#", "ab", False),
    ("a/#", "a/$SYS", True),
    ("caf\u00e9/+", "caf\u00e9/x", True),
    ("caf\u00e9/+", "cafe/x", False),
    ("$share/g/sport/+", "sport/tennis", True),
    ("$share/g/sport/+", "sport", False),
    ("$queue/sport/#", "sport", True),                                  # [MQTT-4.7.1-2]
    ("$queue/+/b", "a/b", True),
    ("$share/g/#", "$SYS/monitor/Clients", False),                      # [MQTT-4.7.2-1]
    ("$queue/+/monitor/Clients", "$SYS/monitor/Clients", False),        # [MQTT-4.7.2-1]
    ("$share/g/$SYS/#", "$SYS/monitor/Clients", True),
]

#: parametrize a test over every row of MATCH_TABLE, with ids "filter~topic"
match_table = pytest.mark.parametrize("flt,topic,matches", [
    pytest.param(f, t, m, id="%s~%s" % (f, t)) for f, t, m in MATCH_TABLE])


def shared_group(topic_filter):
    """EMQ X 2.x: '$queue/t' -> ('$queue', 't'), '$share/g/t' -> ('g', 't'),
    a plain filter -> (None, filter)."""
    if topic_filter.startswith("$queue/"):
        return "$queue", topic_filter[len("$queue/"):]
    if topic_filter.startswith("$share/"):
        group, _, real = topic_filter[len("$share/"):].partition("/")
        return group, real
    return None, topic_filter


def subscriber(client_id):
    """What TopicTree stores for a subscriber: anything with a client_id."""
    return types.SimpleNamespace(client_id=client_id)


class TestTopicMatching:

    @match_table
    def test_topic_matches(self, flt, topic, matches):
        """topic_matches(filter, topic) for the filter a subscription routes by
        (a shared subscription's without its prefix): 4.7, the '$' rule
        [MQTT-4.7.2-1], '#' matching the parent level [MQTT-4.7.1-2]."""
        assert emqx_lite.topic_matches(shared_group(flt)[1], topic) is matches

    @match_table
    def test_topic_tree_match(self, flt, topic, matches):
        """A TopicTree holding one subscription finds it for exactly the topics
        the filter matches; once removed it finds nothing."""
        tree = emqx_lite.TopicTree()
        group, real = shared_group(flt)
        tree.add(real, group, subscriber("c"), 1)
        found, shared = tree.match(topic)
        assert [(s.client_id, qos) for s, qos in found.values()] == ([("c", 1)] if matches else [])
        assert shared is (matches and group is not None)
        assert tree.remove(real, group, "c") is True
        assert tree.match(topic) == ({}, False)

    def test_topic_tree_holds_every_filter_of_the_table_at_once(self):
        """All the table's filters in one trie, one subscriber each (named after
        its filter): every row still holds, and removing them all leaves none."""
        tree = emqx_lite.TopicTree()
        filters = sorted({f for f, _, _ in MATCH_TABLE})
        for f in filters:
            group, real = shared_group(f)
            tree.add(real, group, subscriber(f), 0)
        for f, topic, matches in MATCH_TABLE:
            found, _ = tree.match(topic)
            assert (f in {s.client_id for s, _ in found.values()}) is matches, (f, topic)
        for f in filters:
            group, real = shared_group(f)
            tree.remove(real, group, f)
        for _, topic, _ in MATCH_TABLE:
            assert tree.match(topic) == ({}, False)

    def test_topic_tree_one_entry_per_client_at_the_highest_qos(self):
        """[MQTT-3.3.5-1] overlapping subscriptions of one client give one
        delivery, at the maximum QoS of the matching subscriptions."""
        tree = emqx_lite.TopicTree()
        s = subscriber("ov")
        for flt, qos in (("ov/+", 0), ("ov/#", 2), ("ov/x", 1), ("other", 2)):
            tree.add(flt, None, s, qos)
        assert tree.match("ov/x") == ({"ov": (s, 2)}, False)
        assert tree.remove("ov/#", None, "ov") is True
        assert tree.match("ov/x") == ({"ov": (s, 1)}, False)

    def test_topic_tree_shared_group_members_take_turns(self):
        """A shared group delivers each message to one member, round robin;
        a plain subscriber to the same filter gets every message."""
        tree = emqx_lite.TopicTree()
        a, b, plain = subscriber("a"), subscriber("b"), subscriber("plain")
        tree.add("sh/t", "g", a, 1)
        tree.add("sh/t", "g", b, 1)
        tree.add("sh/t", None, plain, 0)
        picks = []
        for _ in range(4):
            found, shared = tree.match("sh/t")
            assert shared is True
            ids = sorted(s.client_id for s, _ in found.values())
            assert "plain" in ids and len(ids) == 2
            picks.append([i for i in ids if i != "plain"][0])
        assert picks[0] != picks[1] and picks[:2] == picks[2:]

###############################################################################
# Pure tests: configuration and ACL parsers
###############################################################################

def settings_of(text, filename="emqx_lite.conf"):
    return config_settings(parse_conf(text, filename), filename)


def config_error(text):
    with pytest.raises(ConfigError) as info:
        settings_of(text)
    return str(info.value)


# --- parse_conf ---------------------------------------------------------------

def test_parse_conf_lines_comments_and_whitespace():
    text = ("## header\n\n   # indented comment\nnode.name = a@b\n"
            "  mqtt.max_packet_size=64KB  \r\nmodule.subscription.1.topic = $client/%c # not a comment\n")
    assert parse_conf(text) == [(4, "node.name", "a@b"), (5, "mqtt.max_packet_size", "64KB"),
                                (6, "module.subscription.1.topic", "$client/%c # not a comment")]


def test_parse_conf_value_may_contain_equals_and_be_empty():
    assert parse_conf("auth.username.bob = a=b\nx =") == [(1, "auth.username.bob", "a=b"), (2, "x", "")]


@pytest.mark.parametrize("line", ["node.name", "= value", "node name = x", "just words here"])
def test_parse_conf_malformed_line(line):
    with pytest.raises(ConfigError, match=r"^emq\.conf:2: expected 'key = value'"):
        parse_conf("node.name = a@b\n" + line, "emq.conf")


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# --- values -------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("20s", 20.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0), ("1w", 604800.0),
    ("500ms", 0.5), ("30", 30.0), ("1.5s", 1.5), ("0", 0.0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize("text", ["", "s", "20 s", "-1s", "1y", "20S", "1.s", "abc"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="expected a duration like 20s"):
        parse_duration(text)


@pytest.mark.parametrize("text, size", [
    ("64KB", 65536), ("1MB", 1048576), ("1GB", 1073741824), ("512B", 512), ("100", 100),
    ("64kb", 65536), ("0", 0)])
def test_parse_bytesize(text, size):
    assert parse_bytesize(text) == size


@pytest.mark.parametrize("text", ["", "KB", "1.5MB", "1TB", "-1", "64 KB"])
def test_parse_bytesize_rejects(text):
    with pytest.raises(ValueError, match="expected a size like 64KB"):
        parse_bytesize(text)


@pytest.mark.parametrize("text, value", [("on", True), ("true", True), ("TRUE", True),
                                         ("off", False), ("false", False), ("Off", False)])
def test_parse_bool(text, value):
    assert parse_bool(text) is value


@pytest.mark.parametrize("text", ["yes", "1", "", "enabled"])
def test_parse_bool_rejects(text):
    with pytest.raises(ValueError):
        parse_bool(text)


def test_parse_int():
    assert parse_int("1024") == 1024
    for bad in ("", "-1", "1.0", "1e3", "\u0661"):   # \u0661: ARABIC-INDIC DIGIT ONE
        with pytest.raises(ValueError, match="expected an integer"):
            parse_int(bad)


@pytest.mark.parametrize("text, address", [
    ("0.0.0.0:1883", ("0.0.0.0", 1883)), ("1883", ("0.0.0.0", 1883)),
    ("127.0.0.1:11883", ("127.0.0.1", 11883)), ("[::1]:1883", ("::1", 1883)),
    ("::1:1883", ("::1", 1883)), ("localhost:8080", ("localhost", 8080)), ("0", ("0.0.0.0", 0))])
def test_parse_address(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["", "abc", "1.2.3.4", "1.2.3.4:", ":1883", "1.2.3.4:70000",
                                  "999.0.0.1:1883", "[::1]1883", "[::1]:", "bad host:1883"])
def test_parse_address_rejects(text):
    with pytest.raises(ValueError, match="expected an address like 0.0.0.0:1883"):
        parse_address(text)


# --- config_settings ----------------------------------------------------------

SIMPLE_CASES = [
    ("node.name", "emqx@10.0.0.1", "node", "emqx@10.0.0.1"),
    ("node.data_dir", "/var/lib/emqx_lite", "data_dir", "/var/lib/emqx_lite"),
    ("node.data_sync", "full", "data_sync", "full"),
    ("mqtt.journal", "500", "journal", 500),
    ("mqtt.allow_anonymous", "false", "allow_anonymous", False),
    ("mqtt.acl_nomatch", "deny", "acl_nomatch", "deny"),
    ("mqtt.acl_file", "etc/acl.conf", "acl_file", "etc/acl.conf"),
    ("mqtt.max_clientid_len", "512", "max_clientid_len", 512),
    ("mqtt.max_packet_size", "64KB", "max_packet_size", 65536),
    ("mqtt.keepalive_backoff", "0.75", "keepalive_backoff", 1.5),
    ("mqtt.client.idle_timeout", "30s", "connect_timeout", 30.0),
    ("mqtt.session.max_inflight", "16", "max_inflight", 16),
    ("mqtt.session.retry_interval", "20s", "retry_interval", 20.0),
    ("mqtt.session.max_awaiting_rel", "100", "max_awaiting_rel", 100),
    ("mqtt.session.await_rel_timeout", "1m", "await_rel_timeout", 60.0),
    ("mqtt.session.expiry_interval", "2h", "session_expiry_interval", 7200.0),
    ("mqtt.mqueue.max_length", "0", "max_mqueue_len", 0),
    ("mqtt.mqueue.store_qos0", "off", "mqueue_store_qos0", False),
    ("mqtt.broker.sys_interval", "60", "sys_interval", 60.0),
    ("mqtt.max_topic_length", "100", "max_topic_length", 100),
    ("mqtt.max_topic_levels", "8", "max_topic_levels", 8),
    ("mqtt.max_subscriptions", "10", "max_subscriptions", 10),
    ("mqtt.max_keepalive", "300", "max_keepalive", 300),
    ("mqtt.client.max_outbuf", "64KB", "max_outbuf", 65536),
    ("mqtt.client.send_timeout", "5s", "send_timeout", 5.0),
    ("mqtt.max_topic_alias", "16", "max_topic_alias", 16),
    ("mqtt.topic_alias_out", "off", "topic_alias_out", False),
    ("listener.api.mgmt.max_clients", "2048", "api_max_clients", 2048),
    ("listener.api.mgmt.idle_timeout", "10s", "api_idle_timeout", 10.0),
    ("listener.api.mgmt.cors_origins", "https://Ops.example.com, http://[::1]:3000",
     "api_cors_origins", ("https://ops.example.com", "http://[::1]:3000")),
    ("listener.api.mgmt.max_auth_failures", "5", "api_max_auth_failures", 5),
    ("listener.api.mgmt.auth_failure_window", "5m", "api_auth_failure_window", 300.0),
    ("listener.api.mgmt.certfile", "etc/certs/api.pem", "api_certfile", "etc/certs/api.pem"),
    ("listener.api.mgmt.keyfile", "etc/certs/api.key", "api_keyfile", "etc/certs/api.key"),
    ("listener.api.mgmt.cacertfile", "etc/certs/ca.pem", "api_cacertfile", "etc/certs/ca.pem"),
    ("listener.api.mgmt.verify", "verify_peer", "api_verify", "verify_peer"),
    ("listener.api.mgmt.fail_if_no_peer_cert", "true", "api_fail_if_no_peer_cert", True),
    ("dashboard.password_iterations", "900000", "api_password_iterations", 900000),
    ("prometheus.auth", "off", "prometheus_auth", False),
    ("retainer.max_message_num", "10", "retainer_max_messages", 10),
    ("retainer.max_payload_size", "64KB", "retainer_max_payload_size", 65536),
    ("retainer.expiry_interval", "1h", "retainer_expiry_interval", 3600.0),
]


def test_simple_cases_cover_every_setting_key():
    assert sorted(key for key, _, _, _ in SIMPLE_CASES) == sorted(SETTING_KEYS)


@pytest.mark.parametrize("key, text, name, value", SIMPLE_CASES)
def test_simple_key(key, text, name, value):
    assert settings_of("%s = %s" % (key, text)) == {name: value}


def test_only_set_keys_are_returned_and_later_lines_win():
    assert settings_of("") == {}
    assert settings_of("node.name = a@h\nnode.name = b@h") == {"node": "b@h"}


def test_error_names_file_line_and_key():
    msg = config_error("node.name = a@b\n\nmqtt.max_packet_size = abc\n")
    assert msg == "emqx_lite.conf:3: mqtt.max_packet_size: expected a size like 64KB, got 'abc'"


@pytest.mark.parametrize("line, fragment", [
    ("mqtt.unknown = 1", "mqtt.unknown: unknown key"),
    ("mqtt.acl_nomatch = maybe", "expected allow or deny, got 'maybe'"),
    ("mqtt.keepalive_backoff = 0.4", "expected a number >= 0.5"),
    ("mqtt.session.max_inflight = -1", "expected an integer"),
    ("mqtt.session.retry_interval = soon", "expected a duration like 20s"),
    ("mqtt.allow_anonymous = yes", "expected on, off, true or false"),
    ("node.name =", "node.name: expected a value"),
    ("mqtt.max_packet_size = 64KB # comment", "got '64KB # comment'"),
])
def test_bad_values(line, fragment):
    msg = config_error(line)
    assert msg.startswith("emqx_lite.conf:1: ") and fragment in msg


def test_auth_tables():
    s = settings_of("auth.username.admin = public\nauth.username.john.doe = pw=1\n"
                    "auth.client.dev-1 = secret\n"
                    "auth.client.1.clientid = dev:2\nauth.client.1.password = pw2\n")
    assert s == {"auth_username": {"admin": "public", "john.doe": "pw=1"},
                 "auth_clientid": {"dev-1": "secret", "dev:2": "pw2"}}


def test_auth_errors():
    assert "auth.username.: unknown key" in config_error("auth.username. = x")
    assert "expected a value" in config_error("auth.username.bob =")
    msg = config_error("auth.client.3.clientid = c")
    assert msg == "emqx_lite.conf:1: auth.client.3.clientid: auth.client.3 needs .clientid and .password"


def test_dashboard_default_user():
    assert settings_of("dashboard.default_user.login = root\ndashboard.default_user.password = pw") \
        == {"users": {"root": "pw"}}
    assert settings_of("dashboard.default_user.password = pw") == {"users": {"admin": "pw"}}
    assert settings_of("dashboard.default_user.login = root") == {"users": {"root": "public"}}


def test_module_subscription_sorted_by_number():
    s = settings_of("module.subscription.10.topic = c\nmodule.subscription.2.qos = 2\n"
                    "module.subscription.2.topic = $user/%u\nmodule.subscription.1.topic = $client/%c\n"
                    "module.subscription.1.qos = 0\n")
    assert s == {"module_subscription": [("$client/%c", 0), ("$user/%u", 2), ("c", 1)]}


def test_module_subscription_errors():
    assert "expected 0, 1 or 2, got '3'" in config_error(
        "module.subscription.1.topic = t\nmodule.subscription.1.qos = 3")
    msg = config_error("module.subscription.1.topic = t\nmodule.subscription.2.qos = 1")
    assert msg == "emqx_lite.conf:2: module.subscription.2.qos: module.subscription.2 has no .topic"
    assert "unknown key" in config_error("module.subscription.x.topic = t")


def test_module_rewrite():
    s = settings_of('module.rewrite.rule.2 = y/+/z/# ^y/(.+)/z/(.+)$ y/z/$2\n'
                    'module.rewrite.rule.1 = "x/# ^x/y/(.+)$ z/y/$1"\n')
    assert s == {"module_rewrite": [("x/#", "^x/y/(.+)$", "z/y/$1"),
                                    ("y/+/z/#", "^y/(.+)/z/(.+)$", "y/z/$2")]}


def test_module_rewrite_errors():
    assert "expected '<filter> <regex> <destination>'" in config_error("module.rewrite.rule.1 = x/# ^x")
    assert "bad regex '^x/(('" in config_error("module.rewrite.rule.1 = x/# ^x/(( y")


def test_listeners():
    s = settings_of("""
listener.tcp.external = 0.0.0.0:1883
listener.tcp.external.acceptors = 16
listener.tcp.external.max_clients = 1024
listener.tcp.internal = 127.0.0.1:11883
listener.ssl.external.keyfile = etc/certs/key.pem
listener.ssl.external = 8883
listener.ssl.external.certfile = etc/certs/cert.pem
listener.ssl.external.cacertfile = etc/certs/cacert.pem
listener.ssl.external.verify = verify_peer
listener.ssl.external.fail_if_no_peer_cert = true
listener.ssl.external.peer_cert_as_username = cn
listener.ws.external = 8083
listener.wss.external = [::]:8084
listener.wss.external.mqtt_path = /ws
listener.api.mgmt = 127.0.0.1:8080
""")
    base = dict(LISTENER_DEFAULTS)
    assert base == {"acceptors": 1, "max_clients": 102400, "keyfile": None, "certfile": None,
                    "cacertfile": None, "verify": None, "fail_if_no_peer_cert": None,
                    "peer_cert_as_username": None, "mqtt_path": None}
    assert s["http_bind"] == "127.0.0.1" and s["http_port"] == 8080
    assert s["listeners"] == [
        dict(base, type="tcp", name="external", host="0.0.0.0", port=1883, acceptors=16, max_clients=1024),
        dict(base, type="tcp", name="internal", host="127.0.0.1", port=11883),
        dict(base, type="ssl", name="external", host="0.0.0.0", port=8883, keyfile="etc/certs/key.pem",
             certfile="etc/certs/cert.pem", cacertfile="etc/certs/cacert.pem", verify="verify_peer",
             fail_if_no_peer_cert=True, peer_cert_as_username="cn"),
        dict(base, type="ws", name="external", host="0.0.0.0", port=8083, mqtt_path="/mqtt"),
        dict(base, type="wss", name="external", host="::", port=8084, mqtt_path="/ws"),
    ]


@pytest.mark.parametrize("text, message", [
    ("listener.tcp.x = 1883\nlistener.tcp.y.acceptors = 4",
     "emqx_lite.conf:2: listener.tcp.y.acceptors: listener.tcp.y has no address line"),
    ("listener.tcp.x = 1883\nlistener.tcp.x.keyfile = k.pem",
     "emqx_lite.conf:2: listener.tcp.x.keyfile: not an option of tcp listeners"),
    ("listener.ssl.x = 8883\nlistener.ssl.x.mqtt_path = /mqtt",
     "emqx_lite.conf:2: listener.ssl.x.mqtt_path: not an option of ssl listeners"),
    ("listener.tcp.x = 1883\nlistener.tcp.x.access.1 = allow all",
     "emqx_lite.conf:2: listener.tcp.x.access.1: unknown listener option 'access.1'"),
    ("listener.ssl.x = 8883\nlistener.ssl.x.verify = sometimes",
     "emqx_lite.conf:2: listener.ssl.x.verify: expected verify_peer or verify_none, got 'sometimes'"),
    ("listener.ws.x = 8083\nlistener.ws.x.mqtt_path = mqtt",
     "emqx_lite.conf:2: listener.ws.x.mqtt_path: expected a path like /mqtt, got 'mqtt'"),
    ("listener.tcp.x = 0.0.0.0", "emqx_lite.conf:1: listener.tcp.x: expected an address like"),
    ("listener.udp.x = 1883", "emqx_lite.conf:1: listener.udp.x: unknown key"),
    ("listener.api.mgmt = nope", "emqx_lite.conf:1: listener.api.mgmt: expected an address like"),
])
def test_listener_errors(text, message):
    assert config_error(text).startswith(message)


def test_readme_configuration_example_is_valid():
    readme = open(os.path.join(os.path.dirname(emqx_lite.__file__), "README.md")).read()
    start = readme.index("```\nnode.name = ")
    block = readme[start + 4:readme.index("```", start + 4)]
    settings = emqx_lite.config_settings(emqx_lite.parse_conf(block, "README"), "README")
    assert {l["type"] for l in settings["listeners"]} == {"tcp", "ssl", "ws", "wss"}
    assert settings["max_packet_size"] == 64 * 1024


# --- environment --------------------------------------------------------------

def test_env_overrides_rule():
    environ = {"EMQX_LITE_MQTT__MAX_PACKET_SIZE": "64KB", "PATH": "/bin",
               "EMQX_LITE_LISTENER__TCP__EXTERNAL": "0.0.0.0:1884",
               "EMQX_LITE_MQTT__SESSION__MAX_INFLIGHT": "8"}
    assert env_overrides(environ) == [
        ("$EMQX_LITE_LISTENER__TCP__EXTERNAL", "listener.tcp.external", "0.0.0.0:1884"),
        ("$EMQX_LITE_MQTT__MAX_PACKET_SIZE", "mqtt.max_packet_size", "64KB"),
        ("$EMQX_LITE_MQTT__SESSION__MAX_INFLIGHT", "mqtt.session.max_inflight", "8")]


def test_env_overrides_win_over_the_file_and_can_complete_a_listener():
    entries = parse_conf("mqtt.max_packet_size = 1MB\nlistener.tcp.external = 1883\n", "emq.conf")
    entries += env_overrides({"EMQX_LITE_MQTT__MAX_PACKET_SIZE": "64KB",
                              "EMQX_LITE_LISTENER__TCP__EXTERNAL__ACCEPTORS": "4"})
    s = config_settings(entries, "emq.conf")
    assert s["max_packet_size"] == 65536
    assert s["listeners"][0]["acceptors"] == 4 and s["listeners"][0]["port"] == 1883


def test_env_errors_name_the_variable():
    entries = env_overrides({"EMQX_LITE_MQTT__MAX_PACKET_SIZE": "huge"})
    with pytest.raises(ConfigError) as info:
        config_settings(entries, "emq.conf")
    assert str(info.value) == ("$EMQX_LITE_MQTT__MAX_PACKET_SIZE: mqtt.max_packet_size: "
                               "expected a size like 64KB, got 'huge'")
    for bad in ("EMQX_LITE_", "EMQX_LITE_MQTT____X", "EMQX_LITE_MQTT__"):
        with pytest.raises(ConfigError, match=r"^\$%s: expected" % bad):
            env_overrides({bad: "1"})


# --- render_config ------------------------------------------------------------

FULL_CONF = """
node.name = emqx@10.0.0.1
node.data_dir = /var/lib/emqx_lite
node.data_sync = full
mqtt.journal = 500
mqtt.allow_anonymous = false
mqtt.acl_nomatch = deny
mqtt.acl_file = /etc/emqx/acl.conf
mqtt.max_clientid_len = 512
mqtt.max_packet_size = 1000
mqtt.keepalive_backoff = 0.8
mqtt.client.idle_timeout = 1500ms
mqtt.session.max_inflight = 16
mqtt.session.retry_interval = 90s
mqtt.session.max_awaiting_rel = 7
mqtt.session.await_rel_timeout = 1.1s
mqtt.session.expiry_interval = 1w
mqtt.mqueue.max_length = 0
mqtt.mqueue.store_qos0 = off
mqtt.broker.sys_interval = 0
mqtt.max_topic_length = 100
mqtt.max_topic_levels = 8
mqtt.max_subscriptions = 10
mqtt.max_keepalive = 300
mqtt.client.max_outbuf = 1KB
mqtt.client.send_timeout = 2s
mqtt.max_topic_alias = 8
mqtt.topic_alias_out = off
auth.username.john.doe = pw=1
auth.client.1.clientid = 7.password
auth.client.1.password = x
auth.client.dev = y
dashboard.default_user.login = root
dashboard.default_user.password = secret
module.subscription.1.topic = $client/%c
module.subscription.1.qos = 2
module.rewrite.rule.1 = x/# ^x/y/(.+)$ z/y/$1
listener.api.mgmt = [::1]:8080
listener.api.mgmt.max_clients = 100
listener.api.mgmt.idle_timeout = 30s
listener.api.mgmt.cors_origins = https://a.example, http://b.example:8080
listener.api.mgmt.max_auth_failures = 3
listener.api.mgmt.auth_failure_window = 2m
listener.api.mgmt.certfile = api.pem
listener.api.mgmt.keyfile = api.key
listener.api.mgmt.cacertfile = ca.pem
listener.api.mgmt.verify = verify_none
listener.api.mgmt.fail_if_no_peer_cert = false
dashboard.password_iterations = 700000
dashboard.listener.http = 127.0.0.1:18084
prometheus.auth = off
retainer.max_message_num = 100
retainer.max_payload_size = 1KB
retainer.expiry_interval = 10m
listener.tcp.external = 1883
listener.ssl.external = 127.0.0.1:8883
listener.ssl.external.certfile = cert.pem
listener.ssl.external.fail_if_no_peer_cert = false
listener.wss.external = ::1:8084
listener.wss.external.max_clients = 64
"""


def test_render_round_trip():
    settings = settings_of(FULL_CONF)
    assert len(settings) == len(SETTING_KEYS) + 10
    text = render_config(settings)
    assert config_settings(parse_conf(text)) == settings


def test_render_format():
    text = render_config({"node": "n@h", "max_packet_size": 65536, "session_expiry_interval": 7200.0,
                          "retry_interval": 0.5, "keepalive_backoff": 1.5, "allow_anonymous": True,
                          "acl_file": None, "acceptors": 4, "module_rewrite": [("a/#", "^a/(.+)$", "b/$1")]})
    lines = text.splitlines()
    assert lines[0].startswith("## ")
    for line in ("node.name = n@h", "mqtt.max_packet_size = 64KB", "mqtt.session.expiry_interval = 2h",
                 "mqtt.session.retry_interval = 0.5s", "mqtt.keepalive_backoff = 0.75",
                 "mqtt.allow_anonymous = true", "## mqtt.acl_file is not set",
                 'module.rewrite.rule.1 = "a/# ^a/(.+)$ b/$1"', "##   acceptors = 4"):
        assert line in lines
    assert config_settings(parse_conf(text)) == {
        "node": "n@h", "max_packet_size": 65536, "session_expiry_interval": 7200.0,
        "retry_interval": 0.5, "keepalive_backoff": 1.5, "allow_anonymous": True,
        "module_rewrite": [("a/#", "^a/(.+)$", "b/$1")]}


def test_render_defaults_like_dict():
    defaults = {"node": "emqx_lite@127.0.0.1", "max_packet_size": 1024 * 1024, "max_clientid_len": 1024,
                "connect_timeout": 15.0, "keepalive_backoff": 1.5, "max_inflight": 32,
                "retry_interval": 20.0, "max_awaiting_rel": 100, "await_rel_timeout": 20.0,
                "max_mqueue_len": 1000, "mqueue_store_qos0": True, "session_expiry_interval": 7200.0,
                "max_outbuf": 1024 * 1024, "send_timeout": 15.0, "sys_interval": 60.0,
                "max_clients": 102400, "acceptors": 1, "allow_anonymous": True, "auth_username": {},
                "auth_clientid": {}, "module_subscription": (), "module_rewrite": ()}
    back = config_settings(parse_conf(render_config(defaults)))
    assert back == {k: v for k, v in defaults.items()
                    if k not in ("max_clients", "acceptors",
                                 "auth_username", "auth_clientid", "module_subscription",
                                 "module_rewrite")}


def test_render_several_users_is_a_comment():
    text = render_config({"users": {"a": "1", "b": "2"}})
    assert config_settings(parse_conf(text)) == {}


# --- ACL parsing --------------------------------------------------------------

def test_parse_default_acl():
    assert parse_acl(DEFAULT_ACL) == [
        ("allow", ("user", "dashboard"), "subscribe", [("filter", "$SYS/#")]),
        ("allow", ("ipaddr", ipaddress.ip_network("127.0.0.1/32")), "pubsub",
         [("filter", "$SYS/#"), ("filter", "#")]),
        ("deny", ("all",), "subscribe", [("filter", "$SYS/#"), ("eq", "#")]),
        ("allow", ("all",), "pubsub", None),
    ]


def test_parse_acl_forms_whitespace_and_comments():
    text = ('%% comment\n{deny,\n  {client, "c1"} ,publish,[ "a/#" ] } . % trailing\n'
            "{allow, {'and', [{user, \"u\"}, {ipaddr, \"10.0.0.0/8\"}]}, pubsub, []}.\n"
            '{allow, {or, [{user, all}, {client, "x"}]}, subscribe, ["q\\"\\\\\\n"]}.\n'
            "{'deny', all}.")
    assert parse_acl(text) == [
        ("deny", ("client", "c1"), "publish", [("filter", "a/#")]),
        ("allow", ("and", [("user", "u"), ("ipaddr", ipaddress.ip_network("10.0.0.0/8"))]), "pubsub", []),
        ("allow", ("or", [("all",), ("client", "x")]), "subscribe", [("filter", 'q"\\\n')]),
        ("deny", ("all",), "pubsub", None),
    ]


def test_parse_acl_empty():
    assert parse_acl("") == [] and parse_acl("% nothing\n\n") == []


@pytest.mark.parametrize("text, message", [
    ('{allow, all}.\n{allow, all}', "acl.conf:2: expected ., got end of file"),
    ('{allow, all}.\n\n{allow, all', "acl.conf:3: expected , or }, got end of file"),
    ('{allow,\n "unterminated}.', "acl.conf:2: unterminated quote"),
    ('{allow, All}.', "acl.conf:1: unexpected 'A'"),
    ('{allow, 1}.', "acl.conf:1: unexpected '1'"),
    ('\n{allow, all}\n{deny, all}.', "acl.conf:3: expected ., got '{'"),
    ('{allow, , all}.', "acl.conf:1: expected atom or string or { or [, got ','"),
    ('\n\n{permit, all}.', "acl.conf:3: expected {allow|deny, all} or {allow|deny, Who, Action, Topics}"),
    ('{allow, "all"}.', "acl.conf:1: expected {allow, all}"),
    ('{allow, all, pubsub}.', "acl.conf:1: expected {allow|deny, all}"),
    ('{"allow", all}.', "acl.conf:1: expected {allow|deny, all}"),
    ('{allow, {user, "u"}, write, ["#"]}.', "acl.conf:1: expected publish, subscribe or pubsub"),
    ('{allow, {user, "u"}, publish, "#"}.', "acl.conf:1: expected a list of topics"),
    ('{allow, {user, "u"}, publish, [{eq, x}]}.', "acl.conf:1: expected a topic string or {eq, Topic}"),
    ('{allow, {user, "u"}, publish, [t]}.', "acl.conf:1: expected a topic string"),
    ('{allow, {user, u}, publish, ["#"]}.', "acl.conf:1: expected all, {user, U}"),
    ('{allow, {group, "g"}, publish, ["#"]}.', "acl.conf:1: expected all, {user, U}"),
    ('{allow, {ipaddr, "10.0.0.300"}, publish, ["#"]}.', "acl.conf:1: bad address '10.0.0.300'"),
])
def test_parse_acl_errors(text, message):
    with pytest.raises(ConfigError) as info:
        parse_acl(text, "acl.conf")
    assert str(info.value).startswith(message)


# --- ACL checks ---------------------------------------------------------------

def acl(text, nomatch="allow"):
    return Acl(parse_acl(text), nomatch)


def test_default_acl():
    a = acl(DEFAULT_ACL)
    # dashboard user may subscribe to $SYS from anywhere
    assert a.check("subscribe", "$SYS/brokers/+/uptime", "c", "dashboard", "10.1.1.1")
    # others may not, except from 127.0.0.1
    assert not a.check("subscribe", "$SYS/#", "c", "bob", "10.1.1.1")
    assert a.check("subscribe", "$SYS/#", "c", "bob", "127.0.0.1")
    # exactly "#" is denied, other wildcards are not
    assert not a.check("subscribe", "#", "c", None, "10.1.1.1")
    assert a.check("subscribe", "a/#", "c", None, "10.1.1.1")
    assert a.check("subscribe", "+/b", "c", None, "10.1.1.1")
    assert a.check("subscribe", "#", "c", None, "127.0.0.1")
    # publishing anything is allowed ({allow, all})
    assert a.check("publish", "$SYS/x", "c", None, "10.1.1.1")


def test_user_and_client_rules():
    a = acl('{allow, {user, "u"}, publish, ["a"]}.\n{allow, {client, "c"}, publish, ["b"]}.\n'
            '{deny, all}.')
    assert a.check("publish", "a", "x", "u", None)
    assert not a.check("publish", "a", "u", None, None)       # client id is not a username
    assert a.check("publish", "b", "c", None, None)
    assert not a.check("publish", "b", "x", "c", None)


def test_user_all_and_client_all_match_everyone():
    a = acl('{deny, {user, all}, publish, ["a"]}.\n{deny, {client, all}, publish, ["b"]}.')
    assert not a.check("publish", "a", "c", None, None)
    assert not a.check("publish", "b", "c", "u", None)
    assert a.check("publish", "z", "c", "u", None)


def test_ipaddr_and_cidr():
    a = acl('{deny, {ipaddr, "192.168.0.0/24"}, pubsub, ["#"]}.\n'
            '{deny, {ipaddr, "2001:db8::/32"}, pubsub, ["#"]}.', "allow")
    assert not a.check("publish", "t", "c", None, "192.168.0.77")
    assert not a.check("publish", "t", "c", None, "::ffff:192.168.0.1")   # IPv4-mapped
    assert a.check("publish", "t", "c", None, "192.168.1.1")
    assert not a.check("publish", "t", "c", None, "2001:db8::1")
    assert a.check("publish", "t", "c", None, "2001:db9::1")
    assert a.check("publish", "t", "c", None, None)               # unknown peer never matches
    assert a.check("publish", "t", "c", None, "not an ip")


def test_ipaddr_single_address_is_a_host():
    a = acl('{deny, {ipaddr, "127.0.0.1"}, publish, ["#"]}.')
    assert not a.check("publish", "t", "c", None, "127.0.0.1")
    assert a.check("publish", "t", "c", None, "127.0.0.2")


def test_and_or():
    a = acl('{allow, {and, [{user, "u"}, {ipaddr, "10.0.0.0/8"}]}, publish, ["and"]}.\n'
            '{allow, {or, [{user, "u"}, {client, "c"}]}, publish, ["or"]}.\n{deny, all}.')
    assert a.check("publish", "and", "x", "u", "10.2.3.4")
    assert not a.check("publish", "and", "x", "u", "11.2.3.4")
    assert a.check("publish", "or", "c", None, None)
    assert a.check("publish", "or", "x", "u", None)
    assert not a.check("publish", "or", "x", "v", None)


def test_actions():
    a = acl('{deny, all, publish, ["p"]}.\n{deny, all, subscribe, ["s"]}.\n{deny, all, pubsub, ["ps"]}.')
    assert not a.check("publish", "p", "c", None, None) and a.check("subscribe", "p", "c", None, None)
    assert not a.check("subscribe", "s", "c", None, None) and a.check("publish", "s", "c", None, None)
    assert not a.check("publish", "ps", "c", None, None)
    assert not a.check("subscribe", "ps", "c", None, None)
    with pytest.raises(ValueError):
        a.check("pubsub", "p", "c", None, None)


def test_publish_topic_matching():
    a = acl('{allow, all, publish, ["a/+/c", "d/#", "+/x"]}.', "deny")
    assert a.check("publish", "a/b/c", "c", None, None)
    assert not a.check("publish", "a/b/c/d", "c", None, None)
    assert a.check("publish", "d", "c", None, None)               # "d/#" matches its parent
    assert a.check("publish", "d/e/f", "c", None, None)
    assert a.check("publish", "q/x", "c", None, None)
    assert not a.check("publish", "$q/x", "c", None, None)       # first-level wildcard vs $-topic


def test_subscribe_treats_the_filter_as_a_name():
    a = acl('{allow, all, subscribe, ["#", "a/b"]}.', "deny")
    assert a.check("subscribe", "a/+", "c", None, None)          # "#" matches the string "a/+"
    assert not a.check("subscribe", "$SYS/#", "c", None, None)
    b = acl('{allow, all, subscribe, ["a/b", "x/+"]}.', "deny")
    assert not b.check("subscribe", "a/+", "c", None, None)      # "a/b" does not cover "a/+"
    assert b.check("subscribe", "x/#", "c", None, None)          # "+" matches the level "#"


def test_eq_is_exact():
    a = acl('{deny, all, pubsub, [{eq, "a/#"}, {eq, "t/%u"}]}.')
    assert not a.check("subscribe", "a/#", "c", None, None)
    assert a.check("subscribe", "a/b", "c", None, None)
    assert a.check("subscribe", "a/+", "c", None, None)
    assert not a.check("publish", "t/%u", "c", "bob", None)       # no placeholder in eq
    assert a.check("publish", "t/bob", "c", "bob", None)


def test_placeholders():
    a = acl('{allow, all, pubsub, ["users/%u/#", "clients/%c", "x/%c/%u"]}.', "deny")
    assert a.check("publish", "users/bob/inbox", "c1", "bob", None)
    assert not a.check("publish", "users/alice/inbox", "c1", "bob", None)
    assert not a.check("publish", "users/%u/inbox", "c1", None, None)   # no username: never
    assert a.check("subscribe", "clients/c1", "c1", None, None)
    assert not a.check("subscribe", "clients/c2", "c1", None, None)
    assert a.check("publish", "x/c1/bob", "c1", "bob", None)
    assert not a.check("publish", "x/c1/bob", "c1", None, None)


def test_placeholder_value_is_one_literal_level():
    a = acl('{allow, all, subscribe, ["users/%u/#"]}.', "deny")
    assert not a.check("subscribe", "users/bob/x", "c", "#", None)      # username "#" is no wildcard
    assert not a.check("subscribe", "users/a/b/x", "c", "a/b", None)
    assert not a.check("subscribe", "users/x/y", "c", "+", None)


def test_first_match_wins():
    text = '{deny, {user, "u"}, publish, ["t"]}.\n{allow, {user, "u"}, publish, ["t"]}.'
    assert not acl(text).check("publish", "t", "c", "u", None)
    swapped = "\n".join(reversed(text.splitlines()))
    assert acl(swapped, "deny").check("publish", "t", "c", "u", None)


def test_nomatch():
    assert acl("").check("publish", "t", "c", None, None)
    assert not acl("", "deny").check("publish", "t", "c", None, None)
    assert not acl('{allow, all, publish, ["other"]}.', "deny").check("publish", "t", "c", None, None)
    with pytest.raises(ValueError):
        Acl([], "ignore")


###############################################################################
# 01 CONNECT
###############################################################################

class Test01Connect:

    @both
    def test_connack_accepted_bytes(self, raw, proto):
        r = raw()
        r.send(gen_connect("c1", proto=proto))
        assert r.read_packet() == (CONNACK, 0, b"\x00\x00")

    @both
    def test_paho_connects_and_is_listed(self, client, broker, proto):
        c = client(client_id="paho1", proto=proto, keepalive=30)
        assert c.session_present is False
        infos = wait_until(lambda: broker.clients())
        assert [i["client_id"] for i in infos] == ["paho1"]
        info = infos[0]
        assert info["proto_ver"] == proto
        assert info["username"] is None
        assert info["ipaddress"] == HOST
        assert info["keepalive"] == 30
        assert info["clean_sess"] is True
        assert isinstance(info["port"], int) and info["port"] > 0
        assert abs(info["connected_at"] - time.time()) < 60

    def test_username_is_reported(self, raw, broker):
        r = raw()
        assert r.connect("user1", username="alice", password=b"pw") == (0, 0)
        assert [c["username"] for c in broker.clients()] == ["alice"]

    @both
    def test_first_packet_must_be_connect(self, raw, proto):
        """[MQTT-3.1.0-1] a packet before CONNECT closes the connection."""
        r = raw()
        r.send(gen_pingreq())
        assert r.expect_closed()

    def test_first_packet_publish_is_not_routed(self, raw, client):
        """[MQTT-3.1.0-1] a PUBLISH before CONNECT is not processed."""
        sub = client(client_id="watch")
        sub.subscribe("early", 0)
        r = raw()
        r.send(gen_publish("early", b"x"))
        assert r.expect_closed()
        sub.expect_nothing(0.2)

    @both
    def test_second_connect_is_protocol_violation(self, raw, broker, proto):
        """[MQTT-3.1.0-2] a second CONNECT closes the connection."""
        r = raw()
        assert r.connect("twice", proto=proto) == (0, 0)
        r.send(gen_connect("twice", proto=proto))
        assert r.expect_closed()
        assert wait_until(lambda: not broker.clients())

    def test_bad_protocol_name(self, raw):
        """[MQTT-3.1.2-1] an unknown protocol name: the server MAY disconnect
        without CONNACK."""
        r = raw()
        r.send(gen_connect("bad", proto=4, proto_name="MQTX"))
        assert r.expect_closed()

    @pytest.mark.parametrize("level", [0, 1, 2, 6, 255])
    def test_unsupported_level_gets_connack_1(self, raw, broker, level):
        """[MQTT-3.1.2-2] an unsupported protocol level gets CONNACK 0x01 and
        the connection is closed."""
        r = raw()
        r.send(gen_connect("lvl", proto=level, proto_name="MQTT"))
        assert r.read_packet() == (CONNACK, 0, b"\x00\x01")
        assert r.expect_closed()
        assert broker.clients() == []

    @both
    def test_reserved_flag_must_be_zero(self, raw, proto):
        """[MQTT-3.1.2-3] the reserved CONNECT flag must be 0."""
        r = raw()
        r.send(gen_connect("rsv", proto=proto, extra_flags=0x01))
        assert r.expect_closed()

    @both
    @pytest.mark.parametrize("flags", [0x08, 0x10, 0x18], ids=["q1", "q2", "q3"])
    def test_will_qos_without_will_flag(self, raw, proto, flags):
        """[MQTT-3.1.2-13] will flag 0 requires will QoS 0."""
        r = raw()
        r.send(gen_connect("wq", proto=proto, extra_flags=flags))
        assert r.expect_closed()

    @both
    def test_will_qos_3_is_invalid(self, raw, proto):
        """[MQTT-3.1.2-14] will QoS 3 is a protocol violation."""
        r = raw()
        r.send(gen_connect("wq3", proto=proto, will=("w", b"x", 3, False)))
        assert r.expect_closed()

    @both
    def test_will_retain_without_will_flag(self, raw, proto):
        """[MQTT-3.1.2-15] will flag 0 requires will retain 0."""
        r = raw()
        r.send(gen_connect("wr", proto=proto, extra_flags=0x20))
        assert r.expect_closed()

    def test_password_without_username(self, raw):
        """[MQTT-3.1.2-22] the password flag requires the username flag."""
        r = raw()
        body = (enc_str("MQTT") + bytes((4, 0x42)) + (60).to_bytes(2, "big")
                + enc_str("pw") + enc_bytes(b"secret"))
        r.send(packet(0x10, body))
        assert r.expect_closed()

    def test_empty_client_id_gets_assigned_id(self, raw, broker):
        """[MQTT-3.1.3-6] a zero-length client id with clean session 1 is
        accepted and the server assigns a unique id."""
        r1, r2 = raw(), raw()
        assert r1.connect("", clean=True) == (0, 0)
        assert r2.connect("", clean=True) == (0, 0)
        ids = [c["client_id"] for c in wait_until(lambda: len(broker.clients()) == 2 and broker.clients())]
        assert len(set(ids)) == 2 and all(ids)

    def test_empty_client_id_paho(self, client, broker):
        """[MQTT-3.1.3-6] paho with client_id='' gets an assigned id."""
        c = client(client_id="")
        c.subscribe("anon", 0)
        broker.publish("anon", b"hi")
        assert c.get().payload == b"hi"

    def test_empty_client_id_persistent_rejected(self, raw, broker):
        """[MQTT-3.1.3-8] zero-length client id with clean session 0 gets
        CONNACK 0x02 and the connection is closed."""
        r = raw()
        r.send(gen_connect("", clean=False))
        assert r.read_packet() == (CONNACK, 0, b"\x00\x02")
        assert r.expect_closed()
        assert broker.sessions() == []

    def test_empty_client_id_mqtt31_rejected(self, raw):
        """MQTT 3.1 requires a 1-23 character client id: 0x02 (identifier rejected)."""
        r = raw()
        r.send(gen_connect("", proto=3, clean=True))
        assert r.read_packet() == (CONNACK, 0, b"\x00\x02")
        assert r.expect_closed()

    def test_long_client_id_accepted(self, raw, broker):
        """3.1.1: the server MAY allow client ids longer than 23 characters."""
        cid = "x" * 200
        r = raw()
        assert r.connect(cid) == (0, 0)
        assert broker.clients()[0]["client_id"] == cid

    def test_max_clientid_len(self, make_broker):
        b = make_broker(max_clientid_len=8)
        r = RawClient(b.mqtt_port)
        try:
            r.send(gen_connect("123456789"))
            assert r.read_packet() == (CONNACK, 0, b"\x00\x02")
            assert r.expect_closed()
        finally:
            r.close()
        r = RawClient(b.mqtt_port)
        try:
            assert r.connect("12345678") == (0, 0)
        finally:
            r.close()

    @both
    def test_session_present_0_with_clean_session(self, raw, proto):
        """[MQTT-3.2.2-1] session present is 0 when clean session is 1, even
        if a stored session existed [MQTT-3.1.2-6]."""
        r = raw()
        assert r.connect("sp", proto=proto, clean=False) == (0, 0)
        r.send(gen_disconnect())
        assert r.expect_closed()
        r2 = raw()
        assert r2.connect("sp", proto=proto, clean=True) == (0, 0)

    @both
    def test_session_present_1_when_resumed(self, raw, broker, proto):
        """[MQTT-3.2.2-2] [MQTT-3.1.2-4] clean session 0 resumes the stored
        session and CONNACK says session present 1."""
        r = raw()
        assert r.connect("sp1", proto=proto, clean=False) == (0, 0)
        assert r.subscribe([("keep/me", 1)]) == [1]
        r.send(gen_disconnect())
        assert r.expect_closed()
        r2 = raw()
        present, rc = r2.connect("sp1", proto=proto, clean=False)
        assert rc == 0
        assert present == (1 if proto == 4 else 0)   # MQTT 3.1: a reserved byte, 0
        assert broker.subscriptions("sp1") == [{"client_id": "sp1", "topic": "keep/me", "qos": 1}]

    def test_session_present_0_for_new_persistent_session(self, raw):
        """[MQTT-3.2.2-3] no stored session: session present 0."""
        r = raw()
        assert r.connect("fresh", clean=False) == (0, 0)

    @both
    def test_takeover_closes_old_connection(self, raw, broker, proto):
        """[MQTT-3.1.4-2] a second client with the same id disconnects the first."""
        old = raw()
        assert old.connect("dup", proto=proto) == (0, 0)
        new = raw()
        assert new.connect("dup", proto=proto) == (0, 0)
        assert old.expect_closed()
        new.send(gen_pingreq())
        assert new.read_packet() == (PINGRESP, 0, b"")
        assert [c["port"] for c in broker.clients()] == [new.sock.getsockname()[1]]

    def test_takeover_keeps_persistent_session(self, raw, broker):
        """[MQTT-3.1.4-2] [MQTT-3.2.2-2] takeover with clean session 0 resumes
        the session of the connection it replaces."""
        old = raw()
        assert old.connect("tk", clean=False) == (0, 0)
        assert old.subscribe([("tk/t", 1)]) == [1]
        new = raw()
        assert new.connect("tk", clean=False) == (1, 0)
        assert old.expect_closed()
        broker.publish("tk/t", b"after", qos=1)
        m = new.read_publish()
        assert (m["topic"], m["payload"], m["qos"]) == ("tk/t", b"after", 1)


###############################################################################
# 02 SUBSCRIBE / UNSUBSCRIBE / topic matching
###############################################################################

def next_of(r, topics):
    """Read PUBLISHes from a raw client until one whose topic is in topics
    (skips $SYS heartbeats)."""
    while True:
        m = r.read_publish()
        if m["topic"] in topics:
            return m


class Test02Subscribe:

    @both
    def test_suback_grants_requested_qos(self, raw, proto):
        r = raw()
        r.connect("s1", proto=proto)
        assert r.subscribe([("q/0", 0), ("q/1", 1), ("q/2", 2)], pid=0x1234) == [0, 1, 2]

    @both
    def test_paho_subscribe(self, client, broker, proto):
        c = client(client_id="ps", proto=proto)
        assert c.subscribe([("x/+", 2), ("y/#", 1)]) == [2, 1]
        subs = sorted(broker.subscriptions("ps"), key=lambda s: s["topic"])
        assert subs == [{"client_id": "ps", "topic": "x/+", "qos": 2},
                        {"client_id": "ps", "topic": "y/#", "qos": 1}]
        assert sorted(broker.routes()) == ["x/+", "y/#"]

    @pytest.mark.parametrize("bad", ["a/#/b", "a/b#", "a+/b", "#/", "", "$share/g", "$share//t"])
    def test_suback_failure_for_bad_filter(self, raw, broker, bad):
        """[MQTT-3.9.3-2] [MQTT-4.7.1-2] [MQTT-4.7.1-3] an invalid filter gets
        0x80 and the valid filters in the same SUBSCRIBE are granted."""
        r = raw()
        r.connect("bad")
        assert r.subscribe([("good/1", 1), (bad, 1), ("good/2", 2)]) == [1, 0x80, 2]
        assert sorted(s["topic"] for s in broker.subscriptions("bad")) == ["good/1", "good/2"]
        broker.publish("good/2", b"ok", qos=1)
        m = r.read_publish()
        assert (m["topic"], m["payload"], m["qos"]) == ("good/2", b"ok", 1)

    @both
    def test_subscribe_flags_must_be_0010(self, raw, proto):
        """[MQTT-3.8.1-1] SUBSCRIBE fixed-header flags other than 0010 close the connection."""
        r = raw()
        r.connect("sf", proto=proto)
        r.send(gen_subscribe(1, [("a", 0)], flags=0x00))
        assert r.expect_closed()

    def test_subscribe_without_filters(self, raw):
        """[MQTT-3.8.3-3] a SUBSCRIBE with no topic filter is a protocol violation."""
        r = raw()
        r.connect("sn")
        r.send(gen_subscribe(1, []))
        assert r.expect_closed()

    def test_subscribe_qos_3(self, raw):
        """[MQTT-3.8.3-4] requested QoS 3 is malformed."""
        r = raw()
        r.connect("s3")
        r.send(gen_subscribe(1, [("a", 3)]))
        assert r.expect_closed()

    @match_table
    def test_wildcard_matching(self, raw, broker, flt, topic, matches):
        """MQTT 3.1.1 section 4.7 matching rules, including the '$' rule
        [MQTT-4.7.2-1] and '#' matching the parent level [MQTT-4.7.1-2].
        A sentinel published after the probe proves a non-match (ordering)."""
        r = raw()
        r.connect("m")
        assert r.subscribe([(flt, 0), ("zz/sentinel", 0)]) == [0, 0]
        broker.publish(topic, b"probe")
        broker.publish("zz/sentinel", b"end")
        m = next_of(r, (topic, "zz/sentinel"))
        if matches:
            assert (m["topic"], m["payload"]) == (topic, b"probe")
            m = next_of(r, (topic, "zz/sentinel"))
        assert m["topic"] == "zz/sentinel"

    @match_table
    def test_wildcard_matching_retained(self, raw, broker, flt, topic, matches):
        """The same matching table applied to retained messages sent on
        subscribe [MQTT-3.3.1-6]: a second SUBSCRIBE whose retained sentinel
        arrives after proves a non-match. A shared subscription gets no retained
        messages (EMQ X 2.x), so its rows expect none."""
        broker.publish(topic, b"probe", retain=True)
        broker.publish("zz/sentinel", b"end", retain=True)
        r = raw()
        r.connect("mr")
        r.send(gen_subscribe(1, [(flt, 0)]) + gen_subscribe(2, [("zz/sentinel", 0)]))
        topics = []
        while True:
            ptype, flags, body = r.read_packet()
            if ptype == PUBLISH:
                m = parse_publish(flags, body)
                if m["topic"] == "zz/sentinel":
                    break
                assert m["retain"] is True
                topics.append(m["topic"])
        assert (topic in topics) == (matches and shared_group(flt)[0] is None), topics

    @both
    def test_overlapping_subscriptions_one_copy_highest_qos(self, raw, broker, proto):
        """[MQTT-3.3.5-1] overlapping subscriptions: the message is delivered
        once, at the maximum QoS of the matching subscriptions."""
        r = raw()
        r.connect("ov", proto=proto)
        assert r.subscribe([("ov/+", 0), ("ov/#", 2), ("ov/x", 1), ("zz/sentinel", 0)]) == [0, 2, 1, 0]
        broker.publish("ov/x", b"m", qos=2)
        broker.publish("zz/sentinel", b"end")
        m = r.read_publish()
        assert (m["topic"], m["qos"]) == ("ov/x", 2)
        assert r.read_publish()["topic"] == "zz/sentinel"
        r.send(gen_pubrec(m["pid"]))
        assert r.read_packet() == (PUBREL, 2, m["pid"].to_bytes(2, "big"))
        r.send(gen_pubcomp(m["pid"]))
        assert wait_until(lambda: broker.sessions()[0]["inflight_len"] == 0)

    @both
    def test_resubscribe_replaces_qos(self, raw, broker, proto):
        """[MQTT-3.8.4-3] a SUBSCRIBE for an existing filter replaces it
        (new QoS), and the retained messages are re-sent."""
        broker.publish("rs/t", b"kept", qos=2, retain=True)
        r = raw()
        r.connect("rs", proto=proto)
        assert r.subscribe([("rs/t", 0)], pid=1) == [0]
        m = r.read_publish()
        assert (m["payload"], m["qos"], m["retain"]) == (b"kept", 0, True)
        assert r.subscribe([("rs/t", 1)], pid=2) == [1]
        m = r.read_publish()
        assert (m["payload"], m["qos"], m["retain"]) == (b"kept", 1, True)
        r.send(gen_puback(m["pid"]))
        assert broker.subscriptions("rs") == [{"client_id": "rs", "topic": "rs/t", "qos": 1}]
        assert broker.sessions()[0]["subscriptions"] == 1
        broker.publish("rs/t", b"live", qos=2)
        m = r.read_publish()
        assert (m["payload"], m["qos"], m["retain"]) == (b"live", 1, False)

    @both
    def test_unsubscribe_stops_delivery(self, raw, broker, proto):
        """[MQTT-3.10.4-4] UNSUBACK carries the UNSUBSCRIBE's packet id; the
        subscription is deleted."""
        r = raw()
        r.connect("un", proto=proto)
        assert r.subscribe([("un/a", 1), ("zz/sentinel", 0)]) == [1, 0]
        r.send(gen_unsubscribe(0x0102, ["un/a"]))
        assert r.read_packet() == (UNSUBACK, 0, b"\x01\x02")
        assert broker.subscriptions("un") == [{"client_id": "un", "topic": "zz/sentinel", "qos": 0}]
        assert broker.routes() == ["zz/sentinel"]
        broker.publish("un/a", b"gone", qos=1)
        broker.publish("zz/sentinel", b"end")
        assert r.read_publish()["topic"] == "zz/sentinel"

    def test_unsubscribe_completes_inflight(self, raw, broker):
        """[MQTT-3.10.4-3] messages in flight when the subscription is deleted
        are still completed: their PUBACK/PUBREC is accepted."""
        r = raw()
        r.connect("ui")
        r.subscribe([("ui/1", 1), ("ui/2", 2)])
        broker.publish("ui/1", b"a", qos=1)
        broker.publish("ui/2", b"b", qos=2)
        m1, m2 = r.read_publish(), r.read_publish()
        r.send(gen_unsubscribe(9, ["ui/1", "ui/2"]))
        assert r.read_packet() == (UNSUBACK, 0, b"\x00\x09")
        r.send(gen_puback(m1["pid"]) + gen_pubrec(m2["pid"]))
        assert r.read_packet() == (PUBREL, 2, m2["pid"].to_bytes(2, "big"))
        r.send(gen_pubcomp(m2["pid"]))
        assert wait_until(lambda: broker.sessions()[0]["inflight_len"] == 0)
        mt = broker.metrics()
        assert (mt["packets/puback/missed"], mt["packets/pubcomp/missed"]) == (0, 0)

    def test_unsuback_even_if_nothing_matched(self, raw):
        """[MQTT-3.10.4-5] UNSUBACK is sent even if no filter matched."""
        r = raw()
        r.connect("un2")
        r.send(gen_unsubscribe(7, ["never/subscribed", "a/+"]))
        assert r.read_packet() == (UNSUBACK, 0, b"\x00\x07")

    def test_unsubscribe_requires_exact_filter(self, raw, broker):
        """Unsubscribing 'a/b' does not remove 'a/+' (filters compared character by character)."""
        r = raw()
        r.connect("un3")
        r.subscribe([("a/+", 0)])
        r.send(gen_unsubscribe(2, ["a/b"]))
        assert r.read_packet() == (UNSUBACK, 0, b"\x00\x02")
        assert [s["topic"] for s in broker.subscriptions("un3")] == ["a/+"]

    @both
    def test_unsubscribe_flags_must_be_0010(self, raw, proto):
        """[MQTT-3.10.1-1] UNSUBSCRIBE flags other than 0010 close the connection."""
        r = raw()
        r.connect("uf", proto=proto)
        r.send(gen_unsubscribe(1, ["a"], flags=0x00))
        assert r.expect_closed()

    def test_unsubscribe_without_filters(self, raw):
        """[MQTT-3.10.3-2] UNSUBSCRIBE must contain at least one filter."""
        r = raw()
        r.connect("un0")
        r.send(gen_unsubscribe(1, []))
        assert r.expect_closed()

    @both
    def test_paho_unsubscribe(self, client, broker, proto):
        c = client(client_id="pu", proto=proto)
        c.subscribe("pu/t", 1)
        c.subscribe("zz/sentinel", 0)
        c.unsubscribe("pu/t")
        broker.publish("pu/t", b"x", qos=1)
        broker.publish("zz/sentinel", b"end")
        assert c.get().topic == "zz/sentinel"

    def test_subscription_survives_in_routes_until_last_unsubscribe(self, raw, broker):
        a, b = raw(), raw()
        a.connect("ra")
        b.connect("rb")
        a.subscribe([("r/+", 0)])
        b.subscribe([("r/+", 1)])
        assert broker.routes() == ["r/+"]
        assert broker.stats()["subscriptions/count"] == 2
        a.send(gen_unsubscribe(2, ["r/+"]))
        a.read_packet()
        assert broker.routes() == ["r/+"]
        b.send(gen_unsubscribe(2, ["r/+"]))
        b.read_packet()
        assert broker.routes() == []
        assert broker.stats()["subscriptions/count"] == 0


###############################################################################
# 03 PUBLISH: QoS flows
###############################################################################

class Test03Publish:

    @both
    @pytest.mark.parametrize("qos", [0, 1, 2])
    def test_paho_roundtrip(self, client, proto, qos):
        sub = client(client_id="sub", proto=proto)
        sub.subscribe("rt/t", 2)
        pub = client(client_id="pub", proto=proto)
        pub.publish("rt/t", b"hello \x00\xff", qos=qos)
        m = sub.get()
        assert (m.topic, m.payload, m.qos, m.retain) == ("rt/t", b"hello \x00\xff", qos, False)

    @both
    def test_inbound_qos1_puback_bytes(self, raw, client, proto):
        """4.3.2: a QoS 1 PUBLISH is answered with PUBACK carrying its packet id."""
        sub = client(client_id="w")
        sub.subscribe("in/1", 1)
        r = raw()
        r.connect("p1", proto=proto)
        r.send(gen_publish("in/1", b"one", qos=1, pid=0xBEEF))
        assert r.read_packet() == (PUBACK, 0, b"\xbe\xef")
        m = sub.get()
        assert (m.payload, m.qos) == (b"one", 1)

    @both
    def test_inbound_qos2_flow_bytes(self, raw, client, broker, proto):
        """4.3.3: PUBLISH -> PUBREC, PUBREL (flags 0010) -> PUBCOMP."""
        sub = client(client_id="w")
        sub.subscribe("in/2", 2)
        r = raw()
        r.connect("p2", proto=proto)
        r.send(gen_publish("in/2", b"two", qos=2, pid=9))
        assert r.read_packet() == (PUBREC, 0, b"\x00\x09")
        m = sub.get()
        assert (m.payload, m.qos) == (b"two", 2)
        assert [s["awaiting_rel_len"] for s in broker.sessions() if s["client_id"] == "p2"] == [1]
        r.send(gen_pubrel(9))
        assert r.read_packet() == (PUBCOMP, 0, b"\x00\x09")
        assert [s["awaiting_rel_len"] for s in broker.sessions() if s["client_id"] == "p2"] == [0]

    def test_inbound_qos2_dup_not_redelivered(self, raw, broker):
        """[MQTT-4.3.3-2] a DUP resend of a QoS 2 PUBLISH whose PUBREL has not
        arrived is not delivered a second time; after PUBREL the id is new again."""
        sub, r = raw_sub_and_pub(raw, "s", [("dup/t", 2), ("zz/sentinel", 0)], "p")
        r.send(gen_publish("dup/t", b"once", qos=2, pid=5))
        assert r.read_packet() == (PUBREC, 0, b"\x00\x05")
        r.send(gen_publish("dup/t", b"once", qos=2, pid=5, dup=True))
        assert r.read_packet() == (PUBREC, 0, b"\x00\x05")
        r.send(gen_pubrel(5))
        assert r.read_packet() == (PUBCOMP, 0, b"\x00\x05")
        r.send(gen_publish("zz/sentinel", b"end", qos=1, pid=6))
        assert r.read_packet() == (PUBACK, 0, b"\x00\x06")
        m = sub.read_publish()
        assert (m["topic"], m["payload"], m["qos"], m["dup"]) == ("dup/t", b"once", 2, False)
        assert sub.read_publish()["topic"] == "zz/sentinel"
        # the id was released: reusing it is a new message
        r.send(gen_publish("dup/t", b"again", qos=2, pid=5))
        assert r.read_packet() == (PUBREC, 0, b"\x00\x05")
        m = sub.read_publish()
        assert (m["topic"], m["payload"]) == ("dup/t", b"again")

    def test_pubrel_unknown_id_still_gets_pubcomp(self, raw):
        """4.3.3: PUBREL is always answered with PUBCOMP."""
        r = raw()
        r.connect("rel")
        r.send(gen_pubrel(77))
        assert r.read_packet() == (PUBCOMP, 0, b"\x00\x4d")

    @both
    def test_outbound_qos1(self, raw, broker, proto):
        """Outbound QoS 1: non-zero packet id [MQTT-2.3.1-1], DUP 0, retain 0
        on normal forwarding [MQTT-3.3.1-9]; PUBACK frees the inflight slot."""
        r = raw()
        r.connect("o1", proto=proto)
        r.subscribe([("out/1", 1)])
        broker.publish("out/1", b"a", qos=1, retain=True)
        ptype, flags, body = r.read_packet()
        assert ptype == PUBLISH and flags == 0b0010
        m = parse_publish(flags, body)
        assert m["pid"] != 0 and m["payload"] == b"a"
        assert broker.sessions()[0]["inflight_len"] == 1
        r.send(gen_puback(m["pid"]))
        assert wait_until(lambda: broker.sessions()[0]["inflight_len"] == 0)

    @both
    def test_outbound_qos2(self, raw, broker, proto):
        """Outbound QoS 2: PUBLISH, PUBREC -> PUBREL with flags 0010
        [MQTT-3.6.1-1], PUBCOMP completes it."""
        r = raw()
        r.connect("o2", proto=proto)
        r.subscribe([("out/2", 2)])
        broker.publish("out/2", b"b", qos=2)
        ptype, flags, body = r.read_packet()
        assert ptype == PUBLISH and flags == 0b0100
        m = parse_publish(flags, body)
        assert m["pid"] != 0
        r.send(gen_pubrec(m["pid"]))
        assert r.read_packet() == (PUBREL, 0b0010, m["pid"].to_bytes(2, "big"))
        info = broker.sessions()[0]
        assert (info["inflight_len"], info["awaiting_comp"]) == (1, 1)
        r.send(gen_pubcomp(m["pid"]))
        assert wait_until(lambda: broker.sessions()[0]["inflight_len"] == 0)

    def test_outbound_qos0_flags(self, raw, broker):
        """[MQTT-3.3.1-2] DUP is 0 for QoS 0; no packet id."""
        r = raw()
        r.connect("o0")
        r.subscribe([("out/0", 2)])
        broker.publish("out/0", b"zero", qos=0)
        ptype, flags, body = r.read_packet()
        assert (ptype, flags) == (PUBLISH, 0)
        assert body == enc_str("out/0") + b"zero"

    @pytest.mark.parametrize("pub_qos", [0, 1, 2])
    @pytest.mark.parametrize("sub_qos", [0, 1, 2])
    def test_delivered_at_min_qos(self, raw, client, pub_qos, sub_qos):
        """[MQTT-3.8.4-6] delivery QoS is min(published QoS, granted QoS)."""
        r = raw()
        r.connect("mq")
        assert r.subscribe([("mq/t", sub_qos)]) == [sub_qos]
        pub = client(client_id="mqp")
        pub.publish("mq/t", b"x", qos=pub_qos)
        m = r.read_publish()
        assert (m["payload"], m["qos"]) == (b"x", min(pub_qos, sub_qos))

    @both
    @pytest.mark.parametrize("qos", [0, 1, 2])
    def test_ordering(self, make_broker, proto, qos):
        """[MQTT-4.6.0-2] [MQTT-4.6.0-3] [MQTT-4.6.0-6] messages from one
        publisher arrive in order, also when the broker's inflight window
        (max_inflight=32) fills and messages pass through the session queue."""
        b = make_broker()
        sub = PahoClient(b.mqtt_port, "os", proto=proto)
        # a window large enough that paho itself never queues (see PahoClient)
        pub = PahoClient(b.mqtt_port, "op", proto=proto, max_inflight=1000)
        try:
            self._check_order(sub, pub, qos)
        finally:
            sub.disconnect()
            pub.disconnect()

    @staticmethod
    def _check_order(sub, pub, qos):
        sub.subscribe("ord/t", qos)
        infos = [pub.publish("ord/t", b"%d" % i, qos=qos, wait=False) for i in range(100)]
        for info in infos:
            if qos:
                info.wait_for_publish(TIMEOUT)
        got = [sub.get().payload for _ in range(100)]
        assert got == [b"%d" % i for i in range(100)]

    def test_ordering_across_inflight_window(self, make_broker):
        """[MQTT-4.6.0-6] same topic, same QoS, same publisher: PUBLISHes reach
        the subscriber in the order received, also when max_inflight is
        reached and messages pass through the session queue.

        One client publishes to itself (max_inflight=2): m0 is in flight; one
        write then carries m1 (fills the window), m2 (queued) and the PUBACK
        for m0 (frees a slot, m2 leaves the queue). m1 must still come first."""
        b = make_broker(max_inflight=2)
        r = RawClient(b.mqtt_port)
        try:
            r.connect("selfpub")
            r.subscribe([("o", 1)])
            r.send(gen_publish("o", b"m0", qos=1, pid=1))
            packets = [r.read_packet() for _ in range(2)]
            assert (PUBACK, 0, b"\x00\x01") in packets
            (m0,) = [parse_publish(f, body) for t, f, body in packets if t == PUBLISH]
            r.send(gen_publish("o", b"m1", qos=1, pid=2) + gen_publish("o", b"m2", qos=1, pid=3)
                   + gen_puback(m0["pid"]))
            got = []
            while len(got) < 2:
                ptype, flags, body = r.read_packet()
                if ptype == PUBLISH:
                    m = parse_publish(flags, body)
                    got.append(m["payload"])
                    r.send(gen_puback(m["pid"]))
            assert got == [b"m1", b"m2"]
        finally:
            r.close()

    @pytest.mark.parametrize("qos", [0, 1, 2])
    def test_ordering_raw_pipelined(self, raw, qos):
        """[MQTT-4.6.0-2] [MQTT-4.6.0-3] 100 pipelined PUBLISHes from one raw
        publisher reach a raw subscriber in order, acks in order too."""
        N = 100   # = max_awaiting_rel, so no QoS 2 message is refused
        sub, pub = raw_sub_and_pub(raw, "ors", [("ord/r", 2)], "orp")
        pub.send(b"".join(gen_publish("ord/r", b"%d" % i, qos=qos, pid=i + 1) for i in range(N)))
        if qos:
            acks = [pub.read_packet() for _ in range(N)]
            ack = PUBACK if qos == 1 else PUBREC
            assert acks == [(ack, 0, (i + 1).to_bytes(2, "big")) for i in range(N)]
        got = []
        while len(got) < N:
            ptype, flags, body = sub.read_packet()
            if ptype == PUBREL:
                sub.send(gen_pubcomp(int.from_bytes(body, "big")))
                continue
            m = parse_publish(flags, body)
            got.append(m["payload"])
            if m["qos"] == 1:
                sub.send(gen_puback(m["pid"]))
            elif m["qos"] == 2:
                sub.send(gen_pubrec(m["pid"]))
        assert got == [b"%d" % i for i in range(N)]

    def test_inflight_window(self, make_broker):
        """max_inflight=2: a subscriber that does not ack gets 2 messages; the
        rest wait in the session queue until a PUBACK opens the window."""
        b = make_broker(max_inflight=2)
        r = RawClient(b.mqtt_port)
        try:
            r.connect("win")
            r.subscribe([("win/t", 1)])
            for i in range(5):
                b.publish("win/t", b"%d" % i, qos=1)
            m0, m1 = r.read_publish(), r.read_publish()
            assert (m0["payload"], m1["payload"]) == (b"0", b"1")
            r.expect_nothing(0.3)
            info = b.sessions()[0]
            assert (info["inflight_len"], info["mqueue_len"]) == (2, 3)
            r.send(gen_puback(m0["pid"]))
            m2 = r.read_publish()
            assert m2["payload"] == b"2"
            r.expect_nothing(0.2)
            r.send(gen_puback(m1["pid"]) + gen_puback(m2["pid"]))
            rest = [r.read_publish()["payload"] for _ in range(2)]
            assert rest == [b"3", b"4"]
        finally:
            r.close()

    def test_qos2_inflight_window_counts_until_pubcomp(self, make_broker):
        b = make_broker(max_inflight=1)
        r = RawClient(b.mqtt_port)
        try:
            r.connect("win2")
            r.subscribe([("w2", 2)])
            b.publish("w2", b"a", qos=2)
            b.publish("w2", b"b", qos=2)
            m = r.read_publish()
            r.send(gen_pubrec(m["pid"]))
            assert r.read_packet()[0] == PUBREL
            r.expect_nothing(0.2)
            r.send(gen_pubcomp(m["pid"]))
            assert r.read_publish()["payload"] == b"b"
        finally:
            r.close()

    @pytest.mark.parametrize("qos", [1, 2])
    def test_retry_resends_with_dup(self, make_broker, qos):
        """retry_interval=0.5: an unacknowledged PUBLISH is resent with DUP=1
        and the same packet id."""
        b = make_broker(retry_interval=0.5)
        r = RawClient(b.mqtt_port)
        try:
            r.connect("retry")
            r.subscribe([("re/t", qos)])
            b.publish("re/t", b"again", qos=qos)
            first = r.read_publish()
            assert first["dup"] is False
            t0 = time.monotonic()
            second = r.read_publish(timeout=3)
            assert time.monotonic() - t0 >= 0.3
            assert second["dup"] is True
            assert (second["pid"], second["payload"], second["qos"]) == (first["pid"], b"again", qos)
            if qos == 1:
                r.send(gen_puback(first["pid"]))
            else:
                r.send(gen_pubrec(first["pid"]))
                assert r.read_packet() == (PUBREL, 2, first["pid"].to_bytes(2, "big"))
                # the PUBREL is retried too
                assert r.read_packet(timeout=3) == (PUBREL, 2, first["pid"].to_bytes(2, "big"))
                r.send(gen_pubcomp(first["pid"]))
            assert wait_until(lambda: b.sessions()[0]["inflight_len"] == 0)
        finally:
            r.close()

    def test_incoming_dup_not_propagated(self, raw):
        """[MQTT-3.3.1-3] the DUP flag of an incoming PUBLISH is not
        propagated to subscribers."""
        s, p = raw_sub_and_pub(raw, "s", [("dp", 1)], "p")
        p.send(gen_publish("dp", b"x", qos=1, pid=2, dup=True))
        assert p.read_packet() == (PUBACK, 0, b"\x00\x02")
        m = s.read_publish()
        assert (m["payload"], m["dup"]) == (b"x", False)

    def test_pipelined_connect_subscribe_publish(self, raw):
        """CONNECT, SUBSCRIBE and PUBLISH in one TCP write are processed in order
        and answered in order."""
        r = raw()
        r.send(gen_connect("pipe") + gen_subscribe(3, [("pipe/t", 1)])
               + gen_publish("pipe/t", b"self", qos=1, pid=4))
        assert r.read_packet() == (CONNACK, 0, b"\x00\x00")
        assert r.read_packet() == (SUBACK, 0, b"\x00\x03\x01")
        packets = [r.read_packet() for _ in range(2)]
        assert (PUBACK, 0, b"\x00\x04") in packets
        (pub,) = [p for p in packets if p[0] == PUBLISH]
        assert parse_publish(pub[1], pub[2])["payload"] == b"self"

    def test_publish_to_self(self, client):
        """A client subscribed to the topic it publishes to receives its own message."""
        c = client(client_id="self")
        c.subscribe("me", 1)
        c.publish("me", b"echo", qos=1)
        assert c.get().payload == b"echo"

    def test_large_payload(self, client):
        sub = client(client_id="bigs")
        sub.subscribe("big", 1)
        pub = client(client_id="bigp")
        payload = os.urandom(300_000)
        pub.publish("big", payload, qos=1)
        assert sub.get().payload == payload

    def test_empty_payload(self, client):
        sub = client(client_id="es")
        sub.subscribe("empty", 1)
        client(client_id="ep").publish("empty", b"", qos=1)
        m = sub.get()
        assert (m.topic, m.payload) == ("empty", b"")

    def test_fan_out(self, client, broker):
        subs = [client(client_id="fan%d" % i) for i in range(5)]
        for s in subs:
            s.subscribe("fan/+", 1)
        broker.publish("fan/x", b"all", qos=1)
        for s in subs:
            assert s.get().payload == b"all"

    def test_puback_for_unknown_id_is_harmless(self, raw, broker):
        r = raw()
        r.connect("pa")
        r.send(gen_puback(999))
        r.send(gen_pingreq())
        assert r.read_packet() == (PINGRESP, 0, b"")
        assert broker.metrics()["packets/puback/missed"] == 1

    def test_python_api_publish_validation(self, broker):
        with pytest.raises(ValueError):
            broker.publish("a/+", b"x")
        with pytest.raises(ValueError):
            broker.publish("", b"x")
        with pytest.raises(ValueError):
            broker.publish("a", b"x", qos=3)

    def test_python_api_publish_str_payload(self, client, broker):
        c = client(client_id="api")
        c.subscribe("api/t", 1)
        broker.publish("api/t", "h\u00e9", qos=1)
        assert c.get().payload == "h\u00e9".encode()


###############################################################################
# 04 Retained messages
###############################################################################

def user_retained(broker):
    """The retained store without the broker's own $SYS messages."""
    return [m for m in broker.retained() if not m["topic"].startswith("$SYS")]


class Test04Retain:

    @both
    def test_retained_sent_on_subscribe(self, client, broker, proto):
        """[MQTT-3.3.1-6] the retained message is sent on subscribe, with
        the RETAIN flag 1 [MQTT-3.3.1-8]."""
        pub = client(client_id="rp", proto=proto)
        pub.publish("ret/a", b"state", qos=1, retain=True)
        assert wait_until(lambda: user_retained(broker)) == [
            {"topic": "ret/a", "payload": b"state", "qos": 1}]
        sub = client(client_id="rs", proto=proto)
        sub.subscribe("ret/a", 1)
        m = sub.get()
        assert (m.topic, m.payload, m.qos, m.retain) == ("ret/a", b"state", 1, True)

    def test_retained_flag_bytes(self, raw, broker):
        """[MQTT-3.3.1-8] retained delivery on subscribe has RETAIN=1, arriving
        after the SUBACK."""
        broker.publish("ret/b", b"v", qos=0, retain=True)
        r = raw()
        r.connect("rb")
        assert r.subscribe([("ret/b", 0)]) == [0]
        assert r.read_packet() == (PUBLISH, 0b0001, enc_str("ret/b") + b"v")

    def test_retain_cleared_on_normal_forward(self, raw, broker):
        """[MQTT-3.3.1-9] a retained PUBLISH forwarded to an existing
        subscriber has RETAIN=0."""
        r, p = raw_sub_and_pub(raw, "fw", [("ret/c", 1)], "fwp")
        p.send(gen_publish("ret/c", b"live", qos=1, pid=3, retain=True))
        assert p.read_packet() == (PUBACK, 0, b"\x00\x03")
        m = r.read_publish()
        assert (m["payload"], m["retain"]) == (b"live", False)

    def test_retained_replaced(self, client, broker):
        """[MQTT-3.3.1-5] a new retained message replaces the old one."""
        pub = client(client_id="p")
        pub.publish("ret/r", b"one", qos=1, retain=True)
        pub.publish("ret/r", b"two", qos=1, retain=True)
        assert user_retained(broker) == [{"topic": "ret/r", "payload": b"two", "qos": 1}]
        sub = client(client_id="s")
        sub.subscribe("ret/r", 1)
        assert sub.get().payload == b"two"
        sub.expect_nothing(0.2)

    @both
    def test_zero_byte_retained_deletes(self, raw, broker, proto):
        """[MQTT-3.3.1-10] a zero-byte retained PUBLISH removes the retained
        message; [MQTT-3.3.1-11] it is not stored itself."""
        p = raw()
        p.connect("zp", proto=proto)
        p.send(gen_publish("ret/z", b"old", qos=1, pid=1, retain=True))
        assert p.read_packet()[0] == PUBACK
        assert len(user_retained(broker)) == 1
        p.send(gen_publish("ret/z", b"", qos=1, pid=2, retain=True))
        assert p.read_packet()[0] == PUBACK
        assert user_retained(broker) == []
        s = raw()
        s.connect("zs", proto=proto)
        assert s.subscribe([("ret/z", 1), ("zz/sentinel", 0)]) == [1, 0]
        broker.publish("zz/sentinel", b"end")
        assert s.read_publish()["topic"] == "zz/sentinel"

    def test_non_retained_publish_keeps_retained(self, client, broker):
        """[MQTT-3.3.1-12] a PUBLISH with RETAIN 0 does not store or replace
        the retained message."""
        broker.publish("ret/k", b"kept", retain=True)
        broker.publish("ret/k", b"transient")
        broker.publish("ret/k2", b"transient")
        assert user_retained(broker) == [{"topic": "ret/k", "payload": b"kept", "qos": 0}]

    def test_zero_byte_retained_forwarded_to_current_subscribers(self, raw, broker):
        s = raw()
        s.connect("zf")
        s.subscribe([("ret/zf", 0)])
        broker.publish("ret/zf", b"", retain=True)
        m = s.read_publish()
        assert (m["topic"], m["payload"], m["retain"]) == ("ret/zf", b"", False)

    def test_retained_wildcard_delivery(self, raw, broker):
        """[MQTT-3.3.1-6] every retained message matching the filter is sent."""
        for t in ("w/1", "w/2", "w/2/deep", "x/1"):
            broker.publish(t, t.encode(), retain=True)
        r = raw()
        r.connect("wd")
        assert r.subscribe([("w/+", 0)]) == [0]
        got = sorted(r.read_publish()["topic"] for _ in range(2))
        assert got == ["w/1", "w/2"]
        assert r.subscribe([("w/#", 0)], pid=2) == [0]
        got = sorted(r.read_publish()["topic"] for _ in range(3))
        assert got == ["w/1", "w/2", "w/2/deep"]
        r.expect_nothing(0.2)

    @pytest.mark.parametrize("stored_qos,sub_qos", [(2, 1), (1, 0), (0, 2), (2, 2)])
    def test_retained_min_qos(self, raw, broker, stored_qos, sub_qos):
        """Retained delivery uses min(retained QoS, granted QoS)."""
        broker.publish("ret/q", b"q", qos=stored_qos, retain=True)
        r = raw()
        r.connect("rq")
        r.subscribe([("ret/q", sub_qos)])
        m = r.read_publish()
        assert (m["qos"], m["retain"]) == (min(stored_qos, sub_qos), True)

    def test_hash_does_not_get_sys_retained(self, raw, broker):
        """[MQTT-4.7.2-1] '#' does not receive the $SYS retained messages."""
        assert any(m["topic"].startswith("$SYS/") for m in broker.retained())
        broker.publish("plain", b"p", retain=True)
        r = raw()
        r.connect("h")
        r.subscribe([("#", 0)])
        m = r.read_publish()
        assert m["topic"] == "plain"
        r.expect_nothing(0.2)

    def test_retained_stats(self, broker):
        base = broker.stats()["retained/count"]
        broker.publish("st/1", b"1", retain=True)
        broker.publish("st/2", b"2", retain=True)
        assert broker.stats()["retained/count"] == base + 2
        assert broker.metrics()["messages/retained"] == base + 2
        broker.publish("st/1", b"", retain=True)
        assert broker.stats()["retained/count"] == base + 1
        assert broker.stats()["retained/max"] == base + 2

    def test_retained_survives_publisher(self, client, broker):
        pub = client(client_id="gone")
        pub.publish("ret/g", b"still", qos=1, retain=True)
        pub.disconnect()
        sub = client(client_id="later")
        sub.subscribe("ret/+", 0)
        m = sub.get()
        assert (m.topic, m.payload, m.retain) == ("ret/g", b"still", True)


###############################################################################
# 05 Sessions
###############################################################################

def offline(r):
    """Close a raw client without DISCONNECT and wait for the broker to notice."""
    r.send(gen_disconnect())
    assert r.expect_closed()
    r.close()


class Test05Session:

    @both
    def test_persistent_session_queues_in_order(self, raw, broker, proto):
        """[MQTT-3.1.2-4] [MQTT-3.1.2-5] a clean-session-0 session keeps its
        subscriptions and queues QoS 1/2 messages while offline; they are
        delivered in order [MQTT-4.6.0-2] on reconnect with session present 1."""
        r = raw()
        r.connect("ps", proto=proto, clean=False)
        r.subscribe([("ps/1", 1), ("ps/2", 2)])
        offline(r)
        assert wait_until(lambda: broker.sessions() and not broker.sessions()[0]["connected"])
        for i in range(10):
            broker.publish("ps/%d" % (1 + i % 2), b"%d" % i, qos=1 + i % 2)
        info = broker.sessions()[0]
        assert (info["mqueue_len"], info["enqueue_msg"]) == (10, 10)
        r2 = raw()
        assert r2.connect("ps", proto=proto, clean=False)[1] == 0
        got = []
        for _ in range(10):
            m = r2.read_publish()
            got.append((m["payload"], m["qos"], m["dup"]))
            r2.send(gen_puback(m["pid"]) if m["qos"] == 1 else gen_pubrec(m["pid"]))
        assert got == [(b"%d" % i, 1 + i % 2, False) for i in range(10)]

    @pytest.mark.parametrize("proto", PROTOS)
    def test_paho_persistent_session(self, client, broker, proto):
        """[MQTT-3.2.2-2] paho sees session present after reconnecting."""
        c = client(client_id="pp", proto=proto, clean_session=False)
        assert c.session_present is False
        c.subscribe("pp/t", 1)
        c.disconnect()
        assert wait_until(lambda: broker.clients() == [])
        broker.publish("pp/t", b"while away", qos=1)
        c2 = client(client_id="pp", proto=proto, clean_session=False)
        if proto == 4:        # MQTT 3.1 has no session present flag
            assert c2.session_present is True
        assert c2.get().payload == b"while away"

    def test_unacked_resent_with_dup_on_reconnect(self, raw, broker):
        """[MQTT-4.4.0-1] unacknowledged PUBLISH (and PUBREL) packets are
        resent with DUP=1 and the original packet ids on reconnect."""
        r = raw()
        r.connect("ua", clean=False)
        r.subscribe([("ua/1", 1), ("ua/2", 2)])
        broker.publish("ua/1", b"one", qos=1)
        broker.publish("ua/2", b"two", qos=2)
        broker.publish("ua/2", b"three", qos=2)
        m1, m2, m3 = r.read_publish(), r.read_publish(), r.read_publish()
        r.send(gen_pubrec(m3["pid"]))      # m3 reaches PUBREL state
        assert r.read_packet() == (PUBREL, 2, m3["pid"].to_bytes(2, "big"))
        r.close()                          # no acks for m1, m2; no PUBCOMP for m3
        assert wait_until(lambda: not broker.sessions()[0]["connected"])
        r2 = raw()
        assert r2.connect("ua", clean=False) == (1, 0)
        a, b = r2.read_publish(), r2.read_publish()
        assert (a["pid"], a["payload"], a["qos"], a["dup"]) == (m1["pid"], b"one", 1, True)
        assert (b["pid"], b["payload"], b["qos"], b["dup"]) == (m2["pid"], b"two", 2, True)
        assert r2.read_packet() == (PUBREL, 2, m3["pid"].to_bytes(2, "big"))
        r2.send(gen_puback(a["pid"]) + gen_pubrec(b["pid"]))
        assert r2.read_packet() == (PUBREL, 2, b["pid"].to_bytes(2, "big"))
        r2.send(gen_pubcomp(b["pid"]) + gen_pubcomp(m3["pid"]))
        assert wait_until(lambda: broker.sessions()[0]["inflight_len"] == 0)

    def test_inbound_qos2_exactly_once_across_reconnect(self, raw, broker):
        """Session state includes inbound QoS 2 messages not yet released
        (3.1.2.4): a DUP resend after reconnecting with clean session 0 is not
        delivered again [MQTT-4.3.3-2]."""
        s, p = raw_sub_and_pub(raw, "s", [("x2/t", 2), ("zz/sentinel", 0)], "x2", clean=False)
        p.send(gen_publish("x2/t", b"once", qos=2, pid=11))
        assert p.read_packet() == (PUBREC, 0, b"\x00\x0b")
        p.close()
        assert wait_until(lambda: not broker.is_connected("x2"))
        p2 = raw()
        assert p2.connect("x2", clean=False)[1] == 0
        p2.send(gen_publish("x2/t", b"once", qos=2, pid=11, dup=True))
        assert p2.read_packet() == (PUBREC, 0, b"\x00\x0b")
        p2.send(gen_pubrel(11))
        assert p2.read_packet() == (PUBCOMP, 0, b"\x00\x0b")
        broker.publish("zz/sentinel", b"end")
        got = []
        while True:
            m = s.read_publish()
            if m["topic"] == "zz/sentinel":
                break
            got.append((m["topic"], m["payload"], m["dup"]))
        assert got == [("x2/t", b"once", False)]

    def test_takeover_resends_inflight(self, raw, broker):
        """[MQTT-3.1.4-2] [MQTT-4.4.0-1] a takeover with clean session 0
        resends the old connection's unacknowledged messages with DUP=1."""
        old = raw()
        old.connect("tko", clean=False)
        old.subscribe([("tko/t", 1)])
        broker.publish("tko/t", b"pending", qos=1)
        m = old.read_publish()
        new = raw()
        assert new.connect("tko", clean=False) == (1, 0)
        assert old.expect_closed()
        again = new.read_publish()
        assert (again["pid"], again["payload"], again["dup"]) == (m["pid"], b"pending", True)

    @pytest.mark.parametrize("store", [True, False])
    def test_mqueue_store_qos0(self, make_broker, store):
        """mqueue_store_qos0 decides whether QoS 0 messages are queued for an
        offline session (EMQ X mqueue.store_qos0)."""
        b = make_broker(mqueue_store_qos0=store)
        r = RawClient(b.mqtt_port)
        r.connect("q0", clean=False)
        r.subscribe([("q0/t", 1)])
        offline(r)
        assert wait_until(lambda: not b.sessions()[0]["connected"])
        dropped = b.metrics()["messages/dropped"]
        b.publish("q0/t", b"zero", qos=0)
        b.publish("q0/t", b"one", qos=1)
        assert b.sessions()[0]["mqueue_len"] == (2 if store else 1)
        assert b.metrics()["messages/dropped"] == dropped + (0 if store else 1)
        r2 = RawClient(b.mqtt_port)
        try:
            assert r2.connect("q0", clean=False) == (1, 0)
            got = [r2.read_publish() for _ in range(2 if store else 1)]
            expected = [(b"zero", 0), (b"one", 1)] if store else [(b"one", 1)]
            assert [(m["payload"], m["qos"]) for m in got] == expected
            r2.expect_nothing(0.2)
        finally:
            r2.close()

    def test_max_mqueue_len_drops_oldest(self, make_broker):
        """max_mqueue_len=3: the queue keeps the newest messages; drops are
        counted in mqueue_dropped and messages/dropped."""
        b = make_broker(max_mqueue_len=3)
        r = RawClient(b.mqtt_port)
        r.connect("mq", clean=False)
        r.subscribe([("mq/t", 1)])
        offline(r)
        assert wait_until(lambda: not b.sessions()[0]["connected"])
        for i in range(5):
            b.publish("mq/t", b"%d" % i, qos=1)
        info = b.sessions()[0]
        assert (info["mqueue_len"], info["mqueue_dropped"]) == (3, 2)
        assert b.metrics()["messages/dropped"] == 2
        r2 = RawClient(b.mqtt_port)
        try:
            r2.connect("mq", clean=False)
            got = []
            for _ in range(3):
                m = r2.read_publish()
                got.append(m["payload"])
                r2.send(gen_puback(m["pid"]))
            assert got == [b"2", b"3", b"4"]
            r2.expect_nothing(0.2)
        finally:
            r2.close()

    @both
    def test_clean_session_discards_state(self, raw, broker, proto):
        """[MQTT-3.1.2-6] clean session 1 discards the previous session:
        subscriptions and queued messages are gone."""
        r = raw()
        r.connect("cs", proto=proto, clean=False)
        r.subscribe([("cs/t", 1)])
        offline(r)
        broker.publish("cs/t", b"queued", qos=1)
        r2 = raw()
        assert r2.connect("cs", proto=proto, clean=True) == (0, 0)
        assert broker.subscriptions("cs") == []
        assert r2.subscribe([("zz/sentinel", 0)]) == [0]
        broker.publish("cs/t", b"after", qos=1)
        broker.publish("zz/sentinel", b"end")
        assert r2.read_publish()["topic"] == "zz/sentinel"

    def test_clean_session_ends_with_connection(self, raw, broker):
        """[MQTT-3.1.2-6] a clean session lasts as long as the connection."""
        r = raw()
        r.connect("gone", clean=True)
        r.subscribe([("g/t", 1)])
        assert [s["client_id"] for s in broker.sessions()] == ["gone"]
        offline(r)
        assert wait_until(lambda: broker.sessions() == [])
        assert broker.routes() == []

    def test_persistent_session_listed_while_offline(self, raw, broker):
        r = raw()
        r.connect("off", clean=False)
        r.subscribe([("o/t", 2)])
        offline(r)
        assert wait_until(lambda: broker.clients() == [])
        (info,) = broker.sessions()
        assert (info["client_id"], info["clean_sess"], info["connected"],
                info["subscriptions"]) == ("off", False, False, 1)
        assert broker.routes() == ["o/t"]

    def test_session_expiry(self, make_broker):
        """session_expiry_interval: an offline persistent session is dropped
        after the interval."""
        b = make_broker(session_expiry_interval=0.3)
        r = RawClient(b.mqtt_port)
        r.connect("exp", clean=False)
        r.subscribe([("e/t", 1)])
        offline(r)
        assert wait_until(lambda: b.sessions() == [], timeout=3)
        r2 = RawClient(b.mqtt_port)
        try:
            assert r2.connect("exp", clean=False) == (0, 0)
        finally:
            r2.close()

    def test_session_counters(self, raw, broker):
        r = raw()
        r.connect("cnt")
        r.subscribe([("c/t", 1)])
        for i in range(3):
            broker.publish("c/t", b"x", qos=1)
        for _ in range(3):
            r.send(gen_puback(r.read_publish()["pid"]))
        assert wait_until(lambda: broker.sessions()[0]["inflight_len"] == 0)
        info = broker.sessions()[0]
        assert info["deliver_msg"] == 3
        assert info["mqueue_len"] == 0


###############################################################################
# 06 Keepalive
###############################################################################

class Test06Keepalive:

    @both
    def test_pingreq_pingresp(self, raw, proto):
        """[MQTT-3.12.4-1] PINGREQ is answered with PINGRESP (0xD0 0x00)."""
        r = raw()
        r.connect("ping", proto=proto, keepalive=0)
        for _ in range(3):
            r.send(gen_pingreq())
            assert r.sock.recv(2) == b"\xd0\x00"

    def test_keepalive_zero_disables_timeout(self, raw, broker):
        """3.1.2.10: keepalive 0 turns the mechanism off; the client stays
        connected with nothing to send."""
        r = raw()
        r.connect("ka0", keepalive=0)
        assert broker.clients()[0]["keepalive"] == 0
        r.expect_nothing(0.6)   # longer than one service tick
        r.send(gen_pingreq())
        assert r.read_packet() == (PINGRESP, 0, b"")

    @both
    def test_keepalive_timeout_closes_and_publishes_will(self, raw, client, broker, proto):
        """[MQTT-3.1.2-24] no packet for 1.5 x keepalive closes the
        connection; that is abnormal, so the will is published [MQTT-3.1.2-8]."""
        watcher = client(client_id="watcher")
        watcher.subscribe("will/ka", 1)
        r = raw()
        t0 = time.monotonic()
        r.connect("ka1", proto=proto, keepalive=1, will=("will/ka", b"timed out", 1, False))
        assert r.expect_closed(timeout=4)
        elapsed = time.monotonic() - t0
        assert 1.4 <= elapsed <= 3.5, elapsed
        m = watcher.get()
        assert (m.topic, m.payload, m.qos) == ("will/ka", b"timed out", 1)
        assert wait_until(lambda: [c["client_id"] for c in broker.clients()] == ["watcher"])

    def test_any_packet_resets_keepalive(self, raw):
        """[MQTT-3.1.2-24] the timer counts from the last control packet:
        PINGREQs every 0.5 s keep a keepalive=1 client connected past 1.5 s."""
        r = raw()
        r.connect("alive", keepalive=1)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.7:
            r.send(gen_pingreq())
            assert r.read_packet() == (PINGRESP, 0, b"")
            r.expect_nothing(0.5)
        r.send(gen_pingreq())
        assert r.read_packet() == (PINGRESP, 0, b"")

    def test_paho_keepalive_pings(self, client, broker):
        """paho with keepalive=1 pings and stays connected."""
        c = client(client_id="pk", keepalive=1)
        c.subscribe("pk/t", 0)
        assert wait_until(lambda: broker.metrics()["packets/pingreq"] >= 1, timeout=3)
        broker.publish("pk/t", b"still here")
        assert c.get().payload == b"still here"
        assert c.disconnects.empty()


###############################################################################
# 07 Will messages
###############################################################################

class Test07Will:

    @both
    @pytest.mark.parametrize("will_qos", [0, 1, 2])
    def test_will_on_abnormal_close(self, raw, client, proto, will_qos):
        """[MQTT-3.1.2-8] the will is published when the network connection
        is closed without DISCONNECT, at its QoS (bounded by the subscription)."""
        w = client(client_id="w")
        w.subscribe("will/t", 2)
        r = raw()
        r.connect("dying", proto=proto, will=("will/t", b"bye", will_qos, False))
        r.close()
        m = w.get()
        assert (m.topic, m.payload, m.qos, m.retain) == ("will/t", b"bye", will_qos, False)

    def test_will_qos_bounded_by_subscription(self, raw):
        w, r = raw_sub_and_pub(raw, "w", [("will/q", 1)], "dying", will=("will/q", b"q2", 2, False))
        r.close()
        m = w.read_publish()
        assert (m["payload"], m["qos"]) == (b"q2", 1)

    @both
    def test_no_will_after_disconnect(self, raw, client, broker, proto):
        """[MQTT-3.1.2-10] DISCONNECT removes the will: it is not published."""
        w = client(client_id="w")
        w.subscribe("will/d", 1)
        w.subscribe("zz/sentinel", 0)
        r = raw()
        r.connect("polite", proto=proto, will=("will/d", b"never", 1, True))
        r.send(gen_disconnect())
        assert r.expect_closed()
        assert wait_until(lambda: [c["client_id"] for c in broker.clients()] == ["w"])
        broker.publish("zz/sentinel", b"end")
        assert w.get().topic == "zz/sentinel"
        assert user_retained(broker) == []

    @both
    def test_paho_will(self, client, broker, proto):
        w = client(client_id="w", proto=proto)
        w.subscribe("will/p", 2)
        dying = client(client_id="pdying", proto=proto, will=("will/p", b"paho bye", 2, False))
        dying.client.reconnect_delay_set(0.05, 0.1)   # fast teardown
        # drop the TCP connection under paho's feet
        dying.client.socket().shutdown(socket.SHUT_RDWR)
        m = w.get()
        assert (m.payload, m.qos) == (b"paho bye", 2)

    def test_paho_clean_disconnect_no_will(self, client, broker):
        w = client(client_id="w")
        w.subscribe("will/c", 1)
        w.subscribe("zz/sentinel", 0)
        p = client(client_id="clean", will=("will/c", b"x", 1, False))
        p.disconnect()
        assert wait_until(lambda: [c["client_id"] for c in broker.clients()] == ["w"])
        broker.publish("zz/sentinel", b"end")
        assert w.get().topic == "zz/sentinel"

    def test_will_on_kick(self, raw, client, broker):
        """kick closes the connection like EMQ X's kick: the will is published."""
        w = client(client_id="w")
        w.subscribe("will/k", 1)
        r = raw()
        r.connect("kicked", will=("will/k", b"kicked out", 1, False))
        assert broker.kick("kicked") is True
        assert r.expect_closed()
        m = w.get()
        assert m.payload == b"kicked out"
        assert wait_until(lambda: not broker.is_connected("kicked"))
        assert broker.kick("kicked") is False
        assert broker.kick("nobody") is False

    def test_will_on_protocol_error(self, raw, client):
        """A protocol violation closes the connection abnormally
        [MQTT-3.1.2-8]: the will is published."""
        w = client(client_id="w")
        w.subscribe("will/e", 1)
        r = raw()
        r.connect("broken", will=("will/e", b"violated", 0, False))
        r.send(gen_pubrel(1, flags=0))   # bad fixed-header flags [MQTT-2.2.2-2]
        assert r.expect_closed()
        assert w.get().payload == b"violated"

    def test_will_retain_flag(self, raw, broker):
        """A will with retain=1 is stored as retained; a later subscriber
        gets it with RETAIN=1 [MQTT-3.3.1-8]."""
        r = raw()
        r.connect("ret-will", will=("will/r", b"offline", 1, True))
        r.close()
        assert wait_until(lambda: user_retained(broker)) == [
            {"topic": "will/r", "payload": b"offline", "qos": 1}]
        s = raw()
        s.connect("late")
        s.subscribe([("will/r", 1)])
        m = s.read_publish()
        assert (m["payload"], m["qos"], m["retain"]) == (b"offline", 1, True)

    def test_will_on_takeover(self, raw, client):
        """Takeover [MQTT-3.1.4-2] closes the old connection without
        DISCONNECT: its will is published (EMQ X behaviour)."""
        w = client(client_id="w")
        w.subscribe("will/tk", 1)
        old = raw()
        old.connect("same", will=("will/tk", b"old one", 1, False))
        new = raw()
        new.connect("same")
        assert old.expect_closed()
        assert w.get().payload == b"old one"

    def test_broker_stop_publishes_no_will(self, make_broker):
        """Shutting the broker down publishes no wills."""
        b = make_broker()
        r = RawClient(b.mqtt_port)
        try:
            r.connect("stopped", will=("will/s", b"x", 1, True))
            b.stop()
            assert r.expect_closed()
        finally:
            r.close()
        # the (stopped) broker's retained store has no will in it
        assert [t for t in b.core.retained if not t.startswith("$SYS")] == []

    def test_will_utf8_topic_and_binary_payload(self, raw, client):
        w = client(client_id="w")
        w.subscribe("will/\u00fc", 0)
        r = raw()
        payload = bytes(range(256))
        r.connect("bin", will=("will/\u00fc", payload, 0, False))
        r.close()
        assert w.get().payload == payload

    @pytest.mark.parametrize("topic", ["will/+", "will/#", ""])
    def test_invalid_will_topic(self, raw, topic):
        """[MQTT-3.3.2-2] [MQTT-4.7.3-1] a will topic must be a valid topic name."""
        r = raw()
        r.send(gen_connect("badwill", will=(topic, b"x", 0, False)))
        assert r.expect_closed()


###############################################################################
# 08 Shared subscriptions (EMQ X 2.x $queue/ and $share/<group>/)
###############################################################################

class Test08Shared:

    @pytest.mark.parametrize("flt", ["$queue/sh/t", "$share/g/sh/t"])
    def test_round_robin(self, raw, broker, flt):
        """Two members of one group, four messages: two each."""
        a, b = raw(), raw()
        a.connect("a")
        b.connect("b")
        assert a.subscribe([(flt, 1), ("zz/sentinel", 0)]) == [1, 0]
        assert b.subscribe([(flt, 1), ("zz/sentinel", 0)]) == [1, 0]
        for i in range(4):
            broker.publish("sh/t", b"%d" % i, qos=1)
        broker.publish("zz/sentinel", b"end")
        counts = {}
        for name, r in (("a", a), ("b", b)):
            got = []
            while True:
                m = r.read_publish()
                if m["topic"] == "zz/sentinel":
                    break
                assert m["topic"] == "sh/t"
                got.append(m["payload"])
                r.send(gen_puback(m["pid"]))
            counts[name] = got
        assert len(counts["a"]) == len(counts["b"]) == 2
        assert sorted(counts["a"] + counts["b"]) == [b"0", b"1", b"2", b"3"]

    def test_groups_each_get_a_copy(self, raw, broker):
        """Each group gets one copy; a normal subscriber gets its own copy."""
        clients = {}
        for cid, flt in (("g1a", "$share/g1/gr/+"), ("g1b", "$share/g1/gr/+"),
                         ("g2a", "$share/g2/gr/x"), ("q", "$queue/gr/x"), ("plain", "gr/x")):
            r = raw()
            r.connect(cid)
            assert r.subscribe([(flt, 0), ("zz/sentinel", 0)]) == [0, 0]
            clients[cid] = r
        broker.publish("gr/x", b"copy")
        broker.publish("zz/sentinel", b"end")
        received = {}
        for cid, r in clients.items():
            received[cid] = []
            while True:
                m = r.read_publish()
                if m["topic"] == "zz/sentinel":
                    break
                received[cid].append(m["payload"])
        assert received["plain"] == [b"copy"]
        assert received["g2a"] == [b"copy"]
        assert received["q"] == [b"copy"]
        assert sorted(received["g1a"] + received["g1b"]) == [b"copy"]

    def test_no_retained_on_shared_subscribe(self, raw, broker):
        broker.publish("shr/t", b"retained", retain=True)
        r = raw()
        r.connect("shr")
        assert r.subscribe([("$share/g/shr/t", 0), ("$queue/shr/t", 0), ("zz/sentinel", 0)]) == [0, 0, 0]
        broker.publish("zz/sentinel", b"end")
        assert r.read_publish()["topic"] == "zz/sentinel"

    def test_paho_shared(self, client, broker):
        members = [client(client_id="m%d" % i) for i in range(2)]
        for m in members:
            m.subscribe("$share/grp/ps/#", 1)
        pub = client(client_id="psp")
        for i in range(6):
            pub.publish("ps/x", b"%d" % i, qos=1)
        got = [sorted(m.get().payload for _ in range(3)) for m in members]
        assert sorted(got[0] + got[1]) == [b"%d" % i for i in range(6)]
        for m in members:
            m.expect_nothing(0.1)

    def test_unsubscribe_shared(self, raw, broker):
        a, b = raw(), raw()
        a.connect("ua")
        b.connect("ub")
        a.subscribe([("$queue/us", 0)])
        b.subscribe([("$queue/us", 0)])
        a.send(gen_unsubscribe(5, ["$queue/us"]))
        assert a.read_packet() == (UNSUBACK, 0, b"\x00\x05")
        for i in range(3):
            broker.publish("us", b"%d" % i)
        assert [b.read_publish()["payload"] for _ in range(3)] == [b"0", b"1", b"2"]
        a.expect_nothing(0.1)
        assert broker.subscriptions("ub") == [{"client_id": "ub", "topic": "$queue/us", "qos": 0}]
        assert broker.routes() == ["us"]

    def test_member_leaving_group(self, raw, broker):
        """A clean-session member that disconnects leaves the group."""
        a, b = raw(), raw()
        a.connect("la")
        b.connect("lb")
        a.subscribe([("$share/g/lv", 0)])
        b.subscribe([("$share/g/lv", 0)])
        offline(a)
        assert wait_until(lambda: len(broker.sessions()) == 1)
        for i in range(4):
            broker.publish("lv", b"%d" % i)
        assert [b.read_publish()["payload"] for _ in range(4)] == [b"0", b"1", b"2", b"3"]

    @pytest.mark.parametrize("bad", ["$share/g", "$share//t", "$share/g+/t", "$share/g#/t", "$queue/"])
    def test_invalid_shared_filter(self, raw, bad):
        r = raw()
        r.connect("bad")
        assert r.subscribe([(bad, 0), ("ok", 0)]) == [0x80, 0]


###############################################################################
# 09 $SYS topics and presence events
###############################################################################

class Test09Sys:

    @pytest.fixture
    def broker(self, make_broker):
        return make_broker(sys_interval=0.2)

    def test_sys_retained_topics(self, raw):
        r = raw()
        r.connect("sys")
        r.subscribe([("$SYS/brokers", 0), ("$SYS/brokers/+/version", 0),
                     ("$SYS/brokers/+/sysdescr", 0)])
        got = {}
        while len(got) < 3:
            m = r.read_publish()
            assert m["retain"] is True
            got[m["topic"]] = m["payload"]
        assert got == {"$SYS/brokers": NODE.encode(),
                       "$SYS/brokers/%s/version" % NODE: emqx_lite.__version__.encode(),
                       "$SYS/brokers/%s/sysdescr" % NODE: b"EMQ X Lite"}

    def test_uptime_and_datetime(self, raw):
        r = raw()
        r.connect("hb")
        r.subscribe([("$SYS/brokers/%s/uptime" % NODE, 0), ("$SYS/brokers/%s/datetime" % NODE, 0)])
        got = {}
        while len(got) < 2:
            m = r.read_publish(timeout=3)
            got[m["topic"].rsplit("/", 1)[1]] = m["payload"].decode()
        assert re.fullmatch(r"(\d+ (days|hours|minutes),? ?)*\d+ seconds", got["uptime"]), got
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", got["datetime"]), got

    def test_stats_and_metrics(self, raw):
        r = raw()
        r.connect("st")
        r.subscribe([("$SYS/brokers/%s/stats/clients/count" % NODE, 0),
                     ("$SYS/brokers/%s/metrics/packets/connect" % NODE, 0)])
        got = {}
        while len(got) < 2:
            m = r.read_publish(timeout=3)
            got[m["topic"].split("/", 3)[3]] = m["payload"]
        assert got == {"stats/clients/count": b"1", "metrics/packets/connect": b"1"}

    def test_sys_wildcard_subscription(self, raw):
        """'$SYS/#' receives the periodic $SYS messages (they are only excluded from
        wildcards at the first level [MQTT-4.7.2-1])."""
        r = raw()
        r.connect("all")
        r.subscribe([("$SYS/#", 0)])
        topics = set()
        while not any("/metrics/" in t for t in topics):
            topics.add(r.read_publish(timeout=3)["topic"])
        assert "$SYS/brokers" in topics

    def test_presence_events(self, raw, client):
        """emqx_modules presence: JSON connected/disconnected events at QoS 1."""
        w = client(client_id="watch")
        w.subscribe("$SYS/brokers/+/clients/+/+", 1)
        r = raw()
        t0 = int(time.time())
        r.connect("pres", clean=False, username="bob", proto=3, keepalive=0)
        m = w.get()
        assert m.topic == "$SYS/brokers/%s/clients/pres/connected" % NODE
        assert m.qos == 1 and m.retain is False
        data = json.loads(m.payload)
        assert set(data) == {"clientid", "username", "ipaddress", "clean_sess", "protocol",
                             "connack", "ts"}
        assert (data["clientid"], data["username"], data["ipaddress"], data["clean_sess"],
                data["protocol"], data["connack"]) == ("pres", "bob", HOST, False, 3, 0)
        assert t0 - 1 <= data["ts"] <= time.time() + 1
        r.send(gen_disconnect())
        m = w.get()
        assert m.topic == "$SYS/brokers/%s/clients/pres/disconnected" % NODE
        assert m.qos == 1
        data = json.loads(m.payload)
        assert set(data) == {"clientid", "username", "reason", "ts"}
        assert (data["clientid"], data["username"], data["reason"]) == ("pres", "bob", "normal")

    def test_no_disconnected_event_for_takeover(self, raw, client):
        w = client(client_id="watch")
        w.subscribe("$SYS/brokers/+/clients/+/disconnected", 1)
        old = raw()
        old.connect("tk")
        new = raw()
        new.connect("tk")
        assert old.expect_closed()
        other = raw()
        other.connect("other")
        other.send(gen_disconnect())
        m = w.get()
        assert m.topic.endswith("/clients/other/disconnected"), m.topic

    def test_clients_cannot_publish_to_sys(self, raw, client):
        """Clients' $SYS publishes are acknowledged but not routed."""
        w = client(client_id="watch")
        w.subscribe("$SYS/fake/#", 1)
        w.subscribe("zz/sentinel", 0)
        r = raw()
        r.connect("faker")
        r.send(gen_publish("$SYS/fake/x", b"lie", qos=1, pid=4))
        assert r.read_packet() == (PUBACK, 0, b"\x00\x04")
        r.send(gen_publish("$SYS/fake/y", b"lie", qos=2, pid=5))
        assert r.read_packet() == (PUBREC, 0, b"\x00\x05")
        r.send(gen_publish("zz/sentinel", b"end", qos=1, pid=6))
        assert r.read_packet() == (PUBACK, 0, b"\x00\x06")
        assert w.get().topic == "zz/sentinel"

    def test_hash_subscriber_sees_no_sys(self, raw):
        """[MQTT-4.7.2-1] '#' does not receive $SYS heartbeats."""
        r = raw()
        r.connect("h")
        r.subscribe([("#", 0)])
        r.expect_nothing(0.5)


###############################################################################
# 10 Metrics and stats
###############################################################################

class Test10Metrics:

    def test_all_names_present_and_zero_on_fresh_broker(self, broker):
        metrics = broker.metrics()
        assert set(metrics) == EMQX_METRIC_NAMES
        assert all(v == 0 for k, v in metrics.items() if k != "messages/retained")
        stats = broker.stats()
        assert set(stats) == EMQX_STAT_NAMES
        assert stats["clients/count"] == 0

    def test_exact_counts_after_known_sequence(self, broker):
        """Exact packet/message counters for a scripted exchange on a fresh broker."""
        sent = []

        def send(r, data):
            sent.append(len(data))
            r.send(data)

        a, b = RawClient(broker.mqtt_port), RawClient(broker.mqtt_port)
        try:
            send(a, gen_connect("ma"))
            assert a.read_packet() == (CONNACK, 0, b"\x00\x00")
            send(a, gen_subscribe(1, [("m/t", 1)]))
            assert a.read_packet()[0] == SUBACK
            send(b, gen_connect("mb"))
            assert b.read_packet() == (CONNACK, 0, b"\x00\x00")
            send(b, gen_publish("m/t", b"q1", qos=1, pid=1))
            assert b.read_packet() == (PUBACK, 0, b"\x00\x01")
            m = a.read_publish()
            send(a, gen_puback(m["pid"]))
            send(b, gen_publish("nobody/here", b"q0"))
            send(b, gen_publish("m/t", b"q0"))
            assert a.read_publish()["qos"] == 0
            send(a, gen_pingreq())
            assert a.read_packet() == (PINGRESP, 0, b"")
            send(b, gen_disconnect())
            assert b.expect_closed()
            send(a, gen_disconnect())
            assert a.expect_closed()
        finally:
            a.close()
            b.close()
        assert wait_until(lambda: broker.metrics()["packets/disconnect"] == 2)
        mt = broker.metrics()
        expected = {
            "packets/connect": 2, "packets/connack": 2,
            "packets/subscribe": 1, "packets/suback": 1,
            "packets/publish/received": 3, "packets/publish/sent": 2,
            "packets/puback/sent": 1, "packets/puback/received": 1,
            "packets/pingreq": 1, "packets/pingresp": 1,
            "packets/disconnect": 2,
            "packets/received": 2 + 1 + 3 + 1 + 1 + 2,
            "packets/sent": 2 + 1 + 2 + 1 + 1,
            "messages/received": 3, "messages/qos0/received": 2,
            "messages/qos1/received": 1, "messages/qos2/received": 0,
            "messages/sent": 2, "messages/qos1/sent": 1, "messages/qos0/sent": 1,
            "messages/dropped": 1,   # the PUBLISH nobody subscribed to
            "packets/unsubscribe": 0, "packets/unsuback": 0,
            "packets/puback/missed": 0,
            "bytes/received": sum(sent),
        }
        assert {k: mt[k] for k in expected} == expected
        assert mt["bytes/sent"] > 0
        assert wait_until(lambda: broker.stats()["sessions/count"] == 0)
        stats = broker.stats()
        assert (stats["clients/count"], stats["clients/max"]) == (0, 2)
        assert (stats["sessions/count"], stats["sessions/max"]) == (0, 2)
        assert (stats["subscriptions/count"], stats["subscriptions/max"]) == (0, 1)
        assert (stats["routes/count"], stats["routes/max"]) == (0, 1)

    def test_qos2_counters(self, raw, broker):
        s, p = raw_sub_and_pub(raw, "s", [("q2", 2)], "p")
        p.send(gen_publish("q2", b"x", qos=2, pid=1))
        assert p.read_packet()[0] == PUBREC
        p.send(gen_pubrel(1))
        assert p.read_packet()[0] == PUBCOMP
        m = s.read_publish()
        s.send(gen_pubrec(m["pid"]))
        assert s.read_packet()[0] == PUBREL
        s.send(gen_pubcomp(m["pid"]))
        assert wait_until(lambda: broker.metrics()["packets/pubcomp/received"] == 1)
        mt = broker.metrics()
        assert {k: mt[k] for k in ("messages/qos2/received", "messages/qos2/sent",
                                   "packets/pubrec/sent", "packets/pubrel/received",
                                   "packets/pubcomp/sent", "packets/pubrec/received",
                                   "packets/pubrel/sent", "packets/pubcomp/received")} == \
            dict.fromkeys(("messages/qos2/received", "messages/qos2/sent",
                           "packets/pubrec/sent", "packets/pubrel/received",
                           "packets/pubcomp/sent", "packets/pubrec/received",
                           "packets/pubrel/sent", "packets/pubcomp/received"), 1)

    def test_unsubscribe_counters(self, raw, broker):
        r = raw()
        r.connect("u")
        r.send(gen_unsubscribe(1, ["x"]))
        assert r.read_packet()[0] == UNSUBACK
        mt = broker.metrics()
        assert (mt["packets/unsubscribe"], mt["packets/unsuback"]) == (1, 1)

    def test_clients_stats_follow_connections(self, client, broker):
        cs = [client(client_id="c%d" % i) for i in range(3)]
        assert broker.stats()["clients/count"] == 3
        for c in cs:
            c.disconnect()
        assert wait_until(lambda: broker.stats()["clients/count"] == 0)
        assert broker.stats()["clients/max"] == 3

    def test_max_awaiting_rel(self, make_broker):
        """max_awaiting_rel=2: a third unreleased inbound QoS 2 id gets no
        PUBREC and is counted in messages/qos2/dropped (EMQ X). The broker
        answers in order, so PUBCOMP 1 arriving next proves there was no PUBREC 3."""
        b = make_broker(max_awaiting_rel=2)
        r = RawClient(b.mqtt_port)
        try:
            r.connect("ar")
            for pid in (1, 2, 3):
                r.send(gen_publish("ar", b"x", qos=2, pid=pid))
            assert r.read_packet() == (PUBREC, 0, b"\x00\x01")
            assert r.read_packet() == (PUBREC, 0, b"\x00\x02")
            assert wait_until(lambda: b.metrics()["messages/qos2/dropped"] == 1)
            r.send(gen_pubrel(1))
            assert r.read_packet() == (PUBCOMP, 0, b"\x00\x01")
            r.send(gen_publish("ar", b"x", qos=2, pid=3))
            assert r.read_packet() == (PUBREC, 0, b"\x00\x03")
            assert b.metrics()["messages/qos2/dropped"] == 1
        finally:
            r.close()


###############################################################################
# 13 Malformed input: the bad connection is closed, the broker carries on
###############################################################################

def bad_utf8_string(raw_bytes):
    return len(raw_bytes).to_bytes(2, "big") + raw_bytes


class Test13Malformed:
    """Each test connects a healthy paho pair first (``health``), feeds a raw
    socket bad bytes, checks that socket is closed, then checks the paho pair
    still publishes and receives."""

    @pytest.fixture
    def broker(self, make_broker):
        return make_broker(max_packet_size=1024, connect_timeout=0.3)

    def connected(self, raw, cid="bad"):
        r = raw()
        assert r.connect(cid) == (0, 0)
        return r

    def assert_closes(self, r, data, health, send_may_fail=False, **expect_closed):
        """``r`` sends ``data``; the broker closes ``r`` (expect_closed() with
        ``expect_closed`` as its arguments) and still routes for the healthy
        pair. ``send_may_fail``: the broker may close ``r`` before it has sent
        all of ``data``."""
        try:
            r.send(data)
        except OSError:
            if not send_may_fail:
                raise
        assert r.expect_closed(**expect_closed)
        health.check()

    def assert_publish_closes(self, raw, client, health, data):
        """assert_closes for a PUBLISH after CONNECT; a subscriber on "#" got
        nothing from it."""
        w = client(client_id="w")
        w.subscribe("#", 0)
        self.assert_closes(self.connected(raw), data, health)
        assert all(m.topic == "health/x" for m in w.drain())

    def test_truncated_packet_then_close(self, raw, broker, health):
        r = self.connected(raw)
        r.send(b"\x30\x20\x00\x05hel")     # PUBLISH promising 32 bytes, 5 sent
        r.close()
        assert wait_until(lambda: [c["client_id"] for c in broker.clients()] ==
                          ["healthy-pub", "healthy-sub"])
        health.check()

    def test_truncated_connect_then_close(self, raw, broker, health):
        r = raw()
        r.send(gen_connect("half")[:7])
        r.close()
        assert wait_until(lambda: broker.listener_infos()[0]["current_clients"] == 2)
        health.check()

    def test_five_byte_remaining_length(self, raw, health):
        """2.2.3: the remaining length is at most four bytes."""
        self.assert_closes(self.connected(raw), b"\x30\xff\xff\xff\xff\x01", health)

    def test_five_byte_remaining_length_before_connect(self, raw, health):
        self.assert_closes(raw(), b"\x10\x80\x80\x80\x80\x01", health)

    def test_oversize_packet(self, raw, health):
        """A packet above max_packet_size (1024 here) closes the connection."""
        r = self.connected(raw)
        self.assert_closes(r, gen_publish("big", b"x" * 2000), health, send_may_fail=True)

    def test_oversize_header_only(self, raw, health):
        """The size is checked from the header, before the body arrives."""
        self.assert_closes(self.connected(raw), b"\x30" + enc_varint(10_000_000), health)

    def test_packet_at_limit_is_fine(self, raw, client, health):
        sub = client(client_id="lim")
        sub.subscribe("lim", 0)
        r = self.connected(raw)
        body_len = 1024 - 2 - len("lim")
        r.send(gen_publish("lim", b"y" * body_len))
        assert len(sub.get().payload) == body_len
        health.check()

    @pytest.mark.parametrize("first", [0x00, 0xF0], ids=["type0", "type15"])
    def test_reserved_packet_types(self, raw, health, first):
        """Packet types 0 and 15 are reserved / forbidden in 3.1.1."""
        self.assert_closes(self.connected(raw), bytes((first, 0)), health)

    @pytest.mark.parametrize("ptype", [CONNACK, SUBACK, UNSUBACK, PINGRESP])
    def test_server_to_client_packet_types(self, raw, health, ptype):
        body = b"\x00\x01" if ptype in (SUBACK, UNSUBACK) else (b"\x00\x00" if ptype == CONNACK else b"")
        self.assert_closes(self.connected(raw), packet(ptype << 4, body), health)

    @pytest.mark.parametrize("flags", [0x00, 0x01, 0x03, 0x0F])
    def test_bad_pubrel_flags(self, raw, health, flags):
        """[MQTT-3.6.1-1] [MQTT-2.2.2-2] PUBREL flags must be 0010."""
        r = self.connected(raw)
        r.send(gen_publish("t", b"x", qos=2, pid=1))
        assert r.read_packet() == (PUBREC, 0, b"\x00\x01")
        self.assert_closes(r, gen_pubrel(1, flags=flags), health)

    @pytest.mark.parametrize("data", [b"\xc1\x00", b"\xe2\x00", b"\x41\x02\x00\x01",
                                      b"\x12" + gen_connect("x")[1:]],
                             ids=["pingreq", "disconnect", "puback", "connect"])
    def test_bad_fixed_header_flags(self, raw, health, data):
        """[MQTT-2.2.2-2] invalid fixed-header flags close the connection."""
        self.assert_closes(self.connected(raw), data, health)

    def test_publish_qos3(self, raw, health):
        """[MQTT-3.3.1-4] a PUBLISH with both QoS bits set is malformed."""
        self.assert_closes(self.connected(raw), packet(0x36, enc_str("t") + b"\x00\x01x"), health)

    def test_publish_packet_id_zero(self, raw, health):
        """[MQTT-2.3.1-1] QoS > 0 packets need a non-zero packet id."""
        self.assert_closes(self.connected(raw), gen_publish("t", b"x", qos=1, pid=0), health)

    def test_dup_on_qos0(self, raw, health):
        """[MQTT-3.3.1-2] DUP must be 0 for QoS 0."""
        self.assert_closes(self.connected(raw), gen_publish("t", b"x", qos=0, dup=True), health)

    @pytest.mark.parametrize("raw_id", [b"\xc3\x28", b"\xff", b"\xed\xa0\x80", b"\xc0\x80"],
                             ids=["bad-continuation", "ff", "surrogate", "overlong-nul"])
    def test_invalid_utf8_client_id(self, raw, broker, health, raw_id):
        """[MQTT-1.5.3-1] ill-formed UTF-8 (including surrogates) closes the connection."""
        r = raw()
        body = enc_str("MQTT") + bytes((4, 0x02)) + (60).to_bytes(2, "big") + bad_utf8_string(raw_id)
        r.send(packet(0x10, body))
        assert r.expect_closed()
        assert len(broker.clients()) == 2
        health.check()

    @pytest.mark.parametrize("raw_topic", [b"a/\xc3\x28", b"\xff\xfe", b"x/\xed\xbf\xbf"])
    def test_invalid_utf8_topic(self, raw, client, health, raw_topic):
        """[MQTT-1.5.3-1] ill-formed UTF-8 in a PUBLISH topic closes the connection."""
        self.assert_publish_closes(raw, client, health, packet(0x30, bad_utf8_string(raw_topic) + b"payload"))

    def test_invalid_utf8_subscribe_filter(self, raw, health):
        r = self.connected(raw)
        self.assert_closes(r, packet(0x82, b"\x00\x01" + bad_utf8_string(b"a/\xff") + b"\x00"), health)

    def test_nul_in_topic(self, raw, client, health):
        """[MQTT-1.5.3-2] U+0000 in a string closes the connection."""
        self.assert_publish_closes(raw, client, health, gen_publish("a\u0000b", b"x"))

    def test_nul_in_subscribe_filter(self, raw, health):
        """[MQTT-1.5.3-2] a SUBSCRIBE topic filter containing U+0000 closes the
        connection: no SUBACK, not even 0x80 for that filter."""
        self.assert_closes(self.connected(raw), gen_subscribe(1, [("good", 0), ("a/\u0000", 1)]), health)

    def test_nul_in_unsubscribe_filter(self, raw, health):
        """[MQTT-1.5.3-2] an UNSUBSCRIBE topic filter containing U+0000 closes
        the connection: no UNSUBACK."""
        r = self.connected(raw)
        assert r.subscribe([("a/b", 0)]) == [0]
        self.assert_closes(r, gen_unsubscribe(2, ["a/b", "a/\u0000"]), health)

    def test_nul_in_client_id(self, raw, health):
        """[MQTT-1.5.3-2]"""
        self.assert_closes(raw(), gen_connect("a\u0000b"), health)

    def test_empty_topic(self, raw, health):
        """[MQTT-4.7.3-1] a topic name is at least one character long."""
        self.assert_closes(self.connected(raw), gen_publish("", b"x", qos=1, pid=1), health)

    @pytest.mark.parametrize("topic", ["a/+", "a/#", "+", "#", "a/b+"])
    def test_wildcard_in_publish_topic(self, raw, client, health, topic):
        """[MQTT-3.3.2-2] a PUBLISH topic name must not contain wildcards."""
        self.assert_publish_closes(raw, client, health, gen_publish(topic, b"x"))

    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_random_garbage(self, raw, health, seed):
        rnd = random.Random(seed)
        data = bytes(rnd.randrange(256) for _ in range(4096))
        if data[0] >> 4 == CONNECT:
            data = b"\x00" + data[1:]
        self.assert_closes(raw(), data, health, send_may_fail=True, strict=False)

    def test_random_garbage_after_connect(self, raw, health):
        rnd = random.Random(42)
        r = self.connected(raw)
        data = bytes(rnd.randrange(256) for _ in range(4096))
        self.assert_closes(r, b"\xf0" + data, health, send_may_fail=True, strict=False)

    def test_truncated_fields(self, raw, health):
        """A string length pointing past the packet end is malformed."""
        self.assert_closes(self.connected(raw), packet(0x30, b"\x00\x10ab"), health)

    def test_pingreq_with_body(self, raw, health):
        self.assert_closes(self.connected(raw), b"\xc0\x01\x00", health)

    def test_connect_trailing_bytes(self, raw, health):
        self.assert_closes(raw(), packet(0x10, gen_connect("trail")[2:] + b"\x00"), health)

    def test_connect_timeout(self, raw, health):
        """connect_timeout=0.3: a socket that never sends CONNECT is closed."""
        r = raw()
        t0 = time.monotonic()
        assert r.expect_closed(timeout=3)
        assert time.monotonic() - t0 >= 0.25
        health.check()

    def test_partial_connect_times_out(self, raw, health):
        self.assert_closes(raw(), gen_connect("slow")[:5], health, timeout=3)

    def test_many_bad_clients_at_once(self, raw, health):
        bad = []
        for i in range(20):
            r = raw()
            r.send(bytes((0xF0, 0)) if i % 2 else b"\x30\xff\xff\xff\xff\x01")
            bad.append(r)
        for r in bad:
            assert r.expect_closed()
        health.check()


###############################################################################
# 14-20 MQTT 5.0 (phase 1): CONNECT, PUBLISH, SUBSCRIBE, sessions, DISCONNECT,
# interoperation with 3.1.1, and paho in 5.0 mode
###############################################################################
#
# Normative statements in these classes are MQTT 5.0's (OASIS standard,
# 7 March 2019). Packets are built and parsed by the v5 builders at the top
# (gen_*_v5, parse_*_v5), never by emqx_lite's codec.

#: Every publish property a broker forwards unaltered [MQTT-3.3.2-4]
#: [MQTT-3.3.2-15] [MQTT-3.3.2-16] [MQTT-3.3.2-17] [MQTT-3.3.2-18] [MQTT-3.3.2-20];
#: user properties in order, with a duplicate key and a duplicate pair.
FORWARDED_PROPS = {
    "payload_format_indicator": 1,
    "message_expiry_interval": 3600,
    "content_type": "application/json; charset=utf-8",
    "response_topic": "reply/to/\u00e9",
    "correlation_data": b"\x00\x01\xfe\xff",
    "user_property": [("k", "1"), ("a", "x"), ("k", "2"), ("k", "1"), ("\u00fc", "")],
}


def assert_forwarded(got, sent=FORWARDED_PROPS):
    """``got`` (a delivered PUBLISH's properties) are ``sent`` unaltered; a
    Message Expiry Interval may have counted down by a second on the way
    [MQTT-3.3.2-6] (a message delivered at once keeps, or nearly keeps, its value)."""
    expiry = sent.get("message_expiry_interval")
    if expiry is not None:
        assert expiry - 1 <= got.get("message_expiry_interval", -1) <= expiry, got
        got = dict(got, message_expiry_interval=expiry)
    assert got == sent


def _connack5(port, client_id, **connect_kw):
    """A v5 CONNECT on a fresh socket: -> the CONNACK's reason code; a refused
    connection is closed after its CONNACK [MQTT-3.2.2-7]."""
    r = RawClient5(port)
    try:
        ack = r.connect(client_id, **connect_kw)
        if ack["reason"] >= 0x80:
            assert ack["session_present"] == 0   # [MQTT-3.2.2-6]
            assert r.expect_closed()
        return ack["reason"]
    finally:
        r.close()


#: PUBACK/PUBREC reason codes of an accepted publish, where the test is about something else.
ACCEPTED = (RC_SUCCESS, RC_NO_MATCHING_SUBSCRIBERS)


def _session_ids(b):
    return [s["client_id"] for s in b.sessions()]


class Test14V5Connect:

    def test_connack_bytes_and_default_properties(self, raw5):
        """[MQTT-3.2.2-1] [MQTT-3.2.2-2] CONNACK to a v5 CONNECT: flags 0,
        reason 0x00 and the phase-1 properties (Receive Maximum 100, Topic
        Alias Maximum 256, Retain / Wildcard / Shared Subscription Available
        1, Subscription Identifiers Available 1, no Maximum QoS)."""
        r = raw5()
        assert r.connect("c5") == {"session_present": 0, "reason": RC_SUCCESS,
                                   "props": V5_CONNACK_DEFAULTS}

    def test_v5_client_is_listed_with_level_5(self, raw5, broker):
        raw5().connect("lvl5", keepalive=30)
        (info,) = wait_until(lambda: broker.clients())
        assert (info["client_id"], info["proto_ver"], info["keepalive"]) == ("lvl5", 5, 30)

    def test_connect_properties_are_accepted(self, raw5):
        """Every CONNECT property of phase 1 is read; none changes the CONNACK."""
        props = [("session_expiry_interval", 0), ("receive_maximum", 10),
                 ("maximum_packet_size", 65536), ("topic_alias_maximum", 5),
                 ("request_problem_information", 1), ("request_response_information", 0),
                 ("user_property", [("a", "1"), ("a", "1"), ("b", "")])]
        plain = raw5().connect("plain")
        ack = raw5().connect("props", properties=props)
        assert (ack["reason"], ack["props"]) == (RC_SUCCESS, plain["props"])

    @pytest.mark.parametrize("awaiting_rel, expected", [(7, 7), (0, 65535)])
    def test_receive_maximum_is_max_awaiting_rel(self, make_broker, raw5, awaiting_rel, expected):
        """CONNACK Receive Maximum: max_awaiting_rel, 65535 when that is 0 (unlimited)."""
        b = make_broker(max_awaiting_rel=awaiting_rel)
        assert raw5(port=b.mqtt_port).connect("rm")["props"]["receive_maximum"] == expected

    def test_topic_alias_maximum_is_max_topic_alias(self, make_broker, raw5):
        b = make_broker(max_topic_alias=5)
        assert raw5(port=b.mqtt_port).connect("tam")["props"]["topic_alias_maximum"] == 5

    def test_retain_available_0_without_the_retainer(self, broker, raw5):
        broker.set_plugin("emqx_retainer", False)
        assert raw5().connect("noret")["props"]["retain_available"] == 0

    @pytest.mark.parametrize("clean_start", [True, False], ids=["clean", "persistent"])
    def test_empty_client_id_gets_an_assigned_identifier(self, raw5, broker, clean_start):
        """[MQTT-3.1.3-6] [MQTT-3.1.3-7] [MQTT-3.2.2-16] a zero-length client id
        is accepted (also with Clean Start 0, unlike 3.1.1) and the CONNACK
        carries the Assigned Client Identifier, unique and used for the client."""
        acks = [raw5().connect("", clean_start=clean_start) for _ in range(2)]
        assert [a["reason"] for a in acks] == [RC_SUCCESS, RC_SUCCESS]
        ids = [a["props"]["assigned_client_identifier"] for a in acks]
        assert all(ids) and ids[0] != ids[1]
        listed = wait_until(lambda: len(broker.clients()) == 2 and broker.clients())
        assert sorted(c["client_id"] for c in listed) == sorted(ids)

    def test_assigned_identifier_names_the_session(self, raw5, broker):
        r = raw5()
        cid = r.connect("")["props"]["assigned_client_identifier"]
        assert r.subscribe([("assigned/t", sub_opts(1))]) == [1]
        broker.publish("assigned/t", b"to the assigned id", qos=1)
        assert r.read_publish()["payload"] == b"to the assigned id"
        assert broker.subscriptions(cid) == [{"client_id": cid, "topic": "assigned/t", "qos": 1}]

    @pytest.mark.parametrize("asked, server_keep_alive", [(60, 10), (0, 10), (5, None), (10, None)])
    def test_server_keep_alive(self, make_broker, raw5, asked, server_keep_alive):
        """[MQTT-3.2.2-21] [MQTT-3.2.2-22] with max_keepalive=10 a client asking
        for more (or for none) gets Server Keep Alive 10 and that keepalive
        applies; a client within the ceiling gets no Server Keep Alive."""
        b = make_broker(max_keepalive=10)
        ack = raw5(port=b.mqtt_port).connect("ska", keepalive=asked)
        assert ack["reason"] == RC_SUCCESS
        assert ack["props"].get("server_keep_alive") == server_keep_alive
        assert b.clients()[0]["keepalive"] == (server_keep_alive or asked)

    @pytest.mark.parametrize("auth_props", [
        {"authentication_method": "SCRAM-SHA-1"},
        {"authentication_method": "SCRAM-SHA-1", "authentication_data": b"client-first"},
    ], ids=["method", "method+data"])
    def test_authentication_method_gets_0x8c(self, raw5, broker, auth_props):
        """[MQTT-4.12.0-1] no enhanced authentication in phase 1: an
        Authentication Method gets CONNACK 0x8C (Bad authentication method)
        and the connection is closed [MQTT-3.2.2-7]."""
        r = raw5()
        ack = r.connect("enh", properties=auth_props)
        assert (ack["session_present"], ack["reason"]) == (0, RC_BAD_AUTHENTICATION_METHOD)
        assert "authentication_method" not in ack["props"]
        assert r.expect_closed()
        assert broker.clients() == [] and broker.sessions() == []

    def test_client_id_longer_than_max_clientid_len_gets_0x85(self, make_broker):
        """[MQTT-3.1.3-8] a rejected client id: CONNACK 0x85 (Client Identifier not valid)."""
        b = make_broker(max_clientid_len=8)
        assert _connack5(b.mqtt_port, "123456789") == RC_CLIENT_ID_NOT_VALID
        assert _connack5(b.mqtt_port, "12345678") == RC_SUCCESS

    def test_auth_refusals_use_v5_reason_codes(self, make_broker):
        """emqx_auth_username: a wrong password gets 0x86 (Bad User Name or
        Password); a client nobody vouches for, with allow_anonymous off, 0x87
        (Not authorized) [MQTT-3.2.2-8]."""
        b = make_broker(allow_anonymous=False, auth_username={"alice": "pw"})
        b.set_plugin("emqx_auth_username", True)
        assert _connack5(b.mqtt_port, "a1", username="alice", password=b"pw") == RC_SUCCESS
        assert _connack5(b.mqtt_port, "a2", username="alice", password=b"bad") == \
            RC_BAD_USERNAME_OR_PASSWORD
        assert _connack5(b.mqtt_port, "a3", username="mallory", password=b"pw") == RC_NOT_AUTHORIZED
        assert _connack5(b.mqtt_port, "a4") == RC_NOT_AUTHORIZED

    def test_unsupported_level_keeps_the_3x_connack(self, raw5, broker):
        """[MQTT-3.1.2-2] level 6 in an otherwise v5-shaped CONNECT: the 3.x
        CONNACK 0x01 (two bytes, no properties) and the close."""
        r = raw5()
        data = bytearray(gen_connect_v5("lvl6"))
        data[2 + 6] = 6   # the protocol level byte, after "\x00\x04MQTT"
        r.send(bytes(data))
        assert r.read_packet() == (CONNACK, 0, b"\x00\x01")
        assert r.expect_closed()
        assert broker.clients() == []

    @pytest.mark.parametrize("props", [{"receive_maximum": 0}, {"maximum_packet_size": 0}],
                             ids=["receive-maximum-0", "maximum-packet-size-0"])
    def test_zero_receive_maximum_or_packet_size_is_a_protocol_error(self, raw5, broker, props):
        """A Receive Maximum or Maximum Packet Size of 0 is a Protocol Error
        (5.0 sections 3.1.2.11.3, 3.1.2.11.4): the connection is refused,
        with CONNACK 0x82 or a bare close, never accepted."""
        r = raw5()
        r.send(gen_connect_v5("zero", properties=props))
        assert r.expect_refused() in (None, RC_PROTOCOL_ERROR)
        assert broker.clients() == []

    def test_will_properties_are_carried_by_the_will(self, raw5):
        """[MQTT-3.1.2-8] the will is published when the connection is lost,
        with its Will Properties as the message's properties (as a PUBLISH's
        would be [MQTT-3.3.2-4] [MQTT-3.3.2-15..20])."""
        w = raw5()
        w.connect("watch")
        assert w.subscribe([("will5/t", sub_opts(1))]) == [1]
        dying = raw5()
        ack = dying.connect("dying5", will=("will5/t", b"bye", 1, False, FORWARDED_PROPS))
        assert ack["reason"] == RC_SUCCESS
        dying.close()
        m = w.read_publish()
        assert (m["topic"], m["payload"], m["qos"], m["retain"]) == ("will5/t", b"bye", 1, False)
        assert_forwarded(m["props"])


class Test15V5Publish:

    @pytest.mark.parametrize("qos", [0, 1, 2])
    def test_properties_forwarded_unchanged_to_v5(self, raw5, qos):
        """[MQTT-3.3.2-4] [MQTT-3.3.2-15] [MQTT-3.3.2-16] [MQTT-3.3.2-17]
        [MQTT-3.3.2-18] [MQTT-3.3.2-20] Payload Format Indicator, Message
        Expiry Interval, Content Type, Response Topic, Correlation Data and
        the User Properties (in order, duplicates kept) reach a v5 subscriber
        unaltered, and nothing is added (no Topic Alias, no Subscription
        Identifier)."""
        sub = raw5()
        sub.connect("fw-sub")
        assert sub.subscribe([("fw/#", sub_opts(2))]) == [2]
        pub = raw5()
        pub.connect("fw-pub")
        assert pub.publish("fw/t", b"payload", qos=qos, pid=9, properties=FORWARDED_PROPS) in \
            (None, RC_SUCCESS)
        m = sub.read_publish()
        assert (m["topic"], m["payload"], m["qos"]) == ("fw/t", b"payload", qos)
        assert_forwarded(m["props"])
        sub.ack(m)

    def test_many_user_properties_keep_their_order(self, raw5):
        """[MQTT-3.3.2-17] [MQTT-3.3.2-18]"""
        pairs = [("key-%d" % (i % 7), "value-%d" % i) for i in range(60)] + [("key-0", "value-0")] * 3
        sub = raw5()
        sub.connect("up-sub")
        sub.subscribe([("up/t", sub_opts(0))])
        pub = raw5()
        pub.connect("up-pub")
        pub.publish("up/t", b"x", properties={"user_property": pairs})
        assert sub.read_publish()["props"] == {"user_property": pairs}

    def test_no_properties_is_property_length_0(self, raw5, raw):
        """[MQTT-2.2.2-1] a message without properties (from a 3.1.1 client)
        reaches a v5 subscriber with a Property Length of 0."""
        sub = raw5()
        sub.connect("np-sub")
        sub.subscribe([("np/t", sub_opts(0))])
        pub = raw()
        pub.connect("np-pub")
        pub.send(gen_publish("np/t", b"plain"))
        assert sub.read_packet() == (PUBLISH, 0, enc_str("np/t") + b"\x00" + b"plain")

    @pytest.mark.parametrize("qos", [0, 1])
    def test_v3_subscriber_gets_a_311_publish_without_properties(self, raw5, raw, qos):
        """A v5 PUBLISH with properties reaches a 3.1.1 subscriber as a valid
        3.1.1 PUBLISH: topic, packet id, payload, and no properties."""
        sub = raw()
        sub.connect("v3-sub")
        assert sub.subscribe([("mix/t", qos)]) == [qos]
        pub = raw5()
        pub.connect("v5-pub")
        pub.publish("mix/t", b"from v5", qos=qos, pid=3, properties=FORWARDED_PROPS)
        ptype, flags, body = sub.read_packet()
        assert (ptype, flags) == (PUBLISH, qos << 1)
        pid = parse_publish(flags, body)["pid"]
        assert body == enc_str("mix/t") + (pid.to_bytes(2, "big") if qos else b"") + b"from v5"

    def test_retained_message_keeps_its_properties(self, raw5, raw, broker):
        """A retained message keeps its properties: a later v5 subscriber gets
        them with RETAIN 1 [MQTT-3.3.1-9]; a later 3.1.1 subscriber gets none."""
        props = {k: v for k, v in FORWARDED_PROPS.items() if k != "message_expiry_interval"}
        pub = raw5()
        pub.connect("ret-pub")
        assert pub.publish("ret5/t", b"state", qos=1, retain=True, properties=props) in ACCEPTED
        assert wait_until(lambda: user_retained(broker))
        sub = raw5()
        sub.connect("ret-sub")
        assert sub.subscribe([("ret5/#", sub_opts(1))]) == [1]
        m = sub.read_publish()
        assert (m["topic"], m["payload"], m["qos"], m["retain"]) == ("ret5/t", b"state", 1, True)
        assert m["props"] == props
        sub.ack(m)
        old = raw()
        old.connect("ret-v3")
        assert old.subscribe([("ret5/t", 0)]) == [0]
        assert old.read_packet() == (PUBLISH, 0x01, enc_str("ret5/t") + b"state")

    # --- Topic Alias (client to server) ---------------------------------------------------
    def test_topic_alias_is_set_and_used(self, raw5, raw):
        """[MQTT-3.3.2-12] a PUBLISH with a topic and a Topic Alias sets the
        alias, one with an empty topic uses it, a new topic re-maps it.
        Subscribers (5.0 and 3.1.1) get the full topic and no alias (the
        server sends no aliases in phase 1)."""
        w5 = raw5()
        w5.connect("ta-w5")
        w5.subscribe([("ta/#", sub_opts(0))])
        w3 = raw()
        w3.connect("ta-w3")
        w3.subscribe([("ta/#", 0)])
        pub = raw5()
        pub.connect("ta-pub")
        sends = [("ta/one", 1, b"1"), ("", 1, b"2"), ("ta/two", 1, b"3"), ("", 1, b"4"),
                 ("ta/max", 256, b"5"), ("", 256, b"6"), ("", 1, b"7")]
        for i, (topic, alias, payload) in enumerate(sends, 1):
            assert pub.publish(topic, payload, qos=1, pid=i,
                               properties={"topic_alias": alias}) == RC_SUCCESS
        expected = [("ta/one", b"1"), ("ta/one", b"2"), ("ta/two", b"3"), ("ta/two", b"4"),
                    ("ta/max", b"5"), ("ta/max", b"6"), ("ta/two", b"7")]
        got5 = [w5.read_publish() for _ in expected]
        assert [(m["topic"], m["payload"]) for m in got5] == expected
        assert all(m["props"] == {} for m in got5)
        got3 = [w3.read_publish() for _ in expected]
        assert [(m["topic"], m["payload"]) for m in got3] == expected

    @pytest.mark.parametrize("topic", ["ta/t", ""], ids=["with-topic", "empty-topic"])
    @pytest.mark.parametrize("alias", [0, 257, 65535])
    def test_topic_alias_0_or_above_the_maximum_gets_0x94(self, raw5, broker, alias, topic):
        """[MQTT-3.3.2-8] [MQTT-3.3.2-9] a Topic Alias of 0 or above the Topic
        Alias Maximum (256 by default): DISCONNECT 0x94 (Topic Alias invalid)."""
        r = raw5()
        r.connect("ta-bad")
        r.send(gen_publish_v5(topic, b"x", properties={"topic_alias": alias}))
        assert r.expect_disconnect() == RC_TOPIC_ALIAS_INVALID
        assert wait_until(lambda: not broker.is_connected("ta-bad"))

    def test_topic_alias_maximum_setting_bounds_the_aliases(self, make_broker, raw5):
        b = make_broker(max_topic_alias=4)
        r = raw5(port=b.mqtt_port)
        assert r.connect("ta-4")["props"]["topic_alias_maximum"] == 4
        assert r.publish("ta/4", b"ok", qos=1, properties={"topic_alias": 4}) in ACCEPTED
        r.send(gen_publish_v5("ta/5", b"x", properties={"topic_alias": 5}))
        assert r.expect_disconnect() == RC_TOPIC_ALIAS_INVALID

    def test_empty_topic_with_an_unknown_alias_is_a_protocol_error(self, raw5):
        """An empty Topic Name with a Topic Alias that has no mapping is a
        Protocol Error (5.0 section 3.3.4): DISCONNECT 0x82."""
        r = raw5()
        r.connect("ta-unknown")
        assert r.publish("ta/known", b"x", qos=1, properties={"topic_alias": 1}) in ACCEPTED
        r.send(gen_publish_v5("", b"x", qos=1, pid=2, properties={"topic_alias": 2}))
        assert r.expect_disconnect() == RC_PROTOCOL_ERROR

    def test_empty_topic_without_an_alias_is_a_protocol_error(self, raw5):
        r = raw5()
        r.connect("ta-none")
        r.send(gen_publish_v5("", b"x", qos=1, pid=1))
        assert r.expect_disconnect() == RC_PROTOCOL_ERROR

    def test_topic_aliases_end_with_the_connection(self, raw5):
        """[MQTT-3.3.2-7] aliases are not carried to a new network connection."""
        r = raw5()
        r.connect("ta-conn", clean_start=False, properties={"session_expiry_interval": 60})
        assert r.publish("ta/c", b"x", qos=1, properties={"topic_alias": 3}) in ACCEPTED
        r.send(gen_disconnect_v5())
        assert r.expect_closed()
        r2 = raw5()
        assert r2.connect("ta-conn", clean_start=False)["session_present"] == 1
        r2.send(gen_publish_v5("", b"x", qos=1, pid=1, properties={"topic_alias": 3}))
        assert r2.expect_disconnect() == RC_PROTOCOL_ERROR

    def test_subscription_identifier_in_publish_is_a_protocol_error(self, raw5, broker):
        """[MQTT-3.3.4-6] a client PUBLISH must not carry a Subscription
        Identifier: DISCONNECT 0x82."""
        w = raw5()
        w.connect("sid-w")
        w.subscribe([("sid/#", sub_opts(0))])
        r = raw5()
        r.connect("sid-pub")
        r.send(gen_publish_v5("sid/t", b"x", properties={"subscription_identifier": 1}))
        assert r.expect_disconnect() == RC_PROTOCOL_ERROR
        assert w.pending_publishes() == []

    # --- PUBACK / PUBREC reason codes -------------------------------------------------------
    @pytest.mark.parametrize("qos", [1, 2])
    def test_ack_0x10_when_nobody_matched(self, raw5, qos):
        """[MQTT-3.4.2-1] [MQTT-3.5.2-1] PUBACK/PUBREC 0x10 (No matching
        subscribers); the QoS 2 flow then completes as usual."""
        r = raw5()
        r.connect("nms")
        assert r.publish("nobody/here", b"x", qos=qos, pid=5) == RC_NO_MATCHING_SUBSCRIBERS

    @pytest.mark.parametrize("qos", [1, 2])
    def test_ack_0x00_when_delivered(self, raw5, qos):
        s = raw5()
        s.connect("ok-sub")
        s.subscribe([("ok/t", sub_opts(0))])
        r = raw5()
        r.connect("ok-pub")
        assert r.publish("ok/t", b"x", qos=qos, pid=6) == RC_SUCCESS
        assert s.read_publish()["payload"] == b"x"

    @pytest.mark.parametrize("qos", [1, 2])
    def test_acl_denied_publish_gets_0x87(self, tmp_path, qos):
        """PUBACK/PUBREC 0x87 (Not authorized) for a publish the ACL denies; it
        goes nowhere, and the QoS 2 exchange ends with that PUBREC."""
        rules = '{deny, {user, "bob"}, publish, ["secret/#"]}.\n{allow, all}.\n'
        with _acl_broker(tmp_path, rules) as b:
            w = RawClient5.connected(b.mqtt_port, "acl-w")
            bob = RawClient5.connected(b.mqtt_port, "bob-5", username="bob")
            try:
                assert w.subscribe([("secret/#", sub_opts(0))]) == [0]
                assert bob.publish("secret/x", b"no", qos=qos, pid=4) == RC_NOT_AUTHORIZED
                assert bob.until_pingresp() == []   # no PUBREL expected, none owed
                assert w.pending_publishes() == []
            finally:
                w.close()
                bob.close()

    def test_client_publish_to_sys_gets_0x87(self, raw5):
        w = raw5()
        w.connect("sys-w")
        w.subscribe([("$SYS/brokers/fake", sub_opts(0))])
        r = raw5()
        r.connect("sys-inject")
        assert r.publish("$SYS/brokers/fake", b"spoof", qos=1, pid=8) == RC_NOT_AUTHORIZED
        assert w.pending_publishes() == []

    def test_pubrel_for_an_unknown_id_gets_pubcomp_0x92(self, raw5):
        """PUBCOMP 0x92 (Packet Identifier not found) for a PUBREL nobody awaits."""
        r = raw5()
        r.connect("rel-unknown")
        r.send(gen_pubrel_v5(77))
        assert r.read_ack(PUBCOMP) == (77, RC_PACKET_ID_NOT_FOUND, {})

    def test_pubrec_for_an_unknown_id_gets_pubrel_0x92(self, raw5):
        """PUBREL 0x92 (Packet Identifier not found) for a PUBREC of nothing sent."""
        r = raw5()
        r.connect("rec-unknown")
        r.send(gen_pubrec_v5(78))
        assert r.read_ack(PUBREL) == (78, RC_PACKET_ID_NOT_FOUND, {})

    # --- Receive Maximum --------------------------------------------------------------------
    def test_more_qos2_awaiting_pubrel_than_receive_maximum_gets_0x93(self, make_broker, raw5):
        """The client may have at most our Receive Maximum (max_awaiting_rel)
        QoS 2 PUBLISHes awaiting PUBREL [MQTT-3.3.4-7]; one more: DISCONNECT
        0x93 (Receive Maximum exceeded)."""
        b = make_broker(max_awaiting_rel=2)
        r = raw5(port=b.mqtt_port)
        assert r.connect("rm-in")["props"]["receive_maximum"] == 2
        for pid in (1, 2):
            r.send(gen_publish_v5("rm/in", b"x", qos=2, pid=pid))
            got_pid, reason, _ = r.read_ack(PUBREC)
            assert (got_pid, reason in ACCEPTED) == (pid, True)
        r.send(gen_publish_v5("rm/in", b"x", qos=2, pid=3))
        assert r.expect_disconnect() == RC_RECEIVE_MAXIMUM_EXCEEDED

    def test_qos2_within_receive_maximum_after_pubrel(self, make_broker, raw5):
        """PUBREL frees the slot: max_awaiting_rel QoS 2 messages at a time, any number in all."""
        b = make_broker(max_awaiting_rel=1)
        r = raw5(port=b.mqtt_port)
        r.connect("rm-ok")
        for pid in range(1, 6):
            assert r.publish("rm/ok", b"x", qos=2, pid=pid) in ACCEPTED

    def test_client_receive_maximum_limits_unacked_qos1(self, raw5, broker):
        """[MQTT-3.3.4-9] a subscriber with Receive Maximum 2 gets two QoS 1
        messages, then the next only when it acks one; the rest wait, in order."""
        r = raw5()
        r.connect("rm-sub", properties={"receive_maximum": 2})
        assert r.subscribe([("rm/t", sub_opts(1))]) == [1]
        for i in range(5):
            broker.publish("rm/t", b"%d" % i, qos=1)
        window = [r.read_publish(), r.read_publish()]
        assert [m["payload"] for m in window] == [b"0", b"1"]
        assert r.until_pingresp() == []
        info = [s for s in broker.sessions() if s["client_id"] == "rm-sub"][0]
        assert (info["inflight_len"], info["mqueue_len"]) == (2, 3)
        got = []
        while window:
            m = window.pop(0)
            got.append(m["payload"])
            r.ack(m)
            if len(got) + len(window) < 5:
                window.append(r.read_publish())
                assert r.until_pingresp() == []   # still two in flight, never three
        assert got == [b"%d" % i for i in range(5)]

    def test_client_receive_maximum_counts_qos2_until_pubcomp(self, raw5, broker):
        """[MQTT-3.3.4-9] a QoS 2 PUBLISH counts until its PUBCOMP, not its PUBREC."""
        r = raw5()
        r.connect("rm2-sub", properties={"receive_maximum": 1})
        assert r.subscribe([("rm2/t", sub_opts(2))]) == [2]
        broker.publish("rm2/t", b"a", qos=2)
        broker.publish("rm2/t", b"b", qos=2)
        first = r.read_publish()
        assert first["payload"] == b"a"
        r.send(gen_pubrec_v5(first["pid"]))
        assert r.read_ack(PUBREL)[:2] == (first["pid"], RC_SUCCESS)
        assert r.until_pingresp() == []
        r.send(gen_pubcomp_v5(first["pid"]))
        assert r.read_publish()["payload"] == b"b"

    def test_max_inflight_also_bounds_a_large_receive_maximum(self, make_broker, raw5):
        b = make_broker(max_inflight=2)
        r = raw5(port=b.mqtt_port)
        r.connect("mi-sub", properties={"receive_maximum": 50})
        r.subscribe([("mi/t", sub_opts(1))])
        for i in range(4):
            b.publish("mi/t", b"%d" % i, qos=1)
        assert [r.read_publish()["payload"] for _ in range(2)] == [b"0", b"1"]
        assert r.until_pingresp() == []

    # --- the client's Maximum Packet Size ------------------------------------------------
    def test_message_over_the_clients_maximum_packet_size_is_dropped(self, raw5, broker):
        """[MQTT-3.1.2-24] [MQTT-3.1.2-25] Maximum Packet Size 64 (the whole
        packet, 5.0 section 2.1.4): a 64-byte PUBLISH is sent, a 65-byte one
        is not (counted in messages/dropped) and the connection stays up."""
        r = raw5()
        r.connect("mps", properties={"maximum_packet_size": 64})
        r.subscribe([("mps/t", sub_opts(0))])
        # fixed header 2 + topic 2+5 + property length 1 = 10 bytes before the payload
        broker.publish("mps/t", b"a" * 54)
        m = r.read_publish()
        assert len(m["payload"]) == 54
        dropped = broker.metrics()["messages/dropped"]
        broker.publish("mps/t", b"b" * 55)
        broker.publish("mps/t", b"small")
        assert r.read_publish()["payload"] == b"small"
        assert broker.metrics()["messages/dropped"] == dropped + 1
        assert broker.is_connected("mps")

    def test_dropped_qos1_message_does_not_hold_a_receive_maximum_slot(self, raw5, broker):
        """[MQTT-3.1.2-25] the server behaves as if it had sent the message:
        with Receive Maximum 1 the next QoS 1 message still comes."""
        r = raw5()
        r.connect("mps1", properties={"maximum_packet_size": 64, "receive_maximum": 1})
        r.subscribe([("mps/q", sub_opts(1))])
        broker.publish("mps/q", b"x" * 200, qos=1)
        broker.publish("mps/q", b"fits", qos=1)
        m = r.read_publish()
        assert (m["payload"], m["qos"]) == (b"fits", 1)
        r.ack(m)
        assert r.until_pingresp() == []


class Test16V5Subscribe:

    def test_suback_grants_the_requested_qos(self, raw5):
        """[MQTT-3.8.4-6] [MQTT-3.8.4-7] [MQTT-3.9.3-1] one reason code per
        filter, in order; options bits beyond the QoS do not change it."""
        r = raw5()
        r.connect("grant")
        assert r.subscribe([("g/0", sub_opts(0)), ("g/1", sub_opts(1, nl=True)),
                            ("g/2", sub_opts(2, rap=True, rh=2))], pid=0x1234) == [0, 1, 2]

    def test_invalid_filter_gets_0x8f(self, raw5, broker):
        """SUBACK 0x8F (Topic Filter invalid) for that filter only; the others are granted."""
        r = raw5()
        r.connect("bad-flt")
        assert r.subscribe([("ok/a", sub_opts(1)), ("a/#/b", sub_opts(1)), ("a+/b", sub_opts(0)),
                            ("ok/b", sub_opts(2))]) == [1, RC_TOPIC_FILTER_INVALID,
                                                       RC_TOPIC_FILTER_INVALID, 2]
        assert sorted(s["topic"] for s in broker.subscriptions("bad-flt")) == ["ok/a", "ok/b"]

    def test_acl_denied_filter_gets_0x87(self, tmp_path):
        rules = '{deny, all, subscribe, ["secret/#"]}.\n{allow, all}.\n'
        with _acl_broker(tmp_path, rules) as b:
            r = RawClient5.connected(b.mqtt_port, "acl-sub5")
            try:
                assert r.subscribe([("secret/#", sub_opts(1)), ("open/#", sub_opts(1))]) == \
                    [RC_NOT_AUTHORIZED, 1]
            finally:
                r.close()

    def test_over_max_subscriptions_gets_0x97(self, make_broker, raw5):
        """SUBACK 0x97 (Quota exceeded) past max_subscriptions; replacing an
        existing subscription is no new one [MQTT-3.8.4-3]."""
        b = make_broker(max_subscriptions=2)
        r = raw5(port=b.mqtt_port)
        r.connect("quota")
        assert r.subscribe([("a", sub_opts(0)), ("b", sub_opts(1)), ("c", sub_opts(0))]) == \
            [0, 1, RC_QUOTA_EXCEEDED]
        assert r.subscribe([("a", sub_opts(2))], pid=2) == [2]

    def test_unsuback_reason_codes(self, raw5, broker):
        """[MQTT-3.11.3-1] UNSUBACK: 0x00 per removed filter, 0x11 (No
        subscription existed) for the others, in order."""
        r = raw5()
        r.connect("unsub5")
        r.subscribe([("u/a", sub_opts(0)), ("u/b", sub_opts(1))])
        assert r.unsubscribe(["u/a", "u/none", "u/b"], pid=7) == \
            [RC_SUCCESS, RC_NO_SUBSCRIPTION_EXISTED, RC_SUCCESS]
        assert r.unsubscribe(["u/a"], pid=8) == [RC_NO_SUBSCRIPTION_EXISTED]
        assert broker.subscriptions("unsub5") == []

    @pytest.mark.parametrize("no_local", [True, False], ids=["nl1", "nl0"])
    def test_no_local(self, raw5, no_local):
        """[MQTT-3.8.3-3] No Local 1: the client's own messages are not sent
        back to it on that subscription; other clients' messages are."""
        me = raw5()
        me.connect("nl-me")
        assert me.subscribe([("nl/t", sub_opts(1, nl=no_local))]) == [1]
        other = raw5()
        other.connect("nl-other")
        assert other.subscribe([("nl/t", sub_opts(1))]) == [1]
        assert me.publish("nl/t", b"mine", qos=1, pid=1) == RC_SUCCESS
        other.ack(other.read_publish())
        assert other.publish("nl/t", b"theirs", qos=1, pid=1) == RC_SUCCESS
        expected = [b"theirs"] if no_local else [b"mine", b"theirs"]
        for payload in expected:
            m = me.read_publish()
            assert m["payload"] == payload
            me.ack(m)
        assert me.pending_publishes() == []

    def test_retain_as_published(self, raw5):
        """[MQTT-3.3.1-12] Retain As Published 0: live messages go with RETAIN 0;
        [MQTT-3.3.1-13] 1: with the RETAIN flag they were published with."""
        s0 = raw5()
        s0.connect("rap0")
        s0.subscribe([("rap/t", sub_opts(0, rap=False))])
        s1 = raw5()
        s1.connect("rap1")
        s1.subscribe([("rap/t", sub_opts(0, rap=True))])
        pub = raw5()
        pub.connect("rap-pub")
        pub.publish("rap/t", b"retained", qos=1, retain=True)
        pub.publish("rap/t", b"plain", qos=1, pid=2)
        assert [(m["payload"], m["retain"]) for m in (s0.read_publish(), s0.read_publish())] == \
            [(b"retained", False), (b"plain", False)]
        assert [(m["payload"], m["retain"]) for m in (s1.read_publish(), s1.read_publish())] == \
            [(b"retained", True), (b"plain", False)]

    @pytest.mark.parametrize("rh, first, again", [(0, True, True), (1, True, False),
                                                  (2, False, False)], ids=["rh0", "rh1", "rh2"])
    @pytest.mark.parametrize("rap", [False, True], ids=["rap0", "rap1"])
    def test_retain_handling(self, raw5, broker, rh, first, again, rap):
        """[MQTT-3.3.1-9] Retain Handling 0 sends the retained messages on
        every SUBSCRIBE, [MQTT-3.3.1-10] 1 only when the subscription is new,
        [MQTT-3.3.1-11] 2 never [MQTT-3.8.4-4]; they go with RETAIN 1 whatever
        Retain As Published says (5.0 section 3.3.1.3)."""
        broker.publish("rh/t", b"kept", qos=1, retain=True)
        r = raw5()
        r.connect("rh")
        expected = [("rh/t", b"kept", True)]
        assert r.subscribe([("rh/#", sub_opts(0, rap=rap, rh=rh))]) == [0]
        got = [(m["topic"], m["payload"], m["retain"]) for m in r.pending_publishes()]
        assert got == (expected if first else [])
        assert r.subscribe([("rh/#", sub_opts(0, rap=rap, rh=rh))], pid=2) == [0]
        got = [(m["topic"], m["payload"], m["retain"]) for m in r.pending_publishes()]
        assert got == (expected if again else [])

    def test_retain_handling_3_is_a_protocol_error(self, raw5, broker):
        """Retain Handling 3 is a Protocol Error (5.0 section 3.8.3.1): DISCONNECT 0x82."""
        r = raw5()
        r.connect("rh3")
        r.send(gen_subscribe_v5(1, [("rh3/t", sub_opts(0, rh=3))]))
        assert r.expect_disconnect() == RC_PROTOCOL_ERROR
        assert broker.subscriptions("rh3") == []

    @pytest.mark.parametrize("bits", [0x40, 0x80, 0xC0])
    def test_reserved_option_bits_are_malformed(self, raw5, broker, bits):
        """[MQTT-3.8.3-5] subscription options bits 6-7 must be 0: DISCONNECT 0x81."""
        r = raw5()
        r.connect("rsv-opts")
        r.send(gen_subscribe_v5(1, [("ok/t", sub_opts(0)), ("rsv/t", sub_opts(1) | bits)]))
        assert r.expect_disconnect() == RC_MALFORMED_PACKET
        assert broker.subscriptions("rsv-opts") == []

    def test_maximum_qos_3_is_a_protocol_error(self, raw5, broker):
        """5.0 section 3.8.3.1: a Maximum QoS of 3 is a Protocol Error (0x82)."""
        r = raw5()
        r.connect("qos3")
        r.send(gen_subscribe_v5(1, [("q3/t", 0x03)]))
        assert r.expect_disconnect() == RC_PROTOCOL_ERROR
        assert broker.subscriptions("qos3") == []

    def test_subscription_identifiers_come_with_every_matching_copy(self, raw5, broker):
        """[MQTT-3.3.4-3] [MQTT-3.3.4-4] a delivered message carries the
        Subscription Identifiers of every subscription it matched (one copy
        for overlapping ones); a retained message sent on subscribe carries
        that subscription's; a subscription without one adds nothing."""
        r = raw5()
        assert r.connect("subid")["props"]["subscription_identifier_available"] == 1
        broker.publish("sid/t", b"kept", qos=1, retain=True)
        assert r.subscribe([("sid/#", sub_opts(1))],
                           properties={"subscription_identifier": 7}) == [1]
        m = r.read_publish()
        assert (m["payload"], m["props"]["subscription_identifier"]) == (b"kept", [7])
        r.ack(m)
        assert r.subscribe([("sid/t", sub_opts(1))],
                           properties={"subscription_identifier": 268435455}) == [1]
        r.ack(r.read_publish())   # its retained copy
        assert r.subscribe([("sid/+", sub_opts(0))]) == [0]
        r.ack(r.read_publish())
        broker.publish("sid/t", b"live", qos=1)
        m = r.read_publish()
        assert (m["payload"], sorted(m["props"]["subscription_identifier"])) == (
            b"live", [7, 268435455])
        r.ack(m)
        broker.publish("sid/other", b"one", qos=1)
        m = r.read_publish()
        assert m["props"]["subscription_identifier"] == [7]

    def test_subscription_identifier_0_is_a_protocol_error(self, raw5):
        """An identifier is 1..268,435,455; 0 is a Protocol Error (5.0 section
        3.8.2.1.2): DISCONNECT 0x82."""
        r = raw5()
        r.connect("subid0")
        r.send(gen_subscribe_v5(1, [("sid/t", sub_opts(1))],
                                properties={"subscription_identifier": 0}))
        assert r.expect_disconnect() == RC_PROTOCOL_ERROR

    def test_subscribe_user_properties_are_accepted(self, raw5):
        r = raw5()
        r.connect("sub-up")
        assert r.subscribe([("up/s", sub_opts(1))],
                           properties={"user_property": [("a", "b"), ("a", "b")]}) == [1]
        assert r.unsubscribe(["up/s"], properties={"user_property": ("c", "d")}) == [RC_SUCCESS]

    def test_shared_subscription_gets_no_retained_messages(self, raw5, broker):
        """$share/<group>/<filter>: no retained messages on subscribe (5.0
        section 3.3.1.3), live ones as usual."""
        broker.publish("sh5/t", b"kept", retain=True)
        r = raw5()
        r.connect("sh5")
        assert r.subscribe([("$share/g/sh5/t", sub_opts(0))]) == [0]
        assert r.pending_publishes() == []
        broker.publish("sh5/t", b"live")
        m = r.read_publish()
        assert (m["topic"], m["payload"], m["retain"]) == ("sh5/t", b"live", False)


class Test17V5Session:

    def _leave(self, r, broker, client_id):
        r.send(gen_disconnect_v5())
        assert r.expect_closed()
        assert wait_until(lambda: not broker.is_connected(client_id))

    def test_clean_start_discards_the_session(self, raw5, broker):
        """[MQTT-3.1.2-4] [MQTT-3.2.2-2] Clean Start 1 discards the existing
        session: Session Present 0, no subscriptions, nothing queued."""
        r = raw5()
        r.connect("cs", clean_start=False, properties={"session_expiry_interval": 300})
        r.subscribe([("cs/t", sub_opts(1))])
        self._leave(r, broker, "cs")
        broker.publish("cs/t", b"queued", qos=1)
        r2 = raw5()
        assert r2.connect("cs", clean_start=True)["session_present"] == 0
        assert broker.subscriptions("cs") == []
        assert r2.until_pingresp() == []

    @pytest.mark.parametrize("how", ["disconnect", "drop"])
    def test_expiry_0_ends_the_session_at_close(self, raw5, broker, how):
        """No Session Expiry Interval (0): the session ends when the network
        connection closes [MQTT-4.1.0-2], even with Clean Start 0."""
        r = raw5()
        r.connect("se0", clean_start=False)
        r.subscribe([("se0/t", sub_opts(1))])
        if how == "disconnect":
            r.send(gen_disconnect_v5())
        r.close()
        assert wait_until(lambda: "se0" not in _session_ids(broker))
        r2 = raw5()
        assert r2.connect("se0", clean_start=False)["session_present"] == 0
        assert broker.subscriptions("se0") == []

    def test_nonzero_expiry_keeps_the_session_and_its_queue(self, raw5, broker):
        """[MQTT-3.1.2-23] [MQTT-3.1.2-5] [MQTT-3.2.2-3] Session Expiry 300:
        the session and the messages queued while offline survive the close;
        Clean Start 0 resumes it with Session Present 1 and the messages
        arrive in order, with their properties."""
        r = raw5()
        r.connect("se300", clean_start=False, properties={"session_expiry_interval": 300})
        assert r.subscribe([("se/t", sub_opts(1))]) == [1]
        self._leave(r, broker, "se300")
        assert "se300" in _session_ids(broker)
        for i in range(3):
            broker.publish("se/t", b"%d" % i, qos=1)
        pub = raw5()
        pub.connect("se-pub")
        assert pub.publish("se/t", b"3", qos=1, properties={"user_property": [("n", "3")]}) in \
            ACCEPTED
        r2 = raw5()
        ack = r2.connect("se300", clean_start=False, properties={"session_expiry_interval": 300})
        assert (ack["reason"], ack["session_present"]) == (RC_SUCCESS, 1)
        got = [r2.read_publish() for _ in range(4)]
        assert [m["payload"] for m in got] == [b"0", b"1", b"2", b"3"]
        assert got[3]["props"] == {"user_property": [("n", "3")]}
        for m in got:
            r2.ack(m)
        assert broker.subscriptions("se300") == [{"client_id": "se300", "topic": "se/t", "qos": 1}]

    def test_session_expires_after_its_interval(self, raw5, broker):
        """[MQTT-4.1.0-2] Session Expiry 1: the session is kept, then discarded
        once 1 second has passed since the close."""
        r = raw5()
        r.connect("se1", clean_start=False, properties={"session_expiry_interval": 1})
        r.subscribe([("se1/t", sub_opts(1))])
        t0 = time.monotonic()
        self._leave(r, broker, "se1")
        assert "se1" in _session_ids(broker)
        assert wait_until(lambda: "se1" not in _session_ids(broker))
        assert time.monotonic() - t0 >= 0.95
        r2 = raw5()
        assert r2.connect("se1", clean_start=False)["session_present"] == 0

    def test_disconnect_can_set_the_expiry_to_0(self, raw5, broker):
        """A DISCONNECT's Session Expiry Interval replaces the CONNECT's: 0 ends the session."""
        r = raw5()
        r.connect("se-d0", clean_start=False, properties={"session_expiry_interval": 300})
        r.subscribe([("sed/t", sub_opts(1))])
        r.send(gen_disconnect_v5(RC_SUCCESS, {"session_expiry_interval": 0}))
        assert r.expect_closed()
        assert wait_until(lambda: "se-d0" not in _session_ids(broker))

    def test_disconnect_can_change_a_nonzero_expiry(self, raw5, broker):
        """A DISCONNECT's non-zero Session Expiry Interval replaces a non-zero one."""
        r = raw5()
        r.connect("se-d1", clean_start=False, properties={"session_expiry_interval": 1})
        r.send(gen_disconnect_v5(RC_SUCCESS, {"session_expiry_interval": 300}))
        assert r.expect_closed()
        assert wait_until(lambda: not broker.is_connected("se-d1"))
        time.sleep(1.5)   # past the CONNECT's 1 s: the behaviour under test is a timeout
        assert "se-d1" in _session_ids(broker)
        r2 = raw5()
        assert r2.connect("se-d1", clean_start=False)["session_present"] == 1

    def test_disconnect_expiry_from_0_to_nonzero_is_a_protocol_error(self, raw5, broker):
        """A non-zero Session Expiry Interval in DISCONNECT after a CONNECT with
        0 is a Protocol Error (5.0 section 3.14.2.2.2): DISCONNECT 0x82, and
        the session still ends at the close."""
        r = raw5()
        r.connect("se-bad", clean_start=False)
        r.send(gen_disconnect_v5(RC_SUCCESS, {"session_expiry_interval": 60}))
        assert r.expect_disconnect() == RC_PROTOCOL_ERROR
        assert wait_until(lambda: "se-bad" not in _session_ids(broker))

    def test_takeover_with_clean_start_0_resumes(self, raw5, broker):
        """[MQTT-3.1.4-3] [MQTT-3.2.2-3] a second connection with Clean Start 0
        takes the session over: Session Present 1, the subscription stays."""
        old = raw5()
        old.connect("tk5", clean_start=False, properties={"session_expiry_interval": 60})
        old.subscribe([("tk5/t", sub_opts(1))])
        new = raw5()
        ack = new.connect("tk5", clean_start=False, properties={"session_expiry_interval": 60})
        assert (ack["reason"], ack["session_present"]) == (RC_SUCCESS, 1)
        assert old.expect_disconnect() == RC_SESSION_TAKEN_OVER
        broker.publish("tk5/t", b"after", qos=1)
        assert new.read_publish()["payload"] == b"after"


class Test18V5Disconnect:

    def _will_setup(self, raw5, cid, will_topic, will_props=None):
        w = raw5()
        w.connect(cid + "-watch")
        assert w.subscribe([(will_topic, sub_opts(1))]) == [1]
        r = raw5()
        will = (will_topic, b"will of " + cid.encode(), 1, False) + \
            ((will_props,) if will_props is not None else ())
        assert r.connect(cid, will=will)["reason"] == RC_SUCCESS
        return w, r

    @pytest.mark.parametrize("data", [gen_disconnect_v5(), gen_disconnect_v5(RC_SUCCESS),
                                      gen_disconnect_v5(RC_SUCCESS, {"user_property": ("a", "b")})],
                             ids=["empty", "reason", "reason+props"])
    def test_disconnect_0x00_discards_the_will(self, raw5, broker, data):
        """[MQTT-3.14.4-3] [MQTT-3.1.2-10] DISCONNECT 0x00 (in each of its
        forms): the will is not published."""
        w, r = self._will_setup(raw5, "polite5", "will5/d")
        r.send(data)
        assert r.expect_closed()
        assert wait_until(lambda: not broker.is_connected("polite5"))
        assert w.pending_publishes() == []
        broker.publish("will5/d", b"sentinel")
        assert w.read_publish()["payload"] == b"sentinel"

    def test_disconnect_0x04_publishes_the_will(self, raw5):
        """DISCONNECT 0x04 (Disconnect with Will Message): the will is
        published, with its properties."""
        props = {"content_type": "text/plain", "user_property": [("why", "asked"), ("why", "2")]}
        w, r = self._will_setup(raw5, "willing5", "will5/w", props)
        r.send(gen_disconnect_v5(RC_DISCONNECT_WITH_WILL))
        assert r.expect_closed()
        m = w.read_publish()
        assert (m["topic"], m["payload"], m["qos"]) == ("will5/w", b"will of willing5", 1)
        assert m["props"] == props

    def test_lost_connection_publishes_the_will(self, raw5):
        """[MQTT-3.1.2-8]"""
        w, r = self._will_setup(raw5, "lost5", "will5/l")
        r.close()
        assert w.read_publish()["payload"] == b"will of lost5"

    # --- DISCONNECT from the server, before every close it decides ---------------------------
    def test_takeover_0x8e(self, raw5, broker):
        """[MQTT-3.1.4-3] the existing connection gets DISCONNECT 0x8E (Session
        taken over) and is closed."""
        old = raw5()
        old.connect("dup5")
        new = raw5()
        assert new.connect("dup5")["reason"] == RC_SUCCESS
        assert old.expect_disconnect() == RC_SESSION_TAKEN_OVER
        new.send(gen_pingreq())
        assert new.read_packet() == (PINGRESP, 0, b"")

    def test_takeover_by_a_v3_client_still_tells_the_v5_one(self, raw5, raw):
        old = raw5()
        old.connect("dup53")
        new = raw()
        assert new.connect("dup53") == (0, 0)
        assert old.expect_disconnect() == RC_SESSION_TAKEN_OVER

    def test_keepalive_timeout_0x8d(self, raw5, broker):
        """[MQTT-3.1.2-22] no packet for 1.5 x Keep Alive (1 s here): DISCONNECT
        0x8D (Keep Alive timeout), then the close."""
        r = raw5()
        t0 = time.monotonic()
        r.connect("ka5", keepalive=1)
        assert r.expect_disconnect(timeout=5) == RC_KEEP_ALIVE_TIMEOUT
        assert time.monotonic() - t0 >= 1.0
        assert wait_until(lambda: broker.listener_infos()[0]["shutdown_count"] ==
                          {"keepalive_timeout": 1})

    @pytest.mark.parametrize("data", [
        packet(0x36, enc_str("t") + b"\x00\x01" + b"\x00" + b"x"),            # QoS 3 [MQTT-3.3.1-4]
        gen_publish_v5("t", b"x", properties=b"\x7f\x00"),                   # unknown property 0x7F
        packet(0x30, enc_str("t") + b"\x05\x01\x01"),                         # properties past the end
        packet(0x30, bad_utf8_string(b"a/\xff") + b"\x00x"),                   # [MQTT-1.5.4-1]
        gen_ack_v5(PUBREL, 1, flags=0x00),                                   # [MQTT-3.6.1-1]
    ], ids=["qos3", "unknown-property", "short-properties", "bad-utf8", "pubrel-flags"])
    def test_malformed_packet_0x81(self, raw5, data):
        """A Malformed Packet (5.0 sections 1.5, 2.2.2.2, 4.13): DISCONNECT 0x81, then the close."""
        r = raw5()
        r.connect("malformed5")
        r.send(data)
        assert r.expect_disconnect() == RC_MALFORMED_PACKET

    @pytest.mark.parametrize("data", [
        gen_connect_v5("twice"),                                               # [MQTT-3.1.0-2]
        gen_publish_v5("t", b"x", properties=[("content_type", "a"), ("content_type", "b")]),
    ], ids=["second-connect", "property-twice"])
    def test_protocol_error_0x82(self, raw5, data):
        """A Protocol Error (a second CONNECT [MQTT-3.1.0-2], a property that
        may appear once, twice (5.0 section 3.3.2.3)): DISCONNECT 0x82."""
        r = raw5()
        r.connect("twice")
        r.send(data)
        assert r.expect_disconnect() == RC_PROTOCOL_ERROR

    def test_packet_too_large_0x95(self, make_broker, raw5):
        """A packet above max_packet_size (seen from its fixed header): DISCONNECT
        0x95 (Packet too large)."""
        b = make_broker(max_packet_size=1024)
        r = raw5(port=b.mqtt_port)
        r.connect("big5")
        r.send(b"\x30" + enc_varint(10_000))
        assert r.expect_disconnect() == RC_PACKET_TOO_LARGE

    def test_kick_0x98(self, raw5, broker):
        """Broker.kick: DISCONNECT 0x98 (Administrative action), then the close."""
        r = raw5()
        r.connect("kick5")
        assert broker.kick("kick5") is True
        assert r.expect_disconnect() == RC_ADMINISTRATIVE_ACTION
        assert wait_until(lambda: not broker.is_connected("kick5"))

    def test_rest_kick_0x98(self, api, api_broker):
        """REST DELETE clients/{id}: DISCONNECT 0x98."""
        r = RawClient5.connected(api_broker.mqtt_port, "rest-kick5")
        try:
            assert api.result("DELETE", "clients/rest-kick5") == []
            assert r.expect_disconnect() == RC_ADMINISTRATIVE_ACTION
        finally:
            r.close()

    def test_broker_stop_0x8b(self, make_broker):
        """Broker.stop: DISCONNECT 0x8B (Server shutting down) to every v5 client."""
        b = make_broker()
        clients = [RawClient5.connected(b.mqtt_port, "stop5-%d" % i) for i in range(3)]
        try:
            b.stop()
            assert [c.expect_disconnect() for c in clients] == [RC_SERVER_SHUTTING_DOWN] * 3
        finally:
            for c in clients:
                c.close()

    def test_v3_clients_get_no_disconnect(self, make_broker):
        """3.x has no server DISCONNECT: on kick and on stop a 3.1.1 client is
        just closed, while a 5.0 one beside it gets its DISCONNECT."""
        b = make_broker()
        v3, v5 = RawClient.connected(b.mqtt_port, "k3"), RawClient5.connected(b.mqtt_port, "k5")
        s3, s5 = RawClient.connected(b.mqtt_port, "s3"), RawClient5.connected(b.mqtt_port, "s5")
        try:
            assert b.kick("k3") and b.kick("k5")
            assert v3.expect_closed()
            assert v5.expect_disconnect() == RC_ADMINISTRATIVE_ACTION
            b.stop()
            assert s3.expect_closed()
            assert s5.expect_disconnect() == RC_SERVER_SHUTTING_DOWN
        finally:
            for c in (v3, v5, s3, s5):
                c.close()

    @pytest.mark.parametrize("data", [
        gen_auth_v5(),
        gen_auth_v5(0x19, {"authentication_method": "SCRAM-SHA-1"}),   # Re-authenticate
        gen_auth_v5(0x18, {"authentication_method": "SCRAM-SHA-1",      # Continue authentication
                           "authentication_data": b"x"}),
    ], ids=["bare", "reauthenticate", "continue"])
    def test_auth_is_a_protocol_error(self, raw5, data):
        """[MQTT-4.12.0-7] AUTH from a client that gave no Authentication
        Method: DISCONNECT 0x82."""
        r = raw5()
        r.connect("auth5")
        r.send(data)
        assert r.expect_disconnect() == RC_PROTOCOL_ERROR


class Test19V5Interop:

    def test_v311_and_v5_exchange_messages_both_ways(self, raw, raw5):
        """One topic, a 3.1.1 and a 5.0 client each subscribed and each
        publishing: the 3.1.1 client gets plain 3.1.1 PUBLISHes, the 5.0
        client gets the v5 sender's properties and an empty property set
        for the 3.1.1 sender's message."""
        old = raw()
        old.connect("old311")
        assert old.subscribe([("chat/room", 1)]) == [1]
        new = raw5()
        new.connect("new5")
        assert new.subscribe([("chat/room", sub_opts(1))]) == [1]
        props = {"content_type": "text/plain", "user_property": [("from", "v5")]}
        assert new.publish("chat/room", b"hello from 5", qos=1, pid=1, properties=props) == RC_SUCCESS
        ptype, flags, body = old.read_packet()
        pid = parse_publish(flags, body)["pid"]
        assert (ptype, flags, body) == (PUBLISH, 0x02, enc_str("chat/room") + pid.to_bytes(2, "big")
                                        + b"hello from 5")
        old.send(gen_puback(pid))
        m = new.read_publish()
        assert (m["payload"], m["props"]) == (b"hello from 5", props)
        new.ack(m)
        old.send(gen_publish("chat/room", b"hello from 3.1.1", qos=1, pid=2))
        own = sorted([old.read_packet(), old.read_packet()])   # its own message and its PUBACK
        assert [p[0] for p in own] == [PUBLISH, PUBACK]
        assert own[1] == (PUBACK, 0, b"\x00\x02")
        assert parse_publish(own[0][1], own[0][2])["payload"] == b"hello from 3.1.1"
        m = new.read_publish()
        assert (m["topic"], m["payload"], m["qos"], m["props"]) == \
            ("chat/room", b"hello from 3.1.1", 1, {})
        new.ack(m)

    def test_v311_session_resumed_as_v5(self, raw, raw5, broker):
        """A 3.1.1 persistent session (clean session 0) resumed by a 5.0
        CONNECT with Clean Start 0: Session Present 1, its subscription and
        its queued messages carry over."""
        old = raw()
        old.connect("migrate", clean=False)
        assert old.subscribe([("mig/t", 1)]) == [1]
        old.send(gen_disconnect())
        assert old.expect_closed()
        assert wait_until(lambda: not broker.is_connected("migrate"))
        broker.publish("mig/t", b"queued", qos=1)
        new = raw5()
        ack = new.connect("migrate", clean_start=False, properties={"session_expiry_interval": 60})
        assert (ack["reason"], ack["session_present"]) == (RC_SUCCESS, 1)
        m = new.read_publish()
        assert (m["topic"], m["payload"], m["qos"], m["props"]) == ("mig/t", b"queued", 1, {})
        new.ack(m)
        assert broker.subscriptions("migrate") == [{"client_id": "migrate", "topic": "mig/t", "qos": 1}]


class Test20V5Paho:
    """paho-mqtt in MQTT 5.0 mode: what a real v5 client library sees."""

    def test_request_response_properties(self, paho5):
        """Response Topic, Correlation Data and User Properties travel from the
        requester to the responder and back [MQTT-3.3.2-15] [MQTT-3.3.2-16]
        [MQTT-3.3.2-17] [MQTT-3.3.2-18]."""
        responder = paho5("responder")
        assert responder.subscribe([("svc/req/+", SubscribeOptions(qos=1))]) == [1]
        requester = paho5("requester")
        assert requester.subscribe([("svc/resp/requester", SubscribeOptions(qos=1))]) == [1]
        req_props = Properties(PacketTypes.PUBLISH)
        req_props.ResponseTopic = "svc/resp/requester"
        req_props.CorrelationData = b"\x00req-42"
        req_props.UserProperty = [("trace", "a"), ("trace", "b"), ("op", "sum")]
        assert requester.publish("svc/req/sum", b"[1, 2]", qos=1, properties=req_props) == 0
        req = responder.get()
        assert req.payload == b"[1, 2]"
        assert req.properties.ResponseTopic == "svc/resp/requester"
        assert req.properties.CorrelationData == b"\x00req-42"
        assert req.properties.UserProperty == [("trace", "a"), ("trace", "b"), ("op", "sum")]
        resp_props = Properties(PacketTypes.PUBLISH)
        resp_props.CorrelationData = req.properties.CorrelationData
        resp_props.UserProperty = ("status", "ok")
        assert responder.publish(req.properties.ResponseTopic, b"3", qos=1,
                                 properties=resp_props) == 0
        resp = requester.get()
        assert (resp.topic, resp.payload) == ("svc/resp/requester", b"3")
        assert resp.properties.CorrelationData == b"\x00req-42"
        assert resp.properties.UserProperty == [("status", "ok")]

    def test_connack_as_paho_sees_it(self, paho5):
        c = paho5("")
        assert (c.reason.value, c.session_present) == (0, False)
        assert c.connack_props.ReceiveMaximum == 100
        assert c.connack_props.TopicAliasMaximum == 256
        assert c.connack_props.AssignedClientIdentifier
        assert not hasattr(c.connack_props, "MaximumQoS")

    def test_reason_codes_as_paho_reports_them(self, paho5):
        c = paho5("codes")
        # paho itself refuses a filter with misplaced wildcards; "$share/g" has no filter part
        rcs = c.subscribe([("p/ok", SubscribeOptions(qos=2)), ("$share/g", SubscribeOptions(qos=1))])
        assert [str(rc) for rc in rcs] == ["Granted QoS 2", "Topic filter invalid"]
        assert str(c.publish("p/nobody", b"x", qos=1)) == "No matching subscribers"
        rcs = c.unsubscribe(["p/ok", "p/never"])
        assert [rc.value for rc in rcs] == [RC_SUCCESS, RC_NO_SUBSCRIPTION_EXISTED]
        assert [str(rc) for rc in rcs] == ["Success", "No subscription found"]   # paho's name for 0x11

    def test_bad_password_as_paho_reports_it(self, make_broker, paho5):
        b = make_broker(allow_anonymous=False, auth_username={"alice": "pw"})
        b.set_plugin("emqx_auth_username", True)
        c = paho5("bad-pw", port=b.mqtt_port, username="alice", password="nope")
        assert str(c.reason) == "Bad user name or password"
        assert c.reason.value == RC_BAD_USERNAME_OR_PASSWORD

    def test_kick_as_paho_reports_it(self, paho5, broker):
        c = paho5("kicked-paho")
        assert broker.kick("kicked-paho")
        rc = c.disconnects.get(timeout=TIMEOUT)
        assert (rc.value, str(rc)) == (RC_ADMINISTRATIVE_ACTION, "Administrative action")

    def test_session_expiry_with_paho(self, paho5, broker):
        """Session Expiry Interval 300 and Clean Start 0 through paho: the
        queued message arrives on the next connection, Session Present 1."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        c = paho5("paho-se", clean_start=False, connect_props=props)
        assert c.subscribe([("pse/t", SubscribeOptions(qos=1))]) == [1]
        c.close()
        assert wait_until(lambda: not broker.is_connected("paho-se"))
        broker.publish("pse/t", b"while away", qos=1)
        c2 = paho5("paho-se", clean_start=False, connect_props=props)
        assert c2.session_present is True
        m = c2.get()
        assert (m.topic, m.payload, m.qos) == ("pse/t", b"while away", 1)


class Test21V5Expiry:
    """Message Expiry Interval and Will Delay Interval: the time is the behaviour."""

    def test_an_expired_message_is_never_delivered(self, raw5, broker):
        """[MQTT-3.3.2-5] a message whose expiry passed while it was queued for
        an offline session is not delivered."""
        sub = raw5()
        sub.connect("exp-sub", clean_start=True, properties={"session_expiry_interval": 60})
        assert sub.subscribe([("exp/#", sub_opts(1))]) == [1]
        sub.send(gen_disconnect_v5(RC_SUCCESS))
        assert sub.expect_closed()
        assert wait_until(lambda: not broker.sessions()[0]["connected"])   # queued, not in flight
        pub = raw5()
        pub.connect("exp-pub")
        pub.publish("exp/short", b"gone", qos=1, pid=1,
                    properties={"message_expiry_interval": 1})
        pub.publish("exp/long", b"kept", qos=1, pid=2,
                    properties={"message_expiry_interval": 60})
        time.sleep(1.2)   # the expiry under test: a second must pass
        back = raw5()
        assert back.connect("exp-sub", clean_start=False,
                            properties={"session_expiry_interval": 60})["session_present"] == 1
        (m,) = back.pending_publishes()
        assert (m["topic"], m["payload"]) == ("exp/long", b"kept")
        # [MQTT-3.3.2-6] the property carries what is left of the interval
        assert 1 <= m["props"]["message_expiry_interval"] <= 59

    def test_an_expired_retained_message_is_not_sent_on_subscribe(self, raw5, broker):
        broker.publish("exp/ret", b"old", retain=True, properties={"message_expiry_interval": 1})
        broker.publish("exp/ret2", b"new", retain=True, properties={"message_expiry_interval": 60})
        time.sleep(1.2)   # the expiry under test
        r = raw5()
        r.connect("exp-ret")
        assert r.subscribe([("exp/+", sub_opts(0))]) == [0]
        (m,) = r.pending_publishes()
        assert (m["topic"], m["retain"]) == ("exp/ret2", True)
        assert m["props"]["message_expiry_interval"] <= 60

    def _dropping_client(self, raw5, will_delay, session_expiry):
        r = raw5()
        r.connect("wd", properties={"session_expiry_interval": session_expiry},
                  will=("wd/will", b"gone", 1, False, {"will_delay_interval": will_delay}))
        return r

    def test_a_delayed_will_is_published_after_its_delay(self, raw5):
        """[MQTT-3.1.3-9] the will waits for its Will Delay Interval."""
        watcher = raw5()
        watcher.connect("wd-watch")
        assert watcher.subscribe([("wd/#", sub_opts(1))]) == [1]
        self._dropping_client(raw5, 1, 60).sock.close()   # no DISCONNECT: the will is due
        watcher.expect_nothing(0.4)   # not at once
        m = watcher.read_publish(timeout=5)
        assert (m["topic"], m["payload"]) == ("wd/will", b"gone")

    def test_a_delayed_will_is_cancelled_when_the_client_returns(self, raw5):
        """[MQTT-3.1.3-9] a new connection to the session before the delay: no will."""
        watcher = raw5()
        watcher.connect("wd-watch2")
        assert watcher.subscribe([("wd/#", sub_opts(1))]) == [1]
        self._dropping_client(raw5, 1, 60).sock.close()
        again = raw5()
        assert again.connect("wd", clean_start=False,
                             properties={"session_expiry_interval": 60})["session_present"] == 1
        watcher.expect_nothing(2.0)   # past the delay and its tick

    def test_a_delayed_will_is_published_when_the_session_ends_first(self, raw5):
        """The session (expiry 1 s) ends before the will's delay (60 s): the
        will is published then (5.0 section 3.1.3.2.2)."""
        watcher = raw5()
        watcher.connect("wd-watch3")
        assert watcher.subscribe([("wd/#", sub_opts(1))]) == [1]
        self._dropping_client(raw5, 60, 1).sock.close()
        m = watcher.read_publish(timeout=5)
        assert m["payload"] == b"gone"


class Test22V5EnhancedAuth:
    """Enhanced authentication (5.0 section 4.12) through Broker(auth_methods=...)."""

    class Challenge:
        """A toy method: the broker sends b"nonce"; the client must answer b"nonce:secret"."""

        def __init__(self, client_id, username, ip):
            self.sent = False

        def step(self, data):
            if not self.sent:
                self.sent = True
                return "continue", b"nonce"
            return ("success", b"welcome") if data == b"nonce:secret" else RC_NOT_AUTHORIZED

    @pytest.fixture
    def port(self, make_broker):
        return make_broker(auth_methods={"TOY": self.Challenge}).mqtt_port

    def _auth(self, r, reason, data=None):
        props = {"authentication_method": "TOY"}
        if data is not None:
            props["authentication_data"] = data
        r.send(packet(0xF0, bytes((reason,)) + gen_props(props)))

    def _read_auth(self, r):
        ptype, flags, body = r.read_packet()
        assert (ptype, flags) == (15, 0), (ptype, flags, body)
        reason, props = parse_disconnect_v5(body)
        return reason, props

    def test_challenge_then_connack_with_the_method(self, port):
        """[MQTT-4.12.0-2] the server answers with AUTH 0x18 (continue); on
        success CONNACK carries the same Authentication Method [MQTT-4.12.0-5]."""
        r = RawClient5(port)
        try:
            r.send(gen_connect_v5("ea", properties={"authentication_method": "TOY"}))
            assert self._read_auth(r) == (0x18, {"authentication_method": "TOY",
                                                "authentication_data": b"nonce"})
            self._auth(r, 0x18, b"nonce:secret")
            ack = r.read_connack()
            assert ack["reason"] == RC_SUCCESS
            assert ack["props"]["authentication_method"] == "TOY"
            assert ack["props"]["authentication_data"] == b"welcome"
            assert r.subscribe([("ea/t", sub_opts(0))]) == [0]
        finally:
            r.close()

    def test_a_wrong_answer_gets_connack_0x87(self, port):
        r = RawClient5(port)
        try:
            r.send(gen_connect_v5("ea2", properties={"authentication_method": "TOY"}))
            self._read_auth(r)
            self._auth(r, 0x18, b"guess")
            assert r.read_connack()["reason"] == RC_NOT_AUTHORIZED
            assert r.expect_closed()
        finally:
            r.close()

    def test_an_unknown_method_gets_connack_0x8c(self, port):
        """[MQTT-4.12.0-1] a method the server does not support: CONNACK 0x8C."""
        r = RawClient5(port)
        try:
            r.send(gen_connect_v5("ea3", properties={"authentication_method": "OTHER"}))
            assert r.read_connack()["reason"] == 0x8C
            assert r.expect_closed()
        finally:
            r.close()

    def test_re_authentication(self, port):
        """[MQTT-4.12.1-1] AUTH 0x19 with the same method starts it again;
        success ends with AUTH 0x00, failure with DISCONNECT 0x87."""
        r = RawClient5(port)
        try:
            r.send(gen_connect_v5("ea4", properties={"authentication_method": "TOY"}))
            self._read_auth(r)
            self._auth(r, 0x18, b"nonce:secret")
            assert r.read_connack()["reason"] == RC_SUCCESS
            self._auth(r, 0x19)
            assert self._read_auth(r)[0] == 0x18
            self._auth(r, 0x18, b"nonce:secret")
            assert self._read_auth(r) == (RC_SUCCESS, {"authentication_method": "TOY",
                                                      "authentication_data": b"welcome"})
            self._auth(r, 0x19)
            self._read_auth(r)
            self._auth(r, 0x18, b"stale")
            assert r.expect_disconnect() == RC_NOT_AUTHORIZED
        finally:
            r.close()

    def test_auth_with_another_method_is_a_protocol_error(self, port):
        """[MQTT-4.12.0-5] an AUTH must carry the CONNECT's method; before CONNACK
        the refusal is a CONNACK with reason 0x82."""
        r = RawClient5(port)
        try:
            r.send(gen_connect_v5("ea5", properties={"authentication_method": "TOY"}))
            self._read_auth(r)
            r.send(packet(0xF0, b"\x18" + gen_props({"authentication_method": "OTHER"})))
            assert r.read_connack()["reason"] == RC_PROTOCOL_ERROR   # no CONNACK yet: this is it
            assert r.expect_closed()
        finally:
            r.close()


class Test23V5PublishApis:
    """Properties from the Python API and REST mqtt/publish reach 5.0 subscribers."""

    def test_broker_publish_with_properties(self, raw5, broker):
        r = raw5()
        r.connect("api-props")
        assert r.subscribe([("ap/#", sub_opts(0))]) == [0]
        broker.publish("ap/1", b"x", properties={
            "response_topic": "ap/reply", "correlation_data": b"id-1",
            "user_property": [("k", "v"), ("k", "v2")], "content_type": "text/plain"})
        (m,) = r.pending_publishes()
        assert m["props"] == {"response_topic": "ap/reply", "correlation_data": b"id-1",
                              "user_property": [("k", "v"), ("k", "v2")],
                              "content_type": "text/plain"}
        with pytest.raises(ValueError, match="topic_alias"):
            broker.publish("ap/1", b"x", properties={"topic_alias": 3})
        with pytest.raises(ValueError):
            broker.publish("ap/1", b"x", properties={"content_type": 7})

    def test_rest_publish_with_properties(self, api, api_broker):
        r = RawClient5(api_broker.mqtt_port)
        try:
            r.connect("rest-props")
            assert r.subscribe([("rp/#", sub_opts(0))]) == [0]
            reply = api.json("POST", "mqtt/publish", {
                "topic": "rp/1", "payload": "hi", "properties": {
                    "response_topic": "rp/reply", "correlation_data": "c-9",
                    "user_properties": {"a": "1", "b": "2"}, "message_expiry_interval": 30,
                    "payload_format_indicator": 1, "content_type": "text/plain"}})
            assert reply["code"] == 0
            (m,) = r.pending_publishes()
            assert m["props"]["response_topic"] == "rp/reply"
            assert m["props"]["correlation_data"] == b"c-9"
            assert m["props"]["user_property"] == [("a", "1"), ("b", "2")]
            assert m["props"]["payload_format_indicator"] == 1
            assert 1 <= m["props"]["message_expiry_interval"] <= 30
            for bad in ({"user_properties": "x"}, {"message_expiry_interval": "10"},
                        {"topic_alias": 1}, {"payload_format_indicator": 2}):
                reply = api.json("POST", "mqtt/publish", {"topic": "rp/1", "properties": bad})
                assert reply["code"] == 108, bad
        finally:
            r.close()

    def test_session_rows_carry_the_expiry_interval(self, raw5, broker):
        raw5().connect("exp-row", properties={"session_expiry_interval": 90})
        rows = {s["client_id"]: s for s in wait_until(lambda: broker.sessions())}
        assert rows["exp-row"]["expiry_interval"] == 90


class Test24V5TopicAliasesOut:
    """Topic aliases from the broker to a 5.0 client that takes them (3.3.2.3.4)."""

    def _received(self, r, broker, topics):
        for n, topic in enumerate(topics):
            broker.publish(topic, b"%d" % n)
        return [(m["topic"], m["props"].get("topic_alias")) for m in r.pending_publishes()]

    def test_aliases_within_the_clients_maximum_least_recent_reused(self, raw5, broker):
        """[MQTT-3.3.2-11] never above the client's Topic Alias Maximum; a topic
        goes once in full, then as its alias alone; at the maximum the least
        recently used alias is given to the new topic."""
        r = raw5()
        r.connect("alias-out", properties={"topic_alias_maximum": 2})
        assert r.subscribe([("ao/#", sub_opts(0))]) == [0]
        got = self._received(r, broker, ["ao/a", "ao/a", "ao/b", "ao/a", "ao/c", "ao/b"])
        assert got == [("ao/a", 1), ("", 1), ("ao/b", 2), ("", 1), ("ao/c", 2), ("ao/b", 1)]

    def test_a_new_connection_starts_without_aliases(self, raw5, broker):
        """[MQTT-3.3.2-7] aliases end with the network connection."""
        first = raw5()
        first.connect("alias-re", clean_start=False, properties={
            "topic_alias_maximum": 5, "session_expiry_interval": 60})
        assert first.subscribe([("ar/#", sub_opts(0))]) == [0]
        assert self._received(first, broker, ["ar/x", "ar/x"]) == [("ar/x", 1), ("", 1)]
        first.send(gen_disconnect_v5(RC_SUCCESS))
        assert first.expect_closed()
        again = raw5()
        again.connect("alias-re", clean_start=False, properties={
            "topic_alias_maximum": 5, "session_expiry_interval": 60})
        assert self._received(again, broker, ["ar/x"]) == [("ar/x", 1)]

    def test_no_aliases_without_a_maximum_or_when_turned_off(self, raw5, broker, make_broker):
        plain = raw5()
        plain.connect("alias-none")
        assert plain.subscribe([("an/#", sub_opts(0))]) == [0]
        assert self._received(plain, broker, ["an/t", "an/t"]) == [("an/t", None)] * 2
        b = make_broker(topic_alias_out=False)
        off = RawClient5(b.mqtt_port)
        try:
            off.connect("alias-off", properties={"topic_alias_maximum": 5})
            assert off.subscribe([("an/#", sub_opts(0))]) == [0]
            assert self._received(off, b, ["an/t", "an/t"]) == [("an/t", None)] * 2
        finally:
            off.close()


###############################################################################
# Limits and $SYS protection
###############################################################################

class TestLimits:
    def test_topic_length_and_levels(self, make_broker):
        """max_topic_length / max_topic_levels: a PUBLISH over them closes its
        connection; a SUBSCRIBE filter over them gets 0x80 [MQTT-3.9.3-2]."""
        b = make_broker(max_topic_length=20, max_topic_levels=4)
        r = RawClient(b.mqtt_port)
        r.connect("lim-sub")
        r.send(gen_subscribe(1, [("a/b/c/d", 0), ("a/b/c/d/e", 0), ("x" * 21, 0), ("ok", 0)]))
        assert r.read_packet() == (SUBACK, 0, b"\x00\x01\x00\x80\x80\x00")
        for topic in ("a/b/c/d/e", "y" * 21):
            p = RawClient(b.mqtt_port)
            p.connect("lim-pub")
            p.send(gen_publish(topic, b"x"))
            assert p.expect_closed()
            p.close()
        r.close()

    def test_max_subscriptions(self, make_broker):
        b = make_broker(max_subscriptions=2)
        r = RawClient(b.mqtt_port)
        r.connect("lim-subs")
        r.send(gen_subscribe(1, [("a", 0), ("b", 1), ("c", 0)]))
        assert r.read_packet() == (SUBACK, 0, b"\x00\x01\x00\x01\x80")
        r.send(gen_subscribe(2, [("a", 2)]))   # replacing an existing one is fine
        assert r.read_packet() == (SUBACK, 0, b"\x00\x02\x02")
        r.close()

    def test_max_keepalive_applies_to_clients_asking_for_none(self, make_broker):
        """A client with keepalive 0 would otherwise hold its socket forever."""
        b = make_broker(max_keepalive=1)
        r = RawClient(b.mqtt_port)
        r.connect("lim-ka", keepalive=0)
        assert b.clients()[0]["keepalive"] == 1
        assert r.expect_closed(timeout=5)
        assert wait_until(lambda: b.listener_infos()[0]["shutdown_count"] == {"keepalive_timeout": 1})

    def test_offline_session_memory_is_bounded_by_queue_and_expiry(self, make_broker):
        """A persistent session whose client never returns holds at most
        max_mqueue_len messages, and is dropped after session_expiry_interval."""
        b = make_broker(max_mqueue_len=10, session_expiry_interval=0.5)
        r = RawClient(b.mqtt_port)
        r.connect("gone", clean=False)
        r.subscribe([("mem/t", 1)])
        r.close()
        assert wait_until(lambda: not b.is_connected("gone"))
        for i in range(50):
            b.publish("mem/t", b"%d" % i, qos=1)
        (info,) = [s for s in b.sessions() if s["client_id"] == "gone"]
        assert info["mqueue_len"] == 10 and info["mqueue_dropped"] == 40
        assert wait_until(lambda: not any(s["client_id"] == "gone" for s in b.sessions()))
        assert "mem/t" not in b.routes()


class TestSecurity:
    def test_clients_cannot_inject_sys_topics(self, make_broker):
        b = make_broker()
        s, p = raw_sub_and_pub(b.mqtt_port, "sys-watch", [("$SYS/brokers/fake", 0)], "sys-inject")
        p.send(gen_publish("$SYS/brokers/fake", b"spoof", qos=1, pid=5))
        assert p.read_packet() == (PUBACK, 0, b"\x00\x05")
        s.expect_nothing(0.3)
        s.close()
        p.close()

    def test_default_admin_password_is_warned_about(self, caplog):
        with caplog.at_level("WARNING", logger="emqx_lite"):
            with emqx_lite.Broker("127.0.0.1", 0, 0):
                pass
            assert "default password" in caplog.text
            caplog.clear()
            with emqx_lite.Broker("127.0.0.1", 0, 0, users={"admin": "s3cret"}):
                pass
            assert "default password" not in caplog.text

    def test_passwords_are_not_kept_in_plain_text(self):
        with emqx_lite.Broker("127.0.0.1", 0, None, users={"admin": "hunter2"},
                              auth_username={"u": "pw-u"}, auth_clientid={"c": "pw-c"}) as b:
            everything = repr(vars(b)) + repr(b.settings) + repr(b.users._users) \
                + repr(b.auth_username._users) + repr(b.auth_clientid._users)
            for secret in ("hunter2", "pw-u", "pw-c"):
                assert secret not in everything


###############################################################################
# Authentication plugins and emqx_modules
###############################################################################

class TestAuthPlugins:
    """allow_anonymous and the emqx_auth_username / emqx_auth_clientid tables,
    through real CONNECTs (return codes per [MQTT-3.2.2-5] and table 3.1)."""

    @staticmethod
    def _connack(port, client_id, username=None, password=None):
        r = RawClient(port)
        try:
            return r.connect(client_id, username=username, password=password)[1]
        finally:
            r.close()

    def test_anonymous_refused_when_not_allowed(self, make_broker):
        b = make_broker(allow_anonymous=False, auth_username={"alice": "pw"})
        assert self._connack(b.mqtt_port, "anon") == 5
        b.set_plugin("emqx_auth_username", True)
        assert self._connack(b.mqtt_port, "a1", "alice", b"pw") == 0
        assert self._connack(b.mqtt_port, "a2", "alice", b"bad") == 4
        assert self._connack(b.mqtt_port, "a3", "mallory", b"pw") == 5   # nobody vouches

    def test_clientid_plugin(self, make_broker):
        b = make_broker(auth_clientid={"sensor-1": "s3"})
        b.set_plugin("emqx_auth_clientid", True)
        assert self._connack(b.mqtt_port, "sensor-1", "any", b"s3") == 0
        assert self._connack(b.mqtt_port, "sensor-1", "any", b"no") == 4
        assert self._connack(b.mqtt_port, "other") == 0   # anonymous still allowed
        b.set_plugin("emqx_auth_clientid", False)
        assert self._connack(b.mqtt_port, "sensor-1", "any", b"no") == 0

    def test_authenticate_hook_runs_first(self, make_broker):
        seen = []

        def hook(client_id, username, password, ipaddress):
            seen.append((client_id, username, password, ipaddress))
            return {"ok": True, "no": 5}.get(client_id)

        b = make_broker(authenticate=hook, allow_anonymous=False)
        assert self._connack(b.mqtt_port, "ok") == 0
        assert self._connack(b.mqtt_port, "no") == 5
        assert self._connack(b.mqtt_port, "pass", "u", b"p") == 5   # hook passes, no plugin
        assert seen[2] == ("pass", "u", b"p", "127.0.0.1")

    def test_load_config_reads_file_then_environment(self, tmp_path):
        conf = tmp_path / "c.conf"
        conf.write_text("mqtt.session.max_inflight = 7\nmqtt.max_clientid_len = 9\n")
        kw = emqx_lite.load_config(str(conf), {"EMQX_LITE_MQTT__MAX_CLIENTID_LEN": "11"})
        assert kw == {"max_inflight": 7, "max_clientid_len": 11}
        with emqx_lite.Broker("127.0.0.1", 0, None, **kw) as b:
            assert self._connack(b.mqtt_port, "x" * 12) == 2


class TestEmqxModules:
    def test_presence_auto_subscribe_and_rewrite(self):
        with emqx_lite.Broker("127.0.0.1", 0, None, module_subscription=[("$client/%c", 1)],
                              module_rewrite=[("x/#", r"^x/y/(.+)$", "z/y/$1")]) as b:
            c = PahoClient(b.mqtt_port, "mod-1")
            try:
                assert wait_until(lambda: b.subscriptions("mod-1"))
                assert b.subscriptions("mod-1") == [{"client_id": "mod-1", "topic": "$client/mod-1", "qos": 1}]
                b.publish("$client/mod-1", b"direct", qos=1)
                assert fields(c.get())[:2] == ("$client/mod-1", b"direct")
                b.subscribe("mod-1", "z/#", 0)
                b.publish("x/y/abc", b"rewritten")
                assert fields(c.get())[:2] == ("z/y/abc", b"rewritten")
            finally:
                c.disconnect()


###############################################################################
# ACL through real clients
###############################################################################

def _acl_broker(tmp_path, rules, **kw):
    path = tmp_path / "acl.conf"
    path.write_text(rules)
    return emqx_lite.Broker("127.0.0.1", 0, None, acl_file=str(path), **kw)


class TestAcl:
    def test_denied_subscribe_gets_0x80_alongside_granted_filters(self, tmp_path):
        """[MQTT-3.9.3-2]: 0x80 for the denied filter, the others are granted."""
        rules = '{deny, all, subscribe, ["$SYS/#", {eq, "#"}]}.\n{allow, all}.\n'
        with _acl_broker(tmp_path, rules) as b:
            s = RawClient.connected(b.mqtt_port, "acl-sub")
            assert s.subscribe([("#", 1), ("a/+", 1), ("$SYS/#", 0), ("a/#", 2)]) == \
                [0x80, 1, 0x80, 2]
            assert sorted(x["topic"] for x in b.subscriptions("acl-sub")) == ["a/#", "a/+"]
            s.close()

    def test_eq_matches_only_the_literal_filter(self, tmp_path):
        rules = '{deny, all, subscribe, [{eq, "a/+"}]}.\n'
        with _acl_broker(tmp_path, rules) as b:
            s = RawClient.connected(b.mqtt_port, "acl-eq")
            assert s.subscribe([("a/+", 0), ("a/b", 0), ("a/#", 0)]) == [0x80, 0, 0]
            s.close()

    def test_denied_publish_is_acknowledged_and_dropped(self, tmp_path):
        """[MQTT-3.3.5-2]: a PUBLISH the ACL refuses gets its PUBACK and goes nowhere."""
        rules = '{deny, {user, "bob"}, publish, ["secret/#"]}.\n{allow, all}.\n'
        with _acl_broker(tmp_path, rules) as b:
            sub = RawClient.connected(b.mqtt_port, "acl-watch")
            assert sub.subscribe([("secret/#", 0)]) == [0]
            bob = RawClient.connected(b.mqtt_port, "bob-1", username="bob")
            alice = RawClient.connected(b.mqtt_port, "alice-1", username="alice")
            dropped = b.metrics()["messages/dropped"]
            bob.send(gen_publish("secret/x", b"from bob", qos=1, pid=7))
            assert bob.read_bytes(4) == b"\x40\x02\x00\x07"
            alice.send(gen_publish("secret/x", b"from alice"))
            assert sub.read_bytes(len(gen_publish("secret/x", b"from alice"))) == \
                gen_publish("secret/x", b"from alice")
            assert b.metrics()["messages/dropped"] == dropped + 1
            for s in (sub, bob, alice):
                s.close()

    def test_username_and_client_id_placeholders(self, tmp_path):
        rules = ('{allow, all, subscribe, ["users/%u/#", "clients/%c/#"]}.\n'
                 '{deny, all, subscribe, ["users/#", "clients/#"]}.\n')
        with _acl_broker(tmp_path, rules) as b:
            s = RawClient.connected(b.mqtt_port, "dev-9", username="carol")
            assert s.subscribe([("users/carol/x", 0), ("users/dave/x", 0),
                                        ("clients/dev-9/#", 0), ("clients/dev-8/#", 0)]) == \
                [0, 0x80, 0, 0x80]
            anon = RawClient.connected(b.mqtt_port, "anon-1")
            assert anon.subscribe([("users/%u/x", 0)]) == [0x80]
            s.close()
            anon.close()

    def test_ipaddr_cidr_and_client_rules(self, tmp_path):
        rules = ('{deny, {client, "blocked"}, subscribe, ["#"]}.\n'
                 '{allow, {ipaddr, "127.0.0.0/8"}, subscribe, ["local/#"]}.\n'
                 '{allow, {ipaddr, "10.0.0.0/8"}, subscribe, ["remote/#"]}.\n'
                 '{deny, all}.\n')
        with _acl_broker(tmp_path, rules) as b:
            s = RawClient.connected(b.mqtt_port, "someone")
            assert s.subscribe([("local/a", 0), ("remote/a", 0)]) == [0, 0x80]
            blocked = RawClient.connected(b.mqtt_port, "blocked")
            assert blocked.subscribe([("local/a", 0)]) == [0x80]
            s.close()
            blocked.close()

    def test_nomatch_deny_and_first_match_wins(self, tmp_path):
        rules = ('{allow, all, subscribe, ["a/#"]}.\n'
                 '{deny, all, subscribe, ["a/b"]}.\n')
        with _acl_broker(tmp_path, rules, acl_nomatch="deny") as b:
            s = RawClient.connected(b.mqtt_port, "order")
            assert s.subscribe([("a/b", 0), ("z", 0)]) == [0, 0x80]
            s.close()

    def test_default_acl_lets_localhost_do_everything(self, broker):
        s = RawClient.connected(broker.mqtt_port, "local")
        assert s.subscribe([("#", 0), ("$SYS/#", 0)]) == [0, 0]
        s.close()

    def test_bad_acl_file_stops_startup_with_its_line(self, tmp_path):
        path = tmp_path / "acl.conf"
        path.write_text('{allow, all}.\n{allow, {user, "x"}, fly, ["t"]}.\n')
        with pytest.raises(emqx_lite.ConfigError, match=r"acl\.conf:2: expected publish"):
            emqx_lite.Broker("127.0.0.1", 0, None, acl_file=str(path))


###############################################################################
# Slow consumers
###############################################################################

class TestSlowConsumer:

    def test_stalled_subscriber_does_not_block_others(self, make_broker):
        """A raw subscriber that never reads, a paho subscriber that keeps up
        and a raw QoS 0 publisher of 20,000 x 1 KiB (max_outbuf=64 KiB): the
        fast subscriber gets everything in order, the publisher's writes never
        stall, and the stalled client's surplus is dropped (messages/dropped).

        The publisher sends 50 messages (< max_outbuf) at a time and lets the
        paho subscriber catch up: a consumer that keeps up is never dropped."""
        N, BATCH = 20000, 50
        b = make_broker(max_outbuf=64 * 1024)
        slow = RawClient(b.mqtt_port)
        fast = PahoClient(b.mqtt_port, "fast")
        pub = RawClient(b.mqtt_port)
        try:
            slow.connect("slow")
            assert slow.subscribe([("slow/t", 0)]) == [0]
            assert fast.subscribe("slow/t", 0) == [0]
            pub.connect("pub")
            pad = b"x" * 1019
            got = []
            worst_send = 0.0
            t0 = time.monotonic()
            for start in range(0, N, BATCH):
                data = b"".join(gen_publish("slow/t", pad + b"%05d" % i)
                                for i in range(start, start + BATCH))
                ts = time.monotonic()
                pub.send(data)
                worst_send = max(worst_send, time.monotonic() - ts)
                while len(got) < start + BATCH:
                    got.append(fast.get().payload[-5:])
            elapsed = time.monotonic() - t0
            ts = time.monotonic()
            pub.send(gen_pingreq())
            assert pub.read_packet(timeout=2) == (PINGRESP, 0, b"")
            assert time.monotonic() - ts < 1.0
            assert got == [b"%05d" % i for i in range(N)]
            assert worst_send < 1.0, worst_send
            assert elapsed < 30, elapsed
            dropped = b.metrics()["messages/dropped"]
            assert dropped > 0
            slow_info = [s for s in b.sessions() if s["client_id"] == "slow"][0]
            assert slow_info["deliver_msg"] + dropped == N
            assert b.is_connected("slow")
        finally:
            fast.disconnect()
            slow.close()
            pub.close()

    def test_stalled_qos1_subscriber_queues(self, make_broker):
        """QoS 1 messages for a subscriber that never acks wait in its session
        queue behind a full inflight window; none are dropped."""
        b = make_broker(max_inflight=4)
        slow = RawClient(b.mqtt_port)
        try:
            slow.connect("slow1")
            slow.subscribe([("s1", 1)])
            for i in range(50):
                b.publish("s1", b"%d" % i, qos=1)
            info = b.sessions()[0]
            assert (info["inflight_len"], info["mqueue_len"]) == (4, 46)
            assert b.metrics()["messages/dropped"] == 0
            got = []
            while len(got) < 50:
                m = slow.read_publish()
                got.append(m["payload"])
                slow.send(gen_puback(m["pid"]))
            assert got == [b"%d" % i for i in range(50)]
        finally:
            slow.close()

    def test_send_timeout_closes_stalled_client(self, make_broker):
        """send_timeout: a client whose socket stays full is disconnected."""
        b = make_broker(max_outbuf=16 * 1024, send_timeout=0.5)
        slow = RawClient(b.mqtt_port)
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            slow.send(gen_connect("stall") + gen_subscribe(1, [("st", 0)]))
            assert wait_until(lambda: b.subscriptions("stall"))
            pad = b"z" * 4096

            def flood():
                for _ in range(50):
                    b.publish("st", pad)
                return not b.is_connected("stall")

            assert wait_until(flood, interval=0.02)
        finally:
            slow.close()


###############################################################################
# Publisher flow control
###############################################################################

class TestFlowControl:
    """A QoS 1/2 subscriber that consumes slower than publishers publish loses
    nothing: while its queue is over the mark (half of max_mqueue_len, at most
    2 x max_inflight or 64), the publishers' acks are held, in order, so their
    own windows pace them (lossless while those windows fit in the rest of the
    queue). A subscriber that stalls holds nobody back for longer than
    flow_control_timeout."""

    def test_slow_consumer_paces_the_publisher_and_loses_nothing(self, make_broker):
        b = make_broker(max_inflight=4, max_mqueue_len=100, flow_control_timeout=5)
        sub, pub = raw_sub_and_pub(b.mqtt_port, "fc-sub", [("fc/t", 1)], "fc-pub")
        total, window = 400, 20
        sent = acked = 0
        got = []
        deadline = time.monotonic() + 30
        while len(got) < total:
            assert time.monotonic() < deadline, (sent, acked, len(got))
            while sent < total and sent - acked < window:   # a publisher with a window
                sent += 1
                pub.send(gen_publish("fc/t", b"%d" % sent, qos=1, pid=sent))
            while True:   # take every ack there is: the publisher is the faster side
                try:
                    ptype, _, body = pub.read_packet(timeout=0.002)
                except socket.timeout:
                    break
                assert ptype == PUBACK and int.from_bytes(body, "big") == acked + 1  # in order
                acked += 1
            try:
                m = sub.read_publish(timeout=0.01)   # a consumer that takes its time
            except socket.timeout:
                continue
            got.append(int(m["payload"]))
            sub.send(gen_puback(m["pid"]))
        assert got == list(range(1, total + 1))
        assert acked == total
        info = [s for s in b.sessions() if s["client_id"] == "fc-sub"][0]
        assert info["mqueue_dropped"] == 0
        assert b.metrics()["messages/dropped"] == 0

    def test_stalled_consumer_holds_publishers_back_only_briefly(self, make_broker):
        b = make_broker(max_inflight=2, max_mqueue_len=8, flow_control_timeout=0.3)
        # the subscriber reads, never acks
        stalled, pub = raw_sub_and_pub(b.mqtt_port, "fc-stalled", [("fc/s", 1)], "fc-pub2")
        for i in range(1, 41):
            pub.send(gen_publish("fc/s", b"%d" % i, qos=1, pid=i))
        acks = [pub.read_packet(timeout=5) for _ in range(40)]   # all come, in order
        assert acks == [(PUBACK, 0, i.to_bytes(2, "big")) for i in range(1, 41)]
        info = [s for s in b.sessions() if s["client_id"] == "fc-stalled"][0]
        assert info["inflight_len"] == 2 and info["mqueue_len"] == 8
        assert info["mqueue_dropped"] == 30   # the stalled client's own queue overflowed

    def test_flow_control_off(self, make_broker):
        b = make_broker(max_inflight=1, max_mqueue_len=4, flow_control_timeout=0)
        sub, pub = raw_sub_and_pub(b.mqtt_port, "fc-off-sub", [("fc/o", 1)], "fc-off-pub")
        for i in range(1, 11):
            pub.send(gen_publish("fc/o", b"%d" % i, qos=1, pid=i))
        assert [pub.read_packet()[0] for _ in range(10)] == [PUBACK] * 10   # at once
        info = [s for s in b.sessions() if s["client_id"] == "fc-off-sub"][0]
        assert info["mqueue_len"] == 4 and info["mqueue_dropped"] == 5


###############################################################################
# Races
###############################################################################

class TestRaces:
    def test_messages_accepted_before_a_protocol_error_are_still_routed(self, make_broker):
        """A PUBLISH that got its PUBACK is routed even when the next packet in
        the same read is malformed and closes the connection."""
        b = make_broker()
        sub, pub = raw_sub_and_pub(b.mqtt_port, "race-sub", [("race/t", 1)], "race-pub")
        pub.send(gen_publish("race/t", b"kept", qos=1, pid=1) + b"\x00\x00")   # then type 0
        m = sub.read_publish()
        assert (m["topic"], m["payload"]) == ("race/t", b"kept")
        assert pub.expect_closed(strict=False)

    def test_a_discarded_session_cannot_subscribe_again(self, make_broker):
        """After a clean-session takeover the old connection's late SUBSCRIBE
        must not leave a subscription nobody reads (it would take messages)."""
        b = make_broker()
        old = RawClient(b.mqtt_port)
        old.connect("ghost")
        old_session = b.core.sessions["ghost"]
        new = RawClient(b.mqtt_port)
        new.connect("ghost")
        new.subscribe([("g/#", 0)])
        codes, retained = b.core.subscribe(old_session, [("g/t", 1)])
        assert (codes, retained) == ([0x80], [])
        b.publish("g/t", b"for the new one", qos=1)
        m = new.read_publish()
        assert m["payload"] == b"for the new one" and m["qos"] == 0

###############################################################################
# Embedding hygiene
###############################################################################

def broker_threads():
    """The broker's named threads (its connections' readers are bare threads:
    os_threads() counts those)."""
    return [t for t in threading.enumerate() if t.name.startswith("emqx_lite")]


def os_threads():
    """This process's threads as the kernel counts them, bare ones included."""
    return len(os.listdir("/proc/self/task"))


def fd_count():
    return len(os.listdir("/proc/self/fd"))


class TestEmbedding:

    def test_start_stop_200_brokers_leaks_nothing(self):
        """200 start/stop cycles (some with a client still connected at stop)
        leave no thread and no file descriptor behind."""
        assert wait_until(lambda: not broker_threads())
        threads_before, os_before = threading.active_count(), os_threads()
        fds_before = fd_count()
        for i in range(200):
            with emqx_lite.Broker(HOST, mqtt_port=0, http_port=None) as b:
                assert b.mqtt_port > 0
                if i % 20 == 0:
                    r = RawClient(b.mqtt_port)
                    r.connect("leak%d" % i, will=("w", b"x", 1, True))
                    b.stop()               # stop with the client still connected
                    assert r.expect_closed()
                    r.close()
        assert broker_threads() == []
        assert threading.active_count() <= threads_before
        assert wait_until(lambda: os_threads() <= os_before), (os_threads(), os_before)
        assert wait_until(lambda: fd_count() <= fds_before), (fd_count(), fds_before)

    def test_stop_joins_connection_threads(self, make_broker):
        os_before = os_threads()
        b = make_broker()
        rs = [RawClient(b.mqtt_port) for _ in range(5)]
        for i, r in enumerate(rs):
            r.connect("t%d" % i)
        assert wait_until(lambda: len(b._readers) == 5)   # a reader each, running
        assert b.thread_count() >= 5 + 1
        b.stop()
        assert broker_threads() == []
        assert wait_until(lambda: os_threads() <= os_before), (os_threads(), os_before)
        for r in rs:
            assert r.expect_closed()
            r.close()

    def test_readers_that_log_leave_no_dummy_thread(self, make_broker, caplog):
        """A connection's reader is a bare thread: when it logs, logging asks
        threading.current_thread(), which registers a stand-in for it; the
        reader removes that when it ends, so logging clients leave nothing
        in threading.enumerate()."""
        caplog.set_level(logging.DEBUG, logger="emqx_lite")
        b = make_broker()
        before = set(threading.enumerate())
        for i in range(20):
            r = RawClient(b.mqtt_port)
            r.sock.sendall(b"\x30\x03\x00\x01t")   # PUBLISH before CONNECT [MQTT-3.1.0-1]
            assert r.expect_closed()
            r.close()
        assert wait_until(lambda: not b.core.sockets)
        assert any("first packet must be CONNECT" in m for m in caplog.messages)
        assert wait_until(lambda: set(threading.enumerate()) <= before), \
            set(threading.enumerate()) - before
        b.stop()

    def test_two_brokers_are_independent(self, make_broker):
        b1, b2 = make_broker(), make_broker()
        assert b1.mqtt_port != b2.mqtt_port
        c1 = PahoClient(b1.mqtt_port, "same-id")
        c2 = PahoClient(b2.mqtt_port, "same-id")   # no takeover across brokers
        try:
            c1.subscribe("ind", 1)
            c2.subscribe("ind", 1)
            c2.subscribe("zz/sentinel", 0)
            b1.publish("ind", b"one", qos=1, retain=True)
            assert c1.get().payload == b"one"
            b2.publish("zz/sentinel", b"end")
            assert c2.get().topic == "zz/sentinel"
            assert user_retained(b2) == []
            assert [c["client_id"] for c in b1.clients()] == ["same-id"]
            assert [c["client_id"] for c in b2.clients()] == ["same-id"]
            b1.stop()
            b2.publish("ind", b"two", qos=1)
            assert c2.get().payload == b"two"
        finally:
            c1.disconnect()
            c2.disconnect()

    def test_lifecycle_errors(self):
        b = emqx_lite.Broker(HOST, mqtt_port=0, http_port=None)
        with pytest.raises(RuntimeError):
            b.publish("t", b"x")
        with pytest.raises(RuntimeError):
            b.clients()
        b.start()
        try:
            with pytest.raises(RuntimeError):
                b.start()
        finally:
            b.stop()
        b.stop()   # idempotent
        with pytest.raises(TypeError):
            emqx_lite.Broker(HOST, mqtt_port=0, http_port=None, no_such_setting=1)

    def test_restart(self):
        b = emqx_lite.Broker(HOST, mqtt_port=0, http_port=None)
        for _ in range(2):
            with b:
                r = RawClient(b.mqtt_port)
                try:
                    assert r.connect("again") == (0, 0)
                finally:
                    r.close()
        assert broker_threads() == []

    def test_context_manager_and_node(self):
        with emqx_lite.Broker(HOST, mqtt_port=0, http_port=None) as b:
            assert isinstance(b, emqx_lite.Broker)
            assert b.node == NODE
            assert b.http_port is None
        with emqx_lite.Broker(HOST, mqtt_port=0, http_port=None, node="n1@host") as b:
            assert b.node == "n1@host"
            r = RawClient(b.mqtt_port)
            try:
                r.connect("n")
                r.subscribe([("$SYS/brokers", 0)])
                assert r.read_publish()["payload"] == b"n1@host"
            finally:
                r.close()

    def test_python_subscribe_api(self, raw, broker):
        r = raw()
        r.connect("api", clean=False)
        broker.publish("api/r", b"kept", retain=True)
        broker.subscribe("api", "api/+", qos=1)
        m = r.read_publish()
        assert (m["topic"], m["retain"]) == ("api/r", True)
        assert broker.subscriptions("api") == [{"client_id": "api", "topic": "api/+", "qos": 1}]
        assert broker.is_connected("api") and not broker.is_connected("nobody")
        with pytest.raises(KeyError):
            broker.subscribe("nobody", "t")
        with pytest.raises(ValueError):
            broker.subscribe("api", "a/#/b")
        broker.unsubscribe("api", "api/+")
        assert broker.subscriptions("api") == []

    def test_concurrent_api_publishers(self, client, broker):
        sub = client(client_id="cc")
        sub.subscribe("cc/+", 1)
        n_threads, n_msgs = 8, 100   # 800 < max_mqueue_len: nothing is dropped

        def worker(k):
            for i in range(n_msgs):
                broker.publish("cc/%d" % k, b"%d" % i, qos=1)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        per_topic = {}
        for _ in range(n_threads * n_msgs):
            m = sub.get()
            per_topic.setdefault(m.topic, []).append(int(m.payload))
        assert sorted(per_topic) == ["cc/%d" % k for k in range(n_threads)]
        for values in per_topic.values():
            assert values == list(range(n_msgs))   # per-publisher order [MQTT-4.6.0-2]


###############################################################################
# Listeners: TLS, WebSocket, secure WebSocket, max_clients
###############################################################################

def _tls_broker(pki, **kw):
    return emqx_lite.Broker("127.0.0.1", 0, None, ssl_port=0, ws_port=0, wss_port=0,
                            certfile=pki["server.pem"], keyfile=pki["server.key"],
                            cacertfile=pki["ca.pem"], **kw)


class TestListeners:
    def test_every_listener_type_carries_the_same_mqtt(self, pki):
        """tcp, ssl, ws and wss clients publish to and receive from each other."""
        with _tls_broker(pki) as b:
            clients = [PahoClient(b.mqtt_port, "tcp"),
                       PahoClient(b.ssl_port, "ssl", ca=pki["ca.pem"]),
                       PahoClient(b.ws_port, "ws", transport="websockets"),
                       PahoClient(b.wss_port, "wss", transport="websockets", ca=pki["ca.pem"])]
            try:
                for c in clients:
                    c.subscribe("mix/#", 1)
                big = bytes(range(256)) * 1000   # spans many TLS records and WebSocket frames
                for c in clients:
                    c.publish("mix/" + c.client_id, big, qos=1)
                for c in clients:
                    got = sorted(c.get().topic for _ in clients)
                    assert got == ["mix/ssl", "mix/tcp", "mix/ws", "mix/wss"]
                protocols = [(l["protocol"], l["current_clients"]) for l in b.listener_infos()]
                assert protocols == [("mqtt:tcp", 1), ("mqtt:ssl", 1), ("mqtt:ws", 1), ("mqtt:wss", 1)]
            finally:
                for c in clients:
                    c.disconnect()

    def test_tls_client_certificate_required(self, pki):
        """fail_if_no_peer_cert: a client without a certificate cannot connect;
        with one signed by the CA it can, and peer_cert_as_username=cn makes the
        certificate's CN its username."""
        listeners = [{"type": "ssl", "host": "127.0.0.1", "port": 0,
                      "certfile": pki["server.pem"], "keyfile": pki["server.key"],
                      "cacertfile": pki["ca.pem"], "verify": True,
                      "fail_if_no_peer_cert": True, "peer_cert_as_username": "cn"}]
        with emqx_lite.Broker(http_port=None, listeners=listeners) as b:
            ctx = ssl.create_default_context(cafile=pki["ca.pem"])
            with socket.create_connection(("127.0.0.1", b.ssl_port), timeout=5) as raw_sock:
                with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                    with ctx.wrap_socket(raw_sock, server_hostname="127.0.0.1") as tls:
                        tls.sendall(gen_connect("nocert"))
                        if not tls.recv(4):
                            raise ConnectionError("closed")
            c = PahoClient(b.ssl_port, "withcert", ca=pki["ca.pem"], cert=pki["client.pem"],
                           key=pki["client.key"])
            try:
                assert b.clients()[0]["username"] == "client-7"
            finally:
                c.disconnect()

    def test_tls_optional_client_certificate(self, pki):
        """verify without fail_if_no_peer_cert: clients with or without a certificate connect."""
        with _tls_broker(pki, verify=True) as b:
            a = PahoClient(b.ssl_port, "a", ca=pki["ca.pem"])
            c = PahoClient(b.ssl_port, "c", ca=pki["ca.pem"], cert=pki["client.pem"],
                           key=pki["client.key"])
            a.disconnect()
            c.disconnect()

    def test_tls_garbage_closes_only_that_connection(self, pki):
        with _tls_broker(pki) as b:
            healthy = PahoClient(b.mqtt_port, "healthy")
            try:
                r = RawClient(b.ssl_port)
                r.send(b"\x16\x03\x01\x00\x05hello-not-tls" * 10)
                # the broker may answer with a TLS alert, then closes
                assert r.expect_closed(strict=False)
                r.close()
                assert wait_until(lambda: b.listener_infos()[1]["current_clients"] == 0)
                healthy.subscribe("h/#", 0)
                b.publish("h/1", b"still here")
                assert fields(healthy.get())[:2] == ("h/1", b"still here")
            finally:
                healthy.disconnect()

    def test_websocket_frames_split_and_joined(self):
        """[MQTT-6.0.0-2] a packet split over frames and [MQTT-6.0.0-3] several
        packets in one frame are both handled, as browsers may send them; ping
        gets pong; close gets close."""
        wsproto = pytest.importorskip("wsproto")
        import wsproto.events as ev
        with emqx_lite.Broker("127.0.0.1", 0, None, ws_port=0) as b:
            ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            s = socket.create_connection(("127.0.0.1", b.ws_port), timeout=5)

            def events():
                while True:
                    got = list(ws.events())
                    if got:
                        return got
                    ws.receive_data(s.recv(65536))

            s.sendall(ws.send(ev.Request(host="127.0.0.1", target="/mqtt", subprotocols=["mqtt"])))
            (accept,) = events()
            assert isinstance(accept, ev.AcceptConnection) and accept.subprotocol == "mqtt"
            connect = gen_connect("wsc")
            s.sendall(ws.send(ev.BytesMessage(data=connect[:3], message_finished=False)))
            s.sendall(ws.send(ev.BytesMessage(data=connect[3:])))
            stream = b""
            while len(stream) < 4:
                for e in events():
                    stream += bytes(e.data)
            assert stream[:4] == b"\x20\x02\x00\x00"
            both = gen_subscribe(1, [("w/t", 0)]) + gen_publish("w/t", b"one-frame")
            s.sendall(ws.send(ev.BytesMessage(data=both)))
            stream = stream[4:]
            expected = b"\x90\x03\x00\x01\x00" + gen_publish("w/t", b"one-frame")
            while len(stream) < len(expected):
                for e in events():
                    stream += bytes(e.data)
            assert stream == expected
            s.sendall(ws.send(ev.Ping(payload=b"hi")))
            (pong,) = events()
            assert isinstance(pong, ev.Pong) and pong.payload == b"hi"
            s.sendall(ws.send(ev.CloseConnection(code=1000)))
            assert any(isinstance(e, ev.CloseConnection) for e in events())
            s.close()

    def test_websocket_wrong_path_or_subprotocol_is_rejected(self):
        with emqx_lite.Broker("127.0.0.1", 0, None, ws_port=0) as b:
            for target, protos in (("/other", ["mqtt"]), ("/mqtt", ["chat"])):
                s = socket.create_connection(("127.0.0.1", b.ws_port), timeout=5)
                s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                           "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: %s\r\n\r\n"
                           % (target, ",".join(protos))).encode())
                reply = s.recv(4096)
                assert reply.startswith(b"HTTP/1.1 404"), reply
                s.close()

    def test_max_clients_refuses_cleanly(self):
        with emqx_lite.Broker("127.0.0.1", 0, None, max_clients=2) as b:
            a, c = PahoClient(b.mqtt_port, "mc-a"), PahoClient(b.mqtt_port, "mc-b")
            try:
                r = RawClient(b.mqtt_port)
                r.send(gen_connect("mc-c"))
                assert r.expect_closed()
                r.close()
                assert b.listener_infos()[0]["shutdown_count"] == {"max_clients": 1}
                assert len(b.clients()) == 2
            finally:
                a.disconnect()
                c.disconnect()


###############################################################################
# Command line and configuration files
###############################################################################

class TestCommandLine:
    def test_help_lists_the_flags(self):
        out = _run_cli("--help").stdout
        for flag in ("--bind", "--mqtt-port", "--http-port", "--node", "--log-level",
                     "--config", "--print-config"):
            assert flag in out

    def test_config_file_env_and_flags_in_that_order(self, tmp_path):
        conf = tmp_path / "emqx_lite.conf"
        conf.write_text("# a comment\nnode.name = fromfile@host\n"
                        "mqtt.max_packet_size = 64KB\n"
                        "listener.tcp.external = 127.0.0.1:1883\n"
                        "listener.api.mgmt = 127.0.0.1:8080\n")
        broker = _CliBroker("--config", str(conf), "--mqtt-port", "0", "--http-port", "0",
                            "--node", "fromflag@host",
                            env={"EMQX_LITE_MQTT__MAX_PACKET_SIZE": "1KB",
                                 "EMQX_LITE_NODE__NAME": "fromenv@host"})
        try:
            status = urllib.request.urlopen("http://127.0.0.1:%d/status" % broker.ports["api"],
                                            timeout=5).read()
            assert status.startswith(b"Node fromflag@host is started")
            ok = RawClient.connected(broker.ports["mqtt:tcp"], "small")
            ok.send(gen_pingreq())
            assert ok.read_bytes(2) == b"\xd0\x00"
            big = RawClient.connected(broker.ports["mqtt:tcp"], "big")
            big.send(gen_publish("t", b"x" * 2000))   # over the environment's 1KB
            assert big.expect_closed()
            ok.close()
            big.close()
        finally:
            code, log = broker.stop()
        assert code == 0, log
        assert "Stopping" in log

    @pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                        reason="needs a process that may run on two CPUs or more")
    def test_cpu_keeps_every_thread_on_one_cpu(self):
        """--cpu N: the process and every thread it starts (service, REST,
        connection readers) run on CPU N only; --cpu all leaves them where
        the system puts them; auto picks one of the allowed CPUs."""
        allowed = sorted(os.sched_getaffinity(0))

        def affinities(proc):
            seen = {}
            for task in os.listdir("/proc/%d/task" % proc.pid):
                try:
                    seen[task] = frozenset(os.sched_getaffinity(int(task)))
                except ProcessLookupError:   # a thread that ended meanwhile
                    pass
            return set(seen.values()), len(seen)

        for arg, expect in ((str(allowed[-1]), {frozenset({allowed[-1]})}),
                            ("all", {frozenset(allowed)}), ("auto", None)):
            broker = _CliBroker("--bind", "127.0.0.1", "--mqtt-port", "0", "--http-port", "0",
                                "--dashboard-port", "-1", "--data-dir", "", "--cpu", arg)
            try:
                client = RawClient.connected(broker.ports["mqtt:tcp"], "pinned")
                seen, threads = affinities(broker.proc)
                client.close()
            finally:
                code, log = broker.stop()
            assert code == 0, log
            assert threads >= 4, log   # main, service, REST, the client's reader
            if expect is None:   # one CPU, the same for every thread, one of those allowed
                assert len(seen) == 1 and len(next(iter(seen))) == 1, seen
                assert next(iter(seen)) <= set(allowed)
                assert re.search(r"Running on CPU \d+ of [\d,-]+", log), log
            else:
                assert seen == expect, (arg, seen)

    @pytest.mark.parametrize("arg,message", [
        ("many", "--cpu takes auto, all or a CPU number, not 'many'"),
        ("99999", "--cpu 99999: this process may run on CPUs"),
    ])
    def test_bad_cpu_stops_startup(self, arg, message):
        proc = subprocess.run([sys.executable, emqx_lite.__file__, "--cpu", arg],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2
        assert message in proc.stderr

    def test_sigint_stops_cleanly(self):
        broker = _CliBroker("--bind", "127.0.0.1", "--mqtt-port", "0", "--http-port", "0")
        s = RawClient.connected(broker.ports["mqtt:tcp"], "held")
        code, log = broker.stop(signal.SIGINT)
        assert code == 0, log
        assert s.sock.recv(10) == b""   # the connection was closed by the broker
        s.close()

    @pytest.mark.parametrize("text,message", [
        ("mqtt.bogus = 1\n", r"bad\.conf:1: mqtt\.bogus: unknown key"),
        ("# ok\nmqtt.max_packet_size = lots\n", r"bad\.conf:2: mqtt\.max_packet_size: expected a size"),
        ("listener.tcp.x.max_clients = 5\n", r"has no address line"),
        ("just words\n", r"bad\.conf:1: expected 'key = value'"),
    ])
    def test_bad_config_stops_startup_naming_file_line_and_key(self, tmp_path, text, message):
        conf = tmp_path / "bad.conf"
        conf.write_text(text)
        result = _run_cli("--config", str(conf))
        assert result.returncode == 1
        assert re.search(message, result.stderr), result.stderr

    def test_the_suites_knobs_do_not_stop_the_broker(self):
        """A user who exported the suite's knobs can still start the broker."""
        longer = {"EMQXLITE_TEST_FUZZ_EXAMPLES": "5000", "EMQXLITE_TEST_FUZZ_PACKETS": "20000",
                  "EMQXLITE_TEST_SOAK_SECONDS": "60", "EMQXLITE_TEST_KILLS": "200"}
        assert set(longer) == set(TEST_KNOBS)
        result = _run_cli("--print-config", env=longer)
        assert result.returncode == 0, result.stderr
        assert "\nnode.name = " in result.stdout

    def test_bad_environment_value_names_the_variable(self):
        result = _run_cli("--print-config", env={"EMQX_LITE_MQTT__SESSION__MAX_INFLIGHT": "many"})
        assert result.returncode == 1
        assert "$EMQX_LITE_MQTT__SESSION__MAX_INFLIGHT: mqtt.session.max_inflight" in result.stderr

    def test_print_config_round_trips(self, tmp_path):
        conf = tmp_path / "in.conf"
        conf.write_text("mqtt.session.max_inflight = 7\nlistener.ws.w1 = 127.0.0.1:0\n"
                        "auth.username.u = p\nmqtt.broker.sys_interval = 2m\n")
        printed = _run_cli("--config", str(conf), "--print-config").stdout
        settings = emqx_lite.config_settings(emqx_lite.parse_conf(printed, "out"), "out")
        assert settings["max_inflight"] == 7 and settings["sys_interval"] == 120
        assert settings["auth_username"] == {"u": "p"}
        assert [(l["type"], l["name"]) for l in settings["listeners"]] == [("ws", "w1")]
        again = tmp_path / "again.conf"
        again.write_text(printed)
        assert _run_cli("--config", str(again), "--print-config").stdout == printed


###############################################################################
# REST API (EMQ X 2.x api/v2) — every request goes over real HTTP to waitress
###############################################################################


class TestRestAuth:
    def test_no_credentials_is_401_with_emqx_realm(self, api):
        status, headers, body = api.request("GET", "management/nodes", auth=False)
        assert status == 401
        assert headers["WWW-Authenticate"] == 'Basic realm="emqx control center"'
        assert body == b""

    def test_wrong_password_is_401(self, api_broker):
        status, _, _ = Api(api_broker.http_port, "admin", "wrong").request("GET", "routes")
        assert status == 401

    @pytest.mark.parametrize("header", ["Basic !!!notbase64", "Bearer abc", "Basic",
                                        "Basic " + base64.b64encode(b"nocolon").decode()])
    def test_malformed_authorization_header_is_401(self, api, header):
        status, _, _ = api.request("GET", "routes", auth=header)
        assert status == 401

    def test_unknown_path_needs_auth_before_routing(self, api):
        assert api.request("GET", "no/such/route", auth=False)[0] == 401
        status, _, body = api.request("GET", "no/such/route")
        assert (status, body) == (404, b"")

    def test_wrong_method_is_404(self, api):
        status, _, body = api.request("POST", "management/nodes", {})
        assert (status, body) == (404, b"")

    def test_status_and_index_need_no_auth(self, api):
        status, _, body = api.request("GET", "/status", auth=False)
        assert status == 200 and body == ("Node %s is started\nemqx_lite is running" % NODE).encode()
        status, _, body = api.request("GET", "/", auth=False)
        assert status == 200 and "api/v2/routes" in json.loads(body)["paths"]


class TestRestNodes:
    def test_management_nodes(self, api):
        reply = api.get("management/nodes")
        assert reply["code"] == 0
        (node,) = reply["result"]
        assert list(node) == ["name", "version", "sysdescr", "uptime", "datetime",
                              "otp_release", "node_status"]
        assert node["name"] == NODE and node["version"] == emqx_lite.__version__
        assert node["sysdescr"] == "EMQ X Lite" and node["node_status"] == "Running"
        assert re.fullmatch(r"\d+ seconds", node["uptime"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", node["datetime"])
        assert node["otp_release"].startswith("Python/")

    def test_management_node_by_name_and_unknown_node(self, api):
        info = api.result("GET", "management/nodes/" + NODE)
        assert "name" not in info and info["node_status"] == "Running"
        assert api.request("GET", "management/nodes/nobody@nowhere")[:3:2] == (404, b"")

    def test_monitoring_nodes_reports_process_figures(self, api, api_mqtt):
        api_mqtt("mon-1")
        (node,) = api.result("GET", "monitoring/nodes")
        assert node == api.result("GET", "monitoring/nodes/" + NODE) | {
            "memory_used": node["memory_used"], "memory_total": node["memory_total"],
            "process_used": node["process_used"], "load1": node["load1"],
            "load5": node["load5"], "load15": node["load15"]}
        assert node["clients"] == 1 and node["node_status"] == "Running"
        assert re.fullmatch(r"\d+\.\d\d[KMG]", node["memory_total"])
        assert re.fullmatch(r"\d+\.\d\d", node["load1"])
        assert node["max_fds"] > 0 and node["process_used"] > 1
        assert node["process_available"] >= node["process_used"]
        for path in ("monitoring/nodes/x@y", "monitoring/metrics/x@y", "monitoring/stats/x@y",
                     "monitoring/listeners/x@y", "nodes/x@y/clients"):
            assert api.request("GET", path)[0] == 404, path


class TestRestClients:
    def test_client_rows_reflect_the_real_connection(self, api, api_mqtt):
        c = api_mqtt("rest-c1", keepalive=42, username="alice", password="pw")
        local_port = c.client.socket().getsockname()[1]
        page = api.result("GET", "nodes/%s/clients" % NODE)
        assert {k: page[k] for k in ("current_page", "page_size", "total_num", "total_page")} == \
            {"current_page": 1, "page_size": 20, "total_num": 1, "total_page": 1}
        (row,) = page["objects"]
        assert list(row) == ["client_id", "username", "ipaddress", "port", "clean_sess",
                             "proto_ver", "keepalive", "connected_at"]
        assert row["client_id"] == "rest-c1" and row["username"] == "alice"
        assert row["ipaddress"] == "127.0.0.1" and row["port"] == local_port
        assert row["keepalive"] == 42 and row["proto_ver"] == 4 and row["clean_sess"] is True
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row["connected_at"])
        assert api.result("GET", "clients/rest-c1") == {"objects": [row]}
        assert api.result("GET", "nodes/%s/clients/rest-c1" % NODE) == {"objects": [row]}
        assert api.result("GET", "clients/nobody") == {"objects": []}

    def test_client_without_username_reports_undefined(self, api, api_mqtt):
        api_mqtt("anon")
        assert api.result("GET", "clients/anon")["objects"][0]["username"] == "undefined"

    def test_pagination_is_sorted_and_bounded(self, api, api_mqtt):
        for cid in ("p-c", "p-a", "p-b"):
            api_mqtt(cid)
        page = api.result("GET", "nodes/%s/clients?curr_page=1&page_size=2" % NODE)
        assert page["total_num"] == 3 and page["total_page"] == 2
        assert [o["client_id"] for o in page["objects"]] == ["p-a", "p-b"]
        page = api.result("GET", "nodes/%s/clients?curr_page=2&page_size=2" % NODE)
        assert [o["client_id"] for o in page["objects"]] == ["p-c"]
        page = api.result("GET", "nodes/%s/clients?curr_page=9&page_size=2" % NODE)
        assert page["objects"] == [] and page["current_page"] == 9
        for bad in ("page_size=0", "page_size=-1", "curr_page=x", "page_size="):
            assert api.request("GET", "nodes/%s/clients?%s" % (NODE, bad))[0] == 404, bad

    def test_client_ids_with_slash_plus_and_hash_in_urls(self, api, api_mqtt):
        api_mqtt("dev/1+#")
        for path in ("clients/dev/1%2B%23", "clients/dev%2F1%2B%23"):
            assert api.result("GET", path)["objects"][0]["client_id"] == "dev/1+#", path
        assert api.result("GET", "clients/dev/1+%23") == {"objects": []}  # raw '+' is a space

    def test_delete_kicks_the_client_and_its_will_is_published(self, api, api_broker, api_mqtt):
        watcher = api_mqtt("watcher", subscribe=("wills/#", 1))
        victim = api_mqtt("victim", will=("wills/victim", b"gone", 1, False))
        assert api.result("DELETE", "clients/victim") == []
        assert fields(watcher.get())[:2] == ("wills/victim", b"gone")
        victim.disconnects.get(timeout=TIMEOUT)
        listeners = api.result("GET", "monitoring/listeners/" + NODE)
        assert listeners[0]["shutdown_count"] == {"kick": 1}

    def test_delete_unknown_client_is_112_without_message(self, api):
        assert api.json("DELETE", "clients/nobody") == {"code": 112}


class TestRestSessionsSubscriptionsRoutes:
    def test_session_rows_carry_both_key_sets_with_numbers(self, api, api_mqtt):
        c = api_mqtt("sess-1", clean_session=False, subscribe=("s/#", 1))
        c.disconnect()
        assert wait_until(lambda: not any(x["client_id"] == "sess-1"
                                          for x in api.result("GET", "nodes/%s/clients" % NODE)["objects"]))
        api.result("POST", "mqtt/publish", {"topic": "s/1", "payload": "x", "qos": 1})
        for path in ("nodes/%s/sessions" % NODE, "node/%s/sessions" % NODE):
            (row,) = api.result("GET", path)["objects"]
            assert row["client_id"] == "sess-1" and row["clean_sess"] is False
            assert row["subscriptions"] == 1 and row["max_inflight"] == 32
            assert row["mqueue_len"] == 1 and row["message_queue"] == 1
            assert row["enqueue_msg"] == 1 and row["inflight_len"] == 0
            for key in ("inflight_queue", "message_dropped", "awaiting_rel", "awaiting_ack",
                        "awaiting_comp", "mqueue_dropped", "awaiting_rel_len", "deliver_msg"):
                assert isinstance(row[key], int), key
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row["created_at"])
        assert api.result("GET", "sessions/sess-1")["objects"][0]["client_id"] == "sess-1"
        assert api.result("GET", "nodes/%s/sessions/sess-1" % NODE)["objects"][0]["mqueue_len"] == 1
        assert api.result("GET", "sessions/nobody") == {"objects": []}

    def test_subscriptions_and_routes(self, api, api_mqtt):
        api_mqtt("sub-a", subscribe=[("a/+/c", 1), ("a/#", 2)])
        api_mqtt("sub-b", subscribe=("a/#", 0))
        page = api.result("GET", "nodes/%s/subscriptions" % NODE)
        assert page["total_num"] == 3
        assert page["objects"] == [{"client_id": "sub-a", "topic": "a/#", "qos": 2},
                                   {"client_id": "sub-a", "topic": "a/+/c", "qos": 1},
                                   {"client_id": "sub-b", "topic": "a/#", "qos": 0}]
        assert api.result("GET", "subscriptions/sub-b") == {
            "objects": [{"client_id": "sub-b", "topic": "a/#", "qos": 0}]}
        assert len(api.result("GET", "nodes/%s/subscriptions/sub-a" % NODE)["objects"]) == 2
        routes = api.result("GET", "routes")
        assert routes["total_num"] == 2
        assert routes["objects"] == [{"topic": "a/#", "node": NODE}, {"topic": "a/+/c", "node": NODE}]
        assert api.result("GET", "routes/a%2F%2B%2Fc") == {"objects": [{"topic": "a/+/c", "node": NODE}]}
        assert api.result("GET", "routes/a/%23") == {"objects": [{"topic": "a/#", "node": NODE}]}
        assert api.result("GET", "routes/a/b") == {"objects": []}
        assert api.request("GET", "routes/")[0] == 404


class TestRestPublishSubscribe:
    def test_publish_reaches_a_subscriber_with_qos_and_retain(self, api, api_broker, api_mqtt):
        c = api_mqtt("rx", subscribe=("news/#", 2))
        assert api.result("POST", "mqtt/publish",
                          {"topic": "news/1", "payload": "hello", "qos": 1}) == []
        assert fields(c.get()) == ("news/1", b"hello", 1, False)
        api.result("POST", "mqtt/publish", {"topic": "news/r", "payload": "kept", "qos": 2,
                                            "retain": True, "client_id": "C_1"})
        assert fields(c.get()) == ("news/r", b"kept", 2, False)
        late = api_mqtt("late", subscribe=("news/r", 1))
        assert fields(late.get()) == ("news/r", b"kept", 1, True)
        assert api_broker.metrics()["messages/received"] == 0   # REST is not an MQTT client

    def test_publish_defaults_and_dropped_metric(self, api, api_broker):
        before = api_broker.metrics()["messages/dropped"]
        assert api.result("POST", "mqtt/publish", {"topic": "nobody/listens"}) == []
        assert api_broker.metrics()["messages/dropped"] == before + 1

    @pytest.mark.parametrize("body,code", [
        (b"not json", 109), (b"{'single': 'quotes'}", 109), (b"[1, 2]", 107), (b'"text"', 107),
        (b"5", 107), (b"null", 107), (b"{}", 107), (b'{"payload": "x"}', 107),
        (b'{"topic": 1}', 108), (b'{"topic": null}', 108), (b'{"topic": "t", "qos": 3}', 108),
        (b'{"topic": "t", "qos": "1"}', 108), (b'{"topic": "t", "qos": 1.0}', 108),
        (b'{"topic": "t", "retain": "yes"}', 108), (b'{"topic": "t", "payload": 5}', 108),
        (b'{"topic": "a/+"}', 102), (b'{"topic": "a/#"}', 102), (b'{"topic": ""}', 102),
    ], ids=lambda v: v.decode() if isinstance(v, bytes) else str(v))
    def test_publish_bad_bodies_get_specific_codes(self, api, body, code):
        reply = api.json("POST", "mqtt/publish", raw_body=body)
        assert reply["code"] == code and isinstance(reply["message"], str)

    def test_subscribe_on_behalf_delivers_retained_and_later_messages(self, api, api_broker, api_mqtt):
        api.result("POST", "mqtt/publish", {"topic": "t/ret", "payload": "r", "retain": True, "qos": 1})
        c = api_mqtt("behalf")
        assert api.result("POST", "mqtt/subscribe", {"client_id": "behalf", "topic": "t/#", "qos": 1}) == []
        assert fields(c.get()) == ("t/ret", b"r", 1, True)
        assert {"client_id": "behalf", "topic": "t/#", "qos": 1} in api_broker.subscriptions("behalf")
        api.result("POST", "mqtt/publish", {"topic": "t/x", "payload": "live", "qos": 1})
        assert fields(c.get()) == ("t/x", b"live", 1, False)
        assert api.result("POST", "mqtt/unsubscribe", {"client_id": "behalf", "topic": "t/#"}) == []
        assert "t/#" not in api_broker.routes()

    @pytest.mark.parametrize("path,body,code,message", [
        ("mqtt/subscribe", {"client_id": "nobody", "topic": "t"}, 102, "Clientid: nobody not found"),
        ("mqtt/subscribe", {"client_id": "here", "topic": "a/#/b"}, 102, "validate topic: a/#/b fail"),
        ("mqtt/subscribe", {"client_id": "here", "topic": "t", "qos": 3}, 108, "params type error"),
        ("mqtt/subscribe", {"client_id": "here"}, 107, "params error"),
        ("mqtt/subscribe", {"client_id": 5, "topic": "t"}, 108, "params type error"),
        ("mqtt/unsubscribe", {"client_id": "nobody", "topic": "t"}, 102, "Clientid: nobody not found"),
        ("mqtt/unsubscribe", {"topic": "t"}, 107, "params error"),
    ])
    def test_subscribe_errors(self, api, api_mqtt, path, body, code, message):
        api_mqtt("here")
        assert api.json("POST", path, body) == {"code": code, "message": message}


class TestRestPluginsMetricsStatsListeners:
    def test_plugin_list_names_and_defaults(self, api):
        plugins = api.result("GET", "nodes/%s/plugins" % NODE)
        assert [(p["name"], p["active"]) for p in plugins] == [
            ("emqx_auth_clientid", False), ("emqx_auth_username", False),
            ("emqx_bridge_mqtt", True), ("emqx_dashboard", True), ("emqx_modules", True),
            ("emqx_retainer", True)]
        assert all(set(p) == {"name", "version", "description", "active"} for p in plugins)

    def test_retainer_off_neither_stores_nor_delivers(self, api, api_broker, api_mqtt):
        path = "nodes/%s/plugins/emqx_retainer" % NODE
        api.result("POST", "mqtt/publish", {"topic": "keep/1", "payload": "a", "retain": True})
        assert api.result("PUT", path, {"active": False}) == []
        assert api.json("PUT", path, {"active": False}) == {"code": 111, "message": "not_started"}
        api.result("POST", "mqtt/publish", {"topic": "keep/2", "payload": "b", "retain": True})
        c = api_mqtt("ret-off", subscribe=("keep/#", 0))
        api.result("POST", "mqtt/publish", {"topic": "keep/3", "payload": "c"})
        assert fields(c.get())[:2] == ("keep/3", b"c")   # no retained message first
        assert api.result("PUT", path, {"active": True}) == []
        assert api.json("PUT", path, {"active": True}) == {"code": 110, "message": "already_started"}
        assert [r["topic"] for r in api_broker.retained() if r["topic"].startswith("keep/")] == ["keep/1"]

    def test_plugin_errors(self, api):
        assert api.json("PUT", "nodes/%s/plugins/emqx_nope" % NODE, {"active": True}) == \
            {"code": 102, "message": "unknown"}
        assert api.json("PUT", "nodes/%s/plugins/emqx_retainer" % NODE, {}) == \
            {"code": 107, "message": "params error"}
        assert api.json("PUT", "nodes/%s/plugins/emqx_retainer" % NODE, {"active": "no"}) == \
            {"code": 108, "message": "params type error"}

    def test_auth_username_plugin_checks_connect(self):
        """[MQTT-3.2.2-5]: a refused CONNECT gets a non-zero CONNACK (0x04 here)."""
        with emqx_lite.Broker("127.0.0.1", 0, 0, auth_username={"u1": "secret"}, **FAST_HASH) as b:
            rest = Api(b.http_port)
            rest.result("PUT", "nodes/%s/plugins/emqx_auth_username" % NODE, {"active": True})
            codes = []
            for password in ("wrong", "secret"):
                c = PahoClient(b.mqtt_port, "auth-" + password, username="u1", password=password,
                               connect=False)
                codes.append(c.connect())
                c.disconnect()
            assert codes == ["Bad user name or password", "Success"]

    def test_metrics_and_stats_names_and_values(self, api, api_broker, api_mqtt):
        api_mqtt("m-sub", subscribe=("m/#", 1))
        pub = api_mqtt("m-pub")
        pub.publish("m/1", b"x", qos=1)
        all_metrics = api.result("GET", "monitoring/metrics")
        assert list(all_metrics) == [NODE]
        metrics = all_metrics[NODE]
        assert set(metrics) == EMQX_METRIC_NAMES
        assert all(type(v) is int for v in metrics.values())
        assert metrics["packets/connect"] == 2 and metrics["messages/qos1/received"] == 1
        assert api.result("GET", "monitoring/metrics/" + NODE)["packets/subscribe"] == 1
        stats = api.result("GET", "monitoring/stats")[NODE]
        assert set(stats) == EMQX_STAT_NAMES and list(stats) == sorted(stats)
        assert stats["clients/count"] == 2 and stats["subscriptions/count"] == 1
        assert stats["routes/count"] == stats["topics/count"] == 1
        assert api.result("GET", "monitoring/stats/" + NODE)["sessions/count"] == 2

    def test_listeners_report_real_figures(self, api, api_broker, api_mqtt):
        api_mqtt("l-1")
        (lst,) = api.result("GET", "monitoring/listeners")[NODE]
        assert lst == {"protocol": "mqtt:tcp", "listen": "127.0.0.1:%d" % api_broker.mqtt_port,
                       "acceptors": 1, "max_clients": 102400, "current_clients": 1,
                       "shutdown_count": []}


class TestRestUsers:
    def test_user_lifecycle(self, api, api_broker):
        assert api.result("GET", "users") == [{"username": "admin", "tags": "administrator"}]
        assert api.result("POST", "users", {"username": "bob", "password": "pw1", "tags": "viewer"}) == []
        assert api.json("POST", "users", {"username": "bob", "password": "x", "tags": ""}) == \
            {"code": 113, "message": "User already exist"}
        assert api.json("POST", "users", {"username": "", "password": "x", "tags": ""})["code"] == 104
        assert api.result("GET", "users/bob") == {"username": "bob", "tags": "viewer"}
        assert api.result("GET", "users/nobody") == []
        assert api.result("PUT", "users/bob", {"tags": "ops"}) == []
        assert api.json("PUT", "users/nobody", {"tags": "x"}) == {"code": 105, "message": "User not found"}
        bob = Api(api_broker.http_port, "bob", "pw1")
        assert bob.result("GET", "users/bob")["tags"] == "ops"
        assert api.json("PUT", "change_pwd/bob", {"old_pwd": "bad", "new_pwd": "pw2"}) == \
            {"code": 114, "message": "OldPassword error"}
        assert api.result("PUT", "change_pwd/bob", {"old_pwd": "pw1", "new_pwd": "pw2"}) == []
        assert bob.request("GET", "users")[0] == 401
        assert Api(api_broker.http_port, "bob", "pw2").request("GET", "users")[0] == 200
        assert api.json("DELETE", "users/admin") == {"code": 106, "message": "admin cannot be deleted"}
        assert api.result("DELETE", "users/bob") == []
        assert api.json("DELETE", "users/bob") == {"code": 105, "message": "User not found"}

    def test_auth_route_needs_no_basic_auth(self, api):
        assert api.json("POST", "auth", {"username": "admin", "password": "public"}, auth=False) == \
            {"code": 0, "result": []}
        assert api.json("POST", "auth", {"username": "admin", "password": "x"}, auth=False) == \
            {"code": 103, "message": "Password error"}
        assert api.json("POST", "auth", {"username": "ghost", "password": "x"}, auth=False) == \
            {"code": 103, "message": "User not found"}


###############################################################################
# The REST API under load and abuse: descriptors, idle and slow connections,
# body limits, cross-site requests, credentials, throttling, TLS
###############################################################################

def _basic(user, password):
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


def _http_head(sock, timeout=TIMEOUT):
    """Read one response's status line and headers from a raw socket:
    (status, {lowercase name: value}, bytes after the headers)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed after %r" % data)
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, rest


def _raw_request(port, method, path, headers=(), body=b""):
    """Request bytes exactly as sent; ``headers`` is a list of (name, value)."""
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1:%d" % port]
    lines += ["%s: %s" % h for h in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _closed_by_peer(sock, timeout):
    """True once the server closes the connection (within ``timeout``)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


class TestApiHardening:
    """The management API holds under load and abuse."""

    def test_rest_answers_with_more_than_1024_descriptors_in_use(self):
        """With 1,100 MQTT clients connected, REST requests get descriptors above
        1,024 and are answered; after the clients leave too. The broker runs as
        `python emqx_lite.py` in a subprocess whose hard limit is raised."""
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = 3000
        if hard != resource.RLIM_INFINITY and hard < need:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            except (ValueError, OSError):
                pytest.skip("cannot raise RLIMIT_NOFILE to %d" % need)
        elif soft != resource.RLIM_INFINITY and soft < need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        broker = _CliBroker("--bind", "127.0.0.1", "--mqtt-port", "0", "--http-port", "0",
                            env={"EMQX_LITE_DASHBOARD__PASSWORD_ITERATIONS": "1000"})
        socks = []
        try:
            api = Api(broker.ports["api"])
            assert api.get("monitoring/stats")["code"] == 0
            for i in range(1100):
                socks.append(RawClient.connected(broker.ports["mqtt:tcp"], "fd%d" % i))
            assert wait_until(lambda: api.get("monitoring/stats")["result"][NODE]
                              ["clients/count"] == 1100, timeout=30)
            nodes = api.get("monitoring/nodes")["result"]
            assert nodes[0]["clients"] == 1100 and nodes[0]["max_fds"] >= need
            for s in socks:
                s.close()
            socks = []
            assert wait_until(lambda: api.get("monitoring/stats")["result"][NODE]
                              ["clients/count"] == 0, timeout=30)
        finally:
            for s in socks:
                s.close()
            code, log = broker.stop()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert code == 0, log
        assert "filedescriptor out of range" not in log and "Traceback" not in log

    def test_rest_answers_beside_300_idle_connections(self):
        """waitress's default limit was 100 connections: 150 idle ones locked the API out."""
        with emqx_lite.Broker("127.0.0.1", 0, 0, **FAST_HASH) as b:
            idle = [socket.create_connection(("127.0.0.1", b.http_port)) for _ in range(300)]
            try:
                assert Api(b.http_port).get("monitoring/stats")["code"] == 0
            finally:
                for s in idle:
                    s.close()

    def test_at_max_clients_the_idlest_connection_makes_room(self):
        with emqx_lite.Broker("127.0.0.1", 0, 0, api_max_clients=20, **FAST_HASH) as b:
            idle = [socket.create_connection(("127.0.0.1", b.http_port)) for _ in range(40)]
            try:
                assert Api(b.http_port).get("monitoring/stats")["code"] == 0
                assert any(_closed_by_peer(s, 0.01) for s in idle)
            finally:
                for s in idle:
                    s.close()

    def test_idle_connection_is_closed_after_idle_timeout(self):
        with emqx_lite.Broker("127.0.0.1", 0, 0, api_idle_timeout=1, **FAST_HASH) as b:
            s = socket.create_connection(("127.0.0.1", b.http_port))
            try:
                assert _closed_by_peer(s, 5)
            finally:
                s.close()

    def test_half_sent_request_is_closed_even_while_it_trickles(self):
        """slowloris: a header line a byte at a time keeps the connection busy
        but never completes; it is closed after idle_timeout all the same."""
        with emqx_lite.Broker("127.0.0.1", 0, 0, api_idle_timeout=1, **FAST_HASH) as b:
            s = socket.create_connection(("127.0.0.1", b.http_port))
            try:
                s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                closed = False
                deadline = time.monotonic() + 6
                while not closed and time.monotonic() < deadline:
                    try:
                        s.sendall(b"a")
                    except OSError:
                        closed = True
                        break
                    closed = _closed_by_peer(s, 0.2)
                assert closed
                assert Api(b.http_port).get("monitoring/stats")["code"] == 0
            finally:
                s.close()

    def test_keep_alive_connection_serves_several_requests(self, api_broker):
        """Credentials checked once per connection's first request; bodies on a
        kept-alive connection keep working."""
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", api_broker.http_port, timeout=TIMEOUT)
        try:
            for i in range(3):
                conn.request("POST", "/api/v2/mqtt/publish",
                             body=json.dumps({"topic": "ka/%d" % i, "payload": "x"}),
                             headers={"Authorization": _basic("admin", "public")})
                resp = conn.getresponse()
                assert resp.status == 200 and json.loads(resp.read())["code"] == 0
        finally:
            conn.close()

    # --- request limits ------------------------------------------------------------
    def test_oversized_content_length_is_refused_413_before_the_body(self, api_broker):
        s = socket.create_connection(("127.0.0.1", api_broker.http_port))
        try:
            s.sendall(_raw_request(api_broker.http_port, "POST", "/api/v2/mqtt/publish",
                                   [("Authorization", _basic("admin", "public")),
                                    ("Content-Length", str(64 * 1024 * 1024))]))
            status, headers, _ = _http_head(s)   # answered with no body byte sent
            assert status == 413
            assert headers["x-content-type-options"] == "nosniff"
        finally:
            s.close()

    def test_body_limit_fits_a_publish_of_max_packet_size(self):
        """The limit is 6 x max_packet_size + 64 KiB: a max_packet_size payload
        of control characters (6 bytes each in JSON) passes, one byte more is 413."""
        with emqx_lite.Broker("127.0.0.1", 0, 0, max_packet_size=16 * 1024, **FAST_HASH) as b:
            api = Api(b.http_port)
            body = json.dumps({"topic": "big", "payload": "\x01" * 16 * 1024}).encode()
            assert api.json("POST", "mqtt/publish", raw_body=body)["code"] == 0
            limit = 6 * 16 * 1024 + 64 * 1024
            status, _, _ = api.request("POST", "mqtt/publish", raw_body=b" " * (limit + 1))
            assert status == 413
            status, _, _ = api.request("POST", "mqtt/publish", raw_body=b" " * limit)
            assert status == 200

    def test_oversized_headers_are_refused_431(self, api):
        status, _, _ = api.request("GET", "routes", headers={"X-Pad": "a" * 40000})
        assert status == 431

    def test_no_credentials_get_401_before_the_body(self, api_broker):
        s = socket.create_connection(("127.0.0.1", api_broker.http_port))
        try:
            s.sendall(_raw_request(api_broker.http_port, "POST", "/api/v2/mqtt/publish",
                                   [("Content-Length", "1000000")]))
            status, headers, _ = _http_head(s)
            assert status == 401
            assert headers["www-authenticate"] == 'Basic realm="emqx control center"'
            assert _closed_by_peer(s, TIMEOUT)
        finally:
            s.close()

    @pytest.mark.parametrize("user,password", [("admin", "wrong"), ("nobody", "public")])
    def test_wrong_credentials_get_401_before_the_body(self, api_broker, user, password):
        s = socket.create_connection(("127.0.0.1", api_broker.http_port))
        try:
            s.sendall(_raw_request(api_broker.http_port, "POST", "/api/v2/mqtt/publish",
                                   [("Authorization", _basic(user, password)),
                                    ("Content-Length", "1000000")]) + b"{" * 1000)
            status, _, _ = _http_head(s)
            assert status == 401
        finally:
            s.close()

    def test_good_credentials_read_the_body_once_checked(self, api_broker, api_mqtt):
        """Headers first, the body after: the request waits for its body."""
        sub = api_mqtt("body-sub", subscribe="late/body")
        body = json.dumps({"topic": "late/body", "payload": "ok"}).encode()
        s = socket.create_connection(("127.0.0.1", api_broker.http_port))
        try:
            s.sendall(_raw_request(api_broker.http_port, "POST", "/api/v2/mqtt/publish",
                                   [("Authorization", _basic("admin", "public")),
                                    ("Content-Length", str(len(body)))]))
            s.settimeout(0.2)
            with pytest.raises(socket.timeout):
                s.recv(1)   # nothing is answered before the body
            s.sendall(body)
            status, _, rest = _http_head(s)
            assert status == 200
            assert fields(sub.get())[:2] == ("late/body", b"ok")
        finally:
            s.close()

    def test_expect_100_continue_only_after_the_credentials(self, api_broker):
        body = json.dumps({"topic": "c", "payload": "x"}).encode()
        for password, first in (("wrong", 401), ("public", 100)):
            s = socket.create_connection(("127.0.0.1", api_broker.http_port))
            try:
                s.sendall(_raw_request(api_broker.http_port, "POST", "/api/v2/mqtt/publish",
                                       [("Authorization", _basic("admin", password)),
                                        ("Expect", "100-continue"),
                                        ("Content-Length", str(len(body)))]))
                status, _, _ = _http_head(s)
                assert status == first
                if first == 100:
                    s.sendall(body)
                    assert _http_head(s)[0] == 200
            finally:
                s.close()

    def test_unauthenticated_paths_take_small_bodies_only(self, api):
        status, _, _ = api.request("POST", "/status", raw_body=b"x" * (64 * 1024 + 1), auth=False)
        assert status == 413
        reply = api.json("POST", "auth", {"username": "admin", "password": "public"}, auth=False)
        assert reply["code"] == 0

    # --- cross-site requests ---------------------------------------------------------
    def test_forged_cross_site_post_is_refused_beside_a_curl_post(self, api, api_mqtt, caplog):
        """A form on another site, riding the browser's cached credentials,
        publishes nothing; curl -d '{...}' (no Origin, form-encoded) still does."""
        sub = api_mqtt("csrf-sub", subscribe="csrf/#")
        form = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
        with caplog.at_level("WARNING", logger="emqx_lite"):
            status, headers, body = api.request(
                "POST", "mqtt/publish", raw_body=b'{"topic":"csrf/forged","payload":"x"}',
                headers=form)
        assert status == 403 and json.loads(body)["code"] == 403
        assert "cross-site POST /api/v2/mqtt/publish" in caplog.text
        curl = {"Content-Type": "application/x-www-form-urlencoded"}
        reply = json.loads(api.request("POST", "mqtt/publish", headers=curl,
                                       raw_body=b'{"topic":"csrf/curl","payload":"y"}')[2])
        assert reply["code"] == 0
        assert fields(sub.get())[:2] == ("csrf/curl", b"y")   # the forged one never came

    @pytest.mark.parametrize("method,path,body", [
        ("DELETE", "clients/someone", None), ("PUT", "nodes/%s/plugins/emqx_retainer" % NODE,
                                              {"active": False}),
        ("POST", "users", {"username": "eve", "password": "x", "tags": "t"})])
    def test_every_state_changing_method_is_guarded(self, api, api_broker, method, path, body):
        status, _, _ = api.request(method, path, body, headers={"Origin": "https://evil.example"})
        assert status == 403
        assert api_broker.plugins()["emqx_retainer"] and "eve" not in api_broker.users

    def test_sec_fetch_site_cross_site_without_origin_is_refused(self, api):
        status, _, _ = api.request("POST", "mqtt/publish", {"topic": "t"},
                                   headers={"Sec-Fetch-Site": "cross-site"})
        assert status == 403

    def test_same_origin_page_and_reads_from_anywhere_work(self, api, api_broker):
        same = {"Origin": "http://127.0.0.1:%d" % api_broker.http_port,
                "Sec-Fetch-Site": "same-origin"}
        assert json.loads(api.request("POST", "mqtt/publish", {"topic": "t"},
                                      headers=same)[2])["code"] == 0
        status, headers, _ = api.request("GET", "routes", headers={"Origin": "http://x.example"})
        assert status == 200
        assert not [h for h in headers if h.lower().startswith("access-control-")]

    def test_cors_origins_configured_get_preflight_and_headers(self):
        origin = "https://ops.example.com"
        with emqx_lite.Broker("127.0.0.1", 0, 0, api_cors_origins=(origin,), **FAST_HASH) as b:
            api = Api(b.http_port)
            status, headers, _ = api.request("OPTIONS", "mqtt/publish", auth=False, headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert status == 204
            assert headers["Access-Control-Allow-Origin"] == origin
            assert "POST" in headers["Access-Control-Allow-Methods"]
            assert "Authorization" in headers["Access-Control-Allow-Headers"]
            assert "Access-Control-Allow-Credentials" not in headers
            status, headers, body = api.request("POST", "mqtt/publish", {"topic": "t"},
                                                headers={"Origin": origin})
            assert status == 200 and headers["Access-Control-Allow-Origin"] == origin
            status, _, _ = api.request("POST", "mqtt/publish", {"topic": "t"},
                                       headers={"Origin": "https://other.example"})
            assert status == 403

    def test_security_headers_on_every_kind_of_response(self, api):
        for args in (("GET", "routes"), ("GET", "routes", None, False), ("GET", "no/such"),
                     ("GET", "/status", None, False)):
            status, headers, _ = api.request(*args[:3], **({"auth": args[3]} if len(args) > 3 else {}))
            assert headers["X-Content-Type-Options"] == "nosniff", args
            assert headers["Cache-Control"] == "no-store", args
            assert headers["X-Frame-Options"] == "DENY", args
            assert headers["Content-Security-Policy"] == "frame-ancestors 'none'", args

    # --- credentials ------------------------------------------------------------------
    def test_passwords_are_stored_at_a_modern_cost_by_default(self):
        with emqx_lite.Broker("127.0.0.1", None, 0, users={"admin": "s3cret-pw"}) as b:
            scheme, iterations, salt, digest = b.users.password_hash("admin").split("$")
            assert scheme == "pbkdf2_sha256" and int(iterations) >= 600000
            assert base64.b64decode(digest) == hashlib.pbkdf2_hmac(
                "sha256", b"s3cret-pw", base64.b64decode(salt), int(iterations))

    def test_old_hash_works_and_is_upgraded_at_the_next_login(self, api_broker):
        salt = os.urandom(16)
        old = "pbkdf2_sha256$100$%s$%s" % (
            base64.b64encode(salt).decode(),
            base64.b64encode(hashlib.pbkdf2_hmac("sha256", b"old-pw", salt, 100)).decode())
        api_broker.users.import_hash("legacy", old, "viewer")
        assert Api(api_broker.http_port, "legacy", "old-pw").get("routes")["code"] == 0
        upgraded = api_broker.users.password_hash("legacy")
        assert upgraded.startswith("pbkdf2_sha256$1000$")
        assert Api(api_broker.http_port, "legacy", "old-pw").get("routes")["code"] == 0

    def test_verified_credentials_are_hashed_once_not_per_request(self, api_broker, monkeypatch):
        calls = []
        real = emqx_lite.UserTable._matches.__func__
        monkeypatch.setattr(emqx_lite.UserTable, "_matches",
                            classmethod(lambda cls, e, p: calls.append(p) or real(cls, e, p)))
        api = Api(api_broker.http_port)
        for _ in range(10):
            assert api.get("routes")["code"] == 0
        assert len(calls) == 1

    def test_changing_the_password_drops_the_remembered_one(self, api_broker):
        old = Api(api_broker.http_port)
        assert old.get("routes")["code"] == 0   # verified and remembered
        reply = old.json("PUT", "change_pwd/admin", {"old_pwd": "public", "new_pwd": "n3w"})
        assert reply["code"] == 0
        assert old.request("GET", "routes")[0] == 401
        assert Api(api_broker.http_port, "admin", "n3w").get("routes")["code"] == 0

    def test_unknown_users_cost_the_same_as_known_ones(self):
        """Time of a wrong password for an existing user and for a name that
        does not exist, at a cost where the hash dominates: the fastest of 9
        each (noise from the machine only ever adds time)."""
        with emqx_lite.Broker("127.0.0.1", None, 0, api_password_iterations=60000,
                              api_max_auth_failures=0) as b:
            def timed(user):
                t0 = time.perf_counter()
                status = Api(b.http_port, user, "wrong").request("GET", "routes")[0]
                assert status == 401
                return time.perf_counter() - t0
            known, unknown = [], []
            for _ in range(9):
                known.append(timed("admin"))
                unknown.append(timed("nobody-%d" % len(unknown)))
            ratio = min(known) / min(unknown)
            assert 0.6 < ratio < 1.6, (sorted(known), sorted(unknown))

    # --- throttling ---------------------------------------------------------------------
    def test_failed_logins_are_throttled_per_address_and_logged_once(self, caplog):
        with emqx_lite.Broker("127.0.0.1", 0, 0, api_max_auth_failures=3, **FAST_HASH) as b:
            good, bad = Api(b.http_port), Api(b.http_port, "admin", "guess")
            assert good.get("routes")["code"] == 0   # an operator logged in before
            with caplog.at_level("WARNING", logger="emqx_lite"):
                assert [bad.request("GET", "routes")[0] for _ in range(3)] == [401] * 3
                for _ in range(5):
                    status, headers, body = bad.request("GET", "routes")
                    assert status == 429 and int(headers["Retry-After"]) > 0
                    assert "too many failed logins" in json.loads(body)["message"]
            assert caplog.text.count("failed logins from 127.0.0.1") == 1
            # a right password not verified before is not even checked while throttled...
            b.users.add("bob", "pw")
            assert Api(b.http_port, "bob", "pw").request("GET", "routes")[0] == 429
            # ...but the operator's verified session goes on
            assert good.get("routes")["code"] == 0
            status, _, _ = good.request("POST", "auth", {"username": "admin", "password": "x"},
                                        auth=False)
            assert status == 429

    def test_mqtt_is_unaffected_while_someone_hammers_the_api(self):
        with emqx_lite.Broker("127.0.0.1", 0, 0, api_password_iterations=20000) as b:
            stop = threading.Event()
            counts = [0] * 4   # requests made, per hammering thread

            def hammer(k):
                api = Api(b.http_port, "admin", "guess")
                while not stop.is_set():
                    api.request("GET", "routes")
                    counts[k] += 1
            threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            try:
                assert wait_until(lambda: sum(counts) > 10)   # the hammering is under way
                assert roundtrip(b.mqtt_port, 200) == 200
            finally:
                stop.set()
                for t in threads:
                    t.join()
            assert sum(counts) > 10

    # --- TLS -----------------------------------------------------------------------------
    def test_https_api_with_the_mqtt_ssl_options(self, pki):
        with emqx_lite.Broker("127.0.0.1", 0, 0, api_certfile=pki["server.pem"],
                              api_keyfile=pki["server.key"], **FAST_HASH) as b:
            import http.client
            context = ssl.create_default_context(cafile=pki["ca.pem"])
            conn = http.client.HTTPSConnection("127.0.0.1", b.http_port, context=context,
                                               timeout=TIMEOUT)
            try:
                big = {"topic": "tls/big", "payload": "p" * 200000}
                for method, path, body in (("GET", "/api/v2/monitoring/stats", None),
                                           ("POST", "/api/v2/mqtt/publish", big),
                                           ("GET", "/api/v2/routes", None)):
                    conn.request(method, path, body=json.dumps(body) if body else None,
                                 headers={"Authorization": _basic("admin", "public")})
                    resp = conn.getresponse()
                    assert resp.status == 200 and json.loads(resp.read())["code"] == 0
                conn.request("GET", "/api/v2/routes")
                resp = conn.getresponse()
                assert resp.status == 401
                resp.read()
            finally:
                conn.close()
            plain = socket.create_connection(("127.0.0.1", b.http_port))
            try:   # plain HTTP to the TLS port gets no HTTP answer
                plain.sendall(_raw_request(b.http_port, "GET", "/status"))
                assert _closed_by_peer(plain, TIMEOUT)
            finally:
                plain.close()
            assert roundtrip(b.mqtt_port, 5) == 5

    def test_https_api_can_require_a_client_certificate(self, pki):
        with emqx_lite.Broker("127.0.0.1", None, 0, api_certfile=pki["server.pem"],
                              api_keyfile=pki["server.key"], api_cacertfile=pki["ca.pem"],
                              api_verify="verify_peer", api_fail_if_no_peer_cert=True,
                              **FAST_HASH) as b:
            url = "https://127.0.0.1:%d/status" % b.http_port
            context = ssl.create_default_context(cafile=pki["ca.pem"])
            with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
                urllib.request.urlopen(url, context=context, timeout=TIMEOUT).read()
            context.load_cert_chain(pki["client.pem"], pki["client.key"])
            assert urllib.request.urlopen(url, context=context, timeout=TIMEOUT).status == 200

    def test_startup_warns_when_the_api_is_reachable_without_tls(self, caplog, pki):
        cases = [({"http_bind": "0.0.0.0"}, True), ({}, False),
                 ({"http_bind": "0.0.0.0", "api_certfile": pki["server.pem"],
                   "api_keyfile": pki["server.key"]}, False)]
        for kw, warned in cases:
            caplog.clear()
            with caplog.at_level("WARNING", logger="emqx_lite"):
                with emqx_lite.Broker("127.0.0.1", None, 0, **dict(FAST_HASH, **kw)):
                    pass
            assert ("without TLS" in caplog.text) == warned, kw


###############################################################################
# Long runs: live fuzzing, REST fuzzing, soak (quick by default, see the knobs)
###############################################################################

def _random_packet(rng):
    """A random or mutated packet, the kind a broken or hostile client sends."""
    choice = rng.random()
    if choice < 0.3:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40)))
    base = rng.choice([
        gen_connect("fz-%d" % rng.randint(0, 9)), gen_publish("fz/t", b"x" * rng.randint(0, 50), qos=1, pid=1),
        gen_subscribe(1, [("fz/#", 1)]), gen_pubrel(3), gen_pingreq(), gen_disconnect(),
        gen_unsubscribe(2, ["fz/#"]), gen_publish("fz/t", b"q2", qos=2, pid=9)])
    raw = bytearray(base)
    for _ in range(rng.randint(0, 3)):
        raw[rng.randrange(len(raw))] = rng.getrandbits(8)
    if choice > 0.85:
        raw = raw[:rng.randint(1, len(raw))]   # truncated
    return bytes(raw)


class TestLiveFuzz:
    def test_random_and_mutated_packets_from_many_connections(self):
        """A flood of bad input from 12 connections: the broker stays up, closes
        what it must, leaks no thread or socket, and a healthy pair on the side
        gets every one of its QoS 1 messages, in order."""
        rng = random.Random(20261125)
        with emqx_lite.Broker("127.0.0.1", 0, None, connect_timeout=1) as b:
            threads_before, os_before = set(threading.enumerate()), os_threads()
            sub = PahoClient(b.mqtt_port, "fz-healthy-sub")
            sub.subscribe("healthy/t", 1)
            pub = PahoClient(b.mqtt_port, "fz-healthy-pub", max_inflight=1000)
            tried = [0]

            def attacker(seed):
                r = random.Random(seed)
                for _ in range(FUZZ_PACKETS // 12):
                    try:
                        s = RawClient(b.mqtt_port, timeout=2)
                        if r.random() < 0.5:
                            s.send(gen_connect("fz-a%d" % seed))
                        for _ in range(r.randint(1, 5)):
                            s.send(_random_packet(r))
                            tried[0] += 1
                        s.close()
                    except OSError:
                        pass   # the broker closed it first: fine

            attackers = [threading.Thread(target=attacker, args=(rng.random(),)) for _ in range(12)]
            for t in attackers:
                t.start()
            infos = [pub.publish("healthy/t", b"%d" % i, qos=1, wait=False) for i in range(300)]
            for t in attackers:
                t.join()
            for info in infos:
                info.wait_for_publish(TIMEOUT)
            assert [sub.get().payload for _ in range(300)] == [b"%d" % i for i in range(300)]
            assert tried[0] >= FUZZ_PACKETS // 2
            print("live fuzz: %d bad packets over 12 connections; healthy pair: 300 of 300 "
                  "QoS 1 messages in order" % tried[0])
            sub.disconnect()
            pub.disconnect()
            assert wait_until(lambda: not b.core.sockets, timeout=10)
            assert wait_until(lambda: set(threading.enumerate()) <= threads_before)
            assert wait_until(lambda: os_threads() <= os_before)
            assert b.stats()["clients/count"] == 0


class TestRestFuzz:
    @pytest.fixture(scope="class")
    def fuzz_api(self):
        with emqx_lite.Broker("127.0.0.1", 0, 0, **FAST_HASH) as b:
            yield Api(b.http_port)

    _json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
        lambda children: st.lists(children, max_size=3) | st.dictionaries(
            st.sampled_from(["topic", "payload", "qos", "retain", "client_id", "active",
                             "username", "password", "tags", "old_pwd", "new_pwd"]),
            children, max_size=5), max_leaves=8)

    @hsettings(max_examples=FUZZ_EXAMPLES, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.sampled_from([("POST", "mqtt/publish"), ("POST", "mqtt/subscribe"),
                            ("POST", "mqtt/unsubscribe"), ("POST", "users"), ("POST", "auth"),
                            ("PUT", "users/nobody"), ("PUT", "change_pwd/nobody"),
                            ("PUT", "nodes/emqx_lite@127.0.0.1/plugins/emqx_modules"),
                            ("PUT", "clients/nobody/clean_acl_cache")]),
           st.one_of(_json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=60)))
    def test_bad_bodies_get_a_json_code_never_a_server_error(self, fuzz_api, route, body):
        method, path = route
        status, headers, content = fuzz_api.request(method, path, raw_body=body)
        assert status == 200, (status, content)
        reply = json.loads(content)
        assert isinstance(reply["code"], int)
        assert b"Traceback" not in content

    @hsettings(max_examples=FUZZ_EXAMPLES, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
           st.text(st.sampled_from("abcnodes/%2F+#?=&@._-0123456789emqx_lite"), max_size=40))
    def test_random_paths_never_fail_with_a_server_error(self, fuzz_api, method, tail):
        status, _, content = fuzz_api.request(method, "/api/v2/" + tail.replace("#", "%23"),
                                              raw_body=b"{}" if method != "GET" else None)
        assert status in (200, 404), (status, content)
        assert b"Traceback" not in content and b"/work/" not in content

    def test_every_api_route_refuses_strangers(self, fuzz_api):
        for path in API_PATHS_TO_PROBE:
            status, _, _ = fuzz_api.request("GET", path, auth=False)
            assert status == 401, path
        assert fuzz_api.request("GET", "/status", auth=False)[0] == 200


API_PATHS_TO_PROBE = ["management/nodes", "monitoring/nodes", "monitoring/listeners",
                      "monitoring/metrics", "monitoring/stats", "nodes/emqx_lite@127.0.0.1/clients",
                      "clients/x", "nodes/emqx_lite@127.0.0.1/sessions", "sessions/x",
                      "subscriptions/x", "routes", "routes/a", "users", "users/admin",
                      "nodes/emqx_lite@127.0.0.1/plugins"]


class TestSoak:
    def test_soak_reconnecting_persistent_clients_lose_nothing(self):
        """For SOAK_SECONDS: persistent subscribers that drop their connections
        abruptly and come back, publishers at QoS 0/1/2, REST reads throughout.
        Every QoS 1/2 message the broker acknowledged reaches every persistent
        subscriber (QoS 1 at least once, QoS 2 exactly once, in order), and
        clients, threads and sockets return to where they started."""
        subscribers, publishers = 6, 4
        with emqx_lite.Broker("127.0.0.1", 0, 0, max_mqueue_len=0, retry_interval=1, **FAST_HASH) as b:
            threads_before, os_before = set(threading.enumerate()), os_threads()
            fds_before = len(os.listdir("/proc/self/fd"))
            api = Api(b.http_port)
            stop = threading.Event()
            acked = {1: [], 2: []}       # (publisher, seq) the broker acknowledged, per QoS
            received = {}                # subscriber -> qos -> list of (publisher, seq)
            errors = []
            ready, all_subscribed = [], threading.Event()

            def receive(r, got, awaiting_rel, timeout):
                """One packet as a correct client handles it; False on timeout.
                QoS 2 ids are remembered until PUBREL (client session state), so a
                resent PUBLISH is not taken twice [MQTT-4.3.3-2]."""
                try:
                    ptype, flags, body = r.read_packet(timeout=timeout)
                except socket.timeout:
                    return False
                if ptype == PUBREL:
                    pid = int.from_bytes(body, "big")
                    awaiting_rel.discard(pid)
                    r.send(gen_pubcomp(pid))
                    return True
                m = parse_publish(flags, body)
                message = tuple(m["payload"].decode().split(":"))
                if m["qos"] == 0:
                    pass   # at most once: nothing to check
                elif m["qos"] == 1:
                    got[1].append(message)
                    r.send(gen_puback(m["pid"]))
                else:
                    if m["pid"] not in awaiting_rel:
                        awaiting_rel.add(m["pid"])
                        got[2].append(message)
                    r.send(gen_pubrec(m["pid"]))
                return True

            def subscriber(n):
                got = received.setdefault(n, {1: [], 2: []})
                awaiting_rel = set()
                cid = "soak-sub-%d" % n
                first = True
                while first or not stop.is_set():
                    r = RawClient(b.mqtt_port)
                    r.connect(cid, clean=False)
                    if first:
                        r.subscribe([("soak/1/#", 1), ("soak/2/#", 2)])
                        ready.append(n)
                        if len(ready) == subscribers:
                            all_subscribed.set()
                        first = False
                    deadline = time.monotonic() + random.uniform(0.2, 0.6)
                    while time.monotonic() < deadline:
                        receive(r, got, awaiting_rel, 0.1)
                    r.sock.close()   # abrupt: no DISCONNECT
                r = RawClient(b.mqtt_port)
                r.connect(cid, clean=False)
                idle = 0
                while idle < 3:   # drain what is left, then leave cleanly
                    idle = 0 if receive(r, got, awaiting_rel, 0.5) else idle + 1
                r.send(gen_disconnect())
                r.close()

            def publisher(n):
                assert all_subscribed.wait(TIMEOUT)   # publish once every subscription exists
                r = RawClient(b.mqtt_port)
                r.connect("soak-pub-%d" % n)
                seq = 0
                while not stop.is_set():
                    seq += 1
                    qos = seq % 3
                    payload = ("%d:%d" % (n, seq)).encode()
                    r.send(gen_publish("soak/%d/%d" % (max(qos, 1), n), payload, qos=qos, pid=seq % 65535 + 1))
                    if qos == 1:
                        assert r.read_packet()[0] == PUBACK
                        acked[1].append(("%d" % n, "%d" % seq))
                    elif qos == 2:
                        assert r.read_packet()[0] == PUBREC
                        r.send(gen_pubrel(seq % 65535 + 1))
                        assert r.read_packet()[0] == PUBCOMP
                        acked[2].append(("%d" % n, "%d" % seq))
                    if seq % 50 == 0:
                        time.sleep(0.005)   # pace: the point is reconnects, not throughput
                r.send(gen_disconnect())
                r.close()

            def rest_reader():
                while not stop.is_set():
                    assert api.get("monitoring/stats")["code"] == 0
                    assert api.get("nodes/emqx_lite@127.0.0.1/sessions")["code"] == 0
                    stop.wait(0.05)

            def guarded(target, *args):
                def run():
                    try:
                        target(*args)
                    except BaseException as exc:   # reported by the main thread
                        errors.append(exc)
                        stop.set()
                return threading.Thread(target=run)

            workers = [guarded(subscriber, n) for n in range(subscribers)]
            workers += [guarded(publisher, n) for n in range(publishers)]
            workers.append(guarded(rest_reader))
            for t in workers:
                t.start()
            time.sleep(SOAK_SECONDS)   # the soak's duration, not a wait for an event
            stop.set()
            for t in workers:
                t.join(60)
                assert not t.is_alive()
            assert not errors, errors
            for n, got in received.items():
                qos1 = set(got[1])
                assert qos1 >= set(acked[1]), "subscriber %d lost QoS 1 messages" % n
                assert sorted(got[2]) == sorted(set(got[2])), "subscriber %d: QoS 2 duplicate" % n
                assert set(got[2]) == set(acked[2]), "subscriber %d lost QoS 2 messages" % n
                for pub in map(str, range(publishers)):   # per publisher, in order
                    seqs = [int(s) for p, s in got[2] if p == pub]
                    assert seqs == sorted(seqs)
            assert len(acked[1]) > 10 and len(acked[2]) > 10
            reconnects = b.metrics()["packets/connect"] - publishers - subscribers
            print("soak: %.0f s, %d reconnects, %d QoS 1 + %d QoS 2 messages acknowledged, "
                  "%d deliveries checked, 0 lost" % (
                      SOAK_SECONDS, reconnects, len(acked[1]), len(acked[2]),
                      sum(len(g[1]) + len(g[2]) for g in received.values())))
            assert wait_until(lambda: b.stats()["clients/count"] == 0)
            assert wait_until(lambda: set(threading.enumerate()) <= threads_before)
            assert wait_until(lambda: os_threads() <= os_before)
            assert wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds_before)



###############################################################################
# Durable state: the data directory (SQLite)
###############################################################################

class TestDurableState:
    """With a data directory, state outlives the broker: stopped and started
    again in-process on the same ``data_dir``."""

    @pytest.fixture
    def durable(self, tmp_path):
        """durable(**settings) -> a started Broker on this test's data directory;
        each call stops the previous one first (a restart)."""
        running = []

        def start(**settings):
            while running:
                running.pop().stop()
            b = emqx_lite.Broker(HOST, mqtt_port=0, http_port=settings.pop("http_port", None),
                                 data_dir=str(tmp_path / "data"), **settings)
            b.start()
            running.append(b)
            return b

        yield start
        while running:
            running.pop().stop()

    @pytest.fixture
    def track(self):
        """track(client) -> client, closed at teardown."""
        made = []
        yield lambda c: made.append(c) or c
        for c in made:
            (c.disconnect if isinstance(c, PahoClient) else c.close)()

    def test_retained_messages_survive_a_restart(self, durable, track):
        """Retained messages keep QoS, properties and the time left of their
        Message Expiry Interval [MQTT-3.3.1-5, MQTT-3.3.2-6]; one cleared by an
        empty payload stays cleared [MQTT-3.3.1-10]."""
        b = durable()
        b.publish("r/1", b"one", qos=1, retain=True,
                  properties={"user_property": [("k", "v")], "content_type": "text/plain",
                              "message_expiry_interval": 300})
        b.publish("r/2", b"two", qos=2, retain=True)
        b.publish("r/2", b"", retain=True)
        b.publish("r/3", b"three", qos=0, retain=True)
        b = durable()
        sub = track(RawClient5.connected(b.mqtt_port, "r"))
        assert sub.subscribe([("r/#", 2)]) == [2]
        got = {m["topic"]: m for m in (sub.read_publish() for _ in range(2))}
        assert set(got) == {"r/1", "r/3"}
        one = got["r/1"]
        assert (one["payload"], one["qos"], one["retain"]) == (b"one", 1, True)
        assert one["props"]["user_property"] == [("k", "v")]
        assert one["props"]["content_type"] == "text/plain"
        assert 290 <= one["props"]["message_expiry_interval"] <= 300
        assert (got["r/3"]["payload"], got["r/3"]["qos"]) == (b"three", 0)
        sub.expect_nothing(0.2)

    def test_queued_messages_survive_a_restart_in_order(self, durable, track):
        """A persistent session's queue survives: the client resumes with
        session present 1 [MQTT-3.2.2-2] and gets its QoS 1/2 messages in
        order [MQTT-4.6.0-6]; QoS 0 messages are never written, so they are
        gone."""
        b = durable()
        sub = track(RawClient.connected(b.mqtt_port, "q", clean=False))
        assert sub.subscribe([("q/#", 2)]) == [2]
        sub.close()
        assert wait_until(lambda: not b.is_connected("q"))
        for n in range(6):
            b.publish("q/%d" % n, b"m%d" % n, qos=n % 3)
        b = durable()
        sub = track(RawClient(b.mqtt_port))
        assert sub.connect("q", clean=False) == (1, 0)
        got = [sub.read_publish() for _ in range(4)]
        assert [(m["topic"], m["qos"]) for m in got] == [
            ("q/1", 1), ("q/2", 2), ("q/4", 1), ("q/5", 2)]
        for m in got:
            if m["qos"] == 1:
                sub.send(gen_puback(m["pid"]))
            else:
                sub.send(gen_pubrec(m["pid"]))
                assert sub.read_packet()[0] == PUBREL
                sub.send(gen_pubcomp(m["pid"]))
        sub.expect_nothing(0.2)

    def test_inflight_message_resent_with_dup_after_restart(self, durable, track):
        """A QoS 1 message sent but not acknowledged is resent after the
        restart with DUP and its packet id [MQTT-4.4.0-1, MQTT-3.3.1-1]."""
        b = durable()
        sub = track(RawClient.connected(b.mqtt_port, "s", clean=False))
        sub.subscribe([("t", 1)])
        b.publish("t", b"unacked", qos=1)
        first = sub.read_publish()
        assert (first["dup"], first["qos"]) == (0, 1)
        sub.close()
        b = durable()
        sub = track(RawClient(b.mqtt_port))
        assert sub.connect("s", clean=False) == (1, 0)
        again = sub.read_publish()
        assert (again["payload"], again["pid"], again["dup"]) == (b"unacked", first["pid"], 1)
        sub.send(gen_puback(again["pid"]))
        b = durable()   # acknowledged: not sent a third time
        sub = track(RawClient(b.mqtt_port))
        assert sub.connect("s", clean=False) == (1, 0)
        sub.expect_nothing(0.2)

    def test_pubrel_not_publish_resent_after_restart(self, durable, track):
        """Once the broker has sent PUBREL it never sends the PUBLISH again
        [MQTT-4.3.3-3]: after the restart the session resends the PUBREL."""
        b = durable()
        sub = track(RawClient.connected(b.mqtt_port, "s2", clean=False))
        sub.subscribe([("t", 2)])
        b.publish("t", b"exactly once", qos=2)
        m = sub.read_publish()
        sub.send(gen_pubrec(m["pid"]))
        ptype, _, body = sub.read_packet()
        assert (ptype, body[:2]) == (PUBREL, m["pid"].to_bytes(2, "big"))
        sub.close()
        b = durable()
        sub = track(RawClient(b.mqtt_port))
        assert sub.connect("s2", clean=False) == (1, 0)
        ptype, flags, body = sub.read_packet()
        assert (ptype, flags, body[:2]) == (PUBREL, 0x02, m["pid"].to_bytes(2, "big"))
        sub.send(gen_pubcomp(m["pid"]))
        sub.expect_nothing(0.2)

    def test_inbound_qos2_id_survives_restart(self, durable, track):
        """A QoS 2 PUBLISH the broker sent PUBREC for is routed once: resent
        with DUP after the restart it is not routed again [MQTT-4.3.3-9], and
        the publisher's PUBREL completes it with PUBCOMP [MQTT-4.3.3-11]."""
        b = durable()
        sub = track(RawClient.connected(b.mqtt_port, "sub", clean=False))
        sub.subscribe([("t", 2)])
        pub = track(RawClient.connected(b.mqtt_port, "pub", clean=False))
        pub.send(gen_publish("t", b"once", qos=2, pid=7))
        ptype, _, body = pub.read_packet()
        assert (ptype, body) == (PUBREC, b"\x00\x07")
        b = durable()
        sub, m = self._resend_and_receive_once(b, track, 7)
        sub.send(gen_pubrec(m["pid"]))
        assert sub.read_packet()[0] == PUBREL
        sub.send(gen_pubcomp(m["pid"]))
        sub.expect_nothing(0.2)

    @staticmethod
    def _resend_and_receive_once(b, track, pid):
        """Client "pub" resumes and resends QoS 2 PUBLISH ``pid`` with DUP: it
        gets PUBREC and the message is not routed again [MQTT-4.3.3-9]; its
        PUBREL gets PUBCOMP. Client "sub" resumes and gets the message:
        -> (sub, the message)."""
        pub = track(RawClient(b.mqtt_port))
        assert pub.connect("pub", clean=False) == (1, 0)
        pub.send(gen_publish("t", b"once", qos=2, pid=pid, dup=True))
        assert pub.read_packet()[:3:2] == (PUBREC, pid.to_bytes(2, "big"))
        pub.send(gen_pubrel(pid))
        assert pub.read_packet()[:3:2] == (PUBCOMP, pid.to_bytes(2, "big"))
        sub = track(RawClient(b.mqtt_port))
        assert sub.connect("sub", clean=False) == (1, 0)
        m = sub.read_publish()
        assert m["payload"] == b"once"
        return sub, m

    def test_subscription_options_and_identifiers_survive(self, durable, track):
        """5.0 subscriptions keep their options [MQTT-3.8.3-3] and
        Subscription Identifiers [MQTT-3.3.4-3] across the restart, and the
        session its Session Expiry Interval."""
        b = durable()
        c = track(RawClient5.connected(b.mqtt_port, "v5", clean_start=False,
                           properties={"session_expiry_interval": 3600}))
        assert c.subscribe([("a/#", sub_opts(1, nl=True))],
                           properties={"subscription_identifier": 42}) == [1]
        c.close()
        assert wait_until(lambda: not b.is_connected("v5"))
        b = durable()
        assert b.sessions()[0]["expiry_interval"] == 3600
        c = track(RawClient5(b.mqtt_port))
        assert c.connect("v5", clean_start=False,
                         properties={"session_expiry_interval": 3600})["session_present"] == 1
        c.publish("a/own", b"no local", qos=1)
        b.publish("a/x", b"from elsewhere", qos=1)
        m = c.read_publish()
        assert (m["topic"], m["props"]["subscription_identifier"]) == ("a/x", [42])
        c.ack(m)
        assert c.pending_publishes() == []

    def test_session_expiry_counts_from_the_disconnect(self, durable, track):
        """Session Expiry counts from the disconnect, not from the restart
        [MQTT-3.1.2-23]: a session that expired while the broker was down is
        gone when it comes back."""
        b = durable()
        c = track(RawClient5.connected(b.mqtt_port, "brief", clean_start=False,
                           properties={"session_expiry_interval": 1}))
        c.subscribe([("x", 1)])
        c.close()
        assert wait_until(lambda: not b.is_connected("brief"))
        gone = time.time() + 1.0
        b.stop()
        time.sleep(max(0.0, gone - time.time()) + 0.1)   # the interval itself is under test
        b = durable()
        assert wait_until(lambda: b.sessions() == [], timeout=2)
        c = track(RawClient5(b.mqtt_port))
        assert c.connect("brief", clean_start=False)["session_present"] == 0

    def test_clean_sessions_and_qos0_write_nothing(self, durable, track):
        """QoS 0 traffic and clean sessions record no change at all."""
        b = durable()
        sub = track(PahoClient(b.mqtt_port, client_id="clean-sub"))
        sub.subscribe("z/#", 2)
        pub = track(PahoClient(b.mqtt_port, client_id="clean-pub"))
        before = b._store.seq
        for n in range(50):
            pub.publish("z/%d" % n, b"x", qos=n % 3)
        for n in range(50):
            sub.get()
        assert b._store.seq == before

    def test_users_plugins_and_auth_tables_survive(self, durable):
        """Dashboard users (as salted hashes), plugin states and the auth
        plugins' tables changed at run time are on disk when the call returns."""
        b = durable(http_port=0, **FAST_HASH)
        api = Api(b.http_port)
        assert api.json("POST", "/api/v2/users", {"username": "ops", "password": "s3cret",
                                                  "tags": "viewer"})["code"] == 0
        assert api.json("PUT", "/api/v2/nodes/%s/plugins/emqx_auth_username" % b.node,
                        {"active": True})["code"] == 0
        assert api.json("PUT", "/api/v2/change_pwd/admin", {"old_pwd": "public",
                                                            "new_pwd": "better"})["code"] == 0
        b.auth_username.add("device", "pw")
        b = durable(http_port=0, **FAST_HASH)
        assert {u["username"]: u["tags"] for u in b.users.list()} == {
            "admin": "administrator", "ops": "viewer"}
        assert b.users.check("admin", "better") and not b.users.check("admin", "public")
        assert b.plugins()["emqx_auth_username"] is True
        assert b.auth_username.check("device", "pw") is True
        with open(b._store.path, "rb") as f:
            data = f.read()
        wal = b._store.path + "-wal"
        if os.path.exists(wal):
            with open(wal, "rb") as f:
                data += f.read()
        assert b"s3cret" not in data and b"better" not in data

    def test_second_broker_on_the_same_directory_is_refused(self, durable, tmp_path):
        durable()
        other = emqx_lite.Broker(HOST, mqtt_port=0, http_port=None,
                                 data_dir=str(tmp_path / "data"))
        with pytest.raises(emqx_lite.StoreError, match="in use by another broker"):
            other.start()

    @pytest.mark.parametrize("content, problem", [
        (b"this is not a database at all" * 200, "corrupt or not a database"),
        ("foreign", "not an emqx_lite database"),
        ("newer", "newer emqx_lite"),
    ])
    def test_a_file_that_is_not_ours_stops_start_up(self, tmp_path, content, problem):
        """Start-up stops with an error naming the file and the problem, and
        leaves the file as it was."""
        import sqlite3
        path = tmp_path / "emqx_lite.db"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            db = sqlite3.connect(str(path))
            if content == "foreign":
                db.execute("CREATE TABLE invoices (id INTEGER)")
            else:
                db.execute("PRAGMA application_id = %d" % 0x454D514C)
                db.execute("PRAGMA user_version = 99")
                db.execute("CREATE TABLE t (x)")
            db.commit()
            db.close()
        before = path.read_bytes()
        b = emqx_lite.Broker(HOST, mqtt_port=0, http_port=None, data_dir=str(tmp_path))
        with pytest.raises(emqx_lite.StoreError) as err:
            b.start()
        assert str(path) in str(err.value) and problem in str(err.value)
        assert path.read_bytes() == before
        assert sorted(os.listdir(tmp_path)) == ["emqx_lite.db"]

    def test_empty_file_gets_the_schema(self, tmp_path, durable):
        """A version-0 (new, empty) file is migrated to the current schema."""
        import sqlite3
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "emqx_lite.db").write_bytes(b"")
        b = durable()
        b.publish("r", b"x", retain=True)
        b.stop()
        db = sqlite3.connect(str(tmp_path / "data" / "emqx_lite.db"))
        assert db.execute("PRAGMA user_version").fetchone()[0] == emqx_lite.SCHEMA_VERSION
        assert db.execute("SELECT topic, payload FROM retained").fetchall() == [("r", b"x")]
        db.close()

    def test_cli_keeps_state_in_data_by_default(self):
        """`python emqx_lite.py` keeps its state in ./data and says so;
        --data-dir '' keeps it in memory."""
        fast = {"EMQX_LITE_DASHBOARD__PASSWORD_ITERATIONS": "1000"}
        broker = _CliBroker("--bind", "127.0.0.1", "--mqtt-port", "0", "--http-port", "0",
                            env=fast)
        try:
            assert any("Keeping state in %s" % os.path.join(
                os.path.realpath(broker.cwd), "data", "emqx_lite.db") in line
                for line in broker.lines)
        finally:
            code, out = broker.stop()
        assert code == 0, out
        memory = _CliBroker("--bind", "127.0.0.1", "--mqtt-port", "0", "--http-port", "0",
                            "--data-dir", "", env=fast)
        try:
            assert any("in memory only" in line for line in memory.lines)
            assert not os.path.exists(os.path.join(memory.cwd, "data"))
        finally:
            memory.stop()

    def test_restored_qos2_id_waits_for_its_pubrel_from_the_restart(self, durable, track):
        """An inbound QoS 2 id's await_rel_timeout counts from the restart, not
        from its arrival: the publisher could not send PUBREL while the broker
        was down, and a resent PUBLISH must still not be routed twice
        [MQTT-4.3.3-9]."""
        b = durable(await_rel_timeout=1.0)
        sub = track(RawClient.connected(b.mqtt_port, "sub", clean=False))
        sub.subscribe([("t", 2)])
        sub.close()
        pub = track(RawClient.connected(b.mqtt_port, "pub", clean=False))
        pub.send(gen_publish("t", b"once", qos=2, pid=3))
        assert pub.read_packet()[:3:2] == (PUBREC, b"\x00\x03")
        b.stop()
        time.sleep(1.2)   # longer than await_rel_timeout: the downtime is under test
        b = durable(await_rel_timeout=1.0)

        def awaiting():
            return [s["awaiting_rel_len"] for s in b.sessions() if s["client_id"] == "pub"]

        deadline = time.monotonic() + 0.6   # past the first timer tick (every 0.5 s)
        while time.monotonic() < deadline:
            assert awaiting() == [1]
            time.sleep(0.05)
        sub, _ = self._resend_and_receive_once(b, track, 3)
        sub.expect_nothing(0.2)

    def test_disconnect_reason_is_sent_with_acks_waiting(self, durable, track):
        """A 5.0 client that breaks the protocol right after a QoS 1 PUBLISH
        still gets the DISCONNECT saying why [MQTT-4.13.2-1]: it promises
        nothing, so it does not wait for the disk."""
        b = durable()
        c = track(RawClient5.connected(b.mqtt_port, "bad", clean_start=False,
                                       properties={"session_expiry_interval": 60}))
        c.send(gen_publish_v5("x", b"fine", qos=1, pid=1)
               + gen_publish_v5("", b"?", qos=1, pid=2, properties={"topic_alias": 1000}))
        packets = []
        while True:
            try:
                packets.append(c.read_packet())
            except ConnectionError:
                break
        assert packets and packets[-1][0] == DISCONNECT, packets
        assert parse_disconnect_v5(packets[-1][2])[0] == RC_TOPIC_ALIAS_INVALID

    def test_configured_auth_entries_win_over_stored_ones(self, durable):
        """The auth plugins' tables: entries added at run time are kept; the
        configuration's own entries win at every start. Dashboard users come
        from the file once it has them, and the default-password warning
        still tells whether admin has 'public'."""
        b = durable(auth_username={"u": "one"}, http_port=0, **FAST_HASH)
        b.auth_username.add("v", "added")
        b.auth_username.set_password("u", "changed at run time")
        b = durable(auth_username={"u": "two"}, http_port=0, **FAST_HASH)
        assert b.auth_username.check("u", "two") is True
        assert b.auth_username.check("v", "added") is True
        assert b._default_admin   # still admin/public, now read from the file
        b.users.set_password("admin", "better")
        b = durable(http_port=0, **FAST_HASH)
        assert not b._default_admin
        assert b.users.check("admin", "better") is True

    def test_external_backup_while_running_restores(self, durable, tmp_path):
        """The file can be copied with SQLite's online backup while the broker
        runs, and a broker started on the copy has the state."""
        import sqlite3
        b = durable()
        b.publish("kept", b"in the backup", qos=1, retain=True)
        copy = tmp_path / "copy"
        copy.mkdir()
        source = sqlite3.connect(b._store.path)
        target = sqlite3.connect(str(copy / "emqx_lite.db"))
        source.backup(target)
        source.close()
        target.close()
        with emqx_lite.Broker(HOST, mqtt_port=0, http_port=None, data_dir=str(copy)) as c:
            assert {r["topic"]: r["payload"] for r in c.retained()}["kept"] == b"in the backup"


_FULL_DISK_DRIVER = r"""
import logging, resource, signal, sys, threading
import emqx_lite
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(levelname)s %(message)s")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG
b = emqx_lite.Broker("127.0.0.1", mqtt_port=0, http_port=None, data_dir=sys.argv[1]).start()
print("port", b.mqtt_port, flush=True)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
for line in sys.stdin:
    if line.strip() == "full":      # no file may grow or be written past 1 byte
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))
    elif line.strip() == "space":
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    elif line.strip() == "publish":   # the Python API refuses before routing
        try:
            b.publish("t/python", b"x", qos=1)
        except emqx_lite.StoreError as exc:
            print("refused", exc, flush=True)
            continue
    print("ok", flush=True)
b.stop()
"""


class TestDurableStateDiskFull:
    """A data file that cannot be written: acknowledgements are refused, not lied."""

    def test_full_disk_refuses_qos1_acks_and_recovers(self, tmp_path):
        """With writes failing (RLIMIT_FSIZE in a broker subprocess), a 5.0
        QoS 1 PUBLISH gets PUBACK 0x97 and a 3.1.1 one has its connection
        closed with no PUBACK; QoS 0 keeps flowing to a persistent subscriber;
        the cause is logged once. When writes succeed again, so do QoS 1
        acknowledgements, and what was acknowledged is on disk."""
        import subprocess
        import sys
        proc = subprocess.Popen(
            [sys.executable, "-c", _FULL_DISK_DRIVER, str(tmp_path / "data")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.abspath(emqx_lite.__file__)))
        log = []
        reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
        reader.start()
        clients = []

        def command(word):
            proc.stdin.write(word + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "ok"

        try:
            line = proc.stdout.readline()
            assert line.startswith("port "), (line, log)
            port = int(line.split()[1])
            sub = RawClient.connected(port, "keeper", clean=False)
            clients.append(sub)
            assert sub.subscribe([("t/#", 1)]) == [1]
            v5 = RawClient5.connected(port, "pub5")
            v3 = RawClient.connected(port, "pub3")
            clients += [v5, v3]
            command("full")
            v3.send(gen_publish("t/retained", b"r", qos=0, retain=True))   # a write that fails
            assert sub.read_publish()["payload"] == b"r"
            assert wait_until(lambda: any("Cannot write" in l for l in log))
            assert v5.publish("t/q1", b"refused", qos=1, pid=5) == RC_QUOTA_EXCEEDED
            v3.send(gen_publish("t/q1", b"refused too", qos=1, pid=6))
            assert v3.expect_closed(strict=True)
            v5.send(gen_publish_v5("t/q0", b"still flowing"))
            assert sub.read_publish()["payload"] == b"still flowing"
            proc.stdin.write("publish\n")
            proc.stdin.flush()
            assert proc.stdout.readline().startswith("refused cannot write")
            command("space")
            assert wait_until(lambda: any("messages are accepted" in l for l in log))
            v3 = RawClient.connected(port, "pub3")
            clients.append(v3)
            v3.send(gen_publish("t/q1", b"kept", qos=1, pid=7))
            assert v3.read_packet()[:3:2] == (PUBACK, b"\x00\x07")
            m = sub.read_publish()
            assert (m["payload"], m["qos"]) == (b"kept", 1)
            assert sum("Cannot write" in l for l in log) == 1, log
        finally:
            for c in clients:
                c.close()
            proc.kill()
            proc.wait(10)
        assert not [l for l in log if "Traceback" in l], log
        with emqx_lite.Broker(HOST, mqtt_port=0, http_port=None,
                              data_dir=str(tmp_path / "data")) as b:
            retained = {r["topic"]: r["payload"] for r in b.retained()}
            assert retained["t/retained"] == b"r"
            keeper = [s for s in b.sessions() if s["client_id"] == "keeper"]
            assert keeper and keeper[0]["inflight_len"] + keeper[0]["mqueue_len"] == 1


###############################################################################
# Crash tests: durable state (--data-dir) under kill -9
###############################################################################
#
# The contract under test: ``python3 emqx_lite.py --data-dir DIR`` keeps the
# broker's state in DIR/emqx_lite.db. A QoS 1/2 PUBLISH the broker acknowledged
# (PUBACK for QoS 1, PUBREC for QoS 2) is on disk, for every persistent session
# (clean session 0) it was routed to, before the acknowledgement leaves. After a
# kill -9 at any moment and a restart: no acknowledged message is lost for a
# persistent subscriber, no QoS 2 message is delivered twice, a QoS 2 handshake
# cut by the crash completes after the reconnect, inflight messages are resent
# with DUP in order, and CONNACK says session present 1 on resume.
#
# The broker runs as a real subprocess and is killed with SIGKILL; the clients
# are raw MQTT 3.1.1 clients that keep their own half of the session as the
# specification asks. Every socket has a timeout and every wait is bounded.

#: kill -9 rounds of the load test (EMQXLITE_TEST_KILLS)
CRASH_KILLS = _knob("EMQXLITE_TEST_KILLS", int)
#: the module the subprocess runs (absolute: the broker's cwd is a tmp dir)
CRASH_MODULE = os.path.abspath(emqx_lite.__file__)
CRASH_START_TIMEOUT = 15.0   # seconds for a broker to log its MQTT listener
CRASH_READ_TIMEOUT = 3.0     # seconds to wait for a packet the broker owes us
CRASH_QUIET = 0.5            # seconds of silence that end a "nothing more" check
_LISTENING = re.compile(r"Listening for MQTT \(mqtt:tcp\) on [\d.]+:(\d+)")
_CRASH_CACHE = {}


class CrashRig:
    """Brokers as subprocesses on one data dir, and the sockets of their clients.

    ``start()`` -> (proc, port): ``python emqx_lite.py --data-dir DIR
    --mqtt-port 0 --http-port -1 --log-level info`` with cwd a tmp dir; the
    port is read from the "Listening for MQTT (mqtt:tcp)" line of its stderr,
    which a thread keeps reading (a full pipe would stall the broker's logging).
    ``kill9(proc)`` sends SIGKILL and reaps. ``close()`` (the fixture's
    teardown) closes every client socket and kills and reaps every broker."""

    def __init__(self, tmp_path):
        self.data_dir = tmp_path / "data"
        self.cwd = tmp_path / "cwd"
        self.data_dir.mkdir()
        self.cwd.mkdir()
        self.procs, self.clients, self.readers, self.logs = [], [], {}, {}
        # The broker's own configuration variables stay out: the contract's command line only.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EMQX_LITE_")}

    def start(self, timeout=CRASH_START_TIMEOUT):
        args = [sys.executable, CRASH_MODULE, "--data-dir", str(self.data_dir),
                "--mqtt-port", "0", "--http-port", "-1", "--log-level", "info"]
        proc = subprocess.Popen(args, cwd=str(self.cwd), env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                errors="replace")
        self.procs.append(proc)
        lines = self.logs[proc.pid] = collections.deque(maxlen=400)
        port, ready = [], threading.Event()

        def pump():
            for line in proc.stderr:
                lines.append(line)
                if not port:
                    m = _LISTENING.search(line)
                    if m:
                        port.append(int(m.group(1)))
                        ready.set()
            ready.set()   # end of stderr: the broker exited

        reader = threading.Thread(target=pump, name="broker-stderr-%d" % proc.pid, daemon=True)
        reader.start()
        self.readers[proc.pid] = reader
        if not ready.wait(timeout) or not port:
            self._reap(proc)
            raise AssertionError("broker did not listen within %.0f s (exit %s):\n%s"
                                 % (timeout, proc.returncode, self.log(proc)))
        return proc, port[0]

    def kill9(self, proc):
        """SIGKILL the broker and reap it; it must not have exited by itself."""
        assert proc.poll() is None, ("broker exited by itself (%s) before the kill:\n%s"
                                     % (proc.returncode, self.log(proc)))
        self._reap(proc)
        assert proc.returncode == -signal.SIGKILL, proc.returncode

    def _reap(self, proc):
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        self.readers[proc.pid].join(timeout=5)   # stderr is at its end once the broker is gone

    def log(self, proc, last=40):
        return "".join(list(self.logs.get(proc.pid, ()))[-last:])

    def client(self, port, client_id, clean):
        """A RawClient (its socket closed at teardown) whose CONNECT got return
        code 0 -> (client, session_present)."""
        c = RawClient(port)
        self.clients.append(c)
        session_present, rc = c.connect(client_id, clean=clean)
        assert rc == 0, "CONNACK return code %d for %s" % (rc, client_id)
        return c, session_present

    def close(self):
        for c in self.clients:
            c.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for reader in self.readers.values():
            reader.join(timeout=5)
        for proc in self.procs:
            if proc.stderr:
                proc.stderr.close()


@pytest.fixture
def crash_rig(tmp_path):
    rig = CrashRig(tmp_path)
    try:
        yield rig
    finally:
        rig.close()


def _next_packet(c, timeout=CRASH_READ_TIMEOUT):
    """The next packet as (type, flags, body); None on timeout or a closed connection."""
    try:
        return c.read_packet(timeout)
    except (socket.timeout, OSError, ConnectionError):
        return None


def _collect(c, quiet=CRASH_QUIET, limit=10.0):
    """What the broker sends until it is quiet for ``quiet`` s (at most ``limit``
    s), answered like a compliant subscriber: PUBACK, PUBREC, PUBCOMP for a
    PUBREL. -> [("PUBLISH", topic, payload, qos, dup, retain, pid) | (type name, pid)]."""
    names = {PUBREL: "PUBREL", PUBACK: "PUBACK", PUBREC: "PUBREC", PUBCOMP: "PUBCOMP",
             SUBACK: "SUBACK", CONNACK: "CONNACK"}
    got, deadline = [], time.monotonic() + limit
    while time.monotonic() < deadline:
        pkt = _next_packet(c, min(quiet, max(0.01, deadline - time.monotonic())))
        if pkt is None:
            break
        ptype, flags, body = pkt
        if ptype == PUBLISH:
            m = parse_publish(flags, body)
            got.append(("PUBLISH", m["topic"], m["payload"], m["qos"], m["dup"], m["retain"],
                        m["pid"]))
            if m["qos"]:
                c.send(gen_puback(m["pid"]) if m["qos"] == 1 else gen_pubrec(m["pid"]))
        else:
            pid = int.from_bytes(body[:2], "big")
            got.append((names.get(ptype, ptype), pid))
            if ptype == PUBREL:
                c.send(gen_pubcomp(pid))
    return got


# --- the load test's clients --------------------------------------------------------------

class _CrashClient:
    """What both crash-test clients keep across connections: their client id,
    CONNACKs' session present flags and anything unexpected they saw."""

    def __init__(self, client_id):
        self.client_id = client_id
        self.anomalies = []
        self.session_present = []
        self.conn = None

    def _reconnect(self, rig, port):
        """A new connection (clean session 0) in place of the old; -> session present."""
        if self.conn is not None:
            self.conn.close()
        self.conn, present = rig.client(port, self.client_id, clean=False)
        return present


class CrashPublisher(_CrashClient):
    """A clean-session-0 publisher at QoS 1 or 2 that keeps its half of the
    session (3.1.1 section 4.1: QoS 1/2 messages sent and not completely
    acknowledged) across connections and brokers.

    A new message gets an unused packet id [MQTT-2.3.1-2] and enters
    ``inflight`` before it is sent; QoS 1 waits for PUBACK; QoS 2 waits for
    PUBREC, answers PUBREL [MQTT-4.3.3-1] and waits for PUBCOMP. On every
    reconnect it resends, in the order of the original PUBLISHes, PUBLISH with
    DUP=1 for what has no PUBACK/PUBREC and PUBREL for what has PUBREC and no
    PUBCOMP, with the original packet ids [MQTT-4.4.0-1] [MQTT-4.6.0-1]
    [MQTT-3.3.1-1]. ``acked``: payloads whose PUBACK or PUBREC arrived, with
    the connection (0, 1, ...) it came on."""

    WINDOW = 8   # messages in flight; the broker's max_awaiting_rel is 100

    def __init__(self, client_id, topic, qos):
        super().__init__(client_id)
        self.topic, self.qos = topic, qos
        self.inflight = collections.OrderedDict()   # pid -> [payload, "ack" | "comp"]
        self.acked = {}   # payload -> the connection (0, 1, ...) its PUBACK / PUBREC came on
        self.sent = 0
        self.resent = set()   # payloads sent again with DUP=1
        self.ended = None

    def connect(self, rig, port):
        self.session_present.append(self._reconnect(rig, port))
        out = b""
        for pid, (payload, stage) in self.inflight.items():
            if stage == "ack":
                out += gen_publish(self.topic, payload, qos=self.qos, pid=pid, dup=True)
                self.resent.add(payload)
            else:
                out += gen_pubrel(pid)
        if out:
            self.conn.send(out)

    def _new_pid(self):
        """The lowest id not in flight [MQTT-2.3.1-2]: ids come back at once, so
        an id the broker still believes in use after a restart (a PUBCOMP sent
        before the release was on disk) swallows the next message as a DUP."""
        pid = 1
        while pid in self.inflight:
            pid += 1
        return pid

    def _publish_one(self):
        self.sent += 1
        payload = b"%s-%07d" % (self.client_id.encode(), self.sent)
        pid = self._new_pid()
        self.inflight[pid] = [payload, "ack"]
        self.conn.send(gen_publish(self.topic, payload, qos=self.qos, pid=pid))

    def _handle(self, pkt):
        ptype, _flags, body = pkt
        pid = int.from_bytes(body[:2], "big")
        entry = self.inflight.get(pid)
        if self.qos == 1 and ptype == PUBACK and entry:
            self.acked[entry[0]] = len(self.session_present) - 1
            del self.inflight[pid]
        elif self.qos == 2 and ptype == PUBREC and entry:
            self.acked.setdefault(entry[0], len(self.session_present) - 1)
            entry[1] = "comp"
            self.conn.send(gen_pubrel(pid))
        elif self.qos == 2 and ptype == PUBCOMP and entry and entry[1] == "comp":
            del self.inflight[pid]
        else:
            self.anomalies.append((ptype, pid, entry))

    def run(self, stop, may_publish):
        """Publish (window permitting) until ``stop`` or the connection dies."""
        try:
            while not stop.is_set():
                while len(self.inflight) < self.WINDOW and may_publish() and not stop.is_set():
                    self._publish_one()
                try:
                    self._handle(self.conn.read_packet(0.05))
                except socket.timeout:
                    pass
        except (OSError, ConnectionError):   # the broker was killed
            pass

    def finish(self, stall=5.0):
        """After the last restart: read acks until nothing is in flight (no new
        messages); give up after ``stall`` s without progress."""
        last, progress = len(self.inflight), time.monotonic()
        try:
            while self.inflight and time.monotonic() - progress < stall:
                try:
                    self._handle(self.conn.read_packet(0.05))
                except socket.timeout:
                    pass
                if len(self.inflight) != last:
                    last, progress = len(self.inflight), time.monotonic()
            self.ended = "no answer for %g s" % stall if self.inflight else "done"
        except (OSError, ConnectionError) as exc:
            self.ended = "connection lost: %r" % exc


class CrashSubscriber(_CrashClient):
    """A clean-session-0 subscriber that keeps its half of the session across
    connections: the packet ids of QoS 2 messages it has delivered and
    acknowledged with PUBREC but not yet seen PUBREL for (3.1.1 section 4.1).

    Method B of 4.3.3 (figure 4.3): a QoS 2 message is delivered on first
    receipt and its id stored; a PUBLISH with a stored id (the broker's DUP
    resend) is acknowledged with PUBREC again and not delivered again
    [MQTT-4.3.3-2]; PUBREL discards the id and is answered with PUBCOMP.
    ``received``: (payload, qos) of every delivery, in order."""

    def __init__(self, client_id, topic_filter):
        super().__init__(client_id)
        self.topic_filter = topic_filter
        self.awaiting_rel = set()
        self.received = []
        self.suppressed = []   # payloads of QoS 2 PUBLISHes not delivered: their id awaits PUBREL
        self.subscribed = False

    def connect(self, rig, port):
        present = self._reconnect(rig, port)
        self.session_present.append((self.subscribed, present))
        if not self.subscribed:   # once, on the first connection: then the session keeps it
            assert self.conn.subscribe([(self.topic_filter, 2)]) == [2]
            self.subscribed = True

    def _handle(self, pkt):
        ptype, flags, body = pkt
        if ptype == PUBLISH:
            m = parse_publish(flags, body)
            if m["qos"] == 2:
                if m["pid"] in self.awaiting_rel:
                    self.suppressed.append(m["payload"])
                else:
                    self.awaiting_rel.add(m["pid"])
                    self.received.append((m["payload"], 2))
                self.conn.send(gen_pubrec(m["pid"]))
            else:
                self.received.append((m["payload"], m["qos"]))
                if m["qos"] == 1:
                    self.conn.send(gen_puback(m["pid"]))
        elif ptype == PUBREL:
            pid = int.from_bytes(body[:2], "big")
            self.awaiting_rel.discard(pid)
            self.conn.send(gen_pubcomp(pid))   # also for an id it no longer holds
        else:
            self.anomalies.append((ptype, flags, bytes(body)))

    def run(self, stop):
        try:
            while not stop.is_set():
                try:
                    self._handle(self.conn.read_packet(0.05))
                except socket.timeout:
                    pass
        except (OSError, ConnectionError):
            pass


def _threads(*targets):
    ts = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in ts:
        t.start()
    return ts


def _join(threads, timeout=10.0):
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.01, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a client thread did not stop"


def _crash_load(rig, kills, crash="kill"):
    """The load test's body: ``kills`` rounds of start, (re)connect everyone
    (clean session 0), publish QoS 1 and QoS 2 for 50-300 ms, then SIGKILL
    (``crash="kill"``) or, for the harness's control run, drop every client's
    connection with the broker left running (``crash="drop"``). Then a last
    start, the publishers' resends completed and the subscriber drained.
    -> (problems, summary line)."""
    sub = CrashSubscriber("crash-sub", "crash/#")
    pubs = [CrashPublisher("crash-pub-q1", "crash/q1", 1),
            CrashPublisher("crash-pub-q2", "crash/q2", 2)]
    backlog_cap = 300   # acked and not yet delivered: well under the broker's max_mqueue_len

    def may_publish():
        return sum(len(p.acked) for p in pubs) - len(sub.received) < backlog_cap

    proc = port = None
    threads, stop = [], threading.Event()

    def everyone_back():
        """A broker running (started if it was killed), every client resumed."""
        nonlocal proc, port
        if proc is None:
            proc, port = rig.start()
        sub.connect(rig, port)
        for p in pubs:
            p.connect(rig, port)
        stop.clear()

    try:
        for _ in range(kills):
            everyone_back()
            threads = _threads(lambda: sub.run(stop),
                               *[(lambda p=p: p.run(stop, may_publish)) for p in pubs])
            time.sleep(random.uniform(0.05, 0.3))   # the load, cut at a random moment
            if crash == "kill":
                rig.kill9(proc)
                proc = None
            stop.set()
            _join(threads)
            if crash == "drop":
                for c in [sub.conn] + [p.conn for p in pubs]:
                    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    c.close()   # RST, no DISCONNECT
        # The last start: everyone back, resends completed, the subscriber drained.
        everyone_back()
        threads = _threads(lambda: sub.run(stop))
        _join(_threads(*[p.finish for p in pubs]), timeout=60)
        acked = set().union(*(p.acked for p in pubs))

        def missing():
            return acked - {payload for payload, _ in list(sub.received)}

        # Bounded: done, or 5 s without a new delivery (or 60 s in all).
        last, progress, deadline = -1, time.monotonic(), time.monotonic() + 60
        while missing() and time.monotonic() - progress < 5 and time.monotonic() < deadline:
            if len(sub.received) != last:
                last, progress = len(sub.received), time.monotonic()
            time.sleep(0.02)
        lost = missing()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    _join(threads)
    rig.kill9(proc)   # it must still be running: it did not crash by itself under the load

    received = list(sub.received)
    counts = collections.Counter(payload for payload, _ in received)
    q2_twice = sorted(pl for pl, n in counts.items() if pl.startswith(b"crash-pub-q2-") and n > 1)
    q1_extra = sum(n - 1 for pl, n in counts.items() if pl.startswith(b"crash-pub-q1-") and n > 1)
    wrong_qos = [(pl, q) for pl, q in received
                 if q != (1 if pl.startswith(b"crash-pub-q1-") else 2)]
    not_present = [i for i, (subscribed, present) in enumerate(sub.session_present)
                   if subscribed and present != 1]   # connection i > 0 came after restart i
    problems = []
    if lost:
        acked_on = {}
        for p in pubs:
            acked_on.update(p.acked)
        text = ("%d of %d acknowledged messages never reached the persistent subscriber, e.g. "
                "%s (acknowledged on connections %s)"
                % (len(lost), len(acked), sorted(lost)[:5], sorted({acked_on[pl] for pl in lost})))
        if not not_present:   # the sessions survived: hints at where the messages went
            text += (". Of them, %d QoS 2 ones got their PUBREC only after a DUP resend (the "
                     "broker may have kept the packet id awaiting PUBREL without the routed "
                     "message, and took the resend for a duplicate), and %d reached the "
                     "subscriber only under a packet id still awaiting its PUBREL (the broker "
                     "reused it [MQTT-4.4.0-1])"
                     % (len(lost & pubs[1].resent), len(lost & set(sub.suppressed))))
        problems.append(text)
    if q2_twice:
        problems.append("%d QoS 2 messages delivered twice [MQTT-4.3.3-2], e.g. %s"
                        % (len(q2_twice), q2_twice[:5]))
    if not_present:
        problems.append("session present 0 on resuming the subscriber's session after %d of "
                        "%d restarts, e.g. %s [MQTT-3.2.2-2]"
                        % (len(not_present), len(sub.session_present) - 1, not_present[:10]))
    for p in pubs:
        if p.inflight:
            problems.append("%s: %d messages never completed after the last restart (%s): %s"
                            % (p.client_id, len(p.inflight), p.ended,
                               list(p.inflight.items())[:5]))
        if p.anomalies:
            problems.append("%s: unexpected acks %s" % (p.client_id, p.anomalies[:5]))
    if wrong_qos:
        problems.append("delivered at the wrong QoS: %s" % wrong_qos[:5])
    if sub.anomalies:
        problems.append("subscriber: unexpected packets %s" % sub.anomalies[:5])
    if crash == "kill" and not (rig.data_dir / "emqx_lite.db").exists():
        problems.append("no %s" % (rig.data_dir / "emqx_lite.db"))
    summary = ("crash load (%s): kills=%d acked=%d (qos1 %d, qos2 %d) received=%d "
               "qos1_duplicates=%d qos2_duplicates=%d lost=%d suppressed_qos2_dups=%d"
               % (crash, kills, len(acked), len(pubs[0].acked), len(pubs[1].acked),
                  len(received), q1_extra, len(q2_twice), len(lost), len(sub.suppressed)))
    return problems, summary


def test_kill_9_under_qos1_and_qos2_load_loses_no_acknowledged_message(crash_rig):
    """kill -9 at random moments under QoS 1 and QoS 2 load, EMQXLITE_TEST_KILLS
    times (default 20), then a last restart.

    A persistent subscriber (clean session 0, subscribed once to crash/# at
    QoS 2) and persistent QoS 1 and QoS 2 publishers reconnect after every
    restart and resend as [MQTT-4.4.0-1] demands. Checked at the end:
    - every message whose PUBACK / PUBREC the publisher got reached the
      subscriber: the broker took ownership of it [MQTT-4.3.2-2] [MQTT-4.3.3-2]
      and a persistent session keeps it [MQTT-3.1.2-4] [MQTT-3.1.2-5];
    - no QoS 2 message was delivered twice [MQTT-4.3.3-2];
    - the subscriber's CONNACK said session present 1 after every restart
      [MQTT-3.2.2-2];
    - the publishers' resent PUBLISH / PUBREL packets were all completed."""
    problems, summary = _crash_load(crash_rig, CRASH_KILLS)
    print("\n" + summary)
    if problems:
        pytest.fail(summary + "\n" + "\n".join(problems), pytrace=False)


def test_connection_drops_under_the_same_load_lose_nothing(crash_rig):
    """Control for the kill -9 test's clients: the same load and the same
    clients, but each round only drops every client connection (RST, no
    DISCONNECT) while the broker keeps running. The broker's in-memory
    sessions must satisfy every check of the kill test; this one passing shows
    that the kill test's failures are the broker's state lost, not the clients'."""
    problems, summary = _crash_load(crash_rig, min(CRASH_KILLS, 5), crash="drop")
    print("\n" + summary)
    if problems:
        pytest.fail(summary + "\n" + "\n".join(problems), pytrace=False)


# --- crash points, one at a time ----------------------------------------------------------

def _publish_qos2_complete(c, topic, payload, pid=1):
    """A clean publisher's whole QoS 2 exchange; asserts each step."""
    c.send(gen_publish(topic, payload, qos=2, pid=pid))
    assert c.read_packet() == (PUBREC, 0, pid.to_bytes(2, "big"))
    c.send(gen_pubrel(pid))
    assert c.read_packet() == (PUBCOMP, 0, pid.to_bytes(2, "big"))


def _subscribe_then_go_offline(rig, port, client_id, topics):
    """A persistent subscriber that subscribes and DISCONNECTs: its session stays."""
    c, _ = rig.client(port, client_id, clean=False)
    assert c.subscribe(topics) == [q for _, q in topics]
    c.send(gen_disconnect())
    assert c.expect_closed()
    c.close()


def test_kill_9_between_pubrec_and_pubrel_keeps_the_inbound_qos2_message(crash_rig):
    """Broker as QoS 2 receiver, killed after its PUBREC and before the
    publisher's PUBREL.

    The PUBREC says the broker accepted ownership of the message
    [MQTT-4.3.3-2]; it is in the offline persistent subscriber's session
    [MQTT-3.1.2-5]. After the restart the publisher (clean session 0) resumes
    its session, session present 1 [MQTT-3.1.2-4] [MQTT-3.2.2-2], resends the
    PUBREL with the original packet id [MQTT-4.4.0-1] and gets PUBCOMP
    [MQTT-4.3.3-2]; the subscriber then gets the message exactly once."""
    proc, port = crash_rig.start()
    _subscribe_then_go_offline(crash_rig, port, "cp-a-sub", [("cp/a", 2)])
    pub, _ = crash_rig.client(port, "cp-a-pub", clean=False)
    pub.send(gen_publish("cp/a", b"exactly once", qos=2, pid=7))
    assert pub.read_packet() == (PUBREC, 0, b"\x00\x07")
    crash_rig.kill9(proc)                        # PUBREC out, PUBREL not sent yet

    proc, port = crash_rig.start()
    pub, pub_present = crash_rig.client(port, "cp-a-pub", clean=False)
    pub.send(gen_pubrel(7))
    pubcomp = _next_packet(pub)
    sub, sub_present = crash_rig.client(port, "cp-a-sub", clean=False)
    got = _collect(sub)
    pid = got[0][-1] if got and got[0][0] == "PUBLISH" else None
    assert {"subscriber got": got, "subscriber session present": sub_present,
            "publisher session present": pub_present, "answer to PUBREL": pubcomp} == {
        "subscriber got": [("PUBLISH", "cp/a", b"exactly once", 2, False, False, pid),
                           ("PUBREL", pid)],
        "subscriber session present": 1, "publisher session present": 1,
        "answer to PUBREL": (PUBCOMP, 0, b"\x00\x07")}


def test_kill_9_after_subscriber_pubrec_resends_pubrel_not_publish(crash_rig):
    """Broker as QoS 2 sender, killed after the subscriber's PUBREC was answered
    with PUBREL and before the subscriber's PUBCOMP.

    Having sent PUBREL, the broker MUST NOT resend the PUBLISH [MQTT-4.3.3-1];
    on the subscriber's reconnect (clean session 0, session present 1
    [MQTT-3.2.2-2]) it resends the PUBREL with the original packet id
    [MQTT-4.4.0-1] and, once PUBCOMP is in, has nothing more for it."""
    proc, port = crash_rig.start()
    sub, _ = crash_rig.client(port, "cp-b-sub", clean=False)
    assert sub.subscribe([("cp/b", 2)]) == [2]
    pub, _ = crash_rig.client(port, "cp-b-pub", clean=True)
    _publish_qos2_complete(pub, "cp/b", b"released")
    m = sub.read_publish()
    assert (m["topic"], m["payload"], m["qos"], m["dup"]) == ("cp/b", b"released", 2, False)
    pid = m["pid"].to_bytes(2, "big")
    sub.send(gen_pubrec(m["pid"]))
    assert sub.read_packet() == (PUBREL, 2, pid)
    crash_rig.kill9(proc)                        # PUBREL out, PUBCOMP not sent yet

    proc, port = crash_rig.start()
    sub, present = crash_rig.client(port, "cp-b-sub", clean=False)
    first = _next_packet(sub)
    if first is not None and first[0] == PUBREL:
        sub.send(gen_pubcomp(m["pid"]))
    rest = _collect(sub)
    assert {"session present": present, "first packet": first, "then": rest} == {
        "session present": 1, "first packet": (PUBREL, 2, pid), "then": []}


def test_kill_9_before_puback_redelivers_with_dup_and_the_same_packet_ids(crash_rig):
    """Broker as QoS 1 sender, killed with three PUBLISHes out and no PUBACK in.

    After the restart the subscriber resumes (clean session 0, session present
    1 [MQTT-3.2.2-2]) and gets the same messages again: DUP=1
    [MQTT-3.3.1-1], the original packet ids [MQTT-4.4.0-1] [MQTT-2.3.1-4],
    in their original order (4.6: resends in the order of the original
    PUBLISHes [MQTT-4.6.0-1]; an Ordered Topic [MQTT-4.6.0-6])."""
    proc, port = crash_rig.start()
    sub, _ = crash_rig.client(port, "cp-c-sub", clean=False)
    assert sub.subscribe([("cp/c", 1)]) == [1]
    pub, _ = crash_rig.client(port, "cp-c-pub", clean=True)
    for i in range(1, 4):
        pub.send(gen_publish("cp/c", b"unacked %d" % i, qos=1, pid=i))
        assert pub.read_packet() == (PUBACK, 0, i.to_bytes(2, "big"))
    first = [sub.read_publish() for _ in range(3)]
    assert [(m["payload"], m["qos"], m["dup"]) for m in first] == [
        (b"unacked %d" % i, 1, False) for i in range(1, 4)]
    crash_rig.kill9(proc)                        # PUBLISHes out, no PUBACK sent

    proc, port = crash_rig.start()
    sub, present = crash_rig.client(port, "cp-c-sub", clean=False)
    again = _collect(sub)
    assert {"session present": present, "redelivered": again} == {
        "session present": 1,
        "redelivered": [("PUBLISH", "cp/c", m["payload"], 1, True, False, m["pid"])
                        for m in first]}


def test_kill_9_keeps_the_retained_message(crash_rig):
    """A QoS 1 retained message, PUBACKed, survives kill -9: the Server stores it
    [MQTT-3.3.1-5], it is not session state and outlives sessions
    [MQTT-3.1.2-7], and a new subscription after the restart gets it
    [MQTT-3.3.1-6] with RETAIN 1 [MQTT-3.3.1-8]."""
    proc, port = crash_rig.start()
    pub, _ = crash_rig.client(port, "cp-d-pub", clean=True)
    pub.send(gen_publish("cp/d", b"kept", qos=1, pid=1, retain=True))
    assert pub.read_packet() == (PUBACK, 0, b"\x00\x01")
    crash_rig.kill9(proc)

    proc, port = crash_rig.start()
    sub, _ = crash_rig.client(port, "cp-d-sub", clean=True)
    assert sub.subscribe([("cp/#", 1)]) == [1]
    got = _collect(sub)
    assert [g[:6] for g in got] == [("PUBLISH", "cp/d", b"kept", 1, False, True)]


###############################################################################
# The test kit: pytest plugin, awaits, captures, the packet journal, reset
###############################################################################

def _run_pytest(tmp_path, files, *args):
    """pytest in a subprocess on ``files`` ({name: text}), as a user runs it."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(emqx_lite.__file__)))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *args], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=120)


class TestTestKitPlugin:
    """`pytest -p emqx_lite` / `pytest_plugins = ["emqx_lite"]`, run as users run it."""

    def test_readme_example_runs(self, tmp_path):
        """README's test-kit example is a test file that passes as written."""
        with open(os.path.join(os.path.dirname(os.path.abspath(emqx_lite.__file__)),
                               "README.md"), encoding="utf-8") as f:
            readme = f.read()
        block = readme.split("<!-- test-kit-example")[1].split("```python\n", 1)[1]
        code = block.split("```", 1)[0]
        result = _run_pytest(tmp_path, {"conftest.py": 'pytest_plugins = ["emqx_lite"]\n',
                                        "test_example.py": code},
                             "-W", "error::pytest.PytestUnknownMarkWarning")
        assert "4 passed" in result.stdout, result.stdout + result.stderr

    def test_failed_test_report_shows_the_journal(self, tmp_path):
        """A failing test that used mqtt_broker gets the broker's last packets
        in its report, the way pytest shows captured logs."""
        code = '''
import socket

def test_fails_after_traffic(mqtt_broker):
    s = socket.create_connection(("127.0.0.1", mqtt_broker.mqtt_port))
    s.sendall(bytes([0x10, 16, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 60, 0, 4]) + b"dev1")
    mqtt_broker.wait_for_client("dev1")
    s.close()
    assert False, "the code under test misbehaved"
'''
        result = _run_pytest(tmp_path, {"test_user.py": code}, "-p", "emqx_lite")
        out = result.stdout
        assert "1 failed" in out, out + result.stderr
        assert "emqx_lite journal (last" in out, out
        assert "<- CONNECT dev1" in out and "-> CONNACK dev1" in out, out

    def test_marker_settings_and_factory(self, tmp_path):
        code = '''
import pytest

@pytest.mark.mqtt_broker(node="marked@127.0.0.1", journal=0)
def test_marker(mqtt_broker, mqtt_broker_factory):
    assert mqtt_broker.node == "marked@127.0.0.1"
    assert mqtt_broker.journal.query() == []
    other = mqtt_broker_factory(max_inflight=3)
    assert other.settings["max_inflight"] == 3 and other.is_connected("x") is False
    assert other.http_port and mqtt_broker.http_port
'''
        result = _run_pytest(tmp_path, {"conftest.py": 'pytest_plugins = ["emqx_lite"]\n',
                                        "test_m.py": code}, "-W", "error::pytest.PytestUnknownMarkWarning")
        assert "1 passed" in result.stdout, result.stdout + result.stderr

    def test_module_does_not_import_pytest(self):
        """The plugin is defined only where pytest is already loaded: the
        broker itself never imports it."""
        result = subprocess.run([sys.executable, "-c", "import sys, emqx_lite; "
                                 "assert 'pytest' not in sys.modules; print('ok')"],
                                cwd=os.path.dirname(os.path.abspath(emqx_lite.__file__)),
                                capture_output=True, text=True, timeout=30)
        assert result.stdout.strip() == "ok", result.stderr


class TestTestKitAwaits:
    """Awaiting instead of sleeping, with paho clients as code under test."""

    def test_wait_for_client_and_its_disconnect(self, broker, client):
        c = client(client_id="dev-1")
        row = broker.wait_for_client("dev-1")
        assert row["client_id"] == "dev-1" and row["proto_ver"] == 4
        c.disconnect()
        assert broker.wait_for_client("dev-1", connected=False) is None

    def test_timeout_shows_who_was_there(self, broker, client):
        client(client_id="present")
        broker.wait_for_client("present")
        with pytest.raises(TimeoutError, match=r"'absent' not connected.*\['present'\]"):
            broker.wait_for_client("absent", timeout=0.2)

    def test_wait_for_subscription(self, broker, client):
        c = client(client_id="s1")
        c.client.subscribe("a/+/c", 1)   # not waiting for the SUBACK: the broker is awaited
        row = broker.wait_for_subscription("s1", "a/+/c")
        assert row == {"client_id": "s1", "topic": "a/+/c", "qos": 1}
        with pytest.raises(TimeoutError, match=r"no subscription of 's1' to 'x'.*s1 a/\+/c"):
            broker.wait_for_subscription("s1", "x", timeout=0.2)


class TestTestKitCapture:
    def test_capture_records_without_subscribers_until_the_block_ends(self, broker, client):
        pub = client(client_id="pub")
        with broker.capture("t/#") as seen:
            pub.publish("t/1", b"one", qos=1, retain=True)
            broker.publish("t/2", b"two", properties={"content_type": "text/plain"})
            broker.publish("other", b"not matched")
            got = seen.wait(count=2)
        assert [(m.topic, m.payload, m.qos, m.retain, m.publisher) for m in got] == [
            ("t/1", b"one", 1, True, "pub"), ("t/2", b"two", 0, False, "python")]
        assert got[1].properties == {"content_type": "text/plain"}
        broker.publish("t/3", b"after the block")
        assert len(seen.messages) == 2

    def test_capture_without_with_predicate_clear_and_timeout(self, broker):
        seen = broker.capture()
        for n in range(3):
            broker.publish("n/%d" % n, b"%d" % n)
        assert [m.payload for m in seen.wait(count=2, predicate=lambda m: m.payload != b"0")] \
            == [b"1", b"2"]
        seen.clear()
        assert seen.messages == []
        broker.publish("n/9", b"nine")
        with pytest.raises(TimeoutError, match=r"2 message\(s\) on '#' wanted, 1 matched.*n/9"):
            seen.wait(count=2, timeout=0.2)
        seen.stop()
        with pytest.raises(ValueError):
            broker.capture("a/#/b")


class TestTestKitJournal:
    def test_entries_in_and_out_with_the_routing_note(self, broker, client):
        sub = client(client_id="sub")
        sub.subscribe("j/#", 1)
        pub = client(client_id="pub")
        pub.publish("j/1", b"hello", qos=1)
        sub.get()
        [entry] = broker.journal.query(client_id="pub", type="PUBLISH")
        assert (entry["direction"], entry["topic"], entry["payload"], entry["qos"]) == (
            "in", "j/1", "hello", 1)
        assert entry["note"] == "routed to sub (subscribed qos 1)"
        out = broker.journal.query(client_id="sub", type="PUBLISH", direction="out")
        assert [(e["topic"], e["qos"], e["dup"]) for e in out] == [("j/1", 1, False)]
        [ack] = broker.journal.query(client_id="pub", type="PUBACK")
        assert (ack["direction"], ack["packet_id"], ack["reason_code"]) == (
            "out", entry["packet_id"], None)   # 3.1.1: no reason codes
        seqs = [e["seq"] for e in broker.journal.query()]
        assert seqs == sorted(seqs)
        later = broker.journal.query(since_seq=entry["seq"])
        assert later and all(e["seq"] > entry["seq"] for e in later)
        assert {e["topic"] for e in broker.journal.query(topic="j/+")} == {"j/1"}

    def test_notes_for_acl_refusal_and_takeover(self, make_broker, tmp_path):
        acl = tmp_path / "acl.conf"
        acl.write_text('{deny, all, publish, ["secret/#"]}.\n{allow, all}.\n')
        b = make_broker(acl_file=str(acl))
        r1 = RawClient.connected(b.mqtt_port, "twin")
        r1.send(gen_publish("secret/x", b"no", qos=1, pid=1))
        assert r1.read_packet()[0] == PUBACK
        r2 = RawClient.connected(b.mqtt_port, "twin")
        try:
            [denied] = b.journal.query(type="PUBLISH", topic="secret/x")
            assert denied["note"] == "ACL denied: not routed"
            connects = b.journal.query(client_id="twin", type="CONNECT")
            assert connects[-1]["note"].startswith("took the client id over from 127.0.0.1:")
        finally:
            r1.close()
            r2.close()

    def test_dump_rest_route_and_off(self, api_broker, api, api_mqtt, tmp_path, make_broker):
        c = api_mqtt(client_id="rest-1")
        c.publish("r/1", b"x", qos=1)
        path = tmp_path / "journal.jsonl"
        api_broker.journal.dump(str(path), client_id="rest-1")
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert {e["type"] for e in lines} >= {"CONNECT", "CONNACK", "PUBLISH", "PUBACK"}
        node = api_broker.node
        reply = api.get("/api/v2/nodes/%s/journal?client_id=rest-1&type=PUBLISH&limit=1" % node)
        assert reply["code"] == 0 and [e["topic"] for e in reply["result"]] == ["r/1"]
        assert api.get("/api/v2/nodes/%s/journal?limit=zero" % node)["code"] == 108
        assert api.request("GET", "/api/v2/nodes/nobody@x/journal")[0] == 404
        quiet = make_broker(journal=0)
        assert quiet.core.journal is None
        RawClient.connected(quiet.mqtt_port, "q").close()
        assert quiet.journal.query() == []


class TestTestKitReset:
    def test_reset_forgets_state_and_keeps_ports_settings_and_plugins(self, make_broker, raw):
        b = make_broker(max_inflight=7)
        port = b.mqtt_port
        b.set_plugin("emqx_auth_username", True)
        b.auth_username.add("u", "p")
        r = RawClient.connected(port, "old", clean=False, username="u", password=b"p")
        r.subscribe([("x", 1)])
        b.publish("kept?", b"no", retain=True)
        r.close()
        b.wait_for_client("old", connected=False)
        b.reset()
        assert (b.mqtt_port, b.settings["max_inflight"]) == (port, 7)
        assert b.plugins()["emqx_auth_username"] is True
        assert b.sessions() == [] and b.journal.query() == []
        assert [m["topic"] for m in b.retained() if not m["topic"].startswith("$SYS")] == []
        assert b.metrics()["packets/connect"] == 0
        r = RawClient(port)
        try:
            assert r.connect("old", clean=False, username="u", password=b"p") == (0, 0)
        finally:
            r.close()


class TestTestKitFaults:
    """broker.faults on live connections, with clients as code under test."""

    def test_disconnect_is_a_network_failure_with_will(self, broker, client):
        """No DISCONNECT reaches the client, and its will is published
        [MQTT-3.1.2-8]."""
        sub = client(client_id="watch")
        sub.subscribe("wills/#", 1)
        dev = client(client_id="dev", will=("wills/dev", b"gone", 1, False))
        broker.faults.disconnect("dev")
        assert sub.get().payload == b"gone"
        assert dev.disconnects.get(timeout=TIMEOUT) != 0   # paho saw the connection lost
        with pytest.raises(KeyError, match="'nobody' is not connected"):
            broker.faults.disconnect("nobody")

    def test_freeze_holds_traffic_without_losing_it(self, broker, client):
        sub = client(client_id="frozen")
        sub.subscribe("f/#", 1)
        pub = client(client_id="pub")
        broker.faults.freeze("frozen", 0.6)
        pub.publish("f/1", b"later", qos=1)
        sub.expect_nothing(0.3)
        assert sub.get().payload == b"later"   # delivered once the freeze ends

    def test_freeze_lets_the_keepalive_clock_run(self, make_broker):
        """A frozen client that is silent past 1.5 x keepalive is closed
        [MQTT-3.1.2-24], as a client cut off from the network would be."""
        b = make_broker(keepalive_backoff=1.0)
        r = RawClient.connected(b.mqtt_port, "ka", keepalive=1)
        try:
            b.faults.freeze("ka", 5)
            r.send(gen_pingreq())
            assert r.expect_closed(timeout=4, strict=True)
            b.wait_for_client("ka", connected=False)
        finally:
            r.close()

    def test_drop_next_makes_the_retries_run(self, make_broker):
        """A dropped PUBACK: the publisher resends with DUP [MQTT-4.4.0-1] and
        gets it; a dropped PUBLISH to a subscriber: the broker resends it
        after retry_interval, DUP set [MQTT-3.3.1-1]."""
        b = make_broker(retry_interval=0.3)
        pub = RawClient.connected(b.mqtt_port, "pub")
        sub = RawClient.connected(b.mqtt_port, "sub")
        try:
            sub.subscribe([("d", 1)])
            b.faults.drop_next("sub", "PUBLISH")
            b.publish("d", b"lost once", qos=1)
            m = sub.read_publish()
            assert (m["payload"], m["dup"]) == (b"lost once", True)
            sub.send(gen_puback(m["pid"]))
            b.faults.drop_next("pub", "PUBACK")
            pub.send(gen_publish("d", b"x", qos=1, pid=9))
            pub.expect_nothing(0.2)
            pub.send(gen_publish("d", b"x", qos=1, pid=9, dup=True))
            assert pub.read_packet()[:3:2] == (PUBACK, b"\x00\x09")
            notes = [e["note"] for e in b.journal.query(type="PUBACK", direction="out")]
            assert "dropped by an injected fault" in notes
        finally:
            pub.close()
            sub.close()

    def test_delay_holds_one_packet_type(self, broker, raw):
        r = raw()
        r.connect("slowack")
        broker.faults.delay("slowack", "PUBACK", 0.5)
        r.send(gen_publish("t", b"x", qos=1, pid=1) + gen_pingreq())
        assert r.read_packet()[0] == PINGRESP   # the PINGRESP overtakes the held PUBACK
        assert r.read_packet()[:3:2] == (PUBACK, b"\x00\x01")
        broker.faults.clear()

    def test_refuse_connect_then_accept(self, broker):
        """The next CONNECT from that id gets the code, the one after is accepted."""
        broker.faults.refuse_connect(5, client_id="app")
        first = PahoClient(broker.mqtt_port, client_id="app", connect=False)
        try:
            assert first.connect() == "Not authorized"
        finally:
            first.disconnect()
        second = PahoClient(broker.mqtt_port, client_id="app")
        second.disconnect()
        [entry] = broker.journal.query(type="refuse_connect")
        assert (entry["direction"], entry["note"]) == (
            "fault", "injected: the next 1 CONNECT(s) get 5")

    def test_close_after_cuts_after_n_packets(self, broker, client, raw):
        sub = client(client_id="w")
        sub.subscribe("wills/#")
        r = raw()
        r.connect("cut", will=("wills/cut", b"bye", 0, False))
        broker.faults.close_after("cut", 2)
        r.send(gen_pingreq())
        assert r.read_packet()[0] == PINGRESP
        r.send(gen_pingreq())   # the second: handled, then the connection is cut
        assert r.expect_closed()
        assert sub.get().payload == b"bye"

    def test_pause_listener_answers_connect_when_it_ends(self, broker, raw):
        broker.faults.pause_listener(0.6)
        r = raw()   # the kernel completes the TCP handshake meanwhile
        r.send(gen_connect("patient"))
        r.expect_nothing(0.3)
        ptype, _, body = r.read_packet()
        assert (ptype, body) == (CONNACK, b"\x00\x00")

    def test_faults_over_rest(self, api_broker, api, api_mqtt):
        node = api_broker.node
        c = api_mqtt(client_id="r1")
        path = "/api/v2/nodes/%s/faults" % node
        assert api.json("POST", path, {"action": "freeze", "client_id": "r1",
                                       "seconds": 0.2})["code"] == 0
        assert api.json("POST", path, {"action": "explode"})["code"] == 102
        assert api.json("POST", path, {"action": "freeze", "client_id": "nobody",
                                       "seconds": 1})["code"] == 112
        assert api.json("POST", path, {"action": "freeze", "client_id": "r1",
                                       "seconds": -1})["code"] == 108
        assert api.json("POST", path, {"action": "freeze", "client": "r1"})["code"] == 107
        assert api.json("POST", path, {"action": "clear"})["code"] == 0
        c.publish("x", b"after the freeze", qos=1)   # acknowledged: nothing stuck
        assert [e["note"] for e in api_broker.journal.query(direction="fault")][0] == \
            "injected: frozen for 0.2s"


class TestTrace:
    def test_trace_prints_packets_with_their_statements(self):
        """`python emqx_lite.py --trace` prints a line a packet with the
        normative statements it exercises, and what the broker decided."""
        broker = _CliBroker("--bind", "127.0.0.1", "--mqtt-port", "0", "--http-port", "0",
                            "--trace", env={"EMQX_LITE_DASHBOARD__PASSWORD_ITERATIONS": "1000"})
        try:
            r = RawClient.connected(broker.ports["mqtt:tcp"], "c1")
            r.subscribe([("t", 1)])
            r.send(gen_publish("t", b"hi", qos=1, pid=5))
            assert r.read_packet()[0] in (PUBACK, PUBLISH)
            r.send(gen_disconnect())
            r.close()
        finally:
            code, out = broker.stop()
        assert re.search(r"<- CONNECT c1 v3\.1\.1 clean keepalive=60 \[MQTT-3\.1\.0-1", out), out
        assert re.search(r"-> CONNACK c1 reason_code=0 \[MQTT-3\.2\.0-1", out), out
        assert re.search(r"<- PUBLISH c1 t qos=1 id=5 'hi' \[MQTT-4\.3\.2-2", out), out
        assert re.search(r"-> PUBACK c1 id=5 \[MQTT-4\.3\.2-2", out), out
        assert re.search(r"# routed to c1 \(subscribed qos 1\)", out), out


class TestTestKitClock:
    """Broker(clock=ManualClock()): timers run when the test advances time."""

    @pytest.fixture
    def clocked(self, make_broker):
        clock = emqx_lite.ManualClock()
        return clock, make_broker(clock=clock)

    def test_keepalive_in_milliseconds(self, clocked):
        """Silent for 1.5 x keepalive, the client is closed and its will
        published before advance() returns [MQTT-3.1.2-24, MQTT-3.1.2-8]."""
        clock, b = clocked
        r = RawClient.connected(b.mqtt_port, "sleepy", keepalive=10,
                                will=("wills/sleepy", b"gone", 0, False))
        try:
            with b.capture("wills/#") as wills:
                clock.advance(14.9)
                assert b.is_connected("sleepy") and wills.messages == []
                clock.advance(0.6)
                assert not b.is_connected("sleepy")
                assert [m.payload for m in wills.messages] == [b"gone"]
            assert r.expect_closed()
        finally:
            r.close()

    def test_keepalive_backoff_changed_at_run_time(self, clocked):
        """mqtt.keepalive_backoff changed while clients are connected counts
        for them at once: at 0.5 (EMQ X doubles it: 1.0 x keepalive), silent
        for 10.5 s with keepalive 10, closed; a client that keeps talking
        stays [MQTT-3.1.2-24]."""
        clock, b = clocked
        quiet = RawClient.connected(b.mqtt_port, "quiet", keepalive=10)
        chatty = RawClient5.connected(b.mqtt_port, "chatty", keepalive=10)
        try:
            clock.advance(0.5)   # their timers are set, at 1.5 x keepalive
            b.set_config("mqtt.keepalive_backoff", "0.5")
            for _ in range(5):   # 10.5 s in all: past 1.0 x 10 s, short of 1.5 x
                clock.advance(2)
                chatty.until_pingresp()
            assert not b.is_connected("quiet") and b.is_connected("chatty")
            assert quiet.expect_closed()
            clock.advance(10.5)   # and silent now
            assert not b.is_connected("chatty")
        finally:
            quiet.close()
            chatty.close()

    def test_the_real_clock_behaves_the_same(self, make_broker):
        """The same keepalive rule on real time (keepalive 1: closed after 1.5 s)."""
        b = make_broker()
        r = RawClient.connected(b.mqtt_port, "sleepy", keepalive=1,
                                will=("wills/sleepy", b"gone", 0, False))
        try:
            with b.capture("wills/#") as wills:
                assert wills.wait(timeout=5)[0].payload == b"gone"
            assert r.expect_closed()
        finally:
            r.close()

    def test_retry_message_and_session_expiry(self, clocked):
        """Retries after retry_interval (DUP set) [MQTT-4.4.0-1]; a retained
        message past its Message Expiry Interval is not sent [MQTT-3.3.2-5];
        an offline session past its expiry is gone [MQTT-3.1.2-23]."""
        clock, b = clocked
        sub = RawClient.connected(b.mqtt_port, "slow")
        v5 = RawClient5.connected(b.mqtt_port, "brief", clean_start=False,
                                  properties={"session_expiry_interval": 30})
        try:
            sub.subscribe([("t", 1)])
            b.publish("t", b"m", qos=1)
            first = sub.read_publish()
            clock.advance(b.settings["retry_interval"] + 0.5)
            again = sub.read_publish()
            assert (again["pid"], again["dup"]) == (first["pid"], True)
            b.publish("r", b"short-lived", qos=0, retain=True,
                      properties={"message_expiry_interval": 60})
            clock.advance(61)
            late = RawClient.connected(b.mqtt_port, "late")
            late.subscribe([("r", 0)])
            late.expect_nothing(0.2)
            late.close()
            v5.close()
            b.wait_for_client("brief", connected=False)
            clock.advance(29.5)
            assert "brief" in {s["client_id"] for s in b.sessions()}
            clock.advance(1)
            assert "brief" not in {s["client_id"] for s in b.sessions()}
        finally:
            sub.close()
            v5.close()

    def test_will_delay_and_uptime(self, clocked):
        """A will waits for its Will Delay Interval [MQTT-3.1.3-9]; $SYS uptime
        reads the clock."""
        clock, b = clocked
        c = RawClient5.connected(b.mqtt_port, "delayed", clean_start=False,
                                 properties={"session_expiry_interval": 100},
                                 will=("wills/d", b"late", 0, False, {"will_delay_interval": 5}))
        with b.capture("wills/#") as wills, b.capture("$SYS/brokers/+/uptime") as uptime:
            b.faults.disconnect("delayed")
            b.wait_for_client("delayed", connected=False)
            clock.advance(4.5)
            assert wills.messages == []
            clock.advance(1)
            assert [m.payload for m in wills.messages] == [b"late"]
            clock.advance(3600)
            assert uptime.messages[-1].payload.startswith(b"1 hours, 0 minutes")
        c.close()
        with pytest.raises(ValueError):
            clock.advance(-1)


class TestTestKitReview:
    """Edges of the test kit: a frozen client can still be closed, a freeze
    after clear() holds, captures outlive reset(), the fixture takes any
    setting, the journal of a 5.0 CONNECT."""

    def test_a_frozen_client_is_closed_by_keepalive_at_once(self, make_broker):
        clock = emqx_lite.ManualClock()
        b = make_broker(clock=clock)
        r = RawClient.connected(b.mqtt_port, "ice", keepalive=10,
                                will=("wills/ice", b"melted", 0, False))
        try:
            with b.capture("wills/#") as wills:
                b.faults.freeze("ice", 60)
                r.send(gen_pingreq())   # the reader takes it and waits for the thaw
                time.sleep(0.1)         # (no event to await: nothing may happen)
                started = time.monotonic()
                clock.advance(16)
                assert time.monotonic() - started < 5   # not held until the freeze ends
                assert [m.payload for m in wills.messages] == [b"melted"]
        finally:
            r.close()

    def test_freeze_after_clear_holds_inbound_too(self, broker, raw):
        r = raw()
        r.connect("twice")
        broker.faults.freeze("twice", 0.1)
        broker.faults.clear()
        broker.faults.freeze("twice", 0.5)
        with broker.capture("t") as seen:
            r.send(gen_publish("t", b"held"))
            time.sleep(0.2)   # inside the freeze: the check is that nothing happened yet
            assert seen.messages == []
            assert seen.wait()[0].payload == b"held"

    def test_captures_outlive_reset_and_journal_versions(self, make_broker):
        b = make_broker()
        seen = b.capture("x")
        b.reset()
        b.publish("x", b"after")
        assert [m.payload for m in seen.wait()] == [b"after"]
        c = RawClient5.connected(b.mqtt_port, "five", clean_start=False)
        [connect] = b.journal.query(client_id="five", type="CONNECT")
        assert (connect["version"], connect["clean_session"]) == (5, False)
        assert emqx_lite.spec_statements(connect) == ["MQTT-3.1.0-1", "MQTT-3.1.2-5"]
        c.close()

    def test_fixture_settings_may_override_its_defaults(self, tmp_path):
        code = '''
import pytest

@pytest.mark.mqtt_broker(api_password_iterations=2000)
def test_override(mqtt_broker, mqtt_broker_factory):
    assert mqtt_broker.settings["api_password_iterations"] == 2000
    assert mqtt_broker_factory(api_password_iterations=3000).settings[
        "api_password_iterations"] == 3000
'''
        result = _run_pytest(tmp_path, {"test_o.py": code}, "-p", "emqx_lite")
        assert "1 passed" in result.stdout, result.stdout + result.stderr


_LIMITED_DRIVER = r"""
import json, logging, resource, sys
import emqx_lite
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
kind, value = sys.argv[1], int(sys.argv[2])
b = emqx_lite.Broker("127.0.0.1", mqtt_port=0, http_port=None, max_clients=value
                     if kind == "max_clients" else 102400).start()
if kind == "nofile":
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (value, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
elif kind == "address_space":   # room for about 150 more thread stacks, then none
    with open("/proc/self/status") as f:
        size = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize")][0]
    resource.setrlimit(resource.RLIMIT_AS, (size + value * 1024 * 1024, resource.RLIM_INFINITY))
print("port", b.mqtt_port, flush=True)
for line in sys.stdin:
    print(json.dumps(b.listener_infos()[0]["shutdown_count"]), flush=True)
b.stop()
"""


class TestResourceExhaustion:
    """Out of descriptors (RLIMIT_NOFILE), out of threads (no address space
    left for a stack: RLIMIT_AS) or at max_clients: a new connection is
    closed at once, counted and logged once a minute; everyone else notices
    nothing, and the listener accepts again when resources come back."""

    @pytest.mark.parametrize("kind, value", [("nofile", 48), ("max_clients", 20),
                                             ("address_space", 40)])
    def test_refusal_is_clean_and_the_broker_goes_on(self, kind, value):
        proc = subprocess.Popen([sys.executable, "-c", _LIMITED_DRIVER, kind, str(value)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                cwd=os.path.dirname(os.path.abspath(emqx_lite.__file__)))
        log = []
        reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
        reader.start()
        clients = []
        try:
            line = proc.stdout.readline()
            assert line.startswith("port "), (line, log)
            port = int(line.split()[1])
            sub = RawClient.connected(port, "healthy-sub")
            sub.subscribe([("h", 0)])
            pub = RawClient.connected(port, "healthy-pub")
            clients += [sub, pub]
            refused = 0
            for n in range(400):   # until the broker runs out: then three refusals
                c = RawClient(port)
                clients.append(c)
                c.send(gen_connect("c%d" % n))
                try:
                    ptype, _, body = c.read_packet(timeout=5)
                    assert (ptype, body) == (CONNACK, b"\x00\x00")
                except ConnectionError:   # closed at once, no CONNACK
                    refused += 1
                    if refused == 3:
                        break
            assert refused == 3, "never refused"
            pub.send(gen_publish("h", b"still here"))   # the others notice nothing
            assert sub.read_publish()["payload"] == b"still here"
            proc.stdin.write("counts\n")
            proc.stdin.flush()
            counts = json.loads(proc.stdout.readline())
            counted = {"nofile": "emfile", "max_clients": "max_clients",
                       "address_space": "thread_limit"}[kind]
            assert counts.get(counted, 0) >= 3, counts
            for c in clients[2:12]:   # resources come back...
                c.close()

            def accepted_again():
                c = RawClient(port)
                clients.append(c)
                c.send(gen_connect("back"))
                try:
                    return c.read_packet(timeout=2)[0] == CONNACK
                except ConnectionError:   # the closes not seen yet: refused again
                    return False

            assert wait_until(accepted_again, timeout=10)   # ...and the listener accepts again
        finally:
            for c in clients:
                c.close()
            proc.stdin.close()
            proc.wait(10)
        refusals = [l for l in log if "Refusing new connections" in l]
        assert len(refusals) == 1, log   # once a minute, not per connection
        assert not [l for l in log if "Traceback" in l or "service thread failed" in l], log


class TestMassEvents:
    """Storms at a few hundred clients (bench/massbench.py runs them at 10,000
    and prints figures): wills, counts, leaks and liveness, not timings."""

    N = 300

    def _connect_many(self, port, prefix, n, **connect_kw):
        """n raw clients with 64 CONNECTs in flight at a time, all CONNACKed."""
        clients = []
        for start in range(0, n, 64):
            batch = [RawClient(port) for _ in range(start, min(n, start + 64))]
            for k, c in enumerate(batch):
                c.send(gen_connect("%s%d" % (prefix, start + k), **connect_kw))
            for c in batch:
                ptype, _, body = c.read_packet()
                assert (ptype, body[1]) == (CONNACK, 0)
            clients += batch
        return clients

    def test_mass_reset_publishes_every_will_and_leaks_nothing(self, make_broker, client):
        b = make_broker()
        sub = client(client_id="healthy-sub", port=b.mqtt_port)
        sub.subscribe("health", 0)
        pub = client(client_id="healthy-pub", port=b.mqtt_port)
        threads, fds, tasks = b.thread_count(), fd_count(), os_threads()
        with b.capture("will/#") as wills:
            many = self._connect_many(b.mqtt_port, "dev", self.N, will=("will/x", b"w", 0, False))
            for c in many:   # all reset at once, as a NAT gateway restart does
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()
            fresh = RawClient.connected(b.mqtt_port, "fresh")   # a newcomer gets in
            assert len(wills.wait(count=self.N, timeout=30)) == self.N
        assert wait_until(lambda: b.stats()["clients/count"] == 3, timeout=30)
        pub.publish("health", b"alive")
        assert sub.get().payload == b"alive"
        fresh.close()
        assert wait_until(lambda: b.thread_count() <= threads, timeout=30)
        assert wait_until(lambda: os_threads() <= tasks, timeout=30)
        assert wait_until(lambda: fd_count() <= fds, timeout=30)

    def test_mass_takeover_closes_every_old_connection(self, make_broker):
        b = make_broker()
        old = self._connect_many(b.mqtt_port, "same", 200)
        new = self._connect_many(b.mqtt_port, "same", 200)   # the old ones still open
        try:
            assert all(c.expect_closed(timeout=10, strict=False) for c in old)
            assert wait_until(lambda: b.stats()["clients/count"] == 200)
            assert sorted(c["client_id"] for c in b.clients()) == sorted(
                "same%d" % n for n in range(200))
            fresh = RawClient.connected(b.mqtt_port, "fresh")
            fresh.close()
        finally:
            for c in old + new:
                c.close()


###############################################################################
# The dashboard's listener, Prometheus, live views, chart history
###############################################################################

NODE = emqx_lite.DEFAULTS["node"]


@pytest.fixture
def dash_broker():
    """A broker with the REST API and the dashboard, both on ephemeral ports."""
    with emqx_lite.Broker("127.0.0.1", mqtt_port=0, http_port=0, dashboard_port=0,
                          **FAST_HASH) as b:
        yield b


@pytest.fixture
def dash_mqtt(dash_broker):
    """dash_mqtt(client_id, ...) -> PahoClient on dash_broker."""
    clients = Clients(PahoClient, dash_broker.mqtt_port)
    yield clients
    clients.close()


def refused(port):
    """True if nothing listens on ``port`` any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:   # in the backlog as the listener closed: try again
        pass
    return False


class LiveView:
    """GET nodes/{node}/live: reads the Server-Sent Events one at a time."""

    def __init__(self, port, topic_filter, password="public"):
        import http.client
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        token = base64.b64encode(("admin:" + password).encode()).decode()
        self.conn.request("GET", "/api/v2/nodes/%s/live?topic=%s"
                          % (NODE, urllib.parse.quote(topic_filter, safe="")),
                          headers={"Authorization": "Basic " + token})
        self.resp = self.conn.getresponse()
        self.kind = self.resp.headers["Content-Type"]

    def event(self):
        """The next event as (name, data as JSON); comments are skipped."""
        name = data = None
        while True:
            line = self.resp.readline().decode()
            if not line:
                raise EOFError("the stream ended")
            if line == "\n" and data is not None:
                return name, json.loads(data)
            if line.startswith("event: "):
                name = line[7:].strip()
            elif line.startswith("data: "):
                data = line[6:].strip()

    def close(self):
        self.conn.close()


class TestPrometheus:
    """GET api/v2/prometheus/stats and /metrics: the text exposition format."""

    def test_every_metric_and_stat_as_an_emqx_family_matching_the_api(self, dash_broker,
                                                                      dash_mqtt):
        from prometheus_client.parser import text_string_to_metric_families
        sub = dash_mqtt("prom-sub")
        sub.subscribe("prom/#", 1)
        dash_mqtt("prom-pub").publish("prom/x", b"1", qos=1)
        assert sub.get().payload == b"1"
        b = dash_broker
        taken = []

        def still():   # metrics and stats taken at the same moment as the text
            before = (b.metrics(), b.stats())
            taken[:] = [before, Api(b.http_port).request("GET", "prometheus/stats")]
            return (b.metrics(), b.stats()) == before
        assert wait_until(still)
        before, (status, headers, body) = taken
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        wanted = {"emqx_" + key.replace("/", "_"): ("counter", value)
                  for key, value in before[0].items()}
        wanted["emqx_messages_retained"] = ("gauge", before[0]["messages/retained"])
        wanted.update({"emqx_" + key.replace("/", "_"): ("gauge", value)
                       for key, value in before[1].items()})
        assert set(families) == set(wanted)   # only emqx_ families, every one of them
        for name, (kind, value) in wanted.items():
            family = families[name]
            assert family.type == kind and family.documentation, name
            (sample,) = family.samples
            assert sample.labels == {"node": NODE} and sample.value == value, name
        assert families["emqx_messages_received"].samples[0].value >= 1
        assert families["emqx_clients_count"].samples[0].value == 2

    def test_metrics_on_the_dashboard_listener_is_the_same_text(self, dash_broker):
        api, dash = Api(dash_broker.http_port), Api(dash_broker.dashboard_port)
        assert dash.request("GET", "/metrics")[2] == api.request("GET", "prometheus/stats")[2]

    def test_needs_basic_auth_as_the_api_does(self, dash_broker):
        for port, path in ((dash_broker.http_port, "prometheus/stats"),
                           (dash_broker.dashboard_port, "/metrics")):
            status, headers, _ = Api(port).request("GET", path, auth=False)
            assert status == 401 and "Basic" in headers["WWW-Authenticate"]
            assert Api(port, password="wrong").request("GET", path)[0] == 401

    def test_prometheus_auth_off_serves_it_open_and_nothing_else(self):
        with emqx_lite.Broker("127.0.0.1", mqtt_port=0, http_port=0, dashboard_port=0,
                              prometheus_auth=False, **FAST_HASH) as b:
            api, dash = Api(b.http_port), Api(b.dashboard_port)
            assert api.request("GET", "prometheus/stats", auth=False)[0] == 200
            assert dash.request("GET", "/metrics", auth=False)[0] == 200
            assert api.request("GET", "monitoring/metrics", auth=False)[0] == 401
            assert dash.request("GET", "monitoring/stats", auth=False)[0] == 401

    def test_node_label_is_escaped(self):
        text = emqx_lite.prometheus_text({"bytes/sent": 3}, {}, 'a"b\\c')
        assert 'emqx_bytes_sent{node="a\\"b\\\\c"} 3' in text.splitlines()


class TestDashboardListener:
    """dashboard.listener.http: the page, /metrics and every api/v2 route, while
    the emqx_dashboard plugin is active."""

    def test_page_script_and_style_with_a_strict_policy(self, dash_broker):
        dash = Api(dash_broker.dashboard_port)
        for path, kind in (("/", "text/html"), ("/dashboard.js", "text/javascript"),
                           ("/dashboard.css", "text/css")):
            status, headers, body = dash.request("GET", path, auth=False)
            assert status == 200 and headers["Content-Type"].startswith(kind) and body
            assert "script-src 'self'" in headers["Content-Security-Policy"]
            assert "unsafe-inline" not in headers["Content-Security-Policy"]
        status, _, body = dash.request("GET", "/", auth=False)
        assert b'<script src="/dashboard.js"' in body and b'href="/dashboard.css"' in body

    def test_the_api_routes_with_the_same_credentials(self, dash_broker):
        dash = Api(dash_broker.dashboard_port)
        assert dash.result("GET", "management/nodes")[0]["name"] == NODE
        assert dash.request("GET", "management/nodes", auth=False)[0] == 401
        assert dash.json("POST", "auth", {"username": "admin", "password": "nope"},
                         auth=False) == {"code": 103, "message": "Password error"}

    def test_embedded_broker_has_no_dashboard_unless_asked(self, api_broker):
        assert api_broker.dashboard_port is None

    def test_stopping_the_plugin_closes_the_listener_and_starting_reopens_it(self, dash_broker):
        port, api = dash_broker.dashboard_port, Api(dash_broker.http_port)
        plugin = "nodes/%s/plugins/emqx_dashboard" % NODE
        assert api.result("PUT", plugin, {"active": False}) == []
        assert wait_until(lambda: refused(port))
        assert api.result("PUT", plugin, {"active": True}) == []
        assert dash_broker.dashboard_port == port   # the same port: an open page finds it again
        assert Api(port).result("GET", "management/nodes")[0]["name"] == NODE

    def test_stopped_from_its_own_page_it_answers_then_goes(self, dash_broker):
        port = dash_broker.dashboard_port
        reply = Api(port).json("PUT", "nodes/%s/plugins/emqx_dashboard" % NODE, {"active": False})
        assert reply == {"code": 0, "result": []}
        assert wait_until(lambda: refused(port))
        plugins = Api(dash_broker.http_port).result("GET", "nodes/%s/plugins" % NODE)
        assert {"name": "emqx_dashboard", "version": emqx_lite.__version__,
                "description": "EMQ X Dashboard", "active": False} in plugins
        dash_broker.set_plugin("emqx_dashboard", True)
        assert Api(port).result("GET", "management/nodes")[0]["name"] == NODE

    def test_stop_joins_every_thread_of_a_stopped_dashboard(self):
        threads = len(broker_threads())
        b = emqx_lite.Broker("127.0.0.1", mqtt_port=0, http_port=0, dashboard_port=0, **FAST_HASH)
        b.start()
        Api(b.dashboard_port).result("PUT", "nodes/%s/plugins/emqx_dashboard" % NODE,
                                     {"active": False})
        b.stop()
        assert len(broker_threads()) == threads

    def test_cli_flag_and_config_key(self, tmp_path):
        conf = tmp_path / "emqx.conf"
        conf.write_text("dashboard.listener.http = 127.0.0.1:0\n")
        cli = _CliBroker("--mqtt-port", "0", "--http-port", "0", "--data-dir", "",
                         "--config", str(conf))
        try:
            assert wait_until(lambda: any("Dashboard on" in l for l in cli.lines)
                              or cli.lines.append(cli.proc.stdout.readline()), timeout=10)
            port = int(re.search(r"Dashboard on http://127\.0\.0\.1:(\d+)/",
                                 "".join(cli.lines)).group(1))
            assert Api(port).request("GET", "/", auth=False)[0] == 200
        finally:
            cli.stop()
        code, out = _CliBroker("--mqtt-port", "0", "--http-port", "0", "--data-dir", "",
                               "--dashboard-port", "-1").stop()
        assert code == 0 and "Dashboard on" not in out
        out = _run_cli("--print-config", "--dashboard-port", "18090").stdout
        assert "dashboard.listener.http = 0.0.0.0:18090" in out.splitlines()


class TestLiveView:
    """GET nodes/{node}/live?topic=F: Server-Sent Events of the messages routed to F."""

    def test_messages_stream_as_events_text_or_base64(self, dash_broker, dash_mqtt):
        view = LiveView(dash_broker.dashboard_port, "live/#")
        try:
            assert view.kind.startswith("text/event-stream")
            pub = dash_mqtt("live-pub")
            pub.publish("live/a", b"hello", qos=1, retain=True)
            pub.publish("other", b"not this one")
            pub.publish("live/b", b"\xff\x00", qos=2)
            name, first = view.event()
            assert name == "message" and {k: first[k] for k in (
                "topic", "payload", "encoding", "qos", "retain")} == {
                "topic": "live/a", "payload": "hello", "encoding": "utf-8", "qos": 1,
                "retain": True}
            assert abs(first["time"] / 1000 - time.time()) < 60
            name, second = view.event()
            assert (second["topic"], second["payload"], second["encoding"]) == (
                "live/b", base64.b64encode(b"\xff\x00").decode(), "base64")
        finally:
            view.close()

    def test_a_bad_filter_is_refused_with_a_message(self, dash_broker):
        view = LiveView(dash_broker.dashboard_port, "a/#/b")
        try:
            assert view.kind.startswith("application/json")
            reply = json.loads(view.resp.read())
            assert reply["code"] == 102 and "a/#/b" in reply["message"]
        finally:
            view.close()

    def test_at_most_four_views_and_a_closed_one_frees_its_place(self, dash_broker):
        views = [LiveView(dash_broker.dashboard_port, "v/%d" % n) for n in range(4)]
        try:
            extra = LiveView(dash_broker.dashboard_port, "v/extra")
            reply = json.loads(extra.resp.read())
            extra.close()
            assert reply["code"] == 102 and "live views" in reply["message"]
            views.pop().close()   # noticed at the next keepalive comment

            def one_more():
                view = LiveView(dash_broker.dashboard_port, "v/again")
                if view.kind.startswith("text/event-stream"):
                    views.append(view)
                    return True
                view.close()
                return False
            assert wait_until(one_more, timeout=10, interval=0.2)
            # the API answers meanwhile: the views do not hold its other threads
            assert Api(dash_broker.dashboard_port).result("GET", "management/nodes")
        finally:
            for view in views:
                view.close()

    def test_a_head_request_holds_no_view(self, dash_broker):
        api = Api(dash_broker.http_port)
        for _ in range(3):   # more than the API listener's 2 views
            assert api.request("HEAD", "nodes/%s/live?topic=h" % NODE)[0] == 200
        assert wait_until(lambda: not [t for t in dash_broker.core.taps
                                       if isinstance(t, emqx_lite.Capture)])
        view = LiveView(dash_broker.http_port, "h")
        try:
            assert view.kind.startswith("text/event-stream")
        finally:
            view.close()

    def test_stop_ends_open_views(self):
        b = emqx_lite.Broker("127.0.0.1", mqtt_port=0, http_port=0, dashboard_port=0, **FAST_HASH)
        b.start()
        view = LiveView(b.dashboard_port, "#")
        try:
            b.stop()
            with pytest.raises((EOFError, OSError)):
                while True:
                    view.event()
        finally:
            view.close()


class TestDashboardData:
    """The routes the dashboard's pages read besides EMQ X's: retained, history."""

    def test_retained_messages_paged_with_their_payloads(self, dash_broker):
        for n in range(3):
            dash_broker.publish("keep/%d" % n, b"v%d" % n, qos=1, retain=True)
        dash_broker.publish("keep/bin", b"\x80", retain=True)
        api = Api(dash_broker.http_port)
        page = api.result("GET", "nodes/%s/retained?page_size=2&curr_page=2" % NODE)
        keep = [r for r in api.result("GET", "nodes/%s/retained?page_size=100" % NODE)["objects"]
                if r["topic"].startswith("keep/")]
        assert all(abs(r.pop("time") / 1000 - time.time()) < 60 for r in keep)
        assert keep == [{"topic": "keep/0", "qos": 1, "payload": "v0", "encoding": "utf-8"},
                        {"topic": "keep/1", "qos": 1, "payload": "v1", "encoding": "utf-8"},
                        {"topic": "keep/2", "qos": 1, "payload": "v2", "encoding": "utf-8"},
                        {"topic": "keep/bin", "qos": 0, "payload": "gA==", "encoding": "base64"}]
        assert page["current_page"] == 2 and len(page["objects"]) == 2
        assert page["total_num"] == len(dash_broker.retained())

    def test_history_samples_rates_on_the_broker_clock(self):
        clock = emqx_lite.ManualClock()
        with emqx_lite.Broker("127.0.0.1", mqtt_port=0, http_port=0, clock=clock,
                              **FAST_HASH) as b:
            api = Api(b.http_port)
            sub = PahoClient(b.mqtt_port, "hist-sub")
            pub = PahoClient(b.mqtt_port, "hist-pub")
            try:
                sub.subscribe("h/#", 0)
                clock.advance(2)          # the first sample's baseline
                for n in range(10):
                    pub.publish("h/x", b"%d" % n)
                for _ in range(10):
                    sub.get()
                clock.advance(2)
                history = api.result("GET", "nodes/%s/history" % NODE)
            finally:
                sub.close()
                pub.close()
        assert history["interval"] == emqx_lite.HISTORY_INTERVAL
        last = history["samples"][-1]
        assert (last["messages_in"], last["messages_out"]) == (5.0, 5.0)   # 10 in 2 s
        assert (last["connections"], last["subscriptions"]) == (2, 1)
        assert abs(last["time"] / 1000 - time.time()) < 60


class TestConfigsRoutes:
    """configs, nodes/{node}/configs and PUT .../configs/{app}: the broker's
    settings by their emq.conf keys, changed at run time where that is safe."""

    def test_every_setting_listed_by_node_and_on_the_node(self, api):
        everywhere = api.result("GET", "configs")
        rows = api.result("GET", "nodes/%s/configs" % NODE)
        assert everywhere == {NODE: rows}   # keyed by node, as EMQ X 2.3
        assert [r["key"] for r in rows] == sorted(SETTING_KEYS)
        by_key = {r["key"]: r for r in rows}
        assert by_key["mqtt.allow_anonymous"] == {"key": "mqtt.allow_anonymous", "value": "true",
                                                  "datatpye": "flag", "app": "emqx",
                                                  "runtime": True}
        assert by_key["mqtt.max_packet_size"]["value"] == "1MB"
        assert by_key["retainer.max_message_num"]["app"] == "emqx_retainer"
        assert by_key["node.name"]["runtime"] is False
        assert api.request("GET", "nodes/other@host/configs")[0] == 404

    def test_a_runtime_change_takes_effect_for_the_next_client(self, api, api_broker):
        api_broker.set_config("mqtt.allow_anonymous", "true")
        assert api.result("PUT", "nodes/%s/configs/emqx" % NODE,
                          {"key": "mqtt.allow_anonymous", "value": "false"}) == []
        r = RawClient(api_broker.mqtt_port)
        try:
            assert r.connect("anon") == (0, emqx_lite.CONNACK_NOT_AUTHORIZED)
        finally:
            r.close()
        assert api.result("PUT", "configs/emqttd",   # EMQ X 2.3's application name works too
                          {"key": "mqtt.max_clientid_len", "value": "4"}) == []
        r = RawClient(api_broker.mqtt_port)
        try:
            api.result("PUT", "configs/emqx", {"key": "mqtt.allow_anonymous", "value": "on"})
            assert r.connect("toolong") == (0, emqx_lite.CONNACK_IDENTIFIER_REJECTED)
        finally:
            r.close()
        RawClient.connected(api_broker.mqtt_port, "four").close()
        assert {r["key"]: r["value"] for r in api.result("GET", "nodes/%s/configs" % NODE)}[
            "mqtt.max_clientid_len"] == "4"

    @pytest.mark.parametrize("body, words", [
        ({"key": "mqtt.acl_file", "value": "x.conf"},
         ["mqtt.acl_file", "cannot be changed while the broker runs"]),
        ({"key": "node.name", "value": "x@y"}, ["node.name", "restart"]),
        ({"key": "mqtt.session.max_inflight", "value": "many"},
         ["mqtt.session.max_inflight", "expected an integer, got 'many'"]),
        ({"key": "mqtt.no_such_key", "value": "1"}, ["mqtt.no_such_key", "unknown key"]),
    ])
    def test_refusals_name_the_key_and_change_nothing(self, api, api_broker, body, words):
        before = dict(api_broker.settings)
        reply = api.json("PUT", "nodes/%s/configs/emqx" % NODE, body)
        assert reply["code"] == 102 and all(w in reply["message"] for w in words), reply
        assert api_broker.settings == before

    def test_the_application_must_own_the_key(self, api):
        reply = api.json("PUT", "configs/emqx_retainer",
                         {"key": "mqtt.max_inflight", "value": "1"})
        assert reply["code"] == 102
        reply = api.json("PUT", "configs/emqx_modules",
                         {"key": "retainer.max_message_num", "value": "1"})
        assert reply["code"] == 102 and "emqx_retainer" in reply["message"]

    def test_parameters_are_checked_as_emq_x_does(self, api):
        path = "nodes/%s/configs/emqx" % NODE
        assert api.json("PUT", path, {"key": "mqtt.max_keepalive"})["code"] == 107
        assert api.json("PUT", path, {"key": "mqtt.max_keepalive", "value": 5})["code"] == 108


class TestPluginConfigs:
    """nodes/{node}/plugin_configs/{plugin}: each plugin's settings, replaced
    whole by a PUT of {key: value}, with real effect."""

    def path(self, plugin):
        return "nodes/%s/plugin_configs/%s" % (NODE, plugin)

    def test_every_plugin_lists_key_value_desc_required(self, api):
        for plugin in emqx_lite.PLUGINS:
            rows = api.result("GET", self.path(plugin))
            assert rows, plugin
            for row in rows:
                assert set(row) == {"key", "value", "desc", "required", "secret"}
                assert isinstance(row["value"], str) and row["desc"]
                assert isinstance(row["required"], bool)
        assert api.request("GET", self.path("emqx_nothing"))[0] == 404
        assert api.request("GET", "nodes/other@host/plugin_configs/emqx_retainer")[0] == 404

    def test_retainer_limits(self, api, api_broker):
        """A payload above retainer.max_payload_size is delivered, not retained."""
        assert api.result("PUT", self.path("emqx_retainer"), {
            "retainer.max_message_num": "50", "retainer.max_payload_size": "4B"}) == []
        rows = {r["key"]: r["value"] for r in api.result("GET", self.path("emqx_retainer"))}
        assert rows == {"retainer.storage_type": "ram", "retainer.max_message_num": "50",
                        "retainer.max_payload_size": "4B", "retainer.expiry_interval": "0s"}
        with api_broker.capture("lim/#") as live:
            api_broker.publish("lim/big", b"12345", retain=True)
            api_broker.publish("lim/small", b"1234", retain=True)
            assert [m.topic for m in live.wait(2)] == ["lim/big", "lim/small"]
        assert sorted(m["topic"] for m in api_broker.retained()
                      if m["topic"].startswith("lim/")) == ["lim/small"]
        assert api.result("PUT", self.path("emqx_retainer"), {}) == []   # back to defaults
        assert api_broker.settings["retainer_max_payload_size"] == 1024 * 1024

    def test_retainer_count_limit_keeps_replacements(self, api_broker):
        """At retainer.max_message_num ($SYS ones count) a new topic is not
        retained; a retained topic can still be replaced."""
        api_broker.set_plugin_config("emqx_retainer", {"retainer.max_message_num": str(
            len(api_broker.retained()) + 1)})
        api_broker.publish("one/a", b"1", retain=True)
        api_broker.publish("one/b", b"2", retain=True)   # no room
        api_broker.publish("one/a", b"3", retain=True)   # a replacement
        kept = {m["topic"]: m["payload"] for m in api_broker.retained()
                if m["topic"].startswith("one/")}
        assert kept == {"one/a": b"3"}

    def test_retainer_expiry_on_the_broker_clock(self):
        clock = emqx_lite.ManualClock()
        with emqx_lite.Broker("127.0.0.1", mqtt_port=0, http_port=None, clock=clock,
                              retainer_expiry_interval=10.0) as b:
            b.publish("exp/a", b"x", retain=True)
            clock.advance(5)
            b.publish("exp/b", b"y", retain=True)
            clock.advance(5)
            assert sorted(m["topic"] for m in b.retained() if m["topic"].startswith("exp/")) \
                == ["exp/b"]
            r = RawClient.connected(b.mqtt_port, "late")
            try:
                r.subscribe([("exp/#", 0)])
                assert r.read_publish()["topic"] == "exp/b"
            finally:
                r.close()

    def test_a_bad_value_or_key_changes_nothing(self, api, api_broker):
        before = dict(api_broker.settings)
        for body, words in (({"retainer.max_message_num": "lots"}, "retainer.max_message_num"),
                            ({"retainer.max_message_num": "5", "retainer.nope": "1"},
                             "retainer.nope"),
                            ({"retainer.storage_type": "disc"}, "node.data_dir"),
                            ({"retainer.max_message_num": 5}, "string")):
            reply = api.json("PUT", self.path("emqx_retainer"), body)
            assert reply["code"] == 102 and words in reply["message"], reply
        assert api_broker.settings == before

    def test_modules_subscriptions_and_rewrites(self, api, api_broker):
        assert api.result("PUT", self.path("emqx_modules"), {
            "module.subscription.1.topic": "inbox/%c", "module.subscription.1.qos": "1",
            "module.rewrite.rule.1": "old/# ^old/(.+)$ new/$1"}) == []
        rows = {r["key"]: r["value"] for r in api.result("GET", self.path("emqx_modules"))}
        assert rows["module.subscription.1.topic"] == "inbox/%c"
        assert rows["module.rewrite.rule.1"] == "old/# ^old/(.+)$ new/$1"
        r = RawClient.connected(api_broker.mqtt_port, "dev7")
        try:
            assert api_broker.wait_for_subscription("dev7", "inbox/dev7")["qos"] == 1
            r.subscribe([("new/#", 0)])
            api_broker.publish("old/x", b"moved")
            assert r.read_publish()["topic"] == "new/x"
        finally:
            r.close()
        assert api.result("PUT", self.path("emqx_modules"), {}) == []   # all of it removed
        assert api_broker.settings["module_subscription"] == ()
        reply = api.json("PUT", self.path("emqx_modules"), {"module.rewrite.rule.1": "x ( y"})
        assert reply["code"] == 102 and "module.rewrite.rule.1" in reply["message"]

    def test_auth_table_passwords_are_write_only(self, api, api_broker):
        api_broker.set_plugin("emqx_auth_username", True)
        api_broker.set_config("mqtt.allow_anonymous", "false")
        path = self.path("emqx_auth_username")
        assert api.result("PUT", path, {"auth.username.bob": "s3cret",
                                        "auth.username.amy": "pw-amy"}) == []
        status, _, body = api.request("GET", path)
        assert b"s3cret" not in body and b"pw-amy" not in body
        rows = {r["key"]: r["value"] for r in json.loads(body)["result"]}
        assert rows["auth.username.bob"] == rows["auth.username.amy"] == ""

        def login(user, password):
            r = RawClient(api_broker.mqtt_port)
            try:
                return r.connect("c-" + user, username=user, password=password)[1]
            finally:
                r.close()
        assert login("bob", b"s3cret") == 0 and login("bob", b"wrong") != 0
        # "" keeps bob's password; amy, left out, is removed
        assert api.result("PUT", path, {"auth.username.bob": ""}) == []
        assert login("bob", b"s3cret") == 0 and login("amy", b"pw-amy") != 0
        reply = api.json("PUT", path, {"auth.username.new": ""})
        assert reply["code"] == 102 and "needs a password" in reply["message"]
        reply = api.json("PUT", path, {"auth.username.$name": "pw"})   # the template row
        assert reply["code"] == 102 and "replace" in reply["message"]
        assert [r["secret"] for r in api.result("GET", path)] == [True, False]

    def test_auth_clientid_pairs(self, api, api_broker):
        path = self.path("emqx_auth_clientid")
        assert api.result("PUT", path, {"auth.client.1.clientid": "dev1",
                                        "auth.client.1.password": "p1"}) == []
        rows = api.result("GET", path)
        assert {"key": "auth.client.1.clientid", "value": "dev1", "required": True} \
            .items() <= rows[0].items()
        assert rows[1]["key"] == "auth.client.1.password" and rows[1]["value"] == ""
        assert api_broker.auth_clientid.check("dev1", "p1") is True
        reply = api.json("PUT", path, {"auth.client.1.password": "p"})
        assert reply["code"] == 102 and "auth.client.1.clientid" in reply["message"]

    def test_dashboard_moves_and_default_user(self, dash_broker):
        api = Api(dash_broker.http_port)
        old = dash_broker.dashboard_port
        # asked through the dashboard itself: it answers, then moves
        reply = Api(old).json("PUT", self.path("emqx_dashboard"), {
            "dashboard.listener.http": "127.0.0.1:0", "dashboard.default_user.login": "ops",
            "dashboard.default_user.password": "ops-pw"})
        assert reply == {"code": 0, "result": []}
        assert wait_until(lambda: dash_broker.dashboard_port not in (None, old))
        assert Api(dash_broker.dashboard_port, "ops", "ops-pw").result("GET", "management/nodes")
        rows = {r["key"]: r["value"] for r in api.result("GET", self.path("emqx_dashboard"))}
        assert rows["dashboard.listener.http"] == "127.0.0.1:%d" % dash_broker.dashboard_port
        assert rows["dashboard.default_user.password"] == ""
        reply = api.json("PUT", self.path("emqx_dashboard"),
                         {"dashboard.default_user.login": "someone"})
        assert reply["code"] == 102 and "needs one" in reply["message"]

    def test_moving_the_dashboard_to_a_busy_port_is_refused(self, dash_broker):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            reply = Api(dash_broker.dashboard_port).json("PUT", self.path("emqx_dashboard"), {
                "dashboard.listener.http": "127.0.0.1:%d" % busy.getsockname()[1]})
        assert reply["code"] == 102 and "cannot listen" in reply["message"]
        assert Api(dash_broker.dashboard_port).result("GET", "management/nodes")


class TestSettingsSurviveRestart:
    """Settings changed at run time are kept in the data file and win over
    the configuration's at the next start."""

    def test_configs_and_plugin_configs_come_back(self, tmp_path, caplog):
        kw = dict(bind="127.0.0.1", mqtt_port=0, http_port=None, data_dir=str(tmp_path))
        with emqx_lite.Broker(**kw) as b:
            b.set_config("mqtt.max_clientid_len", "8")
            b.set_plugin_config("emqx_retainer", {"retainer.max_message_num": "77"})
            b.set_plugin_config("emqx_modules", {"module.subscription.1.topic": "in/%c"})
            b.set_plugin_config("emqx_auth_username", {"auth.username.eve": "pw"})
        with caplog.at_level("INFO", logger="emqx_lite"):
            with emqx_lite.Broker(max_clientid_len=100, **kw) as b:
                assert b.settings["max_clientid_len"] == 8   # the later change wins
                assert b.settings["retainer_max_messages"] == 77
                assert b.settings["module_subscription"] == (("in/%c", 1),)
                assert b.auth_username.check("eve", "pw") is True
        assert any("Settings changed at run time, from the data file" in r.getMessage()
                   for r in caplog.records)

    def test_an_older_data_file_is_migrated(self, tmp_path):
        import sqlite3
        with emqx_lite.Broker("127.0.0.1", mqtt_port=0, http_port=None,
                              data_dir=str(tmp_path)) as b:
            b.publish("kept", b"1", retain=True)
        db = sqlite3.connect(str(tmp_path / emqx_lite.STORE_FILE))
        db.execute("DROP TABLE settings")
        db.execute("DROP TABLE bridge_queue")
        db.execute("PRAGMA user_version = 1")   # as version 1 wrote it
        db.commit()
        db.close()
        with emqx_lite.Broker("127.0.0.1", mqtt_port=0, http_port=None,
                              data_dir=str(tmp_path)) as b:
            assert any(m["topic"] == "kept" for m in b.retained())
            b.set_config("mqtt.max_keepalive", "30")
        db = sqlite3.connect(str(tmp_path / emqx_lite.STORE_FILE))
        assert db.execute("PRAGMA user_version").fetchone()[0] == emqx_lite.SCHEMA_VERSION
        assert db.execute("SELECT * FROM settings").fetchall() == [("mqtt.max_keepalive", "30")]
        db.close()


###############################################################################
# The dashboard in a real browser (Selenium, headless Chromium)
###############################################################################
#
# Debian's chromium and chromium-driver (.ci/run installs them) and selenium
# from PyPI. Where no browser can be had, these tests skip and say why. A
# failing test leaves a screenshot and the browser's log, named in its report.

try:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:   # the browser tests skip, and say why (needs_browser)
    pass


def _browser_paths():
    """(chromium, chromedriver) paths, or a reason why there is no browser."""
    try:
        import selenium   # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -r requirements.txt"
    import shutil
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                  "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        return ("no %s: apt-get install chromium chromium-driver (.ci/run does)"
                % " or ".join(n for n, p in (("chromium", browser), ("chromedriver", driver))
                              if p is None))
    return browser, driver


#: What must be there ("browser", "mosquitto"): .ci/run sets it, so that a test
#: that needs a missing program fails there instead of skipping.
REQUIRED = os.environ.get("EMQXLITE_TEST_REQUIRE", "").split()
_BROWSER = _browser_paths()
needs_browser = pytest.mark.skipif(isinstance(_BROWSER, str) and "browser" not in REQUIRED,
                                   reason=str(_BROWSER))
WAIT = 10   # seconds any one explicit wait in a browser test may take
SCREENSHOTS = os.environ.get("EMQXLITE_TEST_SCREENSHOTS",
                             os.path.join(tempfile.gettempdir(), "emqx_lite-screenshots"))


def browser_test(test):
    """A browser test: needs a browser, and on failure saves a screenshot and
    the browser's log (their paths are added to the failure's report)."""
    import functools

    @functools.wraps(test)
    def run(**fixtures):
        try:
            return test(**fixtures)
        except BaseException as exc:
            driver = fixtures.get("driver")
            if driver is not None:
                exc.add_note(_save_screenshot(driver, test.__name__))
            raise
    return needs_browser(run)


def _save_screenshot(driver, name):
    os.makedirs(SCREENSHOTS, exist_ok=True)
    base = os.path.join(SCREENSHOTS, name)
    try:
        driver.save_screenshot(base + ".png")
        lines = ["%(level)s %(message)s" % e for e in driver.get_log("browser")]
        with open(base + ".log", "w", encoding="utf-8") as f:
            f.write("url: %s\n%s\n" % (driver.current_url, "\n".join(lines)))
    except Exception as exc:   # a screenshot that fails must not hide the failure
        return "no screenshot: %s" % exc
    return "screenshot: %s.png (browser log: %s.log)" % (base, base)


class _Dashboard:
    """A started Broker with the dashboard on an ephemeral port."""

    def __init__(self):
        self.broker = emqx_lite.Broker("127.0.0.1", mqtt_port=0, http_port=None,
                                       dashboard_port=0, **FAST_HASH)
        self.broker.start()
        self.url = "http://127.0.0.1:%d" % self.broker.dashboard_port
        self.mqtt_port = self.broker.mqtt_port


@pytest.fixture
def dashboard():
    """The dashboard's broker (.url, .broker, .mqtt_port); stopped after the
    test, and no thread it started may be left running."""
    before = set(threading.enumerate())
    server = _Dashboard()
    try:
        yield server
    finally:
        server.broker.stop()
    leaked = [t for t in threading.enumerate() if t not in before]
    for thread in leaked:
        thread.join(5)
    assert not [t for t in leaked if t.is_alive()], "threads left running: %s" % leaked


@pytest.fixture(scope="module")
def browser():
    if isinstance(_BROWSER, str):
        pytest.fail("EMQXLITE_TEST_REQUIRE has browser: " + _BROWSER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,900"):
        options.add_argument(arg)
    options.binary_location = _BROWSER[0]
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(_BROWSER[1]), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def driver(browser, dashboard):
    """The browser on the dashboard's log-in page."""
    browser.set_window_size(1280, 900)
    browser.get(dashboard.url + "/")
    browser.get_log("browser")   # drop what earlier tests logged
    yield browser
    problems = [e["message"] for e in browser.get_log("browser")
                if "Content Security Policy" in e["message"] or "Uncaught" in e["message"]]
    browser.get("about:blank")   # the page stops polling before its server stops
    assert not problems, "the page broke its CSP or threw: %s" % problems


@pytest.fixture
def mqtt_client(dashboard):
    """connect(client_id) -> a connected paho client (VERSION2 callbacks);
    each is disconnected and its loop stopped after the test."""
    clients = []

    def connect(client_id):
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
        client.reconnect_delay_set(30, 60)   # a kicked client stays away during the test
        connected = threading.Event()
        client.on_connect = lambda *args: connected.set()
        client.connect("127.0.0.1", dashboard.mqtt_port)
        client.loop_start()
        clients.append(client)
        assert connected.wait(WAIT), "%s did not connect" % client_id
        return client

    yield connect
    for client in clients:
        client.disconnect()
        client.loop_stop()


# --- helpers ---
def wait(driver, condition, timeout=WAIT):
    return WebDriverWait(driver, timeout).until(condition)


def by_label(label):
    return (By.CSS_SELECTOR, '[aria-label="%s"]' % label)


def text_of(driver, element_id):
    return driver.find_element(By.ID, element_id).text


def click(driver, locator):
    """Click the element once it is there and clickable; tables are redrawn
    every few seconds, so a reference gone stale is looked up again."""
    def attempt(d):
        try:
            element = EC.element_to_be_clickable(locator)(d)
            if element:
                element.click()
                return True
        except StaleElementReferenceException:
            pass
        return False
    wait(driver, attempt)


def log_in(driver, user="admin", password="public"):
    wait(driver, EC.visibility_of_element_located((By.ID, "login-user")))
    for element_id, value in (("login-user", user), ("login-password", password)):
        field = driver.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(value)
    driver.find_element(By.ID, "login-submit").click()


def go(driver, page, heading):
    """Open a page from the navigation; wait for its heading."""
    click(driver, (By.CSS_SELECTOR, '#nav a[href="#/%s"]' % page))
    wait(driver, EC.text_to_be_present_in_element((By.CSS_SELECTOR, "#page h1"), heading))


def rest(dashboard, method, path, body=None, user="admin", password="public"):
    """Call the REST API directly (not through the page) -> the JSON answer."""
    request = urllib.request.Request(
        dashboard.url + "/api/v2/" + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Basic " + base64.b64encode(
            ("%s:%s" % (user, password)).encode()).decode()})
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        return json.loads(response.read())


def plugin_active(dashboard, name):
    answer = rest(dashboard, "GET", "nodes/%s/plugins" % dashboard.broker.node)
    return {p["name"]: p["active"] for p in answer["result"]}[name]


# ---- 1. Log-in and log-out -------------------------------------------------------------
@browser_test
def test_dashboard_log_in_wrong_password_and_log_out(driver, dashboard):
    log_in(driver, password="wrong")
    wait(driver, EC.text_to_be_present_in_element((By.ID, "login-error"), "Password error"))
    assert driver.find_element(By.ID, "login-form").is_displayed()
    assert not driver.find_element(By.ID, "nav").is_displayed()

    log_in(driver, user="nobody", password="x")
    wait(driver, EC.text_to_be_present_in_element((By.ID, "login-error"), "User not found"))

    log_in(driver)
    wait(driver, EC.text_to_be_present_in_element((By.ID, "ov-node"), dashboard.broker.node))
    assert not driver.find_element(By.ID, "login-form").is_displayed()

    go(driver, "clients", "Clients")   # a reload keeps the session and the page
    driver.refresh()
    wait(driver, EC.text_to_be_present_in_element((By.CSS_SELECTOR, "#page h1"), "Clients"))

    driver.find_element(By.ID, "logout").click()
    wait(driver, EC.visibility_of_element_located((By.ID, "login-form")))
    assert driver.execute_script("return sessionStorage.length") == 0
    assert not driver.find_element(By.ID, "nav").is_displayed()


# ---- 2. A client shows up, and is kicked ------------------------------------------------
@browser_test
def test_dashboard_new_client_appears_and_can_be_kicked(driver, dashboard, mqtt_client):
    log_in(driver)
    go(driver, "clients", "Clients")
    client = mqtt_client("dash-kick-1")
    disconnected = threading.Event()
    client.on_disconnect = lambda *args: disconnected.set()

    click(driver, by_label("Kick dash-kick-1"))   # it appears within a refresh or two
    assert disconnected.wait(WAIT), "paho's on_disconnect did not fire"
    wait(driver, lambda d: not d.find_elements(*by_label("Kick dash-kick-1")))
    wait(driver, EC.text_to_be_present_in_element((By.ID, "clients-status"), "Kicked dash-kick-1"))
    assert not dashboard.broker.is_connected("dash-kick-1")


# ---- 3. Publish from the form: a subscriber and the live view get it -----------------------
@browser_test
def test_dashboard_publish_reaches_subscriber_and_live_view(driver, dashboard, mqtt_client):
    received = queue.Queue()
    subscriber = mqtt_client("dash-sub-1")
    subscriber.on_message = lambda client, userdata, message: received.put(message)
    subscriber.subscribe("dash/test/#", qos=1)
    dashboard.broker.wait_for_subscription("dash-sub-1", "dash/test/#", timeout=WAIT)

    log_in(driver)
    go(driver, "live", "Live messages")
    topic = driver.find_element(By.ID, "live-topic")
    topic.clear()
    topic.send_keys("dash/test/#")
    driver.find_element(By.ID, "live-start").click()
    wait(driver, EC.text_to_be_present_in_element((By.ID, "live-status"), "Live:"))

    go(driver, "publish", "Publish")
    for element_id, value in (("pub-topic", "dash/test/1"), ("pub-payload", "hello from the form")):
        element = driver.find_element(By.ID, element_id)
        element.clear()
        element.send_keys(value)
    Select(driver.find_element(By.ID, "pub-qos")).select_by_value("1")
    driver.find_element(By.ID, "pub-submit").click()
    wait(driver, EC.text_to_be_present_in_element((By.ID, "publish-status"), "Published to dash/test/1"))

    message = received.get(timeout=WAIT)
    assert (message.topic, message.payload, message.qos) == ("dash/test/1", b"hello from the form", 1)

    go(driver, "live", "Live messages")
    wait(driver, EC.text_to_be_present_in_element((By.ID, "live-table"), "hello from the form"))
    row = driver.find_element(By.CSS_SELECTOR, "#live-table tbody tr")   # the newest, at the top
    assert "dash/test/1" in row.text and "hello from the form" in row.text
    driver.find_element(By.ID, "live-stop").click()
    wait(driver, EC.text_to_be_present_in_element((By.ID, "live-status"), "Stopped"))


# ---- 4. Stop and start a plugin ------------------------------------------------------------
@browser_test
def test_dashboard_toggle_retainer(driver, dashboard):
    log_in(driver)
    go(driver, "plugins", "Plugins")
    click(driver, by_label("Stop emqx_retainer"))
    wait(driver, EC.presence_of_element_located(by_label("Start emqx_retainer")))
    assert plugin_active(dashboard, "emqx_retainer") is False

    click(driver, by_label("Start emqx_retainer"))
    wait(driver, EC.presence_of_element_located(by_label("Stop emqx_retainer")))
    assert plugin_active(dashboard, "emqx_retainer") is True


# ---- 5. The charts show the load ------------------------------------------------------------
@browser_test
def test_dashboard_chart_shows_message_rate(driver, dashboard, mqtt_client):
    log_in(driver)
    wait(driver, EC.text_to_be_present_in_element((By.ID, "ov-node"), dashboard.broker.node))
    publisher = mqtt_client("dash-load-1")
    stop = threading.Event()

    def load():   # about 20 messages a second
        while not stop.wait(0.05):
            publisher.publish("dash/load", b"x" * 10, qos=0)
    thread = threading.Thread(target=load)
    thread.start()
    try:
        def rate_in(d):
            text = text_of(d, "chart-in-latest")   # e.g. "20.0/s"
            return text != "-" and float(text.split("/")[0]) > 0
        wait(driver, rate_in, timeout=15)
    finally:
        stop.set()
        thread.join()
    points = driver.find_element(By.CSS_SELECTOR, "#chart-messages polyline.series-in").get_attribute("points")
    assert points.split(), "no line drawn"
    assert driver.find_elements(By.CSS_SELECTOR, "#chart-messages circle.series-in")   # the latest value
    assert int(text_of(driver, "chart-conn-latest")) >= 1


# ---- 6. Stopping the dashboard asks first -----------------------------------------------------
@browser_test
def test_dashboard_stopping_it_asks_for_confirmation(driver, dashboard):
    log_in(driver)
    go(driver, "plugins", "Plugins")
    click(driver, by_label("Stop emqx_dashboard"))
    dialog = wait(driver, EC.visibility_of_element_located((By.ID, "dialog")))
    assert "this page will go away" in dialog.text
    assert driver.find_element(By.ID, "dialog-ok").text == "Stop dashboard"
    driver.find_element(By.ID, "dialog-cancel").click()
    wait(driver, EC.invisibility_of_element_located((By.ID, "dialog")))
    wait(driver, EC.text_to_be_present_in_element((By.ID, "plugins-status"), "keeps running"))
    assert plugin_active(dashboard, "emqx_dashboard") is True
    assert driver.find_elements(*by_label("Stop emqx_dashboard"))


# ---- More: every page, errors, an expired log-in, a narrow window ---------------------------------
PAGES = {   # page -> (heading, an element its data fills)
    "overview": ("Overview", "chart-messages"), "clients": ("Clients", "clients-table"),
    "sessions": ("Sessions", "sessions-table"), "subscriptions": ("Subscriptions", "subscriptions-table"),
    "topics": ("Topics", "topics-table"), "retained": ("Retained messages", "retained-table"),
    "publish": ("Publish", "publish-form"), "live": ("Live messages", "live-table"),
    "plugins": ("Plugins", "plugins-table"), "listeners": ("Listeners", "listeners-table"),
    "bridges": ("Bridges", "bridges-table"),
    "metrics": ("Metrics and stats", "stats-table"), "users": ("Users", "users-table"),
    "alarms": ("Alarms", "alarms-empty"), "journal": ("Journal", "journal-table"),
    "settings": ("Settings", "settings-table"),
}


@browser_test
def test_dashboard_every_page_renders_without_errors(driver, dashboard, mqtt_client):
    mqtt_client("dash-pages-1").publish("dash/retained", b"kept", qos=1, retain=True)
    log_in(driver)
    wait(driver, EC.text_to_be_present_in_element((By.ID, "ov-node"), dashboard.broker.node))
    for page, (heading, filled) in PAGES.items():
        go(driver, page, heading)
        wait(driver, EC.presence_of_element_located((By.ID, filled)))
        alerts = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "#page [role=alert]") if a.text]
        assert not alerts, "%s: %s" % (page, alerts)
        assert driver.title.startswith(PAGES[page][0].split()[0])
    go(driver, "retained", "Retained messages")
    wait(driver, EC.text_to_be_present_in_element((By.ID, "retained-table"), "dash/retained"))


@browser_test
def test_dashboard_refused_request_shows_code_and_message(driver, dashboard):
    log_in(driver)
    go(driver, "publish", "Publish")
    topic = driver.find_element(By.ID, "pub-topic")
    topic.clear()
    topic.send_keys("not/a/#/name")
    driver.find_element(By.ID, "pub-submit").click()
    error = wait(driver, EC.visibility_of_element_located((By.ID, "publish-error")))
    wait(driver, EC.text_to_be_present_in_element((By.ID, "publish-error"), "Error 102: validate topic"))
    assert error.get_attribute("role") == "alert"


@browser_test
def test_dashboard_401_while_logged_in_returns_to_log_in(driver, dashboard):
    log_in(driver)
    go(driver, "clients", "Clients")   # polls every 2 s
    answer = rest(dashboard, "PUT", "change_pwd/admin", {"old_pwd": "public", "new_pwd": "changed"})
    assert answer["code"] == 0
    wait(driver, EC.visibility_of_element_located((By.ID, "login-form")))
    wait(driver, EC.text_to_be_present_in_element((By.ID, "login-error"), "HTTP 401"))


@browser_test
def test_dashboard_narrow_window(driver, dashboard, mqtt_client):
    driver.set_window_size(400, 800)
    mqtt_client("a-client-with-a-rather-long-identifier-0123456789")
    log_in(driver)
    wait(driver, EC.text_to_be_present_in_element((By.ID, "ov-node"), dashboard.broker.node))
    menu = driver.find_element(By.ID, "menu-toggle")
    assert menu.is_displayed() and not driver.find_element(By.ID, "nav").is_displayed()
    menu.click()
    assert menu.get_attribute("aria-expanded") == "true"
    go(driver, "clients", "Clients")   # choosing a page folds the menu again
    assert not driver.find_element(By.ID, "nav").is_displayed()
    wait(driver, EC.presence_of_element_located(by_label("Kick a-client-with-a-rather-long-identifier-0123456789")))
    box = driver.find_element(By.CSS_SELECTOR, "#clients-table").find_element(By.XPATH, "..")
    assert driver.execute_script("return arguments[0].scrollWidth > arguments[0].clientWidth", box)
    assert driver.execute_script("return document.documentElement.scrollWidth") <= 400


###############################################################################
# Bridges (emqx_bridge_mqtt): to mosquitto, to another emqx_lite, and back
###############################################################################

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Mosquitto:
    """A real mosquitto on a free port (Debian's mosquitto package; .ci/run
    installs it), stopped and started again on the same port at will."""

    def __init__(self, tmp_path, port=None, extra=""):
        import shutil
        self.binary = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
        if self.binary is None:
            why = "mosquitto is not installed: apt-get install mosquitto (.ci/run does)"
            if "mosquitto" in os.environ.get("EMQXLITE_TEST_REQUIRE", "").split():
                pytest.fail(why)
            pytest.skip(why)
        self.port = port or free_port()
        self.conf = tmp_path / "mosquitto.conf"
        self.conf.write_text("listener %d 127.0.0.1\nallow_anonymous true\n%s" % (self.port, extra))
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: not refused(self.port) or self.proc.poll() is not None)
        assert self.proc.poll() is None, "mosquitto exited"
        return self

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def mosquitto(tmp_path):
    m = Mosquitto(tmp_path).start()
    yield m
    m.stop()


@pytest.fixture
def bridged():
    """bridged(remote_port, **options) -> a started local Broker with bridge
    "up" to 127.0.0.1:remote_port (options as bridge.mqtt.up.* keys)."""
    brokers = []

    def make(remote_port, broker_kw=None, **options):
        options = dict({"address": "127.0.0.1:%d" % remote_port, "reconnect_interval": "1s"},
                       **{k.replace("__", "."): v for k, v in options.items()})
        b = emqx_lite.Broker(HOST, mqtt_port=0, http_port=0, bridges={"up": options},
                             **dict(FAST_HASH, **(broker_kw or {})))
        b.start()
        brokers.append(b)
        return b

    yield make
    for b in brokers:
        b.stop()


def bridge_state(b, state="connected"):
    assert wait_until(lambda: b.bridges["up"].state == state, timeout=10), b.bridges["up"].info()
    return b.bridges["up"].info()


class TestBridge:
    """The emqx_bridge_mqtt plugin's bridges, against real remotes."""

    def test_messages_cross_both_ways_with_mountpoints(self, mosquitto, bridged):
        b = bridged(mosquitto.port, forwards="a/#,b/#", forward_mountpoint="edge/${node}/",
                    subscription__1__topic="cmd/#", subscription__1__qos="2",
                    receive_mountpoint="remote/")
        bridge_state(b)
        remote = PahoClient(mosquitto.port, "remote-app")
        local = PahoClient(b.mqtt_port, "local-app")
        try:
            remote.subscribe("edge/#", 2)
            local.subscribe("remote/#", 2)
            local.publish("a/1", b"up", qos=2)
            local.publish("c/1", b"not forwarded", qos=1)
            local.publish("b/2", b"retained", qos=1, retain=True)
            got = sorted((m.topic, m.payload, m.qos) for m in (remote.get(), remote.get()))
            assert got == [("edge/%s/a/1" % NODE, b"up", 2), ("edge/%s/b/2" % NODE, b"retained", 1)]
            late = PahoClient(mosquitto.port, "late")   # the retain flag went with it
            try:
                late.subscribe("edge/+/b/2", 1)
                m = late.get()
                assert (m.payload, m.retain) == (b"retained", True)
            finally:
                late.close()
            remote.publish("cmd/reboot", b"now", qos=2)
            m = local.get()
            assert (m.topic, m.payload, m.qos) == ("remote/cmd/reboot", b"now", 2)
            info = b.bridges["up"].info()
            assert (info["forwarded"], info["received"], info["queued"]) == (2, 1, 0)
            remote.expect_nothing()
        finally:
            remote.close()
            local.close()

    def test_qos_1_and_2_wait_for_a_remote_restart_in_order(self, tmp_path, bridged):
        """The remote (another emqx_lite process, with a data directory) goes
        down; what is published meanwhile waits and arrives once, in order."""
        remote = _CliBroker("--mqtt-port", "0", "--http-port", "-1", "--dashboard-port", "-1",
                            "--data-dir", str(tmp_path / "remote"))
        port = remote.ports["mqtt:tcp"]
        sub = PahoClient(port, "far-sub", clean_session=False)
        sub.subscribe("edge/#", 2)
        sub.close()
        b = bridged(port, forwards="t/#", forward_mountpoint="edge/")
        bridge_state(b)
        remote.stop()
        bridge_state(b, "disconnected")
        for n in range(20):
            b.publish("t/%d" % n, b"%d" % n, qos=1 + n % 2)
        info = b.bridges["up"].info()
        assert info["queued"] == 20 and info["last_error"], info
        remote = _CliBroker("--mqtt-port", str(port), "--http-port", "-1", "--dashboard-port",
                            "-1", "--data-dir", str(tmp_path / "remote"))
        try:
            bridge_state(b)
            assert wait_until(lambda: b.bridges["up"].info()["queued"] == 0, timeout=10)
            sub = PahoClient(port, "far-sub", clean_session=False)
            try:
                got = [sub.get() for _ in range(20)]
                for qos in (1, 2):   # in order per QoS (paho hands a QoS 2 one over at PUBREL)
                    assert [m.payload for m in got if m.qos == qos] == [
                        b"%d" % n for n in range(20) if 1 + n % 2 == qos]
                sub.expect_nothing()   # no duplicates
            finally:
                sub.close()
        finally:
            remote.stop()

    def test_the_queue_bound_drops_the_oldest(self, bridged, caplog):
        port = free_port()   # nothing listens there yet
        b = bridged(port, forwards="q/#", queue__max_total_size="2KB")
        bridge_state(b, "disconnected")
        with caplog.at_level("WARNING", logger="emqx_lite"):
            for n in range(40):
                b.publish("q/x", b"%02d" % n + b"." * 98, qos=1)
        info = b.bridges["up"].info()
        assert info["queued_bytes"] <= 2048 and info["dropped"] == 40 - info["queued"] > 0
        assert len([r for r in caplog.records if "queue is full" in r.getMessage()]) == 1
        b.publish("q/zero", b"qos 0 while down", qos=0)
        assert b.bridges["up"].info()["dropped"] == info["dropped"] + 1
        from prometheus_client.parser import text_string_to_metric_families
        text = Api(b.http_port).request("GET", "prometheus/stats")[2].decode()
        samples = {f.name: f.samples[0] for f in text_string_to_metric_families(text)
                   if f.name.startswith("emqx_bridge_")}
        assert samples["emqx_bridge_dropped_overflow"].labels == {"node": NODE, "bridge": "up"}
        assert samples["emqx_bridge_dropped_overflow"].value == info["dropped"]
        assert samples["emqx_bridge_dropped_qos0"].value == 1
        assert samples["emqx_bridge_queued"].value == info["queued"]
        kept = info["queued"]
        with emqx_lite.Broker(HOST, mqtt_port=port, http_port=None) as remote:
            with remote.capture("q/#") as arrived:
                bridge_state(b)
                msgs = arrived.wait(kept)
                assert [m.payload[:2] for m in msgs] == [b"%02d" % n for n in range(40 - kept, 40)]

    def test_a_tls_remote(self, pki, bridged):
        with emqx_lite.Broker(HOST, mqtt_port=None, http_port=None, ssl_port=0,
                              certfile=pki["server.pem"], keyfile=pki["server.key"]) as remote:
            b = bridged(remote.ssl_port, forwards="s/#", ssl="on", cacertfile=pki["ca.pem"],
                        tls_versions="tlsv1.2,tlsv1.3")
            bridge_state(b)
            with remote.capture("s/#") as arrived:
                b.publish("s/1", b"over TLS", qos=1)
                assert arrived.wait()[0].payload == b"over TLS"
            assert remote.clients()[0]["client_id"] == "bridge_up"

    def test_a_remote_with_an_unknown_certificate_is_an_error_not_a_crash(self, pki, bridged):
        with emqx_lite.Broker(HOST, mqtt_port=None, http_port=None, ssl_port=0,
                              certfile=pki["server.pem"], keyfile=pki["server.key"]) as remote:
            b = bridged(remote.ssl_port, forwards="s/#", ssl="on")   # no CA: not trusted
            assert wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in str(
                b.bridges["up"].info()["last_error"]), timeout=10)

    @pytest.mark.parametrize("options", [
        {"proto_ver": "mqttv4"},                          # the bridge bit: the remote's No Local
        {"proto_ver": "mqttv4", "bridge_mode": "off"},    # our own marking
        {"proto_ver": "mqttv5"},                          # No Local
    ], ids=["bridge-bit", "marking", "mqttv5"])
    def test_no_loop_when_forwards_and_subscriptions_overlap(self, bridged, options):
        with emqx_lite.Broker(HOST, mqtt_port=0, http_port=None) as remote:
            b = bridged(remote.mqtt_port, forwards="loop/#", subscription__1__topic="loop/#",
                        subscription__1__qos="1", **options)
            bridge_state(b)
            remote.wait_for_subscription("bridge_up", "loop/#")
            local = PahoClient(b.mqtt_port, "local-sub")
            far = PahoClient(remote.mqtt_port, "far-sub")
            try:
                local.subscribe("loop/#", 1)
                far.subscribe("loop/#", 1)
                local.publish("loop/here", b"from here", qos=1)
                far.publish("loop/there", b"from there", qos=1)
                assert sorted(m.payload for m in (local.get(), local.get())) == [
                    b"from here", b"from there"]
                assert sorted(m.payload for m in (far.get(), far.get())) == [
                    b"from here", b"from there"]
                local.publish("loop/end", b"end", qos=1)   # after the echoes would be
                assert local.get().payload == b"end" and far.get().payload == b"end"
                local.expect_nothing()
                far.expect_nothing()
                info = b.bridges["up"].info()
                assert (info["forwarded"], info["received"]) == (2, 1), info
            finally:
                local.close()
                far.close()

    def test_two_emqx_lite_processes_bridged_both_ways(self, bridged):
        """The remote is `python emqx_lite.py`: its bridge-bit client gets No Local."""
        remote = _CliBroker("--mqtt-port", "0", "--http-port", "-1", "--dashboard-port", "-1",
                            "--data-dir", "")
        port = remote.ports["mqtt:tcp"]
        try:
            b = bridged(port, forwards="x/#", subscription__1__topic="x/#")
            bridge_state(b)
            far = PahoClient(port, "far")
            local = PahoClient(b.mqtt_port, "local")
            try:
                far.subscribe("x/#", 1)
                local.subscribe("x/#", 1)
                local.publish("x/out", b"out", qos=1)
                far.publish("x/in", b"in", qos=1)
                assert sorted(m.payload for m in (far.get(), far.get())) == [b"in", b"out"]
                assert sorted(m.payload for m in (local.get(), local.get())) == [b"in", b"out"]
                local.expect_nothing()
                far.expect_nothing()
            finally:
                far.close()
                local.close()
        finally:
            remote.stop()

    def test_bad_credentials_show_the_connack_error_without_a_crash_loop(self, bridged):
        with emqx_lite.Broker(HOST, mqtt_port=0, http_port=None, allow_anonymous=False,
                              auth_username={"edge": "right"}) as remote:
            remote.set_plugin("emqx_auth_username", True)
            b = bridged(remote.mqtt_port, forwards="a/#", username="edge", password="wrong",
                        reconnect_interval="30s")
            info = bridge_state(b, "disconnected")
            assert "CONNACK 4" in info["last_error"] and "bad user name" in info["last_error"]
            connects = remote.metrics()["packets/connect"]
            assert connects <= 3   # backing off, not hammering the remote
            status = Api(b.http_port).result("GET", "nodes/%s/bridges" % NODE)
            assert status[0]["state"] == "disconnected" and "CONNACK 4" in status[0]["last_error"]

    def test_in_flight_at_a_disconnect_goes_again_and_qos2_once(self, bridged):
        """The acks of a QoS 1 and a QoS 2 message are lost and the connection
        dies: after the reconnect (the remote kept the session) the QoS 1 one
        comes again with DUP, the QoS 2 one goes on with PUBREL, arrives once."""
        with emqx_lite.Broker(HOST, mqtt_port=0, http_port=None) as remote:
            b = bridged(remote.mqtt_port, forwards="f/#", clean_start="off")
            bridge_state(b)
            far = PahoClient(remote.mqtt_port, "far")
            try:
                far.subscribe("f/#", 2)
                remote.faults.drop_next("bridge_up", "PUBCOMP")
                remote.faults.drop_next("bridge_up", "PUBACK")
                b.publish("f/2", b"two", qos=2)
                b.publish("f/1", b"one", qos=1)
                assert sorted(far.get().payload for _ in range(2)) == [b"one", b"two"]
                assert wait_until(lambda: b.bridges["up"].info()["inflight"] == 2)
                remote.faults.disconnect("bridge_up")
                assert wait_until(lambda: b.bridges["up"].info()["queued"] == 0, timeout=10)
                again = []
                while True:
                    try:
                        again.append(far.get(timeout=0.5).payload)
                    except queue.Empty:
                        break
                assert b"two" not in again and set(again) <= {b"one"}
            finally:
                far.close()

    def test_what_a_kept_session_sends_with_the_connack_arrives(self, bridged):
        with emqx_lite.Broker(HOST, mqtt_port=0, http_port=None) as remote:
            b = bridged(remote.mqtt_port, clean_start="off", subscription__1__topic="cmd/#",
                        subscription__1__qos="1")
            bridge_state(b)
            remote.wait_for_subscription("bridge_up", "cmd/#")
            b.bridges["up"].stop()
            for n in range(5):   # queued at the remote for the bridge's session
                remote.publish("cmd/%d" % n, b"%d" % n, qos=1)
            with b.capture("cmd/#") as arrived:
                b.bridges["up"].start()
                assert [m.payload for m in arrived.wait(5)] == [b"%d" % n for n in range(5)]
            assert b.bridges["up"].info()["last_error"] is None

    def test_status_start_stop_and_sys_topic(self, bridged):
        with emqx_lite.Broker(HOST, mqtt_port=0, http_port=None) as remote:
            b = bridged(remote.mqtt_port, forwards="a/#")
            bridge_state(b)
            api = Api(b.http_port)
            (row,) = api.result("GET", "nodes/%s/bridges" % NODE)
            assert {k: row[k] for k in ("name", "state", "remote", "proto_ver", "clientid")} == {
                "name": "up", "state": "connected", "remote": "127.0.0.1:%d" % remote.mqtt_port,
                "proto_ver": "mqttv4", "clientid": "bridge_up"}
            status = "$SYS/brokers/%s/bridges/up/status" % NODE
            sys_sub = PahoClient(b.mqtt_port, "watcher")
            try:
                sys_sub.subscribe(status, 0)
                assert sys_sub.get().payload == b"connected"   # retained
                assert api.result("POST", "nodes/%s/bridges/up/stop" % NODE) == []
                assert sys_sub.get().payload == b"stopped"
                assert remote.wait_for_client("bridge_up", connected=False) is None
                assert api.json("POST", "nodes/%s/bridges/up/stop" % NODE)["code"] == 111
                assert api.result("POST", "nodes/%s/bridges/up/start" % NODE) == []
                assert [sys_sub.get().payload for _ in range(2)] == [b"connecting", b"connected"]
                assert api.json("POST", "nodes/%s/bridges/nope/start" % NODE)["code"] == 102
                # the plugin starts and stops every bridge
                b.set_plugin("emqx_bridge_mqtt", False)
                assert b.bridges["up"].state == "stopped"
                b.set_plugin("emqx_bridge_mqtt", True)
                bridge_state(b)
            finally:
                sys_sub.close()

    def test_the_queue_survives_a_restart_with_replayq(self, tmp_path):
        port = free_port()
        kw = dict(mqtt_port=0, http_port=None, data_dir=str(tmp_path / "data"), bridges={
            "up": {"address": "127.0.0.1:%d" % port, "forwards": "d/#",
                   "queue.replayq_dir": "on", "reconnect_interval": "1s"}})
        with emqx_lite.Broker(HOST, **kw) as b:
            for n in range(5):
                b.publish("d/%d" % n, b"%d" % n, qos=1)
            assert b.bridges["up"].info()["queued"] == 5
        with emqx_lite.Broker(HOST, **kw) as b:
            assert b.bridges["up"].info()["queued"] == 5
            with emqx_lite.Broker(HOST, mqtt_port=port, http_port=None) as remote:
                with remote.capture("d/#") as arrived:
                    assert [m.payload for m in arrived.wait(5)] == [b"%d" % n for n in range(5)]
            assert wait_until(lambda: b.bridges["up"].info()["queued"] == 0)

    def test_a_remote_that_refuses_the_bridge_bit(self, bridged):
        """A remote that answers the bridge bit with CONNACK 1 gets a plain
        3.1.1 CONNECT next, and the bridge marks what it forwards itself."""
        server = socket.socket()
        server.bind((HOST, 0))
        server.listen(8)
        server.settimeout(0.1)
        levels, conns, done = [], [], threading.Event()

        def serve():
            while not done.is_set():
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    continue
                conn.settimeout(TIMEOUT)
                conns.append(conn)
                data = conn.recv(1024)
                level = data[8]   # after the fixed header and "MQTT"
                levels.append(level)
                conn.sendall(bytes((0x20, 2, 0, 1 if level & 0x80 else 0)))

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            b = bridged(server.getsockname()[1], forwards="a/#")
            bridge_state(b)
            assert levels[:2] == [0x84, 0x04]
            assert "bridge bit" in b.bridges["up"].info()["last_error"]
        finally:
            done.set()
            thread.join()
            server.close()
            for conn in conns:
                conn.close()


class TestBridgeConfig:
    """bridge.mqtt.<name>.* keys in the configuration file."""

    def test_keys_become_a_bridge(self):
        settings = settings_of("bridge.mqtt.aws.address = 127.0.0.1:1883\n"
                               "bridge.mqtt.aws.proto_ver = mqttv5\n"
                               "bridge.mqtt.aws.forwards = a/#, b/#\n"
                               "bridge.mqtt.aws.subscription.1.topic = cmd/#\n"
                               "bridge.mqtt.aws.subscription.1.qos = 1\n"
                               "bridge.mqtt.aws.keepalive = 30s\n")
        config = emqx_lite.bridge_config("aws", settings["bridges"]["aws"])
        assert config["address"] == ("127.0.0.1", 1883) and config["proto_ver"] == 5
        assert config["forwards"] == ("a/#", "b/#") and config["keepalive"] == 30.0
        assert config["subscriptions"] == (("cmd/#", 1),) and config["clientid"] == "bridge_aws"
        text = render_config(dict(emqx_lite.DEFAULTS, **settings))
        assert config_settings(parse_conf(text))["bridges"] == settings["bridges"]

    @pytest.mark.parametrize("text, words", [
        ("bridge.mqtt.x.address = 127.0.0.1:1883\nbridge.mqtt.x.nope = 1\n",
         ["emqx_lite.conf:2", "bridge.mqtt.x.nope", "unknown bridge option"]),
        ("bridge.mqtt.x.forwards = a/#\n", ["emqx_lite.conf:1", "address: missing"]),
        ("bridge.mqtt.x.address = 1883\n", ["emqx_lite.conf:1", "expected host:port"]),
        ("bridge.mqtt.x.address = h:1\nbridge.mqtt.x.proto_ver = mqttv9\n",
         ["emqx_lite.conf:2", "mqttv3, mqttv4 or mqttv5"]),
        ("bridge.mqtt.x.address = h:1\nbridge.mqtt.x.forwards = a/#/b\n",
         ["emqx_lite.conf:1", "not a topic filter"]),
        ("bridge.mqtt.x.address = h:1\nbridge.mqtt.x.max_inflight = 0\n",
         ["bridge.mqtt.x.max_inflight", "1 to 65535"]),
        ("bridge.mqtt.x.address = h:1\nbridge.mqtt.x.forward_mountpoint = a/+/\n",
         ["forward_mountpoint", "without + or #"]),
        ("bridge.mqtt.x.address = h:1\nbridge.mqtt.x.tls_versions = tlsv1.0\n",
         ["emqx_lite.conf:2", "tlsv1.2,tlsv1.3"]),
    ])
    def test_bad_keys_name_the_file_line_and_key(self, text, words):
        message = config_error(text)
        assert all(w in message for w in words), message

    def test_broker_keyword(self):
        with pytest.raises(ValueError, match="bridge.mqtt.b.address"):
            emqx_lite.Broker(HOST, bridges={"b": {"forwards": "a/#"}})


class TestBridgeBit:
    """A 3.x CONNECT with the bridge bit (protocol level 0x84), as mosquitto's
    and EMQ X's bridges send it: its own messages do not come back to it, and
    retained flags are kept as published."""

    def test_no_local_and_retain_as_published_for_a_bridge_client(self, broker):
        bridge = RawClient(broker.mqtt_port)
        other = RawClient.connected(broker.mqtt_port, "other")
        try:
            bridge.send(gen_connect("their-bridge", proto=0x84))
            ptype, _, body = bridge.read_packet()
            assert (ptype, body[1]) == (CONNACK, 0)
            assert bridge.subscribe([("t/#", 1)]) == [1]
            bridge.send(gen_publish("t/mine", b"mine", qos=0))
            other.send(gen_publish("t/theirs", b"theirs", qos=0, retain=True))
            m = bridge.read_publish()
            assert (m["topic"], m["payload"], m["retain"]) == ("t/theirs", b"theirs", True)
            bridge.expect_nothing()
        finally:
            bridge.close()
            other.close()


@browser_test
def test_dashboard_bridges_page_shows_and_stops_a_bridge(browser, tmp_path):
    """The bridge, its state and counters on the Bridges page; its Stop button
    stops it (the API agrees) and Start starts it again."""
    with emqx_lite.Broker(HOST, mqtt_port=0, http_port=None) as remote:
        with emqx_lite.Broker(HOST, mqtt_port=0, http_port=None, dashboard_port=0, bridges={
                "cloud": {"address": "127.0.0.1:%d" % remote.mqtt_port, "forwards": "a/#"}},
                **FAST_HASH) as b:
            driver = browser
            driver.set_window_size(1280, 900)   # as the driver fixture leaves it
            driver.get("http://127.0.0.1:%d/" % b.dashboard_port)
            try:
                log_in(driver)
                go(driver, "bridges", "Bridges")
                wait(driver, EC.text_to_be_present_in_element((By.ID, "bridges-table"), "connected"))
                click(driver, by_label("Stop bridge cloud"))
                wait(driver, EC.presence_of_element_located(by_label("Start bridge cloud")))
                assert b.bridges["cloud"].state == "stopped"
                click(driver, by_label("Start bridge cloud"))
                wait(driver, EC.text_to_be_present_in_element((By.ID, "bridges-table"), "connected"))
            except BaseException as exc:
                exc.add_note(_save_screenshot(driver, "bridges_page"))
                raise
            finally:
                driver.get("about:blank")


@browser_test
def test_dashboard_plugin_settings_add_and_remove_a_table_entry(driver, dashboard):
    """The emqx_auth_username table from its settings dialog: a new entry by
    its template row, then its Remove box (a PUT replaces the whole table)."""
    table = dashboard.broker.auth_username
    log_in(driver)
    go(driver, "plugins", "Plugins")

    def open_settings():
        click(driver, by_label("Settings of emqx_auth_username"))
        wait(driver, EC.visibility_of_element_located((By.ID, "dialog")))
    open_settings()
    name = wait(driver, EC.visibility_of_element_located(
        (By.CSS_SELECTOR, "#dialog input[id^=cfg-name-]")))
    name.send_keys("dave")
    password = driver.find_element(By.ID, name.get_attribute("id").replace("cfg-name-", "cfg-"))
    password.send_keys("dave-pw")
    driver.find_element(By.ID, "dialog-ok").click()
    wait(driver, EC.text_to_be_present_in_element((By.ID, "plugins-status"), "Saved"))
    assert table.check("dave", "dave-pw") is True
    open_settings()
    click(driver, by_label("Remove auth.username.dave"))
    driver.find_element(By.ID, "dialog-ok").click()
    wait(driver, EC.invisibility_of_element_located((By.ID, "dialog")))
    assert wait_until(lambda: "dave" not in table)
