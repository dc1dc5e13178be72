//! device-sim
