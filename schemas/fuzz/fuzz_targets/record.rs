//! Any bytes a stream record can hold: the packed format and the IoT rule's
//! JSON. The owning and the in-place decoder must agree on every input, and
//! a record that decodes must encode to bytes that decode to it again.
#![no_main]

use schemas::{RecordView, StreamRecord, decode_record, decode_record_view};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let owned = decode_record(data);
    let view = decode_record_view(data);
    let record = match (owned, view) {
        (Ok(owned), Ok(view)) => {
            let from_view = match view {
                RecordView::Readings(r) => StreamRecord::Readings(r.to_owned_record()),
                RecordView::Rejected(m) => StreamRecord::Rejected(m),
            };
            assert_eq!(owned, from_view, "the two decoders disagree");
            owned
        }
        (Err(a), Err(b)) => {
            assert_eq!(a.reason, b.reason, "the two decoders refuse differently");
            return;
        }
        (a, b) => panic!("one decoder accepts, the other refuses: {a:?} / {b:?}"),
    };
    let again = record.encode();
    assert_eq!(
        decode_record(&again).as_ref(),
        Ok(&record),
        "re-encoding changes the record"
    );
    if let StreamRecord::Readings(r) = &record {
        // The readings-only encoder writes the same bytes as the enum's.
        assert_eq!(
            r.encode(),
            again,
            "PackedRecord and StreamRecord encode apart"
        );
    }
});
