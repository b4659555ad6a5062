//! Reload, shadow mode, the admin listener and packaging.
