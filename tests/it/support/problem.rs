//! idem's own refusals: RFC 9457 problem+json answers with a `Cache-Status` detail.

use std::fmt::Debug;

use super::RawResponse;

/// Prefix of every problem `type` idem answers.
pub const PROBLEM_BASE: &str = "https://idem.dev/problems/";

/// A response as the problem checks read it, whichever client produced it.
pub trait Answered: Debug {
    fn status_code(&self) -> u16;
    /// The first value of `name`, if present and UTF-8.
    fn header_str(&self, name: &str) -> Option<&str>;
    fn body_bytes(&self) -> &[u8];
}

impl Answered for RawResponse {
    fn status_code(&self) -> u16 {
        self.status
    }

    fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name)
    }

    fn body_bytes(&self) -> &[u8] {
        &self.body
    }
}

/// A response read to the end by reqwest, borrowed as [`Answered`].
pub struct ReadResponse<'a> {
    pub status: u16,
    pub headers: &'a reqwest::header::HeaderMap,
    pub body: &'a [u8],
}

impl<'a> ReadResponse<'a> {
    pub fn new(status: u16, headers: &'a reqwest::header::HeaderMap, body: &'a [u8]) -> Self {
        ReadResponse {
            status,
            headers,
            body,
        }
    }
}

impl Debug for ReadResponse<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadResponse")
            .field("status", &self.status)
            .field("headers", self.headers)
            .field("body", &String::from_utf8_lossy(self.body))
            .finish()
    }
}

impl Answered for ReadResponse<'_> {
    fn status_code(&self) -> u16 {
        self.status
    }

    fn header_str(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn body_bytes(&self) -> &[u8] {
        self.body
    }
}

/// The body of a problem answer as JSON, after checking the media type.
#[track_caller]
pub fn problem_json(r: &impl Answered) -> serde_json::Value {
    assert_eq!(
        r.header_str("content-type"),
        Some("application/problem+json"),
        "not a problem: {r:#?}"
    );
    serde_json::from_slice(r.body_bytes())
        .unwrap_or_else(|e| panic!("problem body is not JSON ({e}): {r:#?}"))
}

/// The `Cache-Status` of idem's refusal of `kind`.
pub fn refusal_cache_status(kind: &str) -> String {
    format!("idem; fwd=request; detail={kind}")
}

/// Asserts idem's own problem answer: `status`, problem+json whose `type` is
/// [`PROBLEM_BASE`]`kind`, and a `Cache-Status` naming `kind`. Returns the problem's JSON
/// for further checks.
#[track_caller]
pub fn assert_problem(r: &impl Answered, status: u16, kind: &str) -> serde_json::Value {
    assert_eq!(
        r.status_code(),
        status,
        "expected a {status} {kind} problem: {r:#?}"
    );
    let json = problem_json(r);
    assert_eq!(
        json["type"].as_str(),
        Some(format!("{PROBLEM_BASE}{kind}").as_str()),
        "problem {json}"
    );
    assert_eq!(
        r.header_str("cache-status"),
        Some(refusal_cache_status(kind).as_str()),
        "{r:#?}"
    );
    json
}

/// Asserts the `status`, `title` and `detail` members every idem problem carries.
#[track_caller]
pub fn assert_problem_members(json: &serde_json::Value, status: u16) {
    assert_eq!(json["status"], status, "problem `status` member: {json}");
    for member in ["title", "detail"] {
        assert!(json[member].is_string(), "problem lacks `{member}`: {json}");
    }
}
