//! Limits guessing of the eight-digit codes sent by e-mail (activation and
//! temporary administration codes): after too many wrong codes for one
//! e-mail address within a window, further attempts are refused until the
//! window passes, however right the code.
//!
//! The count is kept per routing process; in a cluster each node allows the
//! limit, which still keeps a guess far below the 10^8 code space.

use std::time::{Duration, Instant};

use beseda_core::{Error, ErrorCode, Result};
use dashmap::DashMap;

/// Wrong codes allowed per e-mail address and window.
pub const MAX_WRONG_CODES: u32 = 10;

pub struct AttemptLimiter {
    failures: DashMap<String, (u32, Instant)>,
    limit: u32,
    window: Duration,
}

impl AttemptLimiter {
    pub fn new(limit: u32, window: Duration) -> Self {
        AttemptLimiter { failures: DashMap::new(), limit, window }
    }

    /// Refuses when the address used up its wrong attempts in this window.
    pub fn check(&self, email: &str) -> Result<()> {
        let Some(entry) = self.failures.get(email) else { return Ok(()) };
        let (count, since) = *entry;
        drop(entry);
        if since.elapsed() >= self.window {
            self.failures.remove(email);
            return Ok(());
        }
        if count >= self.limit {
            let wait_minutes = (self.window - since.elapsed()).as_secs().div_ceil(60);
            return Err(Error::new(
                ErrorCode::TooManyAttempts,
                format!(
                    "{count} wrong codes were given for {email}; try again in {wait_minutes} minutes with a new code"
                ),
            ));
        }
        Ok(())
    }

    pub fn failed(&self, email: &str) {
        let mut entry = self.failures.entry(email.to_owned()).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= self.window {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }

    pub fn succeeded(&self, email: &str) {
        self.failures.remove(email);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guessing_stops_after_the_limit_and_resumes_after_the_window() {
        let limiter = AttemptLimiter::new(3, Duration::from_millis(50));
        for _ in 0..3 {
            limiter.check("a@example.com").unwrap();
            limiter.failed("a@example.com");
        }
        assert_eq!(limiter.check("a@example.com").unwrap_err().code, ErrorCode::TooManyAttempts);
        assert!(limiter.check("b@example.com").is_ok(), "other addresses are not affected");
        std::thread::sleep(Duration::from_millis(60));
        assert!(limiter.check("a@example.com").is_ok());
    }

    #[test]
    fn a_right_code_clears_the_count() {
        let limiter = AttemptLimiter::new(2, Duration::from_secs(60));
        limiter.failed("a@example.com");
        limiter.succeeded("a@example.com");
        limiter.failed("a@example.com");
        assert!(limiter.check("a@example.com").is_ok());
    }
}
