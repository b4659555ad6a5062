//! Configuration: proxy.toml as written ([`file`]), resolved and validated ([`settings`]),
//! and the configuration in force, swapped by SIGHUP (`live`).

pub(crate) mod address;
pub(crate) mod defaults;
pub mod file;
pub(crate) mod live;
pub(crate) mod resolve;
pub(crate) mod route;
pub mod settings;
pub(crate) mod store;
pub(crate) mod tls;
pub(crate) mod trusted;
