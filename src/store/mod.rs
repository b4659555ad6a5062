//! Where settled keys are kept: the embedded store ([`memory`]) and the Redis store shared by
//! replicas ([`redis`]).

pub mod memory;
pub mod redis;
