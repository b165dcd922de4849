//! The config parser: any text gives a config or an error that names a
//! place, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match rpcd::config::Config::parse(text, "fuzz.toml") {
            Ok(c) => {
                // What parses also round-trips through the worker setup.
                let j = rpcd::serde_json_reexport::to_string(&c).unwrap();
                let _: rpcd::config::Config = rpcd::serde_json_reexport::from_str(&j).unwrap();
            }
            Err(e) => assert!(e.0.starts_with("fuzz.toml"), "{e}"),
        }
    }
});
