//! Everything that reads or writes the client's Pingora session.

pub(crate) mod admission;
pub(crate) mod body;
pub(crate) mod body_budget;
pub(crate) mod client_addr;
pub(crate) mod first_bytes;
pub(crate) mod forward;
pub(crate) mod framing;
pub(crate) mod key_inputs;
pub(crate) mod normalize;
pub(crate) mod pass_through;
pub(crate) mod problem;
pub(crate) mod proxy;
pub(crate) mod proxy_protocol;
pub(crate) mod reply;
pub(crate) mod tls;
