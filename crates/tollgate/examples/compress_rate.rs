#![allow(clippy::unwrap_used, clippy::expect_used)]
//! What tool-output compression saves and costs (issue 16, item 3; bench/RESULTS.md): for
//! each file of the corpus (bench/corpus/tool-outputs, real outputs of shell and API tools),
//! the tokens each lossless transform saved as `compress` counts them (on what it removed),
//! the exact figure (the text counted before and after), then with truncation at a token
//! budget, and the CPU per KiB of `compress::compress`, its counting included.
//!
//!   cargo run --release --example compress_rate [DIR] [MAX_TOKENS]

use std::time::Instant;
use tollgate::compress::{compress, Plan};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| "bench/corpus/tool-outputs".into());
    let max_tokens: u64 = args.next().map_or(2000, |s| s.parse().unwrap());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let lossless = Plan {
        ansi: true,
        json: true,
        min_repeats: 3,
        max_tokens: 0,
    };
    let lossy = Plan {
        max_tokens,
        ..lossless
    };
    println!(
        "| file | KiB | tokens | ansi | json | repeats | counted | exact saved | µs/KiB | truncate@{max_tokens}: saved | µs/KiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let (mut all_before, mut all_after, mut all_lossy, mut all_bytes) = (0u64, 0u64, 0u64, 0usize);
    let mut all_counted = 0u64;
    let (mut all_us, mut all_lossy_us) = (0f64, 0f64);
    for path in files {
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
        let before = tollgate::estimate::tokens(&text);
        let (out, steps) = compress(&text, &lossless);
        let after = out.as_deref().map_or(before, tollgate::estimate::tokens);
        let saved = |name: &str| {
            steps
                .iter()
                .find(|s| s.transform == name)
                .map_or(0, |s| s.saved)
        };
        let counted: u64 = steps.iter().map(|s| s.saved).sum();
        let time = |plan: &Plan| {
            let rounds = (4 << 20) / text.len().max(1) + 1;
            let t = Instant::now();
            for _ in 0..rounds {
                std::hint::black_box(compress(std::hint::black_box(&text), plan));
            }
            t.elapsed().as_secs_f64() * 1e6 / (rounds as f64 * text.len() as f64 / 1024.0)
        };
        let us = time(&lossless);
        let (lossy_out, _) = compress(&text, &lossy);
        let lossy_after = lossy_out
            .as_deref()
            .map_or(after, tollgate::estimate::tokens);
        let lossy_us = time(&lossy);
        let kib = text.len() as f64 / 1024.0;
        all_before += before;
        all_counted += counted;
        all_after += after;
        all_lossy += lossy_after;
        all_bytes += text.len();
        all_us += us * kib;
        all_lossy_us += lossy_us * kib;
        println!(
            "| {} | {kib:.1} | {before} | {} | {} | {} | {counted} | {} ({:.0} %) | {us:.1} | {} ({:.0} %) | {lossy_us:.1} |",
            path.file_name().unwrap().to_string_lossy(),
            saved("ansi"),
            saved("json"),
            saved("repeats"),
            before - after,
            100.0 * (before - after) as f64 / before.max(1) as f64,
            before - lossy_after,
            100.0 * (before - lossy_after) as f64 / before.max(1) as f64,
        );
    }
    let kib = all_bytes as f64 / 1024.0;
    println!(
        "| **all** | {kib:.0} | {all_before} | | | | {all_counted} | {} ({:.0} %) | {:.1} | {} ({:.0} %) | {:.1} |",
        all_before - all_after,
        100.0 * (all_before - all_after) as f64 / all_before.max(1) as f64,
        all_us / kib,
        all_before - all_lossy,
        100.0 * (all_before - all_lossy) as f64 / all_before.max(1) as f64,
        all_lossy_us / kib,
    );
}
