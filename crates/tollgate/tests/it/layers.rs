//! The layer rule of `lib.rs`, checked on the source tree: every module is in the table, uses
//! nothing from a layer above its own, and no modules use each other in a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module → the `crate::` names its non-test code uses, with the line of the first use.
type Uses = BTreeMap<String, BTreeMap<String, (String, usize)>>;

/// The `crate::x` names a source text uses outside `#[cfg(test)] mod …` blocks and comments.
fn uses_in(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_start();
        if line.starts_with("#[cfg(test)]")
            && lines
                .get(i + 1)
                .is_some_and(|l| l.trim_start().starts_with("mod "))
        {
            // Skip the test module: to its closing brace at the same indentation.
            let indent = lines[i + 1].len() - lines[i + 1].trim_start().len();
            i += 2;
            while i < lines.len() {
                let l = lines[i];
                if l.len() - l.trim_start().len() == indent && l.trim_start().starts_with('}') {
                    break;
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        if !line.starts_with("//") {
            let mut rest = lines[i];
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                if let Some(group) = rest.strip_prefix('{') {
                    // `use crate::{a, b::c};` (on one line: rustfmt writes short groups so)
                    let end = group.find('}').unwrap_or(group.len());
                    for part in group[..end].split(',') {
                        let name = part.trim().split("::").next().unwrap_or("").trim();
                        if !name.is_empty() {
                            out.push((name.to_string(), i + 1));
                        }
                    }
                } else {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        out.push((name, i + 1));
                    }
                }
            }
        }
        i += 1;
    }
    out
}

fn scan(src: &Path) -> Uses {
    let mut uses = Uses::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let module = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            // The binary (main.rs and its cli/) stands above every layer.
            if module == "lib" || module == "main" || module == "cli" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let entry = uses.entry(module.clone()).or_default();
            for (name, line) in uses_in(&text) {
                if name != module {
                    entry
                        .entry(name)
                        .or_insert_with(|| (rel.display().to_string(), line));
                }
            }
        }
    }
    uses
}

/// Every broken rule, as a line a reader can act on.
fn problems(uses: &Uses, layers: &[(&str, &[&str])]) -> Vec<String> {
    let layer_of: BTreeMap<&str, (usize, &str)> = layers
        .iter()
        .enumerate()
        .flat_map(|(i, (name, mods))| mods.iter().map(move |m| (*m, (i, *name))))
        .collect();
    let mut out = Vec::new();
    for (module, names) in uses {
        let Some(&(mine, my_layer)) = layer_of.get(module.as_str()) else {
            out.push(format!(
                "module `{module}` is in no layer: add it to tollgate::LAYERS (lib.rs)"
            ));
            continue;
        };
        for (name, (file, line)) in names {
            match layer_of.get(name.as_str()) {
                Some(&(theirs, their_layer)) if theirs > mine => out.push(format!(
                    "{file}:{line}: `{module}` ({my_layer}) uses `crate::{name}` ({their_layer}), a layer above it"
                )),
                _ => {}
            }
        }
    }
    // Circles, within a layer or not.
    fn visit<'a>(
        m: &'a str,
        uses: &'a Uses,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
        out: &mut BTreeSet<String>,
    ) {
        state.insert(m, 1);
        path.push(m);
        for next in uses.get(m).into_iter().flat_map(|n| n.keys()) {
            if !uses.contains_key(next) {
                continue;
            }
            match state.get(next.as_str()) {
                Some(1) => {
                    let at = path.iter().position(|p| p == next).unwrap_or(0);
                    let mut circle: Vec<&str> = path[at..].to_vec();
                    circle.push(next);
                    out.insert(format!("import circle: {}", circle.join(" -> ")));
                }
                Some(_) => {}
                None => visit(next, uses, state, path, out),
            }
        }
        path.pop();
        state.insert(m, 2);
    }
    let mut state = BTreeMap::new();
    let mut circles = BTreeSet::new();
    for m in uses.keys() {
        if !state.contains_key(m.as_str()) {
            visit(m, uses, &mut state, &mut Vec::new(), &mut circles);
        }
    }
    out.extend(circles);
    out
}

#[test]
fn modules_use_only_their_layer_and_those_below_without_circles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let uses = scan(&src);
    assert!(uses.len() >= 30, "found only {} modules", uses.len());
    let p = problems(&uses, tollgate::LAYERS);
    assert!(p.is_empty(), "the layer rule is broken:\n{}", p.join("\n"));
}

/// The checker itself: an upward import, a circle, and an unplaced module are all caught,
/// while test code and comments are ignored.
#[test]
fn the_layer_check_catches_what_it_should() {
    let layers: &[(&str, &[&str])] = &[("low", &["a", "b"]), ("high", &["c"])];
    let mut uses = Uses::new();
    let add = |uses: &mut Uses, m: &str, text: &str| {
        let e = uses.entry(m.to_string()).or_default();
        for (n, line) in uses_in(text) {
            if n != m {
                e.entry(n).or_insert((format!("{m}.rs"), line));
            }
        }
    };
    add(
        &mut uses,
        "a",
        "use crate::b::X;\n// use crate::c::Nope;\nfn f() { crate::c::g(); }\n#[cfg(test)]\nmod tests {\n    use crate::c::Fine;\n}\n",
    );
    add(&mut uses, "b", "use crate::{a, clock};\n");
    add(&mut uses, "c", "use crate::a::Y;\n");
    add(&mut uses, "d", "");
    let p = problems(&uses, layers);
    assert!(
        p.iter()
            .any(|l| l == "a.rs:3: `a` (low) uses `crate::c` (high), a layer above it"),
        "{p:?}"
    );
    assert!(p.iter().any(|l| l == "import circle: a -> b -> a"), "{p:?}");
    assert!(p.iter().any(|l| l == "import circle: a -> c -> a"), "{p:?}");
    assert!(
        p.iter().any(|l| l.starts_with("module `d` is in no layer")),
        "{p:?}"
    );
    assert_eq!(p.len(), 4, "comments and test modules are not uses: {p:?}");
}
