//! Configuration: proxy.toml as written ([`file`]), resolved and validated ([`settings`]),
//! and the configuration in force, swapped by SIGHUP ([`live`]).

pub mod file;
pub mod live;
pub mod route;
pub mod settings;
