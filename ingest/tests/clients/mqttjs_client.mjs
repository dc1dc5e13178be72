// Drives the endpoint with MQTT.js for ingest's conformance tests.
//
// Usage: node mqttjs_client.mjs '<json>' where json is
//   {port, version: 4|5, qos: 0|1, tls_ca, cert, key, username, password,
//    client_id, publishes: [{topic, payload}]}
// Prints one JSON line: {connack, error, acks, closed}; acks holds, per
// publish, the PUBACK reason code (0 for success or QoS 0), or null when no
// acknowledgement came before the connection closed or 3 s passed.
import fs from "node:fs";
import mqtt from "mqtt";

const spec = JSON.parse(process.argv[2]);
const tls = spec.tls_ca != null;
const options = {
  host: "127.0.0.1",
  port: spec.port,
  protocol: tls ? "mqtts" : "mqtt",
  protocolVersion: spec.version,
  clientId: spec.client_id,
  clean: true,
  reconnectPeriod: 0,
  connectTimeout: 5000,
  keepalive: 30,
};
if (spec.username != null) options.username = spec.username;
if (spec.password != null) options.password = spec.password;
if (tls) {
  options.ca = fs.readFileSync(spec.tls_ca);
  options.servername = "localhost";
  if (spec.cert != null) {
    options.cert = fs.readFileSync(spec.cert);
    options.key = fs.readFileSync(spec.key);
  }
}

const result = { connack: null, error: null, acks: [], closed: false };
// Printed however the run ends: a refused CONNECT ends it without a callback.
process.on("exit", () => console.log(JSON.stringify(result)));
const done = () => process.exit(0);
// Resolves the publish waiting for its acknowledgement, if any.
let settle = null;

const client = mqtt.connect(options);
client.on("close", () => {
  result.closed = true;
  if (settle) settle(null);
});
client.on("error", (e) => {
  result.error = String(e.message ?? e);
  if (e.code !== undefined && result.connack === null) result.connack = e.code;
  client.end(true, done);
});
client.on("connect", async (connack) => {
  result.connack = connack.returnCode ?? connack.reasonCode ?? 0;
  for (const p of spec.publishes) {
    if (result.closed) {
      result.acks.push(null);
      continue;
    }
    const ack = await new Promise((resolve) => {
      // A pending timer would keep the process alive after a close.
      const timer = setTimeout(() => resolve(null), 3000);
      settle = (v) => {
        clearTimeout(timer);
        resolve(v);
      };
      if (result.closed) settle(null);
      client.publish(p.topic, p.payload, { qos: spec.qos }, (err, packet) => {
        clearTimeout(timer);
        if (err) {
          // MQTT 5 refusals arrive as errors carrying the reason code.
          resolve(err.code ?? null);
        } else {
          resolve(packet?.reasonCode ?? 0);
        }
      });
    });
    settle = null;
    result.acks.push(ack);
  }
  client.end(false, done);
});
