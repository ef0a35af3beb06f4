//! Charts drawn on the server as SVG: no script, nothing to load, and a fixed `viewBox` in
//! a box of fixed aspect ratio, so the page does not move when the chart arrives (there is
//! nothing to arrive). Each bar links to the requests behind it.

use super::html::{esc, usd};
use std::fmt::Write;

/// One bar: its label (shown on hover and under the axis), its value in micro-USD, and the
/// page it opens.
pub struct Bar {
    pub label: String,
    pub micros: u64,
    pub href: String,
}

const W: f64 = 800.0;
const H: f64 = 220.0;
const LEFT: f64 = 64.0;
const BOTTOM: f64 = 24.0;
const TOP: f64 = 10.0;

/// A bar chart of spend; `title` is its accessible name.
pub fn bars(title: &str, bars: &[Bar]) -> String {
    let max = bars.iter().map(|b| b.micros).max().unwrap_or(0).max(1);
    // A round top for the axis: 1, 2 or 5 times a power of ten, in micro-USD.
    let mut top = 1u64;
    while top < max {
        top = match top.to_string().as_bytes()[0] {
            b'1' => top.saturating_mul(2),
            b'2' => top / 2 * 5,
            _ => top.saturating_mul(2),
        };
    }
    let mut s = String::new();
    let _ = write!(
        s,
        "<figure class=\"chart\"><svg viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{}\" xmlns=\"http://www.w3.org/2000/svg\">",
        esc(title)
    );
    let plot_h = H - BOTTOM - TOP;
    for i in 0..=4u64 {
        let y = TOP + plot_h - plot_h * i as f64 / 4.0;
        let _ = write!(
            s,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{W}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/><text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT - 6.0,
            y + 4.0,
            esc(&usd((top / 4 * i) as i64))
        );
    }
    let n = bars.len().max(1) as f64;
    let slot = (W - LEFT) / n;
    let width = (slot * 0.8).max(1.0);
    for (i, b) in bars.iter().enumerate() {
        let h = plot_h * b.micros as f64 / top as f64;
        let x = LEFT + slot * i as f64 + (slot - width) / 2.0;
        let _ = write!(
            s,
            "<a href=\"{}\"><rect class=\"bar\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{width:.1}\" height=\"{h:.1}\"><title>{}: {}</title></rect></a>",
            esc(&b.href),
            TOP + plot_h - h,
            esc(&b.label),
            esc(&usd(b.micros as i64))
        );
    }
    // First, middle and last labels under the axis: readable at any width.
    let mut shown: Vec<usize> = vec![0, bars.len() / 2, bars.len().saturating_sub(1)];
    shown.dedup();
    for i in shown {
        if let Some(b) = bars.get(i) {
            let x = LEFT + slot * i as f64 + slot / 2.0;
            let _ = write!(
                s,
                "<text class=\"axis\" x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                H - 6.0,
                esc(&b.label)
            );
        }
    }
    s.push_str("</svg></figure>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_a_round_top_and_escape_labels() {
        let svg = bars(
            "spend",
            &[
                Bar {
                    label: "<a>".into(),
                    micros: 3_000_000,
                    href: "/ui/requests?x=1&y=2".into(),
                },
                Bar {
                    label: "b".into(),
                    micros: 0,
                    href: "/ui/requests".into(),
                },
            ],
        );
        assert!(svg.contains("&lt;a&gt;: $3.00"), "{svg}");
        assert!(svg.contains("href=\"/ui/requests?x=1&amp;y=2\""));
        // The axis tops at $5.00 (1, 2, 5 steps), so the bar is 60 % of the plot's height.
        assert!(svg.contains(">$5.00</text>"), "{svg}");
        assert!(svg.contains("height=\"111.6\""), "{svg}");
        assert!(!svg.contains("<script"));
    }
}
