//! idem configs for tests. Built as a TOML table rather than by string
//! pasting, so a test can override any key (TOML forbids redefining a table,
//! which is what appending `[upstream]` text would do).

use std::fmt;
use std::net::SocketAddr;

/// A minimal valid config: every listener on an ephemeral port (idem
/// reports the real ports on stdout), memory store, keyed dedup.
pub fn config_for(backend: SocketAddr) -> String {
    Config::new(backend).to_string()
}

fn base_toml(backends: &[SocketAddr]) -> String {
    let list = backends
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"[server]
listen = "127.0.0.1:0"
threads = 2
grace_period = "30s"

[upstream]
backends = [{list}]
connect_timeout = "1s"
read_timeout = "10s"
total_timeout = "15s"

[metrics]
listen = "127.0.0.1:0"

[store]
kind = "memory"

[dedup]
mode = "keyed"
"#
    )
}

#[derive(Debug, Clone)]
pub struct Config {
    table: toml::Table,
}

impl Config {
    pub fn new(backend: SocketAddr) -> Config {
        Config::with_backends(&[backend])
    }

    pub fn with_backends(backends: &[SocketAddr]) -> Config {
        let table = base_toml(backends)
            .parse::<toml::Table>()
            .expect("base config is valid TOML");
        Config { table }
    }

    /// Sets a dotted key, creating tables on the way:
    /// `.set("upstream.read_timeout", "1s")`, `.set("server.threads", 4)`.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Config {
        set_dotted(&mut self.table, key, value.into());
        self
    }

    /// Removes a dotted key (to test defaults or a missing required key).
    pub fn remove(mut self, key: &str) -> Config {
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().expect("non-empty key");
        let mut table = &mut self.table;
        for part in parts {
            match table.get_mut(part) {
                Some(toml::Value::Table(t)) => table = t,
                _ => return self,
            }
        }
        table.remove(last);
        self
    }

    /// Appends a `[[route]]` table.
    pub fn route(mut self, route: Route) -> Config {
        let routes = self
            .table
            .entry("route")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        match routes {
            toml::Value::Array(list) => list.push(toml::Value::Table(route.table)),
            other => panic!("config: `route` is not an array: {other:?}"),
        }
        self
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = toml::to_string(&self.table).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

/// One `[[route]]`: `Route::new("api", "/api", "keyed").set("ttl", "2s")`.
#[derive(Debug, Clone)]
pub struct Route {
    table: toml::Table,
}

impl Route {
    pub fn new(name: &str, path_prefix: &str, mode: &str) -> Route {
        let mut table = toml::Table::new();
        table.insert("name".into(), name.into());
        table.insert("path_prefix".into(), path_prefix.into());
        table.insert("mode".into(), mode.into());
        Route { table }
    }

    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Route {
        set_dotted(&mut self.table, key, value.into());
        self
    }
}

fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().expect("non-empty key");
    let mut table = table;
    for part in parts {
        let entry = table
            .entry(part)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            other => panic!("config: `{part}` in `{key}` is not a table: {other:?}"),
        };
    }
    table.insert(last.to_owned(), value);
}
