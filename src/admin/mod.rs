//! idem's own listeners besides the proxy: metrics and health, and the admin view.

pub(crate) mod guard;
pub(crate) mod health;
pub(crate) mod keys;
