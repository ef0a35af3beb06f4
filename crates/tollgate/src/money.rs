//! Money units: integer micro-USD, the bounds every amount and token count stays within,
//! and exact parsing and formatting of dollar amounts (no floats anywhere).

/// The largest amount of money the ledger takes, in micro-USD ($1 000 000 000): every
/// amount, balance, floor, hold and cost is kept within ±this, so sums of a wallet's entries,
/// a balance plus a top-up, or a hold of a quote can never leave i64 (±9.2e18).
pub const MAX_MICROS: i64 = 1_000_000_000_000_000;

/// The largest token count any request or bound carries (input estimates, output caps,
/// envelope token caps): 10^12, so token sums never leave i64 either.
pub const MAX_TOKENS: u64 = 1_000_000_000_000;

/// `12.50`, `$0.01`, `0.000001` → micro-USD, exactly (no floats). At most 6 decimals, and at
/// most `MAX_MICROS` either way.
pub fn parse_usd(text: &str) -> std::result::Result<i64, String> {
    let t = text.trim();
    let (neg, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    let t = t.strip_prefix('$').unwrap_or(t);
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let bad = || format!("\"{text}\" is not an amount in USD (e.g. 12.50)");
    if whole.is_empty() && frac.is_empty()
        || !whole.chars().all(|c| c.is_ascii_digit())
        || !frac.chars().all(|c| c.is_ascii_digit())
    {
        return Err(bad());
    }
    if frac.len() > 6 {
        return Err(format!(
            "\"{text}\" has more than 6 decimals (the ledger counts micro-dollars)"
        ));
    }
    let too_big = || {
        format!(
            "\"{text}\" is larger than the ledger takes (at most ${})",
            usd(MAX_MICROS)
        )
    };
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_big())?
    };
    let frac_micros: i64 = format!("{frac:0<6}").parse().map_err(|_| bad())?;
    let v = whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(frac_micros))
        .filter(|v| *v <= MAX_MICROS)
        .ok_or_else(too_big)?;
    Ok(if neg { -v } else { v })
}

/// Micro-USD as dollars, exactly.
pub fn usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
}
