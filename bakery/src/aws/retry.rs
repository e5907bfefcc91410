//! The one retry layer for every AWS call. The SDK's own retries are turned off (see
//! `client::load`): nested retry loops multiply (coldsnap's 3 × 12 = 36 attempts), and a single
//! layer lets every caller see the same bounded, jittered backoff and the same error text.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use rand::Rng;
use std::future::Future;
use std::time::Duration;

/// Error codes AWS services use for "slow down" and "try again".
const TRANSIENT_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ProvisionedThroughputExceededException",
    "ThrottledException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
    "InternalError",
    "InternalFailure",
    "InternalServerException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "Unavailable",
];

/// How many times one call is tried, and how long to sleep between tries.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Policy {
    /// `BAKERY_AWS_MAX_ATTEMPTS` overrides the number of attempts (at least 1).
    pub fn from_env() -> Policy {
        let attempts = std::env::var("BAKERY_AWS_MAX_ATTEMPTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
        Policy { attempts: u32::max(attempts, 1), base: Duration::from_millis(50), cap: Duration::from_secs(5) }
    }

    /// "Full jitter" backoff: a random sleep up to an exponentially growing, capped ceiling.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << attempt.min(16)).min(self.cap);
        ceiling.mul_f64(rand::thread_rng().gen_range(0.5..1.0))
    }
}

/// Whether an error is worth another attempt: throttling, server errors, timeouts and
/// connections that failed or were dropped.
pub fn is_transient<E: ProvideErrorMetadata>(error: &SdkError<E, HttpResponse>) -> bool {
    match error {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
        SdkError::ServiceError(context) => {
            let status = context.raw().status().as_u16();
            status >= 500 || status == 429 || error.code().is_some_and(|code| TRANSIENT_CODES.contains(&code))
        }
        _ => false,
    }
}

/// The error of a call that failed for good, with the operation's name and the whole chain of
/// causes (never the request, so never a credential).
#[derive(Debug)]
pub struct CallError {
    pub operation: &'static str,
    pub code: Option<String>,
    pub attempts: u32,
    pub message: String,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed", self.operation)?;
        if let Some(code) = &self.code {
            write!(f, " [{code}]")?;
        }
        if self.attempts > 1 {
            write!(f, " after {} attempts", self.attempts)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for CallError {}

impl CallError {
    /// The AWS error code says the thing asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code.as_deref().is_some_and(|code| code.contains("NotFound") || code == "ResourceNotFoundException")
    }
}

/// Runs `call` until it succeeds, fails with an error that is not transient, or runs out of
/// attempts.
pub async fn retry<T, E, F, Fut>(policy: Policy, operation: &'static str, call: F) -> Result<T, CallError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
{
    retry_also(policy, operation, &[], call).await
}

/// [`retry`], also retrying the error codes in `also` (eventual consistency: a resource that a
/// previous call created and the service does not show everywhere yet).
pub async fn retry_also<T, E, F, Fut>(
    policy: Policy,
    operation: &'static str,
    also: &[&str],
    mut call: F,
) -> Result<T, CallError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match call().await {
            Ok(value) => return Ok(value),
            Err(error)
                if attempt < policy.attempts
                    && (is_transient(&error) || error.code().is_some_and(|code| also.contains(&code))) =>
            {
                let delay = policy.delay(attempt);
                tracing::debug!(operation, attempt, ?delay, error = %DisplayErrorContext(&error), "retrying");
                tokio::time::sleep(delay).await;
            }
            Err(error) => {
                return Err(CallError {
                    operation,
                    code: error.code().map(str::to_string),
                    attempts: attempt,
                    message: error
                        .message()
                        .map(str::to_string)
                        .unwrap_or_else(|| DisplayErrorContext(&error).to_string()),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = Policy { attempts: 5, base: Duration::from_millis(100), cap: Duration::from_secs(1) };
        assert!(policy.delay(1) <= Duration::from_millis(200));
        assert!(policy.delay(1) >= Duration::from_millis(100));
        for attempt in 4..40 {
            assert!(policy.delay(attempt) <= Duration::from_secs(1));
            assert!(policy.delay(attempt) >= Duration::from_millis(500));
        }
    }
}
