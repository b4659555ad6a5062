//! `[store]` resolved: the bounds, and for `kind = "redis"` where Redis is (one node, a
//! Cluster, or the primary Sentinel names), how idem authenticates, the TLS material and the
//! key prefix.
//!
//! Files the section names (`password_file`, `tls_ca`, `tls_client_cert`, `tls_client_key`)
//! are read through [`Env`] and checked here, so `idem check` names a missing, unreadable or
//! malformed one at its line rather than the first connection failing at run time.
//!
//! Password precedence (one rule, stated in docs/configuration.md): `password_file`, else the
//! `IDEM_REDIS_PASSWORD` environment variable, else a password written in the URL. The first
//! two replace a URL's password on every node (never the sentinels', which authenticate with
//! their own URL only, as Sentinel clients usually do). A password written in a `url` or
//! `nodes` entry works but is a warning: the file is often readable by more people than the
//! secret should be.

use crate::config::defaults;
use crate::config::file::{RawStore, StoreKind};
use crate::config::resolve::{at, dur, invalid, or, size, Env, Invalid};
use crate::config::settings::{Password, PasswordFrom, Secret, StoreSettings, TlsMaterial};
use std::ops::Range;
use std::time::Duration;
use toml::Spanned;

/// The longest `key_prefix`: it is repeated in every key and message.
const MAX_PREFIX: usize = 64;

/// Resolves `[store]`; warnings (valid but unwise) go to `warnings`.
pub(crate) fn store(
    raw: &RawStore,
    env: &Env,
    warnings: &mut Vec<Invalid>,
) -> Result<StoreSettings, Invalid> {
    let max_entries = or(&raw.max_entries, defaults::MAX_ENTRIES);
    let max_bytes = size(&raw.max_bytes, defaults::MAX_BYTES);
    let kind = or(&raw.kind, StoreKind::Memory);
    let max_keys_per_scope = or(
        &raw.max_keys_per_scope,
        defaults::max_keys_per_scope(max_entries),
    );
    let mut store = StoreSettings {
        kind,
        max_entries,
        max_bytes,
        max_keys_per_scope,
        // One number by default: a deployment that narrows the scope quota narrows the
        // client quota with it.
        max_keys_per_client: or(&raw.max_keys_per_client, max_keys_per_scope),
        max_bytes_per_client: size(
            &raw.max_bytes_per_client,
            defaults::max_bytes_per_client(max_bytes),
        ),
        max_pinned: or(&raw.max_pinned, defaults::max_pinned(max_entries)),
        url: None,
        nodes: Vec::new(),
        sentinels: Vec::new(),
        master_name: None,
        username: None,
        password: None,
        tls: None,
        key_prefix: defaults::KEY_PREFIX.to_string(),
        on_store_error: or(&raw.on_store_error, defaults::ON_STORE_ERROR),
        timeout: dur(&raw.timeout, defaults::STORE_TIMEOUT),
        liveness_ttl: dur(&raw.liveness_ttl, defaults::LIVENESS_TTL),
        poll_interval: dur(&raw.poll_interval, defaults::POLL_INTERVAL),
    };
    if kind == StoreKind::Redis {
        redis(raw, env, &mut store, warnings)?;
    } else {
        only_with_redis(raw)?;
    }
    if store.max_entries == 0 {
        return Err(invalid(
            "store.max_entries",
            at(&raw.max_entries),
            "must be at least 1",
        ));
    }
    for (key, value, n) in [
        (
            "store.max_keys_per_scope",
            at(&raw.max_keys_per_scope),
            store.max_keys_per_scope as u64,
        ),
        (
            "store.max_keys_per_client",
            at(&raw.max_keys_per_client),
            store.max_keys_per_client as u64,
        ),
        (
            "store.max_bytes_per_client",
            at(&raw.max_bytes_per_client),
            store.max_bytes_per_client,
        ),
        (
            "store.max_pinned",
            at(&raw.max_pinned),
            store.max_pinned as u64,
        ),
    ] {
        if n == 0 {
            return Err(invalid(key, value, "must be at least 1"));
        }
    }
    if store.max_pinned > store.max_entries {
        return Err(invalid(
            "store.max_pinned",
            at(&raw.max_pinned),
            format!(
                "is larger than store.max_entries ({}): keys in flight or held are part of the store",
                store.max_entries
            ),
        ));
    }
    Ok(store)
}

/// Redis keys in a memory-store file are a mistake (a half-finished switch to Redis, say).
fn only_with_redis(raw: &RawStore) -> Result<(), Invalid> {
    let written = [
        ("url", at(&raw.url)),
        ("nodes", at(&raw.nodes)),
        ("sentinels", at(&raw.sentinels)),
        ("master_name", at(&raw.master_name)),
        ("username", at(&raw.username)),
        ("password_file", at(&raw.password_file)),
        ("tls_ca", at(&raw.tls_ca)),
        ("tls_client_cert", at(&raw.tls_client_cert)),
        ("tls_client_key", at(&raw.tls_client_key)),
        ("key_prefix", at(&raw.key_prefix)),
    ];
    match written.into_iter().find(|(_, span)| span.is_some()) {
        Some((key, span)) => Err(invalid(
            format!("store.{key}"),
            span,
            "is only used with kind = \"redis\"; set kind = \"redis\" or remove it",
        )),
        None => Ok(()),
    }
}

/// One Redis URL as written, with the key it belongs to and its place in the file.
struct Url<'a> {
    key: &'static str,
    text: &'a str,
    span: Option<Range<usize>>,
}

fn redis(
    raw: &RawStore,
    env: &Env,
    store: &mut StoreSettings,
    warnings: &mut Vec<Invalid>,
) -> Result<(), Invalid> {
    let targets = [
        ("url", at(&raw.url)),
        ("nodes", at(&raw.nodes)),
        ("sentinels", at(&raw.sentinels)),
    ];
    let given: Vec<&(&str, Option<Range<usize>>)> =
        targets.iter().filter(|(_, span)| span.is_some()).collect();
    match given.as_slice() {
        [] => {
            return Err(invalid(
                "store.url",
                at(&raw.kind),
                "kind = \"redis\" needs url = \"redis://host:6379\" (one node), nodes = [\"redis://a:6379\", ...] (Redis Cluster) or sentinels = [\"redis://s1:26379\", ...] with master_name (Redis Sentinel)",
            ))
        }
        [_] => {}
        [_, (key, span), ..] => {
            return Err(invalid(
                format!("store.{key}"),
                span.clone(),
                "give one of url (one node), nodes (Redis Cluster) or sentinels (Redis Sentinel), not several",
            ))
        }
    }
    let mut urls: Vec<Url<'_>> = Vec::new();
    if let Some(u) = &raw.url {
        urls.push(Url {
            key: "url",
            text: u.get_ref(),
            span: Some(u.span()),
        });
        store.url = Some(u.get_ref().clone());
    }
    for (key, list) in [("nodes", &raw.nodes), ("sentinels", &raw.sentinels)] {
        let Some(list) = list else { continue };
        if list.get_ref().is_empty() {
            return Err(invalid(
                format!("store.{key}"),
                Some(list.span()),
                "needs at least one address",
            ));
        }
        urls.extend(list.get_ref().iter().map(|n| Url {
            key,
            text: n.get_ref(),
            span: Some(n.span()),
        }));
    }
    let strings = |l: &Option<Spanned<Vec<Spanned<String>>>>| -> Vec<String> {
        l.as_ref().map_or_else(Vec::new, |l| {
            l.get_ref().iter().map(|n| n.get_ref().clone()).collect()
        })
    };
    store.nodes = strings(&raw.nodes);
    store.sentinels = strings(&raw.sentinels);
    store.master_name = master_name(raw)?;

    let mut tls: Option<(bool, &Url<'_>)> = None;
    for u in &urls {
        let uses_tls = check_url(u, warnings)?;
        match tls {
            None => tls = Some((uses_tls, u)),
            Some((first, _)) if first == uses_tls => {}
            Some(_) => {
                return Err(invalid(
                    format!("store.{}", u.key),
                    u.span.clone(),
                    "mixes redis:// and rediss:// (TLS): write every address with the same scheme",
                ))
            }
        }
    }
    same_credentials(&urls)?;
    let uses_tls = tls.is_some_and(|(t, _)| t);
    store.tls = tls_material(raw, env, uses_tls)?;

    if let Some(u) = &raw.username {
        if u.get_ref().is_empty() {
            return Err(invalid(
                "store.username",
                Some(u.span()),
                "must not be empty; remove it to use the URL's user (or Redis' \"default\")",
            ));
        }
        store.username = Some(u.get_ref().clone());
    }
    store.password = password(raw, env)?;

    if let Some(p) = &raw.key_prefix {
        check_prefix(p.get_ref()).map_err(|m| invalid("store.key_prefix", Some(p.span()), m))?;
        store.key_prefix = p.get_ref().clone();
    }

    for (key, value, d) in [
        ("timeout", &raw.timeout, store.timeout),
        ("liveness_ttl", &raw.liveness_ttl, store.liveness_ttl),
        ("poll_interval", &raw.poll_interval, store.poll_interval),
    ] {
        if d.is_zero() {
            return Err(invalid(
                format!("store.{key}"),
                at(value),
                "must be above zero",
            ));
        }
    }
    if store.liveness_ttl < Duration::from_millis(300) {
        return Err(invalid(
            "store.liveness_ttl",
            at(&raw.liveness_ttl),
            "must be at least 300ms (it is refreshed every third of it)",
        ));
    }
    Ok(())
}

fn master_name(raw: &RawStore) -> Result<Option<String>, Invalid> {
    match (&raw.sentinels, &raw.master_name) {
        (Some(s), None) => Err(invalid(
            "store.master_name",
            Some(s.span()),
            "sentinels need master_name = \"...\": the name the sentinels monitor the primary by (`sentinel monitor <name> ...`)",
        )),
        (None, Some(m)) => Err(invalid(
            "store.master_name",
            Some(m.span()),
            "is only used with sentinels",
        )),
        (Some(_), Some(m))
            if m.get_ref().is_empty() || m.get_ref().bytes().any(|b| !b.is_ascii_graphic()) =>
        {
            Err(invalid(
                "store.master_name",
                Some(m.span()),
                "must be a non-empty name without spaces, as in `sentinel monitor <name> ...`",
            ))
        }
        (_, m) => Ok(m.as_ref().map(|m| m.get_ref().clone())),
    }
}

/// Checks one URL; returns whether it uses TLS.
fn check_url(u: &Url<'_>, warnings: &mut Vec<Invalid>) -> Result<bool, Invalid> {
    let key = format!("store.{}", u.key);
    let info = redis::IntoConnectionInfo::into_connection_info(u.text).map_err(|e| {
        invalid(
            key.clone(),
            u.span.clone(),
            format!(
                "{:?} is not a Redis URL ({e}); write it like \"redis://127.0.0.1:6379\", or \"rediss://host:6380\" for TLS",
                u.text
            ),
        )
    })?;
    let tls = match info.addr() {
        redis::ConnectionAddr::TcpTls { insecure: true, .. } => {
            return Err(invalid(
                key,
                u.span.clone(),
                "#insecure would accept any server certificate; idem always verifies it. Give the CA that signed the server's certificate as tls_ca",
            ))
        }
        redis::ConnectionAddr::TcpTls { .. } => true,
        _ => false,
    };
    if u.key == "sentinels" {
        if info.redis_settings().db() != 0 {
            return Err(invalid(
                key,
                u.span.clone(),
                "a sentinel has no database: remove the /db from its URL",
            ));
        }
    } else if info.redis_settings().password().is_some() {
        warnings.push(invalid(
            key,
            u.span.clone(),
            "holds a password inline, readable by whoever can read this file; move it to password_file or IDEM_REDIS_PASSWORD (either replaces the URL's)",
        ));
    }
    Ok(tls)
}

/// Cluster nodes log in as one user (redis-rs takes one set), and so do the sentinels.
fn same_credentials(urls: &[Url<'_>]) -> Result<(), Invalid> {
    let login = |u: &Url<'_>| {
        redis::IntoConnectionInfo::into_connection_info(u.text).map(|i| {
            let r = i.redis_settings();
            (
                r.username().map(str::to_string),
                r.password().map(str::to_string),
            )
        })
    };
    let Some(first) = urls.first() else {
        return Ok(());
    };
    let want = login(first).ok();
    match urls[1..].iter().find(|u| login(u).ok() != want) {
        Some(u) => Err(invalid(
            format!("store.{}", u.key),
            u.span.clone(),
            "gives another user or password than the first address: every address logs in alike (or use username and password_file)",
        )),
        None => Ok(()),
    }
}

/// `password_file`, else `IDEM_REDIS_PASSWORD`, else none (the URL's, if any).
fn password(raw: &RawStore, env: &Env) -> Result<Option<Password>, Invalid> {
    if let Some(f) = &raw.password_file {
        let span = Some(f.span());
        let bytes = env
            .files
            .read(f.get_ref())
            .map_err(|m| invalid("store.password_file", span.clone(), m))?;
        let text = String::from_utf8(bytes).map_err(|_| {
            invalid(
                "store.password_file",
                span.clone(),
                format!("{:?} is not UTF-8 text", f.get_ref()),
            )
        })?;
        // Files written by `echo` or an editor end with a newline that is not the password.
        let value = text.trim_end_matches(['\n', '\r']);
        if value.is_empty() {
            return Err(invalid(
                "store.password_file",
                span,
                format!("{:?} is empty", f.get_ref()),
            ));
        }
        return Ok(Some(Password {
            value: Secret(value.to_string()),
            from: PasswordFrom::File,
        }));
    }
    Ok(env
        .redis_password
        .as_ref()
        .filter(|p| !p.0.is_empty())
        .map(|p| Password {
            value: p.clone(),
            from: PasswordFrom::Env,
        }))
}

/// Reads and checks the TLS files; they are only meaningful with `rediss://` addresses.
fn tls_material(raw: &RawStore, env: &Env, uses_tls: bool) -> Result<Option<TlsMaterial>, Invalid> {
    let files = [
        ("tls_ca", &raw.tls_ca),
        ("tls_client_cert", &raw.tls_client_cert),
        ("tls_client_key", &raw.tls_client_key),
    ];
    if !uses_tls {
        return match files.into_iter().find(|(_, v)| v.is_some()) {
            Some((key, v)) => Err(invalid(
                format!("store.{key}"),
                at(v),
                "is only used with TLS: write the Redis addresses as rediss://host:port",
            )),
            None => Ok(None),
        };
    }
    let read = |key: &str, v: &Spanned<String>| {
        env.files
            .read(v.get_ref())
            .map_err(|m| invalid(format!("store.{key}"), Some(v.span()), m))
    };
    let ca = match &raw.tls_ca {
        Some(v) => {
            let pem = read("tls_ca", v)?;
            let roots = certificates(&pem).map_err(|m| {
                invalid(
                    "store.tls_ca",
                    Some(v.span()),
                    format!("{:?}: {m}", v.get_ref()),
                )
            })?;
            let mut store = rustls::RootCertStore::empty();
            for cert in roots {
                store.add(cert).map_err(|e| {
                    invalid(
                        "store.tls_ca",
                        Some(v.span()),
                        format!("{:?}: a certificate is not a usable CA ({e})", v.get_ref()),
                    )
                })?;
            }
            Some(pem)
        }
        None => None,
    };
    let client = match (&raw.tls_client_cert, &raw.tls_client_key) {
        (None, None) => None,
        (Some(c), None) => {
            return Err(invalid(
                "store.tls_client_key",
                Some(c.span()),
                "tls_client_cert needs tls_client_key (the certificate's private key)",
            ))
        }
        (None, Some(k)) => {
            return Err(invalid(
                "store.tls_client_cert",
                Some(k.span()),
                "tls_client_key needs tls_client_cert (the certificate it belongs to)",
            ))
        }
        (Some(c), Some(k)) => {
            let cert_pem = read("tls_client_cert", c)?;
            let chain = certificates(&cert_pem).map_err(|m| {
                invalid(
                    "store.tls_client_cert",
                    Some(c.span()),
                    format!("{:?}: {m}", c.get_ref()),
                )
            })?;
            let key_pem = read("tls_client_key", k)?;
            let key = private_key(&key_pem).map_err(|m| {
                invalid(
                    "store.tls_client_key",
                    Some(k.span()),
                    format!("{:?}: {m}", k.get_ref()),
                )
            })?;
            // What redis-rs will do at connect: a key that does not fit the certificate (or
            // a kind rustls cannot sign with) is refused now, at its line.
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_client_auth_cert(chain, key)
                .map_err(|e| {
                    invalid(
                        "store.tls_client_key",
                        Some(k.span()),
                        format!("{:?} does not go with {:?}: {e}", k.get_ref(), c.get_ref()),
                    )
                })?;
            Some((cert_pem, Secret(key_pem)))
        }
    };
    Ok(Some(TlsMaterial { ca, client }))
}

pub(crate) fn certificates(
    pem: &[u8],
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates ({e})"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_string());
    }
    Ok(certs)
}

pub(crate) fn private_key(pem: &[u8]) -> Result<rustls::pki_types::PrivateKeyDer<'static>, String> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("holds no PEM private key ({e})"))
}

/// A prefix of visible ASCII without braces: a brace would start the Cluster hash tag
/// inside the prefix, and every key would land on one slot.
pub(crate) fn check_prefix(p: &str) -> Result<(), String> {
    if p.is_empty() || p.len() > MAX_PREFIX {
        return Err(format!(
            "must be 1 to {MAX_PREFIX} characters (like the default \"idem:\")"
        ));
    }
    if let Some(c) = p
        .chars()
        .find(|c| !c.is_ascii_graphic() || *c == '{' || *c == '}')
    {
        return Err(format!(
            "{p:?} has {c:?}: use visible ASCII without spaces or braces (a brace would move the Cluster hash tag)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::resolve::{Env, Files};
    use crate::config::settings::{ConfigError, PasswordFrom, Secret, Settings};

    const SECRET: &str = "[dedup]\nsecret = \"0123456789abcdef0123\"\n";

    fn load(store: &str, env: &Env) -> Result<Settings, ConfigError> {
        Settings::from_toml_with_env(&format!("[store]\nkind = \"redis\"\n{store}{SECRET}"), env)
    }

    fn err(store: &str, env: &Env) -> ConfigError {
        load(store, env).expect_err(store)
    }

    fn files(list: Vec<(&'static str, Vec<u8>)>) -> Env {
        Env {
            files: Files::Given(list),
            ..Env::default()
        }
    }

    #[test]
    fn key_prefix_defaults_to_idem_and_refuses_braces_at_its_position() {
        let env = Env::default();
        let s = load("url = \"redis://a:1\"\n", &env).unwrap();
        assert_eq!(s.store.key_prefix, "idem:");
        let s = load("url = \"redis://a:1\"\nkey_prefix = \"shop-a:\"\n", &env).unwrap();
        assert_eq!(s.store.key_prefix, "shop-a:");
        for bad in ["", "a{b", "a}", "with space", "\u{e9}"] {
            let e = err(
                &format!("url = \"redis://a:1\"\nkey_prefix = {bad:?}\n"),
                &env,
            );
            assert_eq!((e.line, e.column), (Some(4), Some(14)), "{bad:?}: {e}");
            assert!(e.message.starts_with("store.key_prefix: "), "{e}");
        }
        let long = "p".repeat(65);
        let e = err(
            &format!("url = \"redis://a:1\"\nkey_prefix = \"{long}\"\n"),
            &env,
        );
        assert!(e.message.contains("1 to 64"), "{e}");
        // Only with Redis.
        let e = Settings::from_toml_with_env("[store]\nkey_prefix = \"x:\"\n", &env).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("only used with kind = \"redis\""), "{e}");
    }

    #[test]
    fn password_precedence_file_then_environment_then_url() {
        let url = "url = \"redis://:inline@a:1\"\n";
        // Only the URL's: nothing replaces it.
        let s = load(url, &Env::default()).unwrap();
        assert_eq!(s.store.password, None);
        // The environment replaces the URL's.
        let env = Env {
            redis_password: Some(Secret("from-env".to_string())),
            ..Env::default()
        };
        let s = load(url, &env).unwrap();
        let p = s.store.password.unwrap();
        assert_eq!(
            (p.value.0.as_str(), p.from),
            ("from-env", PasswordFrom::Env)
        );
        // An empty variable counts as unset.
        let empty = Env {
            redis_password: Some(Secret(String::new())),
            ..Env::default()
        };
        assert_eq!(load(url, &empty).unwrap().store.password, None);
        // The file replaces both; its trailing newline is not part of the password.
        let env = Env {
            redis_password: Some(Secret("from-env".to_string())),
            files: Files::Given(vec![("pw", b"from-file\r\n".to_vec())]),
            ..Env::default()
        };
        let s = load(
            &format!("{url}password_file = \"pw\"\nusername = \"idem\"\n"),
            &env,
        )
        .unwrap();
        let p = s.store.password.clone().unwrap();
        assert_eq!(
            (p.value.0.as_str(), p.from),
            ("from-file", PasswordFrom::File)
        );
        assert_eq!(s.store.username.as_deref(), Some("idem"));
        // Never printed.
        assert!(!format!("{:?}", s.store).contains("from-file"));
    }

    #[test]
    fn a_missing_or_empty_password_file_is_named_at_its_position() {
        let e = err(
            "url = \"redis://a:1\"\npassword_file = \"nope\"\n",
            &Env::default(),
        );
        assert_eq!((e.line, e.column), (Some(4), Some(17)), "{e}");
        assert!(e.message.starts_with("store.password_file: "), "{e}");
        assert!(e.message.contains("\"nope\""), "{e}");
        let env = files(vec![("pw", b"\n".to_vec())]);
        let e = err("url = \"redis://a:1\"\npassword_file = \"pw\"\n", &env);
        assert!(e.message.contains("is empty"), "{e}");
        let e = err("url = \"redis://a:1\"\nusername = \"\"\n", &Env::default());
        assert!(e.message.starts_with("store.username: "), "{e}");
    }

    #[test]
    fn an_inline_password_in_url_or_nodes_is_a_warning_with_its_position() {
        let s = load("url = \"redis://:pw@a:1\"\n", &Env::default()).unwrap();
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(
            s.warnings[0].starts_with("proxy.toml:3:7: store.url: holds a password inline"),
            "{:?}",
            s.warnings
        );
        let s = load(
            "nodes = [\"redis://user:pw@a:1\", \"redis://user:pw@b:2\"]\n",
            &Env::default(),
        )
        .unwrap();
        assert_eq!(s.warnings.len(), 2, "{:?}", s.warnings);
        for (w, col) in s.warnings.iter().zip([10, 33]) {
            assert!(
                w.starts_with(&format!("proxy.toml:3:{col}: store.nodes: ")),
                "{w}"
            );
        }
        let s = load("url = \"redis://user@a:1\"\n", &Env::default()).unwrap();
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn sentinels_need_a_master_name_and_exclude_url_and_nodes() {
        let env = Env::default();
        let s = load(
            "sentinels = [\"redis://s1:26379\", \"redis://s2:26379\"]\nmaster_name = \"main\"\n",
            &env,
        )
        .unwrap();
        assert_eq!(s.store.sentinels.len(), 2);
        assert_eq!(s.store.master_name.as_deref(), Some("main"));
        for (store, key, line) in [
            (
                "sentinels = [\"redis://s1:26379\"]\n",
                "store.master_name",
                3,
            ),
            (
                "url = \"redis://a:1\"\nmaster_name = \"main\"\n",
                "store.master_name",
                4,
            ),
            (
                "url = \"redis://a:1\"\nsentinels = [\"redis://s:1\"]\nmaster_name = \"m\"\n",
                "store.sentinels",
                4,
            ),
            (
                "sentinels = []\nmaster_name = \"m\"\n",
                "store.sentinels",
                3,
            ),
            (
                "sentinels = [\"redis://s:1/2\"]\nmaster_name = \"m\"\n",
                "store.sentinels",
                3,
            ),
            (
                "sentinels = [\"redis://s:1\"]\nmaster_name = \"a b\"\n",
                "store.master_name",
                4,
            ),
        ] {
            let e = err(store, &env);
            assert!(e.message.starts_with(&format!("{key}: ")), "{store}: {e}");
            assert_eq!(e.line, Some(line), "{store}: {e}");
        }
    }

    #[test]
    fn tls_files_need_rediss_and_are_read_and_checked_at_their_position() {
        let env = files(vec![("junk.pem", b"not a certificate".to_vec())]);
        // TLS material without TLS addresses.
        let e = err("url = \"redis://a:1\"\ntls_ca = \"ca.pem\"\n", &env);
        assert_eq!((e.line, e.column), (Some(4), Some(10)), "{e}");
        assert!(e.message.contains("rediss://"), "{e}");
        // rediss:// with the system roots: no files needed.
        let s = load("url = \"rediss://a:1\"\n", &env).unwrap();
        let tls = s.store.tls.unwrap();
        assert!(tls.ca.is_none() && tls.client.is_none());
        for (store, key, col, what) in [
            (
                "tls_ca = \"missing.pem\"\n",
                "store.tls_ca",
                10,
                "cannot read \"missing.pem\"",
            ),
            (
                "tls_ca = \"junk.pem\"\n",
                "store.tls_ca",
                10,
                "no PEM certificate",
            ),
            (
                "tls_client_cert = \"junk.pem\"\n",
                "store.tls_client_key",
                19,
                "needs tls_client_key",
            ),
            (
                "tls_client_key = \"junk.pem\"\n",
                "store.tls_client_cert",
                18,
                "needs tls_client_cert",
            ),
            (
                "tls_client_cert = \"junk.pem\"\ntls_client_key = \"k.pem\"\n",
                "store.tls_client_cert",
                19,
                "no PEM certificate",
            ),
        ] {
            let e = err(&format!("url = \"rediss://a:1\"\n{store}"), &env);
            assert!(e.message.starts_with(&format!("{key}: ")), "{store}: {e}");
            assert!(e.message.contains(what), "{store}: {e}");
            assert_eq!((e.line, e.column), (Some(4), Some(col)), "{store}: {e}");
        }
        // Mixed schemes, and turning verification off.
        let e = err("nodes = [\"rediss://a:1\", \"redis://b:2\"]\n", &env);
        assert_eq!((e.line, e.column), (Some(3), Some(26)), "{e}");
        assert!(e.message.contains("mixes"), "{e}");
        let e = err("nodes = [\"redis://a:1\", \"redis://u:p@b:2\"]\n", &env);
        assert_eq!((e.line, e.column), (Some(3), Some(25)), "{e}");
        assert!(e.message.contains("another user or password"), "{e}");
        let e = err("url = \"rediss://a:1/#insecure\"\n", &env);
        assert!(e.message.contains("#insecure"), "{e}");
    }
}
