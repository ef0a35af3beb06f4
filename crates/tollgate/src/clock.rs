//! Time and request ids: the wall clock for records and expiries, a monotonic clock for
//! limits (which must not jump with the wall clock).

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Microseconds on a monotonic clock, from the first call in this process.
pub fn now_us() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_micros() as u64
}

/// A request id: `req_` and 96 random bits in hex.
pub fn new_request_id() -> String {
    format!("req_{:024x}", rand::random::<u128>() >> 32)
}
