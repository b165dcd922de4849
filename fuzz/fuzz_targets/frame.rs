//! The frame decoder and request handler, as a worker runs them on a byte
//! stream: every complete frame gets exactly one well-formed reply.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rpcd::protocol::{decode, handle, Decoded, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_frame_bytes: 4096, pi_max_terms: 10_000 };
    let mut at = 0;
    let mut out = Vec::new();
    loop {
        match decode(&data[at..], limits.max_frame_bytes) {
            Decoded::Frame(len) => {
                let before = out.len();
                handle(&data[at + 4..at + 4 + len], &limits, &mut out);
                // Exactly one frame, whose body is a JSON object with "out".
                let n = u32::from_le_bytes(out[before..before + 4].try_into().unwrap()) as usize;
                assert_eq!(before + 4 + n, out.len());
                let v: serde_json_check::Value = serde_json_check::from_slice(&out[before + 4..]).expect("reply is JSON");
                assert!(v.get("out").and_then(|o| o.as_str()).is_some());
                at += 4 + len;
            }
            Decoded::Need(_) | Decoded::TooLarge(_) => break,
        }
    }
});

mod serde_json_check {
    pub use rpcd::serde_json_reexport::*;
}
