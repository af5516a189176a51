//! Counts events per e-mail address within a window and refuses more than a
//! limit. Two uses: guessing the eight-digit codes sent by e-mail (after too
//! many wrong codes further attempts are refused until the window passes,
//! however right the code), and e-mail bombing through the public
//! registration and temporary-code calls (a bounded number of mails per
//! address and hour).
//!
//! Counts are kept per routing process; in a cluster each node allows the
//! limit, which still keeps a guess far below the 10^8 code space.

use std::time::{Duration, Instant};

use beseda_core::{Error, ErrorCode, Result};
use dashmap::DashMap;

/// Wrong codes allowed per e-mail address and window.
pub const MAX_WRONG_CODES: u32 = 10;
/// Code e-mails (activation, temporary administration) per address and window.
pub const MAX_CODE_MAILS: u32 = 5;

pub struct AttemptLimiter {
    failures: DashMap<String, (u32, Instant)>,
    limit: u32,
    window: Duration,
    /// What is counted, for the error message: "wrong codes were given".
    counted: &'static str,
}

impl AttemptLimiter {
    pub fn new(limit: u32, window: Duration, counted: &'static str) -> Self {
        AttemptLimiter { failures: DashMap::new(), limit, window, counted }
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
            let wait_minutes = self.window.saturating_sub(since.elapsed()).as_secs().div_ceil(60);
            return Err(Error::new(
                ErrorCode::TooManyAttempts,
                format!("{count} {} for {email}; try again in {wait_minutes} minutes", self.counted),
            ));
        }
        Ok(())
    }

    /// Counts one event for the address.
    pub fn record(&self, email: &str) {
        let mut entry = self.failures.entry(email.to_owned()).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= self.window {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }

    /// Forgets the address's count (a right code was given).
    pub fn clear(&self, email: &str) {
        self.failures.remove(email);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guessing_stops_after_the_limit_and_resumes_after_the_window() {
        let limiter = AttemptLimiter::new(3, Duration::from_millis(50), "wrong codes were given");
        for _ in 0..3 {
            limiter.check("a@example.com").unwrap();
            limiter.record("a@example.com");
        }
        assert_eq!(limiter.check("a@example.com").unwrap_err().code, ErrorCode::TooManyAttempts);
        assert!(limiter.check("b@example.com").is_ok(), "other addresses are not affected");
        std::thread::sleep(Duration::from_millis(60));
        assert!(limiter.check("a@example.com").is_ok());
    }

    #[test]
    fn the_refusal_says_what_was_counted_and_when_to_retry() {
        let limiter = AttemptLimiter::new(1, Duration::from_secs(3600), "code e-mails were sent within an hour");
        limiter.record("a@example.com");
        let message = limiter.check("a@example.com").unwrap_err().message;
        assert_eq!(message, "1 code e-mails were sent within an hour for a@example.com; try again in 60 minutes");
    }

    #[test]
    fn a_right_code_clears_the_count() {
        let limiter = AttemptLimiter::new(2, Duration::from_secs(60), "wrong codes were given");
        limiter.record("a@example.com");
        limiter.clear("a@example.com");
        limiter.record("a@example.com");
        assert!(limiter.check("a@example.com").is_ok());
    }
}
