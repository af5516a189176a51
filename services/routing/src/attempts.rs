//! Counts events per e-mail address within a window and refuses more than a
//! limit. Two uses: guessing the eight-digit codes sent by e-mail (after too
//! many wrong codes further attempts are refused until the window passes,
//! however right the code), and e-mail bombing through the public
//! registration and temporary-code calls (a bounded number of mails per
//! address and hour).
//!
//! Counts are kept per routing process; in a cluster each node allows the
//! limit, which still keeps a guess far below the 10^8 code space.
//!
//! Addresses are counted whether or not they belong to a subscriber (a limit
//! that only known addresses hit would tell who is a subscriber), so anyone
//! can add entries. Memory is therefore bounded: entries expire with their
//! window and are swept as the table grows, and past [`MAX_TRACKED`] live
//! entries the oldest windows are dropped first.

use std::time::{Duration, Instant};

use beseda_core::{Error, ErrorCode, Result};
use dashmap::DashMap;

/// Wrong codes allowed per e-mail address and window.
pub const MAX_WRONG_CODES: u32 = 10;
/// Code e-mails (activation, temporary administration) per address and window.
pub const MAX_CODE_MAILS: u32 = 5;
/// Addresses one limiter tracks at most. Dropping the oldest windows beyond
/// this lets someone who sends this many distinct addresses within one
/// window reset a count early; at about 100 bytes an entry the table stays
/// near 10 MB whatever is sent.
pub const MAX_TRACKED: usize = 100_000;

pub struct AttemptLimiter {
    failures: DashMap<String, (u32, Instant)>,
    limit: u32,
    window: Duration,
    max_tracked: usize,
    /// The table's size after the last sweep; the next sweep happens when
    /// it has doubled, so sweeping costs O(1) per record on average.
    swept_at_len: std::sync::atomic::AtomicUsize,
    /// What is counted, for the error message: "wrong codes were given".
    counted: &'static str,
}

impl AttemptLimiter {
    pub fn new(limit: u32, window: Duration, counted: &'static str) -> Self {
        Self::with_capacity(limit, window, counted, MAX_TRACKED)
    }

    pub fn with_capacity(limit: u32, window: Duration, counted: &'static str, max_tracked: usize) -> Self {
        AttemptLimiter {
            failures: DashMap::new(),
            limit,
            window,
            max_tracked: max_tracked.max(1),
            swept_at_len: std::sync::atomic::AtomicUsize::new(0),
            counted,
        }
    }

    /// How many addresses are tracked now.
    pub fn tracked(&self) -> usize {
        self.failures.len()
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
        {
            let mut entry = self.failures.entry(email.to_owned()).or_insert((0, Instant::now()));
            if entry.1.elapsed() >= self.window {
                *entry = (0, Instant::now());
            }
            entry.0 += 1;
        }
        self.bound();
    }

    /// Drops expired entries once the table has doubled since the last
    /// sweep, and the oldest windows when more than `max_tracked` are live.
    fn bound(&self) {
        use std::sync::atomic::Ordering;
        let len = self.failures.len();
        let threshold = self.swept_at_len.load(Ordering::Relaxed).saturating_mul(2).max(64).min(self.max_tracked);
        if len <= threshold {
            return;
        }
        self.failures.retain(|_, (_, since)| since.elapsed() < self.window);
        let excess = self.failures.len().saturating_sub(self.max_tracked);
        if excess > 0 {
            // Drop a tenth more than needed so the next evictions are not
            // one full scan per record.
            let mut starts: Vec<Instant> = self.failures.iter().map(|entry| entry.value().1).collect();
            let drop = (excess + self.max_tracked / 10).min(starts.len());
            let (_, cutoff, _) = starts.select_nth_unstable(drop - 1);
            let cutoff = *cutoff;
            self.failures.retain(|_, (_, since)| *since > cutoff);
        }
        self.swept_at_len.store(self.failures.len(), Ordering::Relaxed);
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
        let limiter = AttemptLimiter::new(1, Duration::from_secs(3600), "code e-mails were requested within an hour");
        limiter.record("a@example.com");
        let message = limiter.check("a@example.com").unwrap_err().message;
        assert_eq!(message, "1 code e-mails were requested within an hour for a@example.com; try again in 60 minutes");
    }

    #[test]
    fn expired_addresses_are_swept_as_the_table_grows() {
        let limiter = AttemptLimiter::new(5, Duration::from_millis(20), "code e-mails were requested within an hour");
        for index in 0..100 {
            limiter.record(&format!("old{index}@example.com"));
        }
        std::thread::sleep(Duration::from_millis(30));
        for index in 0..200 {
            limiter.record(&format!("new{index}@example.com"));
        }
        assert!(limiter.tracked() <= 200, "expired entries stay: {}", limiter.tracked());
    }

    #[test]
    fn the_table_never_holds_many_more_than_its_capacity() {
        let limiter = AttemptLimiter::with_capacity(
            5,
            Duration::from_secs(3600),
            "code e-mails were requested within an hour",
            100,
        );
        for index in 0..1_000 {
            limiter.record(&format!("a{index}@example.com"));
            assert!(limiter.tracked() <= 101, "{} tracked after {index}", limiter.tracked());
        }
        // The newest addresses are still counted.
        for _ in 0..5 {
            limiter.record("a999@example.com");
        }
        assert_eq!(limiter.check("a999@example.com").unwrap_err().code, ErrorCode::TooManyAttempts);
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
