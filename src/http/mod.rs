//! Everything that reads or writes the client's Pingora session.

pub mod admission;
pub mod first_bytes;
pub mod problem;
pub mod proxy;
pub mod reply;
