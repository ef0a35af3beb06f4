//! HTML by hand: every value that reaches a page goes through `esc`, and a page is one
//! string. No template engine: the pages are few, and a missed escape is easier to see in
//! one `format!` than behind a macro.

use std::fmt::Write;

/// Text safe in element content and in double- or single-quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A query-string value.
pub fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Micro-USD as dollars for people: `$12.34`, and small amounts with their precision.
pub fn usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    if m >= 10_000 || m == 0 {
        let cents = (m + 5_000) / 10_000;
        format!("{sign}${}.{:02}", group(cents / 100), cents % 100)
    } else {
        format!(
            "{sign}${}",
            crate::money::usd(m as i64).trim_end_matches('0')
        )
    }
}

/// 1234567 as `1,234,567`.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A table: its header cells and rows of already-escaped cells.
pub fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = String::from("<div class=\"scroll\"><table><thead><tr>");
    for h in head {
        let _ = write!(t, "<th>{}</th>", esc(h));
    }
    t.push_str("</tr></thead><tbody>");
    for r in rows {
        t.push_str("<tr>");
        for c in r {
            let _ = write!(t, "<td>{c}</td>");
        }
        t.push_str("</tr>");
    }
    t.push_str("</tbody></table></div>");
    t
}

/// A link whose text and target are escaped.
pub fn link(href: &str, text: &str) -> String {
    format!("<a href=\"{}\">{}</a>", esc(href), esc(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_formats() {
        assert_eq!(
            esc("<img src=x onerror='a'>&\""),
            "&lt;img src=x onerror=&#39;a&#39;&gt;&amp;&quot;"
        );
        assert_eq!(q("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(usd(12_345_678), "$12.35");
        assert_eq!(usd(1_234_567_890_000), "$1,234,567.89");
        assert_eq!(usd(0), "$0.00");
        assert_eq!(usd(1_234), "$0.001234");
        assert_eq!(usd(-50_000), "-$0.05");
        assert_eq!(group(1_000), "1,000");
        assert_eq!(group(999), "999");
    }
}
