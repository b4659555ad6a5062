//! Shadow routes: requests pass through untouched while idem counts what it would have
//! collapsed or replayed.

pub(crate) mod request;
pub(crate) mod table;
