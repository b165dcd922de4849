//! The control socket's request parser: never panics, and accepts only the
//! four commands.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cmd) = rpcd::control::parse_request(data) {
        let text = std::str::from_utf8(data).unwrap();
        assert!(text.contains("status") || text.contains("stop") || text.contains("reload") || text.contains("upgrade") || text.contains('\\'), "{cmd:?}");
    }
});
