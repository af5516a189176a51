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

/// Users for `connections` held connections when `--users` is not given: one per 8, half the
/// server's default per-user limit of 16 connections (`gateway.max_connections_per_user`).
pub fn users_for(connections: u64) -> usize {
    usize::try_from(connections.div_ceil(CONNECTIONS_PER_USER)).unwrap_or(usize::MAX).max(1)
}

const CONNECTIONS_PER_USER: u64 = 8;

#[cfg(test)]
mod users_tests {
    #[test]
    fn default_users_keep_each_under_the_per_user_limit() {
        assert_eq!(super::users_for(1), 1);
        assert_eq!(super::users_for(8), 1);
        assert_eq!(super::users_for(9), 2);
        assert_eq!(super::users_for(15_000), 1_875);
    }
}
