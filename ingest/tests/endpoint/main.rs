//! The endpoint over real TCP (and TLS) on port 0, driven by rumqttc's 3.1.1 and 5
//! clients (and a raw client for what they refuse to send), against the
//! in-memory producer.

mod auth;
mod common;
mod durability;
mod presence;
mod publish;
mod refusals;
mod sessions;
mod tap;
mod tls;
