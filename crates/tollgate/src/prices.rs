//! Prices and cost. Integer micro-USD per million tokens in, integer micro-USD out.

use crate::config::PriceConfig;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use tollgate_proto::Usage;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
    pub reasoning: u64,
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
    /// `model@version`, recorded with each cost so a bill can be recomputed.
    pub version: String,
}

/// The built-in table: (model, input, cached input, output) in micro-USD per 1M tokens,
/// from the providers' public price pages. Overridden entry by entry by `[[prices]]`.
const BUILTIN_VERSION: &str = "builtin-2026-11";
const BUILTIN: &[(&str, u64, u64, u64)] = &[
    ("gpt-5", 1_250_000, 125_000, 10_000_000),
    ("gpt-5-mini", 250_000, 25_000, 2_000_000),
    ("gpt-5-nano", 50_000, 5_000, 400_000),
    ("gpt-4.1", 2_000_000, 500_000, 8_000_000),
    ("gpt-4.1-mini", 400_000, 100_000, 1_600_000),
    ("gpt-4.1-nano", 100_000, 25_000, 400_000),
    ("gpt-4o", 2_500_000, 1_250_000, 10_000_000),
    ("gpt-4o-mini", 150_000, 75_000, 600_000),
    ("o1", 15_000_000, 7_500_000, 60_000_000),
    ("o3", 2_000_000, 500_000, 8_000_000),
    ("o3-mini", 1_100_000, 550_000, 4_400_000),
    ("o4-mini", 1_100_000, 275_000, 4_400_000),
    ("text-embedding-3-small", 20_000, 20_000, 0),
    ("text-embedding-3-large", 130_000, 130_000, 0),
    ("claude-opus-4-1", 15_000_000, 1_500_000, 75_000_000),
    ("claude-opus-4", 15_000_000, 1_500_000, 75_000_000),
    ("claude-sonnet-4-5", 3_000_000, 300_000, 15_000_000),
    ("claude-sonnet-4", 3_000_000, 300_000, 15_000_000),
    ("claude-3-7-sonnet", 3_000_000, 300_000, 15_000_000),
    ("claude-haiku-4-5", 1_000_000, 100_000, 5_000_000),
    ("claude-3-5-haiku", 800_000, 80_000, 4_000_000),
    // The mock provider is priced so tests and demos exercise the cost path for real.
    ("mock*", 1_000_000, 500_000, 2_000_000),
];

#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    by_model: HashMap<String, Price>,
    /// Entries written `name*`, longest first.
    prefixes: Vec<(String, Price)>,
}

impl PriceTable {
    pub fn new(overrides: &[PriceConfig]) -> PriceTable {
        let mut by_model = HashMap::new();
        for (model, input, cached, output) in BUILTIN {
            // Anthropic charges 1.25x input for 5-minute cache writes and 2x for 1-hour ones;
            // other providers have no separate write price.
            let (w5, w1) = if model.starts_with("claude") {
                (input * 5 / 4, input * 2)
            } else {
                (*input, *input)
            };
            by_model.insert(
                (*model).to_string(),
                Price {
                    input: *input,
                    cached_input: *cached,
                    output: *output,
                    reasoning: *output,
                    cache_write_5m: w5,
                    cache_write_1h: w1,
                    version: format!("{model}@{BUILTIN_VERSION}"),
                },
            );
        }
        for p in overrides {
            let cached_input = p.cached_input.unwrap_or(p.input);
            let reasoning = p.reasoning.unwrap_or(p.output);
            let w5 = p.cache_write_5m.unwrap_or(p.input);
            let w1 = p.cache_write_1h.unwrap_or(p.input);
            let version = p.version.clone().unwrap_or_else(|| {
                let digest = Sha256::digest(format!(
                    "{}/{}/{}/{}/{}/{}",
                    p.input, cached_input, p.output, reasoning, w5, w1
                ));
                format!("cfg-{}", &hex::encode(digest)[..8])
            });
            by_model.insert(
                p.model.clone(),
                Price {
                    input: p.input,
                    cached_input,
                    output: p.output,
                    reasoning,
                    cache_write_5m: w5,
                    cache_write_1h: w1,
                    version: format!("{}@{version}", p.model),
                },
            );
        }
        let mut prefixes: Vec<(String, Price)> = by_model
            .iter()
            .filter_map(|(k, v)| k.strip_suffix('*').map(|p| (p.to_string(), v.clone())))
            .collect();
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        by_model.retain(|k, _| !k.ends_with('*'));
        PriceTable { by_model, prefixes }
    }

    /// `provider/model` first, then the model; a dated snapshot (`gpt-4o-2024-08-06`,
    /// `claude-sonnet-4-5-20250929`) falls back to its base name. Any other suffix does not,
    /// because `gpt-4o-audio-preview` is not priced like `gpt-4o`.
    pub fn lookup(&self, provider: &str, model: &str) -> Option<&Price> {
        if let Some(p) = self.by_model.get(&format!("{provider}/{model}")) {
            return Some(p);
        }
        if let Some(p) = self.by_model.get(model) {
            return Some(p);
        }
        if let Some(base) = strip_date_suffix(model) {
            if let Some(p) = self
                .by_model
                .get(&format!("{provider}/{base}"))
                .or_else(|| self.by_model.get(base))
            {
                return Some(p);
            }
        }
        let qualified = format!("{provider}/{model}");
        self.prefixes
            .iter()
            .find(|(prefix, _)| {
                qualified.starts_with(prefix.as_str()) || model.starts_with(prefix.as_str())
            })
            .map(|(_, p)| p)
    }

    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.by_model.keys().map(String::as_str)
    }
}

fn strip_date_suffix(model: &str) -> Option<&str> {
    let bytes = model.as_bytes();
    // -YYYY-MM-DD
    if bytes.len() > 11 {
        let (base, tail) = model.split_at(model.len() - 11);
        let t = tail.as_bytes();
        if t[0] == b'-'
            && t[5] == b'-'
            && t[8] == b'-'
            && [1, 2, 3, 4, 6, 7, 9, 10]
                .iter()
                .all(|&i| t[i].is_ascii_digit())
        {
            return Some(base);
        }
    }
    // -YYYYMMDD
    if bytes.len() > 9 {
        let (base, tail) = model.split_at(model.len() - 9);
        if tail.starts_with('-') && tail[1..].bytes().all(|b| b.is_ascii_digit()) {
            return Some(base);
        }
    }
    None
}

/// The token classes a price tells apart, in this order.
pub const TOKEN_CLASSES: [&str; 6] = [
    "Input",
    "Cached Input",
    "Cache Write 5m",
    "Cache Write 1h",
    "Output",
    "Reasoning",
];

/// Usage split into `TOKEN_CLASSES`, each token in exactly one class: cached reads and cache
/// writes are parts of the input, reasoning a part of the output.
pub fn token_classes(u: &Usage) -> [u64; 6] {
    let cached = u.cached_input.min(u.input);
    let w5 = u.cache_write_5m.min(u.input - cached);
    let w1 = u.cache_write_1h.min(u.input - cached - w5);
    let reasoning = u.reasoning.min(u.output);
    [
        u.input - cached - w5 - w1,
        cached,
        w5,
        w1,
        u.output - reasoning,
        reasoning,
    ]
}

impl Price {
    /// Pico-USD per token of each of `TOKEN_CLASSES`.
    pub fn per_class(&self) -> [u64; 6] {
        [
            self.input,
            self.cached_input,
            self.cache_write_5m,
            self.cache_write_1h,
            self.output,
            self.reasoning,
        ]
    }

    /// Cost in micro-USD, rounded up: a request that used anything is never free, and the
    /// rounding error is below one micro-dollar per request (ADR 0003).
    pub fn cost(&self, u: &Usage) -> u64 {
        let pico = token_classes(u)
            .iter()
            .zip(self.per_class())
            .fold(0u128, |acc, (n, p)| {
                acc.saturating_add(u128::from(*n) * u128::from(p))
            });
        // Capped where the ledger's arithmetic stays exact (see `wallet::MAX_MICROS`).
        pico.div_ceil(1_000_000)
            .min(crate::money::MAX_MICROS as u128) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_splits_token_classes_and_rounds_up() {
        let t = PriceTable::new(&[]);
        let p = t.lookup("openai", "gpt-4o-mini").unwrap();
        // 1000 input of which 400 cached, 200 output of which 50 reasoning.
        let u = Usage {
            input: 1000,
            cached_input: 400,
            output: 200,
            reasoning: 50,
            ..Usage::default()
        };
        // 600*0.15 + 400*0.075 + 150*0.6 + 50*0.6 = 90 + 30 + 90 + 30 = 240 micro-USD
        assert_eq!(p.cost(&u), 240);
        assert_eq!(
            p.cost(&Usage {
                input: 1,
                ..Usage::default()
            }),
            1
        );
        assert_eq!(p.cost(&Usage::default()), 0);
    }

    #[test]
    fn anthropic_cache_classes_are_priced_apart() {
        let t = PriceTable::new(&[]);
        let p = t.lookup("anthropic", "claude-sonnet-4-5-20250929").unwrap();
        // 10 plain input, 2000 cache reads, 100 + 200 cache writes, 7 output.
        let u = Usage {
            input: 2310,
            cached_input: 2000,
            cache_write_5m: 100,
            cache_write_1h: 200,
            output: 7,
            reasoning: 0,
        };
        // 10*3 + 2000*0.3 + 100*3.75 + 200*6 + 7*15 = 30 + 600 + 375 + 1200 + 105 = 2310
        assert_eq!(p.cost(&u), 2310);
    }

    #[test]
    fn dated_snapshots_fall_back_other_suffixes_do_not() {
        let t = PriceTable::new(&[]);
        assert_eq!(t.lookup("x", "gpt-4o-2024-08-06").unwrap().input, 2_500_000);
        assert_eq!(
            t.lookup("x", "claude-sonnet-4-5-20250929").unwrap().input,
            3_000_000
        );
        assert!(t.lookup("x", "gpt-4o-audio-preview").is_none());
        assert!(t
            .lookup("x", "gpt-4o-mini-2024-07-18")
            .unwrap()
            .version
            .starts_with("gpt-4o-mini@"));
    }

    #[test]
    fn overrides_win_and_are_versioned() {
        let t = PriceTable::new(&[PriceConfig {
            model: "groq/llama-3".into(),
            version: None,
            input: 50_000,
            cached_input: None,
            output: 80_000,
            reasoning: None,
            cache_write_5m: None,
            cache_write_1h: None,
        }]);
        let p = t.lookup("groq", "llama-3").unwrap();
        assert_eq!(
            (p.input, p.cached_input, p.output, p.reasoning),
            (50_000, 50_000, 80_000, 80_000)
        );
        assert!(p.version.starts_with("groq/llama-3@cfg-"));
        assert!(t.lookup("other", "llama-3").is_none());
    }

    #[test]
    fn prefix_entries_match_longest_first() {
        let t = PriceTable::new(&[PriceConfig {
            model: "mock-exp*".into(),
            version: Some("v2".into()),
            input: 7,
            cached_input: None,
            output: 9,
            reasoning: None,
            cache_write_5m: None,
            cache_write_1h: None,
        }]);
        assert_eq!(
            t.lookup("mock", "mock-expensive").unwrap().version,
            "mock-exp*@v2"
        );
        assert_eq!(t.lookup("mock", "mock-slow").unwrap().input, 1_000_000);
        assert!(t
            .lookup("mock", "mock-slow")
            .unwrap()
            .version
            .starts_with("mock*@"));
    }
}
