//! idem's own listeners besides the proxy: metrics and health, and the admin view.

pub mod health;
pub mod keys;
