//! `wardroom::protocol::parse_client_frame` on arbitrary text: it never
//! panics, and every refusal becomes a valid JSON `error` frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wardroom::protocol::parse_client_frame;
use wardroom::ws::payload_of;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(error) = parse_client_frame(text) {
        let frame = error.to_frame();
        let json: serde_json::Value = serde_json::from_slice(payload_of(&frame)).expect("an error frame is valid JSON");
        assert_eq!(json["type"], "error", "{json}");
        assert!(json["code"].is_string(), "{json}");
    }
});
