//! The scenarios, one module each; `beseda-loadtest <scenario> --help`
//! documents each one's settings.

pub mod fanout;
pub mod pairs;
pub mod webhook;
pub mod bot_echo;
pub mod listing;
pub mod connect_storm;
pub mod idle;
pub mod churn;
