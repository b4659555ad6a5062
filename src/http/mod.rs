//! Everything that reads or writes the client's Pingora session.

pub mod admission;
pub mod body;
pub mod first_bytes;
pub mod forward;
pub mod key_inputs;
pub mod problem;
pub mod proxy;
pub mod reply;
