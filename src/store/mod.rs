//! Where settled keys are kept: the embedded store ([`memory`]) and the Redis store shared by
//! replicas ([`redis`]).

pub(crate) mod memory;
pub(crate) mod redis;
