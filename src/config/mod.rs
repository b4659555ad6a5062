//! Configuration: proxy.toml as written ([`file`]), resolved and validated ([`settings`]),
//! and the configuration in force, swapped by SIGHUP ([`live`]).

pub mod defaults;
pub mod file;
pub mod live;
pub mod resolve;
pub mod route;
pub mod settings;
