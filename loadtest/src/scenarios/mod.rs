//! The scenarios, one module each; `beseda-loadtest <scenario> --help`
//! documents each one's settings.

pub mod bot_echo;
pub mod churn;
pub mod connect_storm;
pub mod fanout;
pub mod idle;
pub mod listing;
pub mod pairs;
pub mod webhook;
