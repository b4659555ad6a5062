//! The `Idempotency-Key` parser on up to three raw header values.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|values: Vec<Vec<u8>>| {
    let refs: Vec<&[u8]> = values.iter().take(3).map(Vec::as_slice).collect();
    idem::testing::fuzz_props::key_header(&refs);
});
