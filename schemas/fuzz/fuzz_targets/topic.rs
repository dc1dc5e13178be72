//! Any PUBLISH topic. A topic that parses names exactly one fleet and device,
//! so formatting them gives the topic back.
#![no_main]

use schemas::Topic;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(topic) = Topic::parse(text) {
        assert_eq!(Topic::format(topic.fleet, topic.device_id), text);
        assert!(Topic::parse(&Topic::format(topic.fleet, topic.device_id)).is_ok());
    }
});
