#![allow(clippy::unwrap_used, clippy::expect_used)]
//! What redaction costs (issue 15, item 4; bench/RESULTS.md): CPU per KB of text for the
//! detectors alone (`redact::find`), and for a whole Chat request's `messages` as the redact
//! phase handles it (parse, scan every string, re-serialize), on agent-like text without
//! findings (log lines, JSON, code, prose) and on text with a finding every ~200 bytes.
//!
//!   cargo run --release --example redact_rate [MIB]

use std::time::Instant;
use tollgate::redact::{Action, Detector, Scrubber};

fn clean_text(kib: usize) -> String {
    let lines = [
        "2026-12-03T11:25:16.123Z INFO request req_1a23bb18e64c451a took 123 ms status=200 bytes=5123\n",
        "{\"id\": 18446744073, \"name\": \"build-runner\", \"tags\": [\"ci\", \"linux\"], \"ok\": true}\n",
        "    fn parse(input: &str) -> Result<Value, Error> { serde_json::from_str(input) }\n",
        "The deployment finished in 4 minutes; 12 of 12 checks passed and version 1.22.3 is live.\n",
        "test tests::it_handles_a_very_long_name_without_panicking ... ok (0.004s) 1764759000000\n",
    ];
    let mut s = String::new();
    let mut i = 0;
    while s.len() < kib * 1024 {
        s.push_str(lines[i % lines.len()]);
        i += 1;
    }
    s
}

fn pii_text(kib: usize) -> String {
    let lines = [
        "Customer jane.doe@example.com called from +1 415 555 2671 about her last invoice today.\n",
        "Refund to card 4111 1111 1111 1111 was approved; the account is otherwise in good standing.\n",
        "Wire the balance to DE89 3704 0044 0532 0130 00 before Friday, said the customer on the phone.\n",
        "The deploy used AKIAIOSFODNN7EXAMPLE, which must be rotated; ticket OPS-4411 tracks it now.\n",
    ];
    let mut s = String::new();
    let mut i = 0;
    while s.len() < kib * 1024 {
        s.push_str(lines[i % lines.len()]);
        i += 1;
    }
    s
}

fn measure(name: &str, text: &str, mib: usize) {
    let secret = [7u8; 32];
    let actions: Vec<(Detector, Action)> =
        Detector::ALL.iter().map(|d| (*d, Action::Mask)).collect();
    let rounds = (mib * 1024 * 1024 / text.len()).max(1);
    // The detectors alone.
    let started = Instant::now();
    let mut found = 0;
    for _ in 0..rounds {
        found += tollgate::redact::find(std::hint::black_box(text), &Detector::ALL).len();
    }
    let scan = started.elapsed().as_secs_f64() * 1e6 / (rounds * text.len()) as f64 * 1024.0;
    // The redact phase on a request: 8 messages sharing the text, parsed and re-serialized.
    let parts: Vec<serde_json::Value> = text
        .as_bytes()
        .chunks(text.len().div_ceil(8))
        .map(|c| serde_json::json!({"role": "user", "content": String::from_utf8_lossy(c)}))
        .collect();
    let raw = serde_json::Value::Array(parts).to_string();
    let started = Instant::now();
    let mut changed = 0;
    for _ in 0..rounds {
        let mut scrub = Scrubber::new(actions.clone(), secret).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(std::hint::black_box(&raw)).unwrap();
        if scrub.value(&mut v) {
            changed += v.to_string().len();
        }
    }
    let phase = started.elapsed().as_secs_f64() * 1e6 / (rounds * raw.len()) as f64 * 1024.0;
    println!(
        "{{\"text\":\"{name}\",\"kib\":{},\"findings_per_kib\":{:.2},\"scan_us_per_kib\":{scan:.2},\"request_us_per_kib\":{phase:.2},\"changed\":{}}}",
        text.len() / 1024,
        found as f64 / (rounds * text.len() / 1024) as f64,
        changed > 0
    );
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    for kib in [4, 64] {
        measure("clean", &clean_text(kib), mib);
        measure("pii", &pii_text(kib), mib);
    }
}
