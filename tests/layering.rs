//! The house's layers, checked on the source text (docs/architecture.md): every
//! `crate::` path in `src/` (in `use` lines and inline) names the top-level module it
//! reaches, and each module may reach only the ones its layer allows. Bottom to top:
//!
//! 1. `money`, `domain`, `machine`: pure. They import only each other, and none of
//!    tokio, sled, rumqttc, reqwest or any IO (`std::fs`, `std::net`, `std::process`).
//! 2. `store`: only `domain`, `machine`, `money` and `failpoint`.
//! 3. `engine`: never a link, topics, a socket server or the fleet link (`station`,
//!    `control`, `service`, `fleet`, `mqtt`, `charge`).
//! 4. Adapters (`station`, `control`, `service`, later `fleet`): `engine::port` and
//!    `domain` (with `money` and the shared `mqtt` part), never the engine's internals,
//!    the store, the machines or each other.
//! 5. Only `lib.rs` (and `main.rs`, through the library) wires the parts together, and
//!    the graph of top-level modules has no cycle.
//!
//! A path in a comment or a string does not count; `#[cfg(test)]` code counts like any
//! other (a test module is part of its layer).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const PURE: &[&str] = &["money", "domain", "machine"];
const ADAPTERS: &[&str] = &["station", "control", "service", "fleet"];

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`src/engine/api.rs` → `engine`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_string()
}

/// The code of one line: without a `//` comment and without string literals (roughly:
/// enough for `use` lines and paths in code, which never hide inside strings here).
fn code_of(line: &str) -> String {
    let mut out = String::new();
    let mut in_str = false;
    let mut prev = ' ';
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if in_str {
            if c == '"' && prev != '\\' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
        } else if c == '/' && chars.peek() == Some(&'/') {
            break;
        } else {
            out.push(c);
        }
        prev = c;
    }
    out
}

/// `(module, path)` for every `crate::a::b` in the text: the module reached (`a`) and the
/// path to its second segment (`a::b`), for the port rule. A braced group
/// (`use crate::{a, b::c}`) yields each member.
fn crate_paths(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        // `pointgate::crate::` does not occur; a preceding identifier char means another
        // word (e.g. `somecrate::`).
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for member in group[..end].split(',') {
                let member = member.trim();
                let first = ident(member);
                if first.is_empty() {
                    continue;
                }
                let second = member[first.len()..]
                    .strip_prefix("::")
                    .map(ident)
                    .unwrap_or_default();
                out.push((first.clone(), format!("{first}::{second}")));
            }
            continue;
        }
        let first = ident(rest);
        let second = rest[first.len()..]
            .strip_prefix("::")
            .map(ident)
            .unwrap_or_default();
        out.push((first.clone(), format!("{first}::{second}")));
    }
    out
}

/// Each `src/` module's references to other top-level modules: `module -> reached ->
/// [(file:line, path)]`, and the external crates the pure modules use.
struct Graph {
    edges: BTreeMap<String, BTreeMap<String, Vec<(String, String)>>>,
    externals: BTreeMap<String, Vec<(String, String)>>,
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut edges: BTreeMap<String, BTreeMap<String, Vec<(String, String)>>> = BTreeMap::new();
    let mut externals: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for file in files {
        let module = module_of(&src, &file);
        let text = std::fs::read_to_string(&file).expect("read a source file");
        // Join `use` statements that span lines, so a braced group is seen whole.
        let mut statement = String::new();
        let mut start_line = 0;
        for (n, raw) in text.lines().enumerate() {
            let code = code_of(raw);
            if statement.is_empty() {
                start_line = n + 1;
            }
            statement.push_str(&code);
            statement.push(' ');
            let open = statement.matches('{').count() > statement.matches('}').count();
            let is_use = statement.trim_start().starts_with("use ")
                || statement.trim_start().starts_with("pub use ");
            if is_use && (open || !statement.contains(';')) {
                continue;
            }
            let at = format!(
                "{}:{start_line}",
                file.strip_prefix(&src).unwrap().display()
            );
            for (reached, path) in crate_paths(&statement) {
                if reached != module {
                    edges
                        .entry(module.clone())
                        .or_default()
                        .entry(reached)
                        .or_default()
                        .push((at.clone(), path));
                }
            }
            for ext in [
                "tokio",
                "sled",
                "rumqttc",
                "reqwest",
                "std::fs",
                "std::net",
                "std::process",
            ] {
                let used = statement
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                    .any(|w| w == ext || w.starts_with(&format!("{ext}::")));
                if used {
                    externals
                        .entry(module.clone())
                        .or_default()
                        .push((at.clone(), ext.to_string()));
                }
            }
            statement.clear();
        }
    }
    Graph { edges, externals }
}

/// Every reference from `module` that `allowed` refuses, as readable lines.
fn violations(g: &Graph, module: &str, allowed: impl Fn(&str, &str) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(reached) = g.edges.get(module) {
        for (target, places) in reached {
            for (at, path) in places {
                if !allowed(target, path) {
                    out.push(format!("{at}: {module} uses crate::{path}"));
                }
            }
        }
    }
    out
}

#[test]
fn the_pure_modules_import_only_each_other_and_no_io() {
    let g = graph();
    let mut bad = Vec::new();
    for m in PURE {
        bad.extend(violations(&g, m, |t, _| PURE.contains(&t)));
        for (at, ext) in g.externals.get(*m).into_iter().flatten() {
            bad.push(format!("{at}: {m} uses {ext}"));
        }
    }
    assert!(
        bad.is_empty(),
        "pure modules reach outside:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_store_imports_only_the_vocabulary_the_machines_and_failpoint() {
    let g = graph();
    let bad = violations(&g, "store", |t, _| {
        ["domain", "machine", "money", "failpoint"].contains(&t)
    });
    assert!(bad.is_empty(), "store reaches:\n{}", bad.join("\n"));
}

#[test]
fn the_engine_never_imports_a_link_topics_or_a_socket_server() {
    let g = graph();
    let bad = violations(&g, "engine", |t, _| {
        ![
            "station", "control", "service", "fleet", "mqtt", "charge", "sim", "demo", "broker",
        ]
        .contains(&t)
    });
    assert!(
        bad.is_empty(),
        "engine reaches an adapter:\n{}",
        bad.join("\n")
    );
}

#[test]
fn adapters_use_the_engine_port_and_the_vocabulary_only() {
    let g = graph();
    let mut bad = Vec::new();
    for m in ADAPTERS {
        bad.extend(violations(&g, m, |t, path| match t {
            "domain" | "money" | "mqtt" | "failpoint" => true,
            "engine" => path == "engine::port",
            _ => false,
        }));
    }
    assert!(
        bad.is_empty(),
        "adapters reach past the port:\n{}",
        bad.join("\n")
    );
}

#[test]
fn only_lib_wires_the_parts_and_the_modules_have_no_cycle() {
    let g = graph();
    let nodes: BTreeSet<&str> = g
        .edges
        .keys()
        .map(String::as_str)
        .chain(g.edges.values().flat_map(|r| r.keys().map(String::as_str)))
        .filter(|m| *m != "lib" && *m != "main")
        .collect();
    // Depth-first search for a back edge; the cycle it finds is reported whole.
    fn visit<'a>(
        g: &'a Graph,
        m: &'a str,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| *s == m) {
            let mut cycle: Vec<String> = stack[i..].iter().map(|s| s.to_string()).collect();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m);
        for next in g.edges.get(m).into_iter().flat_map(|r| r.keys()) {
            if next == "lib" || next == "main" {
                continue;
            }
            if let Some(c) = visit(g, next, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m);
        None
    }
    let mut done = BTreeSet::new();
    for m in &nodes {
        let mut stack = Vec::new();
        if let Some(cycle) = visit(&g, m, &mut stack, &mut done) {
            let witness: Vec<String> = cycle
                .windows(2)
                .map(|w| {
                    let (at, path) = &g.edges[&w[0]][&w[1]][0];
                    format!("  {at}: {} uses crate::{path}", w[0])
                })
                .collect();
            panic!(
                "module cycle {}:\n{}",
                cycle.join(" -> "),
                witness.join("\n")
            );
        }
    }
    // Nothing but lib.rs reaches `crate::run`-level wiring: no module imports `lib`.
    let wired: Vec<String> = g
        .edges
        .iter()
        .filter(|(_, r)| r.contains_key("lib"))
        .map(|(m, _)| m.clone())
        .collect();
    assert!(wired.is_empty(), "modules importing lib: {wired:?}");
}

#[test]
fn the_checker_sees_braced_groups_inline_paths_and_skips_comments() {
    // The checker itself must be able to fail: these are the shapes it has to catch.
    let found = crate_paths("use crate::{engine::port::X, store::Store, money};");
    assert_eq!(
        found,
        vec![
            ("engine".to_string(), "engine::port".to_string()),
            ("store".to_string(), "store::Store".to_string()),
            ("money".to_string(), "money::".to_string()),
        ]
    );
    assert_eq!(
        crate_paths("let x = crate::engine::Engine::new();"),
        vec![("engine".to_string(), "engine::Engine".to_string())]
    );
    assert!(crate_paths(&code_of("// see crate::engine for why")).is_empty());
    assert!(crate_paths(&code_of(r#"let s = "crate::engine";"#)).is_empty());
    assert!(crate_paths("use somecrate::engine;").is_empty());
}
