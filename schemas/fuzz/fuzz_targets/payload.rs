//! Any bytes a device can publish. A payload that decodes must survive the
//! trip the endpoint gives it: packed into a stream record, it decodes to the
//! same readings, in place and owned alike.
#![no_main]

use schemas::{
    PackedRecord, RecordView, StreamRecord, decode_payload, decode_record, decode_record_view,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(readings) = decode_payload(data) else {
        return;
    };
    let packed = PackedRecord {
        device_id: "dev-1".into(),
        fleet: "fleet".into(),
        received_at: 1_764_240_000_000,
        readings,
    };
    let bytes = packed.encode();
    match decode_record(&bytes) {
        Ok(StreamRecord::Readings(back)) => assert_eq!(back, packed),
        other => panic!("an accepted payload packs into {other:?}"),
    }
    match decode_record_view(&bytes) {
        Ok(RecordView::Readings(view)) => assert_eq!(view.to_owned_record(), packed),
        other => panic!("an accepted payload packs into a view {other:?}"),
    }
});
