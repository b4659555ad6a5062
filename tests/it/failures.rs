//! Upstream failure classes and store limits (DESIGN section 4).
