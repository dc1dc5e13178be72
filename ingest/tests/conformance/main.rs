//! Conformance with independent MQTT clients: Eclipse Paho (Python), MQTT.js
//! (Node), Mosquitto's command-line tools and rumqttc, each over MQTT 3.1.1
//! and 5, QoS 0 and 1, plain TCP and TLS, against the endpoint on port 0
//! appending to a real embedded log (fsync on) in a temp dir. Also the
//! refusals each client must understand, client certificates, and the live
//! tap seen by `mosquitto_sub`.
//!
//! The tools are found on PATH and in `ingest/tests/clients/node_modules`;
//! a missing one fails its test with the command that installs it.

mod clients;
mod harness;
mod tap;
