//! Retry delays: exponential from the configured first delay, capped, with
//! jitter so that a receiver coming back is not hit by every retry at once.

use std::time::Duration;

use rand::Rng;

/// Delay before attempt `attempts + 1`, after `attempts` failed ones (≥ 1).
pub fn delay(initial: Duration, max: Duration, attempts: u32) -> Duration {
    let exponent = attempts.saturating_sub(1).min(20);
    let base = initial.saturating_mul(1u32 << exponent).min(max);
    // ±20 % jitter.
    let jitter = rand::rng().random_range(0.8..1.2);
    base.mul_f64(jitter).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_per_attempt_and_stays_under_the_cap() {
        let initial = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        let first = delay(initial, max, 1);
        assert!(first >= Duration::from_millis(800) && first <= Duration::from_millis(1200), "{first:?}");
        let third = delay(initial, max, 3);
        assert!(third >= Duration::from_millis(3200) && third <= Duration::from_millis(4800), "{third:?}");
        assert!(delay(initial, max, 40) <= max);
    }
}
