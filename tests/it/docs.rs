//! The snippets in README.md and docs/*.md work as pasted: the `nginx` blocks of each
//! section (`##` heading) pass `nginx -t` together, each pasted where its first line says
//! (`# in http { }` or `# in server { }`: one site's `server` block), and every
//! `toml` block passes `idem check` on its own (every key of proxy.toml is optional, so a
//! fragment is a whole file). A `toml` block that is not a proxy.toml says so on its info
//! line: ```` ```toml not-proxy.toml ````. The certificate and key files a snippet names
//! (`/etc/...pem`, `...key`) do not exist here: `idem check` reads them, so they are
//! swapped for a certificate and key made with `openssl` for the test.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::support::*;

/// One fenced block: where it is, its info string, its lines.
struct Block {
    at: String,
    /// The document and `##` heading it is under.
    section: String,
    info: String,
    text: String,
}

fn documents() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    if let Ok(dir) = std::fs::read_dir(root.join("docs")) {
        let mut docs: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "md"))
            .collect();
        docs.sort();
        files.extend(docs);
    }
    files
}

fn blocks(lang: &str) -> Vec<Block> {
    let mut found = Vec::new();
    for file in documents() {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut open: Option<(usize, String, Vec<String>, String)> = None;
        let mut section = String::new();
        for (i, line) in text.lines().enumerate() {
            if open.is_none() && line.starts_with("## ") {
                section = format!("{} {line}", file.display());
            }
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            match &mut open {
                None => {
                    if let Some(info) = trimmed.strip_prefix("```") {
                        if info.split_whitespace().next() == Some(lang) {
                            open = Some((i + 1, info.to_string(), Vec::new(), " ".repeat(indent)));
                        } else if !info.is_empty() || trimmed == "```" {
                            // Another language's block: skip to its end.
                            open = Some((i + 1, "\u{0}skip".into(), Vec::new(), String::new()));
                        }
                    }
                }
                Some((start, info, lines, prefix)) => {
                    if trimmed == "```" {
                        if info != "\u{0}skip" {
                            found.push(Block {
                                at: format!("{}:{start}", file.display()),
                                section: section.clone(),
                                info: info.clone(),
                                text: lines.join("\n"),
                            });
                        }
                        open = None;
                    } else {
                        lines.push(
                            line.strip_prefix(prefix.as_str())
                                .unwrap_or(line)
                                .to_string(),
                        );
                    }
                }
            }
        }
    }
    found
}

#[tokio::test]
async fn every_nginx_snippet_passes_nginx_t_where_it_says_to_paste_it() {
    require_tool("nginx", "-v", "nginx-light");
    let snippets = blocks("nginx");
    assert!(!snippets.is_empty(), "README.md has nginx snippets");
    let mut sections: Vec<(String, Vec<Block>)> = Vec::new();
    for b in snippets {
        match sections.iter_mut().find(|(name, _)| *name == b.section) {
            Some((_, list)) => list.push(b),
            None => sections.push((b.section.clone(), vec![b])),
        }
    }
    for (section, snippets) in sections {
        let (mut http, mut server) = (String::new(), String::new());
        for b in &snippets {
            match b.text.lines().next().unwrap_or("").trim() {
                "# in http { }" => http.push_str(&b.text),
                "# in server { }" => server.push_str(&b.text),
                other => panic!(
                    "{}: an nginx snippet starts with `# in http {{ }}` or `# in server {{ }}` (where to paste it), not {other:?}",
                    b.at
                ),
            }
            http.push('\n');
            server.push('\n');
        }
        let dir = TempDir::new();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n access_log off;\n{http}\nserver {{ listen 127.0.0.1:1;\n{server}\n}}\n}}\n"
        );
        let file = dir.write("nginx.conf", &conf);
        let out = tokio::process::Command::new("nginx")
            .arg("-t")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&file)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run nginx -t");
        assert!(
            out.status.success(),
            "{section}: nginx -t refuses its snippets ({}):\n{}\n--- as tested ---\n{conf}",
            snippets
                .iter()
                .map(|b| b.at.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            String::from_utf8_lossy(&out.stderr),
        );
    }
}

/// `text` with every quoted absolute path to a file that does not exist here and names a
/// certificate (`.pem`, `.crt`) or key (`.key`) replaced by the test's own.
fn with_test_certificates(text: &str, pki: &tls::Pki) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("\"/") {
        out.push_str(&rest[..=i]);
        rest = &rest[i + 1..];
        let end = rest.find('"').unwrap_or(rest.len());
        let path = &rest[..end];
        let swap = if Path::new(path).exists() {
            None
        } else if path.ends_with(".key") {
            Some(pki.path("leaf.key"))
        } else if path.ends_with(".pem") || path.ends_with(".crt") {
            // A key in PEM (`privkey.pem`, `key.pem`) is a key.
            if path.rsplit('/').next().is_some_and(|f| f.contains("key")) {
                Some(pki.path("leaf.key"))
            } else if path.rsplit('/').next().is_some_and(|f| f.contains("ca")) {
                Some(pki.path("ca.pem"))
            } else {
                Some(pki.path("leaf.pem"))
            }
        } else {
            None
        };
        match swap {
            Some(p) => out.push_str(&p.to_string_lossy()),
            None => out.push_str(path),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[tokio::test]
async fn every_proxy_toml_snippet_passes_idem_check() {
    let snippets: Vec<Block> = blocks("toml")
        .into_iter()
        .filter(|b| !b.info.contains("not-proxy.toml"))
        .collect();
    assert!(snippets.len() >= 3, "README.md has proxy.toml snippets");
    let pki = tls::Pki::new();
    pki.ca("ca").leaf(tls::Leaf::server("leaf", "ca", 1));
    for b in snippets {
        let text = with_test_certificates(&b.text, &pki);
        let (code, stdout, stderr) = Idem::check(&text).await;
        assert_eq!(
            code, 0,
            "{}: idem check refuses the snippet:\n{stderr}{stdout}\n--- snippet ---\n{}",
            b.at, b.text
        );
    }
}
