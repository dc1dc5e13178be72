//! The `iotpipe` command: the whole local pipeline in one process.
//!
//! - `config`: every setting, from a TOML file and flags.
//! - `backends`: the embedded log and SQLite, or Kinesis and DynamoDB, or a
//!   NATS JetStream stream.
//! - `up`: starts the endpoint, the stream, the processors, the store and the
//!   API, and stops them front to back; or the stages of one role
//!   (`ingest`, `process`, `api`), for processes that share a stream and a
//!   store.
//! - `leased`: the processors on a stream shared with other processes
//!   (Kinesis, NATS JetStream), by shard leases.
//! - `cost`: the monthly AWS bill of a load profile (`iotpipe cost`).
//!
//! The binary (`src/main.rs`) only parses flags and calls [`up::start`]; tests
//! call it the same way with port 0.

pub mod backends;
pub mod config;
pub mod cost;
pub mod leased;
pub mod up;

pub use config::Config;
pub use up::{Hooks, Pipeline, Roles, Running, start, start_roles, start_with};
