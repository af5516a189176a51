//! Beseda's domain: objects, rules, limits and error codes. No I/O lives here,
//! so every rule can be tested without a server.

#![forbid(unsafe_code)]

pub mod bots;
pub mod error;
pub mod limits;
pub mod model;
pub mod rules;

pub use error::{Error, ErrorClass, ErrorCode, Result};
