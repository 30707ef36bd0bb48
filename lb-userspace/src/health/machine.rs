//! keepalived's up/down rules for one checker (`check_*.c` epilogs, keepalived.md §5.1), with
//! rise/fall counts on top, and how a real server's checkers combine (§5.2). Pure: the runner
//! feeds outcomes in and sleeps for the delay that comes out.

use std::time::Duration;

use super::spec::{Outcome, Timing};

/// What a recorded outcome changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

/// One checker's state.
#[derive(Clone, Debug)]
pub struct Checker {
    timing: Timing,
    up: bool,
    /// No outcome yet: without alpha the checker starts up, and one failure is enough to take
    /// it down (keepalived starts `retry_it` at `retry`).
    fresh: bool,
    /// Consecutive failed attempts while up.
    failures: u32,
    /// Consecutive successes while down.
    successes: u32,
    /// HTTP URLs: how many, the one to check next, and while recovering how many have passed
    /// since the failed one did.
    urls: usize,
    url: usize,
    recovering: Option<usize>,
    fast_recovery: bool,
    /// Weight set by the probe (MISC_CHECK dynamic, FILE_CHECK); `None`: the configured one.
    weight: Option<u32>,
}

impl Checker {
    /// `urls`: the number of URLs of an HTTP checker (1 for the others).
    pub fn new(timing: Timing, urls: usize, fast_recovery: bool) -> Self {
        Checker {
            timing,
            up: !timing.alpha,
            fresh: true,
            failures: 0,
            successes: 0,
            urls: urls.max(1),
            url: 0,
            recovering: None,
            fast_recovery,
            weight: None,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The weight the probe asked for, if any.
    pub fn weight(&self) -> Option<u32> {
        self.weight
    }

    /// The URL the next attempt checks.
    pub fn url(&self) -> usize {
        self.url
    }

    /// Consecutive failures an up checker needs to go down.
    fn fall(&self) -> u32 {
        if self.timing.fall > 0 {
            self.timing.fall
        } else {
            self.timing.retry + 1
        }
    }

    /// Delay before the first attempt: 1 s (keepalived's bootstrap delay) plus `jitter`
    /// (a uniform draw in [0, 1)) of the warmup.
    pub fn first_delay(&self, jitter: f64) -> Duration {
        Duration::from_secs(1) + self.timing.warmup.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// Records one attempt; returns the transition it caused and the delay before the next
    /// attempt.
    pub fn record(&mut self, o: &Outcome) -> (Option<Transition>, Duration) {
        let fresh = std::mem::replace(&mut self.fresh, false);
        let t = self.timing;
        if o.ok {
            self.weight = o.weight;
        }
        if self.up {
            if o.ok {
                self.failures = 0;
                self.url = (self.url + 1) % self.urls;
                return (None, t.interval);
            }
            self.failures += 1;
            if fresh || self.failures >= self.fall() {
                self.up = false;
                self.failures = 0;
                self.successes = 0;
                // The failed URL is the one retried while down.
                return (Some(Transition::Down), self.down_interval());
            }
            // Retry the same URL.
            return (None, t.delay_before_retry);
        }
        if !o.ok {
            self.successes = 0;
            self.recovering = None;
            return (None, self.down_interval());
        }
        self.successes += 1;
        if self.successes < t.rise.max(1) {
            return (None, t.interval);
        }
        // Every URL must pass again, starting from the first, before the checker is up.
        if self.urls > 1 {
            let passed = match self.recovering {
                None => {
                    self.url = 0;
                    0
                }
                Some(n) => {
                    self.url = (self.url + 1) % self.urls;
                    n + 1
                }
            };
            if passed < self.urls {
                self.recovering = Some(passed);
                let next = if self.fast_recovery {
                    Duration::ZERO
                } else {
                    t.interval
                };
                return (None, next);
            }
            self.recovering = None;
            self.url = 0;
        }
        self.up = true;
        self.failures = 0;
        (Some(Transition::Up), t.interval)
    }

    /// While down a checker runs every interval; an HTTP checker retries its failed URL every
    /// max(delay_before_retry, interval).
    fn down_interval(&self) -> Duration {
        if self.urls > 1 {
            self.timing.interval.max(self.timing.delay_before_retry)
        } else {
            self.timing.interval
        }
    }
}

/// A real server's health from its checkers: alive only if none is down; its weight is the
/// configured one plus each probe-set weight's difference from it (keepalived's
/// contributions), clamped to 0..=65535.
pub fn combine(configured: u32, checkers: &[Checker]) -> (bool, u32) {
    let alive = checkers.iter().all(|c| c.is_up());
    let mut w = configured as i64;
    for c in checkers {
        if let Some(x) = c.weight() {
            w += x as i64 - configured as i64;
        }
    }
    (alive, w.clamp(0, 65535) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(retry: u32) -> Timing {
        Timing {
            interval: Duration::from_secs(6),
            timeout: Duration::from_secs(3),
            retry,
            delay_before_retry: Duration::from_secs(1),
            warmup: Duration::from_secs(6),
            alpha: false,
            rise: 1,
            fall: 0,
        }
    }

    fn ok() -> Outcome {
        Outcome {
            ok: true,
            detail: "ok".into(),
            weight: None,
            latency: Duration::ZERO,
        }
    }

    fn fail() -> Outcome {
        Outcome {
            ok: false,
            detail: "refused".into(),
            ..ok()
        }
    }

    /// keepalived: the first check after start-up takes a non-alpha checker down at once.
    #[test]
    fn first_failure_is_enough() {
        let mut c = Checker::new(timing(3), 1, false);
        assert!(c.is_up());
        assert_eq!(
            c.record(&fail()),
            (Some(Transition::Down), Duration::from_secs(6))
        );
        assert!(!c.is_up());
    }

    /// While up, `retry` extra attempts delay_before_retry apart; the (retry + 1)-th failure
    /// takes it down; any success resets the count; one success brings it back.
    #[test]
    fn retries_then_down_then_one_success_up() {
        let mut c = Checker::new(timing(2), 1, false);
        assert_eq!(c.record(&ok()), (None, Duration::from_secs(6)));
        assert_eq!(c.record(&fail()), (None, Duration::from_secs(1)));
        assert_eq!(c.record(&ok()), (None, Duration::from_secs(6)));
        assert_eq!(c.record(&fail()), (None, Duration::from_secs(1)));
        assert_eq!(c.record(&fail()), (None, Duration::from_secs(1)));
        assert_eq!(
            c.record(&fail()),
            (Some(Transition::Down), Duration::from_secs(6))
        );
        assert_eq!(c.record(&fail()), (None, Duration::from_secs(6)));
        assert_eq!(
            c.record(&ok()),
            (Some(Transition::Up), Duration::from_secs(6))
        );
    }

    /// alpha: down until the first success.
    #[test]
    fn alpha_starts_down() {
        let mut t = timing(1);
        t.alpha = true;
        let mut c = Checker::new(t, 1, false);
        assert!(!c.is_up());
        assert_eq!(c.record(&fail()).0, None);
        assert_eq!(c.record(&ok()).0, Some(Transition::Up));
    }

    /// rise/fall on top of keepalived's rules.
    #[test]
    fn rise_and_fall_counts() {
        let mut t = timing(0);
        t.rise = 3;
        t.fall = 2;
        let mut c = Checker::new(t, 1, false);
        c.record(&ok());
        assert_eq!(c.record(&fail()).0, None);
        assert_eq!(c.record(&fail()).0, Some(Transition::Down));
        assert_eq!(c.record(&ok()).0, None);
        assert_eq!(c.record(&ok()).0, None);
        assert_eq!(c.record(&fail()).0, None);
        assert_eq!(c.record(&ok()).0, None);
        assert_eq!(c.record(&ok()).0, None);
        assert_eq!(c.record(&ok()).0, Some(Transition::Up));
    }

    /// HTTP with several URLs: one per run while up; the failed one retried while down; all
    /// must pass again (from the first) before it is up.
    #[test]
    fn urls_rotate_and_all_pass_to_recover() {
        let mut c = Checker::new(timing(0), 3, false);
        assert_eq!(c.url(), 0);
        c.record(&ok());
        assert_eq!(c.url(), 1);
        assert_eq!(c.record(&fail()).0, Some(Transition::Down));
        assert_eq!(c.url(), 1, "the failed URL is retried");
        assert_eq!(c.record(&ok()), (None, Duration::from_secs(6)));
        assert_eq!(c.url(), 0, "recovery checks every URL from the first");
        assert_eq!(c.record(&ok()).0, None);
        assert_eq!(c.url(), 1);
        assert_eq!(c.record(&ok()).0, None);
        assert_eq!(c.url(), 2);
        assert_eq!(c.record(&ok()).0, Some(Transition::Up));
        assert_eq!(c.url(), 0);
    }

    /// MISC_CHECK dynamic weights and how checkers combine.
    #[test]
    fn weights_and_combination() {
        let mut a = Checker::new(timing(0), 1, false);
        let b = Checker::new(timing(0), 1, false);
        a.record(&Outcome {
            weight: Some(8),
            ..ok()
        });
        assert_eq!(combine(3, &[a.clone(), b.clone()]), (true, 8));
        a.record(&ok());
        assert_eq!(combine(3, &[a.clone(), b.clone()]), (true, 3));
        let mut d = b.clone();
        d.record(&fail());
        assert_eq!(combine(3, &[a, d]), (false, 3));
        assert_eq!(
            Checker::new(timing(0), 1, false).first_delay(0.5),
            Duration::from_secs(4)
        );
    }
}
