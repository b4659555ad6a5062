//! Scope injectivity: authority (case-insensitive) and scope header values.
#![no_main]
use libfuzzer_sys::fuzz_target;

type Side = (Vec<u8>, Vec<Vec<Vec<u8>>>);

fuzz_target!(|input: (Side, Side, u8)| {
    let ((auth_a, hs_a), (auth_b, hs_b), n) = input;
    idem::testing::fuzz_props::scope_pair((&auth_a, &hs_a), (&auth_b, &hs_b));
    // The same request with one value moved to the next header.
    let mut moved = hs_a.clone();
    if moved.len() >= 2 {
        let i = n as usize % (moved.len() - 1);
        if let Some(v) = moved[i].pop() {
            moved[i + 1].insert(0, v);
        }
    }
    idem::testing::fuzz_props::scope_pair((&auth_a, &hs_a), (&auth_a.to_ascii_uppercase(), &moved));
});
