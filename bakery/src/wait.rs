//! The one loop every host-side wait uses (a process stopping, balancer servers coming up or
//! draining, a filesystem letting go): poll until a check yields, bounded in time. Cloud-side
//! waits have the async twin in `aws::ec2::wait_for`, with backoff.

use std::time::{Duration, Instant};

/// Polls `check` every `interval` until it yields a value (Some) or fails, or `timeout` passes
/// (Ok(None)). The check always runs at least once.
pub fn try_until<T, E>(
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(Some(value));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(interval);
    }
}

/// [`try_until`] for a check that cannot fail.
pub fn until<T>(timeout: Duration, interval: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    try_until(timeout, interval, || Ok::<_, std::convert::Infallible>(check())).unwrap_or_else(|never| match never {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yields_the_first_value_or_none_after_the_timeout() {
        let mut polls = 0;
        let found = until(Duration::from_secs(5), Duration::ZERO, || {
            polls += 1;
            (polls == 3).then_some(polls)
        });
        assert_eq!(found, Some(3));
        assert_eq!(until::<()>(Duration::ZERO, Duration::ZERO, || None), None, "checked once, then gave up");
        let failed: Result<Option<()>, &str> = try_until(Duration::from_secs(5), Duration::ZERO, || Err("broken"));
        assert_eq!(failed, Err("broken"));
    }
}
