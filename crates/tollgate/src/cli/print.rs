//! Output: tables, CSV and JSON, and human-readable times and amounts.

use super::*;

/// Micro-USD as dollars, exactly: integer arithmetic, no floats.
/// Micro-USD as dollars: the one formatter, `tollgate::money::usd`.
pub(crate) fn usd(micros: u64) -> String {
    tollgate::money::usd(i64::try_from(micros).unwrap_or(i64::MAX))
}

pub(crate) fn print_created(c: &CreatedKey, format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(c)?);
        return Ok(());
    }
    println!(
        "Created key {} for agent \"{}\".",
        c.key.key.id, c.key.key.name
    );
    println!("Secret (shown once; store it now):\n  {}", c.secret);
    Ok(())
}

pub(crate) fn print_keys(keys: &[KeyView], format: Format) -> anyhow::Result<()> {
    #[derive(Serialize)]
    struct Out<'a>(&'a [KeyView]);
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&Out(keys))?);
        return Ok(());
    }
    let header = [
        "id", "prefix", "name", "team", "project", "models", "status", "expires",
    ];
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|v| {
            let k = &v.key;
            vec![
                k.id.clone(),
                format!("{}…", k.prefix),
                if k.admin {
                    format!("{} (admin)", k.name)
                } else if k.viewer {
                    format!("{} (dashboard viewer)", k.name)
                } else {
                    k.name.clone()
                },
                k.team.clone().unwrap_or_else(|| "-".into()),
                k.project.clone().unwrap_or_else(|| "-".into()),
                if k.models.is_empty() {
                    "*".into()
                } else {
                    k.models.join(",")
                },
                {
                    let status = serde_json::to_value(v.status)
                        .ok()
                        .and_then(|s| s.as_str().map(str::to_string))
                        .unwrap_or_default();
                    match v.rotating_until_ms {
                        Some(t) => format!(
                            "{status} (rotating: {} secrets until {})",
                            v.live_secrets,
                            format_ms(t)
                        ),
                        None => status,
                    }
                },
                k.expires_ms.map_or_else(|| "never".into(), format_ms),
            ]
        })
        .collect();
    print_rows(&header, &rows, format == Format::Csv);
    Ok(())
}

pub(crate) fn format_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = tollgate::clock::civil(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60
    )
}

pub(crate) fn print_rows(header: &[&str], rows: &[Vec<String>], csv: bool) {
    if csv {
        let esc = |s: &str| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        println!(
            "{}",
            header.iter().map(|h| esc(h)).collect::<Vec<_>>().join(",")
        );
        for r in rows {
            println!("{}", r.iter().map(|c| esc(c)).collect::<Vec<_>>().join(","));
        }
        return;
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}
