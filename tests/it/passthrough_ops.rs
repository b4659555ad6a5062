//! Pass-through streaming, the incident reproduction, shutdown and operations.
