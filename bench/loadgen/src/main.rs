//! A small load generator that measures what wrk cannot: latency at a fixed offered rate
//! without coordinated omission (each request is timed from when it was *scheduled*), and time
//! to first byte of a stream.

use clap::Parser;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Full URL, e.g. http://127.0.0.1:4000/v1/chat/completions
    #[arg(long)]
    url: String,
    /// Bearer key
    #[arg(long, default_value = "none")]
    key: String,
    #[arg(long, default_value = "mock")]
    model: String,
    #[arg(long)]
    stream: bool,
    /// Requests per second (open loop). Without it: closed loop at --concurrency.
    #[arg(long)]
    rate: Option<u64>,
    #[arg(long, default_value = "64")]
    concurrency: usize,
    #[arg(long, default_value = "10")]
    seconds: u64,
    /// Seconds of warm-up load before measuring.
    #[arg(long, default_value = "2")]
    warmup: u64,
    /// A label printed with the result.
    #[arg(long, default_value = "")]
    label: String,
    /// Cycle through this many distinct bodies, the same in every run (0: every body unique),
    /// to measure a response cache's hits.
    #[arg(long, default_value = "0")]
    distinct: u64,
}

struct Sample {
    total_us: u64,
    ttfb_us: u64,
    ok: bool,
}

/// The request body around a per-request number: every request is distinct, as real traffic
/// is (identical ones would be coalesced, replayed or stopped by the loop guard).
struct Template {
    head: Vec<u8>,
    tail: Vec<u8>,
    distinct: u64,
}

static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Template {
    fn body(&self) -> Vec<u8> {
        let mut n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.distinct > 0 {
            n %= self.distinct;
        }
        let n = n.to_string();
        let mut b = Vec::with_capacity(self.head.len() + n.len() + self.tail.len());
        b.extend_from_slice(&self.head);
        b.extend_from_slice(n.as_bytes());
        b.extend_from_slice(&self.tail);
        b
    }
}

async fn one(
    client: &reqwest::Client,
    args: &Args,
    body: &Arc<Template>,
    scheduled: Instant,
) -> Sample {
    let resp = client
        .post(&args.url)
        .bearer_auth(&args.key)
        .header("content-type", "application/json")
        .body(body.body())
        .send()
        .await;
    let mut resp = match resp {
        Ok(r) => r,
        Err(_) => {
            return Sample {
                total_us: scheduled.elapsed().as_micros() as u64,
                ttfb_us: 0,
                ok: false,
            }
        }
    };
    let ok = resp.status().is_success();
    let mut ttfb = None;
    loop {
        match resp.chunk().await {
            Ok(Some(_)) => {
                if ttfb.is_none() {
                    ttfb = Some(scheduled.elapsed().as_micros() as u64);
                }
            }
            Ok(None) => break,
            Err(_) => {
                return Sample {
                    total_us: scheduled.elapsed().as_micros() as u64,
                    ttfb_us: 0,
                    ok: false,
                }
            }
        }
    }
    let total = scheduled.elapsed().as_micros() as u64;
    Sample {
        total_us: total,
        ttfb_us: ttfb.unwrap_or(total),
        ok,
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Arc::new(Args::parse());
    let text = serde_json::to_string(&serde_json::json!({
        "model": args.model,
        "stream": args.stream,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Summarise benchmark request @SEQ@ in one sentence."}],
    }))?;
    let (head, tail) = text.split_once("@SEQ@").unwrap_or((&text, ""));
    // Numbers are unique across runs too: two runs back to back with one key must not look
    // like retries of each other to the gateway's damping.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    // Distinct bodies are the same in every run: the warm-up fills the cache the run reads.
    let head = match args.distinct {
        0 => format!("{head}{run:x}-"),
        _ => format!("{head}cached-"),
    };
    let body = Arc::new(Template {
        head: head.as_bytes().to_vec(),
        tail: tail.as_bytes().to_vec(),
        distinct: args.distinct,
    });
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .build()?;

    let run = |secs: u64| {
        let args = args.clone();
        let body = body.clone();
        let client = client.clone();
        async move {
            let start = Instant::now();
            let end = start + Duration::from_secs(secs);
            let mut handles = Vec::new();
            match args.rate {
                Some(rate) => {
                    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
                    let mut next = start;
                    while next < end {
                        tokio::time::sleep_until(next.into()).await;
                        let (client, args, body) = (client.clone(), args.clone(), body.clone());
                        let scheduled = next;
                        handles.push(tokio::spawn(async move {
                            vec![one(&client, &args, &body, scheduled).await]
                        }));
                        next += interval;
                    }
                }
                None => {
                    for _ in 0..args.concurrency {
                        let (client, args, body) = (client.clone(), args.clone(), body.clone());
                        handles.push(tokio::spawn(async move {
                            let mut out = Vec::new();
                            while Instant::now() < end {
                                out.push(one(&client, &args, &body, Instant::now()).await);
                            }
                            out
                        }));
                    }
                }
            }
            let mut samples = Vec::new();
            for h in handles {
                samples.extend(h.await.unwrap_or_default());
            }
            (samples, start.elapsed())
        }
    };
    if args.warmup > 0 {
        run(args.warmup).await;
    }
    let (samples, elapsed) = run(args.seconds).await;
    let errors = samples.iter().filter(|s| !s.ok).count();
    let mut total: Vec<u64> = samples
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.total_us)
        .collect();
    let mut ttfb: Vec<u64> = samples.iter().filter(|s| s.ok).map(|s| s.ttfb_us).collect();
    total.sort_unstable();
    ttfb.sort_unstable();
    let out = serde_json::json!({
        "label": args.label,
        "mode": if args.rate.is_some() { "fixed-rate" } else { "max" },
        "offered_rps": args.rate,
        "concurrency": if args.rate.is_none() { Some(args.concurrency) } else { None },
        "stream": args.stream,
        "requests": samples.len(),
        "errors": errors,
        "achieved_rps": (samples.len() as f64 / elapsed.as_secs_f64()).round(),
        "ms": {"p50": pct(&total, 0.50), "p90": pct(&total, 0.90), "p99": pct(&total, 0.99), "p999": pct(&total, 0.999), "max": pct(&total, 1.0)},
        "ttfb_ms": {"p50": pct(&ttfb, 0.50), "p99": pct(&ttfb, 0.99), "p999": pct(&ttfb, 0.999)},
    });
    println!("{out}");
    Ok(())
}
