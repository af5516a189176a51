//! The `beseda` binary's library: configuration, wiring of the services into
//! one process, health and metrics, and the `ctl` command line.

#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod ctl;
pub mod health;
pub mod http_server;
pub mod internal_grpc;
pub mod roles;
pub mod telemetry;
