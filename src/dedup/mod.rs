//! Coalescing, in plain Rust over the stores and the upstream client: one leader per key
//! ([`coordinator`]), its detached call ([`leader`]), and shadow routes ([`shadow`]).

pub(crate) mod coordinator;
pub(crate) mod leader;
pub(crate) mod shadow;
