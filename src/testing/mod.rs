//! Test-only modules: the coordinator's model test and properties shared with cargo-fuzz.

#[cfg(test)]
mod coordinator_model;
#[cfg(any(test, fuzzing))]
pub mod fuzz_props;
