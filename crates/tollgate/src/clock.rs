//! Time and request ids: the wall clock for records and expiries, a monotonic clock for
//! limits (which must not jump with the wall clock).

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Nanoseconds since the Unix epoch (span times).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Microseconds on a monotonic clock, from the first call in this process.
pub fn now_us() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_micros() as u64
}

/// A request id: `req_`, the time in milliseconds (44 bits) and 52 random bits, in hex.
/// Time first, so ids sort by creation: the usage table is keyed by id, and random ids made
/// every insert land on a random B-tree page (13 k records/s on the writer's path at 1 M
/// records, against 65 k/s for ids in creation order; bench/RESULTS.md run G).
pub fn new_request_id() -> String {
    let ms = (now_ms().max(0) as u64) & ((1 << 44) - 1);
    let random = rand::random::<u64>() & ((1 << 52) - 1);
    format!("req_{ms:011x}{random:013x}")
}

const DAY_MS: i64 = 86_400_000;

/// Days since the epoch → (year, month, day), proleptic Gregorian (Howard Hinnant's
/// algorithm): the one calendar the reports, exports and CLI share, without a date crate.
pub fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) → days since the epoch.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Epoch milliseconds as RFC 3339 UTC to the second: `2026-12-01T00:00:00Z`.
pub fn rfc3339(ms: i64) -> String {
    let (y, m, d) = civil(ms.div_euclid(DAY_MS));
    let s = ms.rem_euclid(DAY_MS) / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// An RFC 3339 UTC time (`…Z`, fractions of a second ignored) as epoch milliseconds.
pub fn parse_rfc3339(v: &str) -> Option<i64> {
    let (date, time) = v.split_once('T')?;
    let mut dp = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, d) = (dp.next()??, dp.next()??, dp.next()??);
    let hms: Vec<i64> = time
        .trim_end_matches('Z')
        .split(':')
        .map(|x| x.split('.').next().unwrap_or("0").parse::<i64>().ok())
        .collect::<Option<Vec<_>>>()?;
    let secs = hms.first()? * 3600 + hms.get(1)? * 60 + hms.get(2).copied().unwrap_or(0);
    Some(days_from_civil(y, m, d) * DAY_MS + secs * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        for ms in [0i64, 1_796_083_200_000, 1_796_169_599_000, 951_782_400_000] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms), "{}", rfc3339(ms));
        }
        assert_eq!(rfc3339(1_796_083_200_000), "2026-12-01T00:00:00Z");
        assert_eq!(
            parse_rfc3339("2026-12-01T00:00:00.427Z"),
            Some(1_796_083_200_000)
        );
        assert_eq!(parse_rfc3339("garbage"), None);
    }
}
