//! The Accept-Encoding reader used before replaying an encoded body.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<u8>, Vec<u8>)| {
    idem::testing::fuzz_props::accept_encoding(&input.0, &input.1);
});
