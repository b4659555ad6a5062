//! Client aborts at every point, upstream faults, and hostile requests.
