//! Any bytes a client can send: framing, both MQTT decoders and the session.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ingest::fuzzing::feed(data);
});
