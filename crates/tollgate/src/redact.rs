//! Redaction: finding personal data and secrets in what agents send and receive, and masking,
//! hashing, refusing or just recording them (`[redaction]`, docs/GOVERNANCE.md).
//!
//! The detectors are hand-written scanners, not regular expressions: each looks for a cheap
//! anchor first (`@` for an email, a digit for numbers, a keyword such as `AKIA` or `ghp_` for
//! a secret, as Gitleaks' keyword prefilter does) and validates only around it, with the
//! checks that keep false positives down: Luhn and the issuer's prefix and length for payment
//! cards, ISO 13616's mod-97 for IBANs, the SSA's reserved ranges for SSNs. Text is scanned
//! after JSON decoding, so an escaped `\u0040` is still an `@`.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// Cloud and provider API keys, tokens, private keys.
    Secret,
    /// Payment card numbers (Luhn-checked, known issuer prefixes and lengths).
    Card,
    /// International bank account numbers (mod-97 checked).
    Iban,
    /// US social security numbers, `ddd-dd-dddd`.
    Ssn,
    Email,
    /// Phone numbers written as such: a leading `+`, or grouped digits.
    Phone,
}

impl Detector {
    /// When two findings overlap, the earlier in this order wins.
    pub const ALL: [Detector; 6] = [
        Detector::Secret,
        Detector::Card,
        Detector::Iban,
        Detector::Ssn,
        Detector::Email,
        Detector::Phone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Detector::Secret => "secret",
            Detector::Card => "card",
            Detector::Iban => "iban",
            Detector::Ssn => "ssn",
            Detector::Email => "email",
            Detector::Phone => "phone",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Detector::Secret => "SECRET",
            Detector::Card => "CARD",
            Detector::Iban => "IBAN",
            Detector::Ssn => "SSN",
            Detector::Email => "EMAIL",
            Detector::Phone => "PHONE",
        }
    }

    fn scan(self, text: &str, starts: &Starts, out: &mut Vec<Found>) {
        match self {
            Detector::Secret => secrets(text, out),
            Detector::Card => cards(text, starts, out),
            Detector::Iban => ibans(text, starts, out),
            Detector::Ssn => ssns(text, starts, out),
            Detector::Email => emails(text, out),
            Detector::Phone => phones(text, starts, out),
        }
    }
}

/// What to do with a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// `<EMAIL_1>`: numbered per request, the same value the same number.
    Mask,
    /// `<EMAIL_3f2a9c1d>`: keyed by the gateway's secret, the same value the same tag in
    /// every request (so a conversation stays coherent), not reversible without the secret.
    Hash,
    /// The request is refused; nothing is sent.
    Reject,
    /// Only counted and logged; the text is unchanged.
    Log,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Mask => "mask",
            Action::Hash => "hash",
            Action::Reject => "reject",
            Action::Log => "log",
        }
    }
}

/// What one detector found in one place of a request (`redact.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redacted {
    pub detector: Detector,
    pub action: Action,
    pub count: u64,
    /// `request`, `answer`, `tool_arguments` or `tool_result`.
    pub place: String,
}

/// One finding: a byte range of the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub detector: Detector,
    pub start: usize,
    pub end: usize,
}

/// Every finding in `text` of the detectors in `on`, in order, none overlapping.
pub fn find(text: &str, on: &[Detector]) -> Vec<Found> {
    let mut all = Vec::new();
    let numeric = [
        Detector::Card,
        Detector::Iban,
        Detector::Ssn,
        Detector::Phone,
    ];
    let starts = if on.iter().any(|d| numeric.contains(d)) {
        Starts::of(text.as_bytes())
    } else {
        Starts::default()
    };
    for d in Detector::ALL {
        if on.contains(&d) {
            let before = all.len();
            d.scan(text, &starts, &mut all);
            // Drop what overlaps a finding of a detector that ranks higher.
            let (kept, new) = all.split_at(before);
            let mut kept: Vec<(usize, usize)> = kept.iter().map(|k| (k.start, k.end)).collect();
            kept.sort_unstable();
            // Findings of one detector do not overlap each other: the one kept finding that
            // could overlap `f` is the last to start before `f` ends.
            let overlaps = |f: &Found| {
                let i = kept.partition_point(|(start, _)| *start < f.end);
                i > 0
                    && kept[..i]
                        .iter()
                        .rev()
                        .take(1)
                        .any(|(_, end)| *end > f.start)
            };
            let new: Vec<Found> = new.iter().filter(|f| !overlaps(f)).copied().collect();
            all.truncate(before);
            all.extend(new);
        }
    }
    all.sort_by_key(|f| f.start);
    all
}

/// The findings of one request (or answer), and the numbering of masked values.
#[derive(Default)]
pub struct Tally {
    counts: HashMap<(Detector, Action), u64>,
    numbers: HashMap<(Detector, String), usize>,
    next: HashMap<Detector, usize>,
    /// The first finding whose action is `reject`.
    pub rejected: Option<Detector>,
}

impl Tally {
    /// (detector, action, count), sorted: what the record and the audit log keep (never the
    /// values).
    pub fn summary(&self) -> Vec<(Detector, Action, u64)> {
        let mut v: Vec<_> = self.counts.iter().map(|((d, a), n)| (*d, *a, *n)).collect();
        v.sort_by_key(|(d, a, _)| (*d, a.as_str()));
        v
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

/// Applies `actions` to `text`: the new text when anything was masked or hashed. `hash` tags a
/// value for `Action::Hash`.
pub fn apply(
    text: &str,
    actions: &[(Detector, Action)],
    tally: &mut Tally,
    hash: &dyn Fn(Detector, &str) -> String,
) -> Option<String> {
    let on: Vec<Detector> = actions.iter().map(|(d, _)| *d).collect();
    let found = find(text, &on);
    if found.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    let mut changed = false;
    for f in found {
        let action = actions
            .iter()
            .find(|(d, _)| *d == f.detector)
            .map_or(Action::Log, |(_, a)| *a);
        *tally.counts.entry((f.detector, action)).or_default() += 1;
        let value = canonical(f.detector, &text[f.start..f.end]);
        let value = value.as_str();
        let replacement = match action {
            Action::Log => continue,
            Action::Reject => {
                tally.rejected.get_or_insert(f.detector);
                continue;
            }
            Action::Mask => {
                let key = (f.detector, value.to_string());
                let n = match tally.numbers.get(&key) {
                    Some(n) => *n,
                    None => {
                        let next = tally.next.entry(f.detector).or_insert(0);
                        *next += 1;
                        tally.numbers.insert(key, *next);
                        *next
                    }
                };
                format!("<{}_{n}>", f.detector.label())
            }
            Action::Hash => format!("<{}_{}>", f.detector.label(), hash(f.detector, value)),
        };
        out.push_str(&text[at..f.start]);
        out.push_str(&replacement);
        at = f.end;
        changed = true;
    }
    if !changed {
        return None;
    }
    out.push_str(&text[at..]);
    Some(out)
}

/// Keys whose string values are not text anyone wrote (ids, roles, types, media, signatures):
/// left alone, so a request's structure and its images are never touched.
const NOT_TEXT: &[&str] = &[
    "role",
    "type",
    "id",
    "tool_call_id",
    "tool_use_id",
    "call_id",
    "model",
    "name",
    "media_type",
    "mime_type",
    "cache_control",
    "signature",
    "data",
    "url",
    "image_url",
    "file_id",
    "format",
    "status",
    "object",
    "finish_reason",
    "stop_reason",
    "previous_response_id",
    "encrypted_content",
];

/// Redaction of one request or answer: the actions that apply, the gateway's key for
/// `hash`, and what was found so far.
pub struct Scrubber {
    actions: Vec<(Detector, Action)>,
    /// The HMAC key of `hash` (derived from the server secret).
    hash_key: [u8; 32],
    pub tally: Tally,
}

impl Scrubber {
    /// `None` when no detector is on.
    pub fn new(actions: Vec<(Detector, Action)>, hash_key: [u8; 32]) -> Option<Scrubber> {
        if actions.is_empty() {
            return None;
        }
        Some(Scrubber {
            actions,
            hash_key,
            tally: Tally::default(),
        })
    }

    /// The text with its findings masked or hashed; `None` when it is unchanged.
    pub fn text(&mut self, text: &str) -> Option<String> {
        let key = self.hash_key;
        let hash = |d: Detector, v: &str| {
            use hmac::{Hmac, Mac};
            // HMAC takes keys of any length: this cannot fail.
            let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key)
                .unwrap_or_else(|_| unreachable!());
            mac.update(d.as_str().as_bytes());
            mac.update(b":");
            mac.update(v.as_bytes());
            hex::encode(&mac.finalize().into_bytes()[..4])
        };
        apply(text, &self.actions, &mut self.tally, &hash)
    }

    /// Every string of `v` that is text (see `NOT_TEXT`), in place; whether any changed.
    pub fn value(&mut self, v: &mut serde_json::Value) -> bool {
        use serde_json::Value;
        match v {
            Value::String(s) => match self.text(s) {
                Some(new) => {
                    *s = new;
                    true
                }
                None => false,
            },
            Value::Array(items) => {
                let mut changed = false;
                for item in items {
                    changed |= self.value(item);
                }
                changed
            }
            Value::Object(map) => {
                let mut changed = false;
                for (k, item) in map.iter_mut() {
                    if !NOT_TEXT.contains(&k.as_str()) {
                        changed |= self.value(item);
                    }
                }
                changed
            }
            _ => false,
        }
    }

    /// `value` for text the agent has already been counted for (a stream's closing events
    /// repeat what its deltas carried): the same masks, nothing counted twice.
    pub fn value_again(&mut self, v: &mut serde_json::Value) -> bool {
        let counted = self.tally.counts.clone();
        let changed = self.value(v);
        self.tally.counts = counted;
        changed
    }

    /// Every finding of `text`, for a stream deciding how much of its end to hold back.
    pub fn findings(&self, text: &str) -> Vec<Found> {
        let on: Vec<Detector> = self.actions.iter().map(|(d, _)| *d).collect();
        find(text, &on)
    }

    /// The detector a `reject` action fired for, if any.
    pub fn rejected(&self) -> Option<Detector> {
        self.tally.rejected
    }

    /// What was found, for the record (counts only), and starts counting afresh for the
    /// next place.
    pub fn take(&mut self, place: &str) -> Vec<Redacted> {
        let out = self
            .tally
            .summary()
            .into_iter()
            .map(|(detector, action, count)| Redacted {
                detector,
                action,
                count,
                place: place.to_string(),
            })
            .collect();
        self.tally.counts.clear();
        out
    }
}

/// What a person is told a detector found.
pub fn described(d: Detector) -> &'static str {
    match d {
        Detector::Secret => "a secret (an API key, token or private key)",
        Detector::Card => "a payment card number",
        Detector::Iban => "a bank account number (IBAN)",
        Detector::Ssn => "a US social security number",
        Detector::Email => "an email address",
        Detector::Phone => "a phone number",
    }
}

/// A value as its detector compares it: the same card, IBAN or phone number however it is
/// spaced, the same email in any case, get the same mask number and hash.
fn canonical(d: Detector, v: &str) -> String {
    match d {
        Detector::Card | Detector::Iban | Detector::Phone | Detector::Ssn => v
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_uppercase())
            .collect(),
        Detector::Email => v.to_ascii_lowercase(),
        Detector::Secret => v.to_string(),
    }
}

/// The longest text a finding can span (an email at its RFC limit), bar private keys: a stream
/// that holds back this much of its end cannot send half of a finding.
pub const WINDOW: usize = 320;

/// `is_word` by table: the scanners ask it of nearly every byte.
static WORD: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'_';
        b += 1;
    }
    t
};

#[inline]
fn is_word(b: u8) -> bool {
    WORD[b as usize]
}

fn boundary_before(s: &[u8], i: usize) -> bool {
    i == 0 || !is_word(s[i - 1])
}

fn boundary_after(s: &[u8], i: usize) -> bool {
    i >= s.len() || !is_word(s[i])
}

fn emails(text: &str, out: &mut Vec<Found>) {
    let s = text.as_bytes();
    let local = |b: u8| b.is_ascii_alphanumeric() || b"._%+-".contains(&b);
    let domain = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'-';
    let mut last_end = 0;
    for at in memchr::memchr_iter(b'@', s) {
        if at < last_end {
            continue;
        }
        let mut start = at;
        while start > last_end && local(s[start - 1]) && at - start < 64 {
            start -= 1;
        }
        while start < at && s[start] == b'.' {
            start += 1;
        }
        if start == at {
            continue;
        }
        let mut end = at + 1;
        while end < s.len() && domain(s[end]) && end - at < 254 {
            end += 1;
        }
        while end > at + 1 && (s[end - 1] == b'.' || s[end - 1] == b'-') {
            end -= 1;
        }
        let host = &text[at + 1..end];
        let labels: Vec<&str> = host.split('.').collect();
        let tld = labels.last().copied().unwrap_or("");
        if labels.len() < 2
            || labels.iter().any(|l| l.is_empty())
            || tld.len() < 2
            || !tld.bytes().all(|b| b.is_ascii_alphabetic())
        {
            continue;
        }
        out.push(Found {
            detector: Detector::Email,
            start,
            end,
        });
        last_end = end;
    }
}

/// Runs of digits with single spaces or dashes between them: (start, end, digits).
/// The next place a finding can start after a failed try at `i`: every detector's finding
/// starts at a word's start or at punctuation, so the rest of a word is skipped whole. This
/// is what keeps the scanners near one comparison per byte.
fn skip(s: &[u8], i: usize) -> usize {
    if !is_word(s[i]) {
        return i + 1;
    }
    s[i + 1..]
        .iter()
        .position(|b| !is_word(*b))
        .map_or(s.len(), |p| i + 1 + p)
}

/// Where a number or an IBAN can start, found in one pass for all the detectors that need
/// them: `num` a digit at a word's start, or `+`/`(` before a digit; `upper` an uppercase
/// letter at a word's start.
#[derive(Default)]
struct Starts {
    num: Vec<usize>,
    upper: Vec<usize>,
}

impl Starts {
    fn of(s: &[u8]) -> Starts {
        let mut st = Starts::default();
        let mut i = 0;
        while i < s.len() {
            let b = s[i];
            if is_word(b) {
                if b.is_ascii_digit() {
                    st.num.push(i);
                } else if b.is_ascii_uppercase() {
                    st.upper.push(i);
                }
                i = skip(s, i);
            } else {
                if (b == b'+' || b == b'(') && s.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    st.num.push(i);
                }
                i += 1;
            }
        }
        st
    }
}

/// Runs of up to 19 digits with single spaces or dashes between them: (start, end, digits,
/// count). Longer runs are not cards.
fn digit_runs(s: &[u8], starts: &Starts, seps: &[u8]) -> Vec<(usize, usize, [u8; 19], usize)> {
    let mut runs = Vec::new();
    let mut next = 0;
    for &start in &starts.num {
        if start < next || !s[start].is_ascii_digit() {
            continue;
        }
        let mut i = start;
        let (mut digits, mut n) = ([0u8; 19], 0usize);
        let mut end = i;
        while i < s.len() {
            if s[i].is_ascii_digit() {
                if n < 19 {
                    digits[n] = s[i] - b'0';
                }
                n += 1;
                i += 1;
                end = i;
            } else if seps.contains(&s[i]) && i + 1 < s.len() && s[i + 1].is_ascii_digit() {
                i += 1;
            } else {
                break;
            }
        }
        if boundary_after(s, end) && n <= 19 {
            runs.push((start, end, digits, n));
        }
        next = end.max(start + 1);
    }
    runs
}

fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut d = u32::from(*d);
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum.is_multiple_of(10)
}

/// Whether a number of this length and prefix is one a card network issues.
fn card_issuer(d: &[u8]) -> bool {
    let n = d.len();
    let p = |k: usize| d.iter().take(k).fold(0u32, |a, x| a * 10 + u32::from(*x));
    match d[0] {
        4 => matches!(n, 13 | 16 | 19),
        5 => (51..=55).contains(&p(2)) && n == 16,
        2 => (2221..=2720).contains(&p(4)) && n == 16,
        3 => match p(2) {
            34 | 37 => n == 15,
            35 => (16..=19).contains(&n),
            36 | 38 | 39 | 30 => (14..=19).contains(&n),
            _ => false,
        },
        6 => {
            (p(4) == 6011 || p(2) == 65 || (644..=649).contains(&p(3)) || p(2) == 62)
                && (16..=19).contains(&n)
        }
        _ => false,
    }
}

fn cards(text: &str, starts: &Starts, out: &mut Vec<Found>) {
    for (start, end, digits, n) in digit_runs(text.as_bytes(), starts, b" -") {
        let digits = &digits[..n];
        if (13..=19).contains(&n) && card_issuer(digits) && luhn(digits) {
            out.push(Found {
                detector: Detector::Card,
                start,
                end,
            });
        }
    }
}

fn ssns(text: &str, starts: &Starts, out: &mut Vec<Found>) {
    let s = text.as_bytes();
    let mut next = 0;
    for &i in &starts.num {
        if i + 11 > s.len() {
            break;
        }
        if i < next || !s[i].is_ascii_digit() {
            continue;
        }
        let w = &s[i..i + 11];
        let shape = w.iter().enumerate().all(|(k, b)| match k {
            3 | 6 => *b == b'-',
            _ => b.is_ascii_digit(),
        });
        let free = (i == 0 || !(s[i - 1].is_ascii_alphanumeric() || s[i - 1] == b'-'))
            && (i + 11 == s.len() || !(s[i + 11].is_ascii_alphanumeric() || s[i + 11] == b'-'));
        if shape && free {
            let num = |a: usize, b: usize| {
                w[a..b]
                    .iter()
                    .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'))
            };
            let (area, group, serial) = (num(0, 3), num(4, 6), num(7, 11));
            if area != 0 && area != 666 && area < 900 && group != 0 && serial != 0 {
                out.push(Found {
                    detector: Detector::Ssn,
                    start: i,
                    end: i + 11,
                });
                next = i + 11;
            }
        }
    }
}

/// IBAN lengths by country (ISO 13616 registry) for the countries most seen; others are
/// taken at their longest run that passes mod-97.
fn iban_length(country: &[u8]) -> Option<usize> {
    Some(match country {
        b"AD" => 24,
        b"AT" => 20,
        b"BE" => 16,
        b"BG" => 22,
        b"CH" => 21,
        b"CY" => 28,
        b"CZ" => 24,
        b"DE" => 22,
        b"DK" => 18,
        b"EE" => 20,
        b"ES" => 24,
        b"FI" => 18,
        b"FR" => 27,
        b"GB" => 22,
        b"GR" => 27,
        b"HR" => 21,
        b"HU" => 28,
        b"IE" => 22,
        b"IS" => 26,
        b"IT" => 27,
        b"LI" => 21,
        b"LT" => 20,
        b"LU" => 20,
        b"LV" => 21,
        b"MC" => 27,
        b"MT" => 31,
        b"NL" => 18,
        b"NO" => 15,
        b"PL" => 28,
        b"PT" => 25,
        b"RO" => 24,
        b"SE" => 24,
        b"SI" => 19,
        b"SK" => 24,
        b"SM" => 27,
        b"TR" => 26,
        _ => return None,
    })
}

fn mod97(chars: &[u8]) -> bool {
    let mut rem = 0u32;
    let rotated = chars[4..].iter().chain(&chars[..4]);
    for c in rotated {
        if c.is_ascii_digit() {
            rem = (rem * 10 + u32::from(c - b'0')) % 97;
        } else {
            let v = u32::from(c.to_ascii_uppercase() - b'A') + 10;
            rem = (rem * 100 + v) % 97;
        }
    }
    rem == 1
}

fn ibans(text: &str, starts: &Starts, out: &mut Vec<Found>) {
    let s = text.as_bytes();
    let mut next = 0;
    for &i in &starts.upper {
        if i + 15 > s.len() {
            break;
        }
        let head =
            s[i + 1].is_ascii_uppercase() && s[i + 2].is_ascii_digit() && s[i + 3].is_ascii_digit();
        if i < next || !head {
            continue;
        }
        // The characters, and where each ends in the text (groups of four may be spaced).
        let mut chars = Vec::with_capacity(34);
        let mut ends = Vec::with_capacity(34);
        let mut j = i;
        while j < s.len() && chars.len() < 34 {
            let b = s[j];
            if b.is_ascii_uppercase() || b.is_ascii_digit() {
                chars.push(b);
                j += 1;
                ends.push(j);
            } else if b == b' '
                && chars.len() % 4 == 0
                && j + 1 < s.len()
                && (s[j + 1].is_ascii_uppercase() || s[j + 1].is_ascii_digit())
            {
                j += 1;
            } else {
                break;
            }
        }
        let lengths: Vec<usize> = match iban_length(&chars[..2]) {
            Some(n) => vec![n],
            None => (15..=chars.len()).rev().collect(),
        };
        let hit = lengths
            .into_iter()
            .find(|&n| n <= chars.len() && boundary_after(s, ends[n - 1]) && mod97(&chars[..n]));
        if let Some(n) = hit {
            out.push(Found {
                detector: Detector::Iban,
                start: i,
                end: ends[n - 1],
            });
            next = ends[n - 1];
        }
    }
}

fn phones(text: &str, starts: &Starts, out: &mut Vec<Found>) {
    let s = text.as_bytes();
    let mut next = 0;
    for &i in &starts.num {
        let plus = s[i] == b'+';
        if i < next || (i > 0 && (is_word(s[i - 1]) || b"+-./".contains(&s[i - 1]))) {
            continue;
        }
        let start = i;
        let mut j = if plus { i + 1 } else { i };
        let (mut digits, mut groups, mut last_group, mut cur) = (0usize, 0usize, 0usize, 0usize);
        let mut end = j;
        while j < s.len() {
            let b = s[j];
            if b.is_ascii_digit() {
                digits += 1;
                cur += 1;
                j += 1;
                end = j;
            } else if b" -()".contains(&b)
                && j + 1 < s.len()
                && (s[j + 1].is_ascii_digit() || (b == b')' && s[j + 1] == b' '))
            {
                if cur > 0 {
                    groups += 1;
                    last_group = cur;
                }
                cur = 0;
                j += 1;
            } else {
                break;
            }
        }
        if cur > 0 {
            groups += 1;
            last_group = cur;
        }
        let shaped = plus || groups >= 2;
        let count = if plus { 8..=15 } else { 10..=15 };
        if shaped && count.contains(&digits) && last_group >= 3 && boundary_after(s, end) {
            out.push(Found {
                detector: Detector::Phone,
                start,
                end,
            });
        }
        next = end.max(i + 1);
    }
}

/// Secrets with a fixed prefix: (keyword, the characters that follow, their least and most
/// count).
type Prefixed = (&'static str, fn(u8) -> bool, usize, usize);
const PREFIXED: &[Prefixed] = &[
    ("AKIA", upper_digit, 16, 16),
    ("ASIA", upper_digit, 16, 16),
    ("ghp_", alnum, 36, 36),
    ("gho_", alnum, 36, 36),
    ("ghu_", alnum, 36, 36),
    ("ghs_", alnum, 36, 36),
    ("ghr_", alnum, 36, 36),
    ("github_pat_", word, 60, 100),
    ("glpat-", token, 20, 20),
    ("xoxb-", token, 10, 200),
    ("xoxp-", token, 10, 200),
    ("xoxa-", token, 10, 200),
    ("xoxr-", token, 10, 200),
    ("AIza", token, 35, 35),
    ("sk_live_", alnum, 16, 200),
    ("rk_live_", alnum, 16, 200),
    ("sk_test_", alnum, 16, 200),
    // OpenAI (sk-, sk-proj-) and Anthropic (sk-ant-) keys.
    ("sk-", token, 20, 300),
    // tollgate's own keys: one pasted into a prompt would reach the provider.
    ("tg_", token, 32, 32),
];

fn upper_digit(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit()
}
fn alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}
fn word(b: u8) -> bool {
    is_word(b)
}
fn token(b: u8) -> bool {
    is_word(b) || b == b'-'
}

/// The keyword searchers, built once: building one costs more than a short text's scan.
static KEYWORDS: std::sync::LazyLock<Vec<memchr::memmem::Finder<'static>>> =
    std::sync::LazyLock::new(|| {
        PREFIXED
            .iter()
            .map(|(kw, ..)| kw.as_bytes())
            .chain([
                &b"aws_secret_access_key"[..],
                b"AWS_SECRET_ACCESS_KEY",
                b"eyJ",
                b"-----BEGIN ",
            ])
            .map(memchr::memmem::Finder::new)
            .collect()
    });

fn secrets(text: &str, found: &mut Vec<Found>) {
    let s = text.as_bytes();
    let mut out = Vec::new();
    let finders = &*KEYWORDS;
    for ((kw, class, min, max), finder) in PREFIXED.iter().zip(finders) {
        for at in finder.find_iter(s) {
            if !boundary_before(s, at) {
                continue;
            }
            let body = at + kw.len();
            let mut end = body;
            while end < s.len() && class(s[end]) && end - body < *max {
                end += 1;
            }
            let n = end - body;
            // An `sk-` key has digits; `sk-learn-and-pandas` prose does not.
            let prose = *kw == "sk-" && !s[body..end].iter().any(u8::is_ascii_digit);
            if n >= *min && boundary_after(s, end) && !prose {
                out.push(Found {
                    detector: Detector::Secret,
                    start: at,
                    end,
                });
            }
        }
    }
    // AWS secret access keys have no prefix: only after their name.
    let name_len = "aws_secret_access_key".len();
    for finder in &finders[PREFIXED.len()..PREFIXED.len() + 2] {
        for at in finder.find_iter(s) {
            let mut v = at + name_len;
            while v < s.len() && b" \t\"':=".contains(&s[v]) {
                v += 1;
            }
            let b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'/' || b == b'+';
            let mut end = v;
            while end < s.len() && b64(s[end]) {
                end += 1;
            }
            if end - v == 40 {
                out.push(Found {
                    detector: Detector::Secret,
                    start: v,
                    end,
                });
            }
        }
    }
    // JSON web tokens: three base64url parts, the first an encoded `{"`.
    for at in finders[PREFIXED.len() + 2].find_iter(s) {
        if !boundary_before(s, at) {
            continue;
        }
        let b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
        let (mut end, mut parts, mut len) = (at, 1, 0);
        while end < s.len() {
            if b64(s[end]) {
                len += 1;
            } else if s[end] == b'.' && len >= 10 && parts < 3 {
                parts += 1;
                len = 0;
            } else {
                break;
            }
            end += 1;
        }
        if parts == 3 && len >= 10 {
            out.push(Found {
                detector: Detector::Secret,
                start: at,
                end,
            });
        }
    }
    // PEM private keys, to their END line (or the end of the text if it never comes).
    for at in finders[PREFIXED.len() + 3].find_iter(s) {
        let line_end = memchr::memmem::find(&s[at..], b"-----\n")
            .or_else(|| memchr::memmem::find(&s[at + 11..], b"-----").map(|p| p + 11))
            .map_or(s.len(), |p| at + p);
        if !text[at..line_end.min(s.len())].contains("PRIVATE KEY") {
            continue;
        }
        let end = memchr::memmem::find(&s[at..], b"-----END ")
            .and_then(|p| {
                let from = at + p + 9;
                memchr::memmem::find(&s[from..], b"-----").map(|q| from + q + 5)
            })
            .unwrap_or(s.len());
        out.push(Found {
            detector: Detector::Secret,
            start: at,
            end,
        });
    }
    // Prefixes overlap (`sk-` inside `sk_live_` cannot, but a JWT can contain a keyword):
    // keep the first of overlapping findings.
    out.sort_by_key(|f| (f.start, std::cmp::Reverse(f.end)));
    let mut last = 0;
    found.extend(out.into_iter().filter(|f| {
        if f.start < last {
            return false;
        }
        last = f.end;
        true
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(text: &str, d: Detector) -> Vec<&str> {
        find(text, &[d])
            .into_iter()
            .map(|f| &text[f.start..f.end])
            .collect()
    }

    #[test]
    fn emails_are_found_with_their_whole_address_and_prose_is_not() {
        assert_eq!(
            spans("mail a.b+c@mail.example.co.uk, or x@y.io.", Detector::Email),
            ["a.b+c@mail.example.co.uk", "x@y.io"]
        );
        assert!(spans("@handle and user@localhost and a@b.c1", Detector::Email).is_empty());
    }

    #[test]
    fn cards_need_luhn_an_issuer_prefix_and_its_length() {
        assert_eq!(
            spans(
                "visa 4111 1111 1111 1111, amex 378282246310005, mc 5555-5555-5555-4444",
                Detector::Card
            ),
            [
                "4111 1111 1111 1111",
                "378282246310005",
                "5555-5555-5555-4444"
            ]
        );
        // Off by one digit (Luhn fails); a 13-digit millisecond timestamp; an order id.
        assert!(spans(
            "4111 1111 1111 1112 at 1764759000000 order 9111111111111111",
            Detector::Card
        )
        .is_empty());
    }

    #[test]
    fn ibans_pass_mod_97_spaced_or_not() {
        assert_eq!(
            spans(
                "pay DE89 3704 0044 0532 0130 00 or GB82WEST12345698765432 now",
                Detector::Iban
            ),
            ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432"]
        );
        assert!(spans("DE89 3704 0044 0532 0130 01", Detector::Iban).is_empty());
    }

    #[test]
    fn ssns_skip_the_ranges_never_issued() {
        assert_eq!(
            spans(
                "ssn 123-45-6789; 000-12-3456 666-12-3456 912-34-5678 123-00-4567",
                Detector::Ssn
            ),
            ["123-45-6789"]
        );
        assert!(spans("2026-12-0312 and 123-45-67890", Detector::Ssn).is_empty());
    }

    #[test]
    fn phones_need_a_plus_or_groups() {
        assert_eq!(
            spans(
                "call +14155552671 or (415) 555-2671 or +44 20 7946 0958",
                Detector::Phone
            ),
            ["+14155552671", "(415) 555-2671", "+44 20 7946 0958"]
        );
        assert!(spans(
            "id 4155552671, v1.2.3, 192.168.100.200, on 2026-12-03 11:25",
            Detector::Phone
        )
        .is_empty());
    }

    #[test]
    fn secrets_are_found_by_keyword_and_shape() {
        let aws = "AKIAIOSFODNN7EXAMPLE";
        let gh = "ghp_0123456789abcdefghijABCDEFGHIJ012345";
        let oai = "sk-proj-Ab3dEfGh1jKlMn0pQrStUvWx";
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlX2hlcmU";
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----";
        let text = format!(
            "k={aws} t={gh} o={oai} j={jwt}\n{pem}\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY done"
        );
        assert_eq!(
            spans(&text, Detector::Secret),
            [
                aws,
                gh,
                oai,
                jwt,
                pem,
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
            ]
        );
        assert!(spans(
            "use sk-learn-and-pandas-for-this, see ghp_short, -----BEGIN CERTIFICATE-----",
            Detector::Secret
        )
        .is_empty());
    }

    #[test]
    fn masking_numbers_values_and_keeps_the_rest() {
        let mut t = Tally::default();
        let actions = [
            (Detector::Email, Action::Mask),
            (Detector::Card, Action::Hash),
            (Detector::Phone, Action::Log),
        ];
        let out = apply(
            "a@x.io wrote b@x.io and a@x.io; card 4111111111111111; +14155552671",
            &actions,
            &mut t,
            &|_, _| "h".into(),
        )
        .unwrap();
        assert_eq!(
            out,
            "<EMAIL_1> wrote <EMAIL_2> and <EMAIL_1>; card <CARD_h>; +14155552671"
        );
        assert_eq!(
            t.summary(),
            [
                (Detector::Card, Action::Hash, 1),
                (Detector::Email, Action::Mask, 3),
                (Detector::Phone, Action::Log, 1)
            ]
        );
        let mut t = Tally::default();
        assert!(apply(
            "ssn 123-45-6789",
            &[(Detector::Ssn, Action::Reject)],
            &mut t,
            &|_, _| String::new()
        )
        .is_none());
        assert_eq!(t.rejected, Some(Detector::Ssn));
    }

    #[test]
    fn overlapping_findings_go_to_the_higher_ranked_detector() {
        // A card number is also digit groups a phone scanner could take.
        let f = find("4111-1111-1111-1111", &[Detector::Phone, Detector::Card]);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].detector, Detector::Card);
    }

    #[test]
    fn random_text_gives_ordered_disjoint_findings_on_char_boundaries() {
        let parts = [
            "a@b.io",
            "4111 1111 1111 1111",
            "+1 415 555 2671",
            "DE89 3704 0044 0532 0130 00",
            "123-45-6789",
            "AKIAIOSFODNN7EXAMPLE",
            "-----BEGIN RSA PRIVATE KEY-----",
            "-----END ",
            "eyJ",
            ".",
            " ",
            "-",
            "(",
            ")",
            "+",
            "@",
            "é",
            "日本",
            "_",
            "9",
            "sk-",
            "x",
            "\n",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..3000 {
            let mut text = String::new();
            for _ in 0..(seed % 24) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                text.push_str(parts[(seed % parts.len() as u64) as usize]);
            }
            let found = find(&text, &Detector::ALL);
            let mut last = 0;
            for f in &found {
                assert!(f.start >= last && f.start < f.end, "{text:?}: {found:?}");
                assert!(text.is_char_boundary(f.start) && text.is_char_boundary(f.end));
                last = f.end;
            }
            let actions: Vec<_> = Detector::ALL.iter().map(|d| (*d, Action::Mask)).collect();
            let _ = apply(&text, &actions, &mut Tally::default(), &|_, _| {
                String::new()
            });
        }
    }

    #[test]
    fn no_input_panics() {
        for text in [
            "",
            "@",
            "a@",
            "@b.c",
            "+",
            "(",
            "-----BEGIN ",
            "eyJ",
            "DE89",
            "4",
            "é@é.é",
            "sk-",
            "aws_secret_access_key",
            "\u{0}@\u{0}",
            "1234567890123456789012345",
            "---------BEGIN PRIVATE KEY",
            "(((((1))))) 2 3 4 5 6 7 8 9 0",
        ] {
            let _ = find(text, &Detector::ALL);
        }
    }
}
