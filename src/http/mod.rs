//! Everything that reads or writes the client's Pingora session.

pub(crate) mod admission;
pub(crate) mod body;
pub(crate) mod first_bytes;
pub(crate) mod forward;
pub(crate) mod key_inputs;
pub(crate) mod pass_through;
pub(crate) mod problem;
pub(crate) mod proxy;
pub(crate) mod reply;
