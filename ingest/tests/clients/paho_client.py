"""Drives the endpoint with Eclipse Paho (paho-mqtt 2) for ingest's
conformance tests.

Usage: python3 paho_client.py '<json>', the same spec as mqttjs_client.mjs:
  {port, version: 4|5, qos: 0|1, tls_ca, cert, key, username, password,
   client_id, publishes: [{topic, payload}]}
Prints one JSON line: {connack, error, acks, closed}; acks holds, per
publish, the PUBACK reason code (0 for success or QoS 0), or null when no
acknowledgement came before the connection closed or 3 s passed.
"""

import json
import ssl
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

spec = json.loads(sys.argv[1])
v5 = spec["version"] == 5
client = mqtt.Client(
    callback_api_version=CallbackAPIVersion.VERSION2,
    client_id=spec["client_id"],
    protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
)
if spec.get("username") is not None:
    client.username_pw_set(spec["username"], spec.get("password"))
if spec.get("tls_ca") is not None:
    client.tls_set(
        ca_certs=spec["tls_ca"],
        certfile=spec.get("cert"),
        keyfile=spec.get("key"),
        cert_reqs=ssl.CERT_REQUIRED,
    )

result = {"connack": None, "error": None, "acks": [], "closed": False}
connected = threading.Event()
closed = threading.Event()
acked = {}
ack_events = {}


def on_connect(client, userdata, flags, reason_code, properties):
    result["connack"] = reason_code.value
    connected.set()


def on_disconnect(client, userdata, flags, reason_code, properties):
    result["closed"] = True
    closed.set()
    connected.set()
    for e in ack_events.values():
        e.set()


def on_publish(client, userdata, mid, reason_code, properties):
    acked[mid] = reason_code.value
    ack_events.setdefault(mid, threading.Event()).set()


client.on_connect = on_connect
client.on_disconnect = on_disconnect
client.on_publish = on_publish
try:
    client.connect("127.0.0.1", spec["port"], keepalive=30)
except Exception as e:  # refused handshakes surface here
    result["error"] = str(e)
    print(json.dumps(result))
    sys.exit(0)
client.loop_start()
connected.wait(5)
if result["connack"] == 0 and not result["closed"]:
    for p in spec["publishes"]:
        if result["closed"]:
            result["acks"].append(None)
            continue
        info = client.publish(p["topic"], p["payload"], qos=spec["qos"])
        event = ack_events.setdefault(info.mid, threading.Event())
        if spec["qos"] == 0:
            info.wait_for_publish(3)
            result["acks"].append(0)
            continue
        event.wait(3)
        result["acks"].append(acked.get(info.mid))
    client.disconnect()
    closed.wait(3)
client.loop_stop()
print(json.dumps(result))
