//! The proxy.toml loader on any UTF-8 text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    idem::testing::fuzz_props::config_text(text);
});
