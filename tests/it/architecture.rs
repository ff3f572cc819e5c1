//! The layout `src/lib.rs` promises, checked from the code's own imports: the library's
//! wings depend only on the wings below them, and no two modules depend on each other,
//! however indirectly.
//!
//! Read as text (no compiler involved): every `crate::…`, `super::…` and `self::…` path
//! outside comments, resolved to the file that defines the module it names. A module's
//! own submodules are not dependencies of it (a `mod.rs` declares and re-exports them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The wings, from the top (wiring) down to the bottom (process plumbing), as `lib.rs`
/// lists them.
const WINGS: [&str; 9] = ["app", "config", "delivery", "broker", "engine", "message", "data", "ops", "platform"];

/// A module path (`["engine", "snapshot", "store"]`) for every file of the library.
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<Vec<String>, PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            let name = path.file_stem().and_then(|n| n.to_str()).expect("utf-8 name").to_owned();
            if path.is_dir() {
                if name != "bin" {
                    walk(&path, &[prefix, &[name]].concat(), out);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                let module = match name.as_str() {
                    "mod" | "lib" => prefix.to_vec(),
                    _ => [prefix, &[name]].concat(),
                };
                out.insert(module, path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, &[], &mut out);
    out
}

/// The code of a file without its comments.
fn code(path: &Path) -> String {
    strip_comments(&std::fs::read_to_string(path).expect("read source"))
}

/// `text` without comments (`//`, `///`, `//!`, `/* */`: intra-doc links are not
/// dependencies) and without the contents of string literals (`"amqps://"` is no
/// comment, and a path in a message is no dependency).
fn strip_comments(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let rest = &chars[i..];
        match rest {
            ['/', '/', ..] => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            ['/', '*', ..] => {
                i += 2;
                while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                    i += 1;
                }
                i += 2;
            }
            ['\'', '"', '\'', ..] => i += 3,
            ['r', '#', ..] | ['r', '"', ..] => {
                let hashes = rest[1..].iter().take_while(|&&c| c == '#').count();
                if rest.get(1 + hashes) != Some(&'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                i += 2 + hashes;
                while i < chars.len() && !(chars[i] == '"' && chars[i + 1..].iter().take(hashes).all(|&c| c == '#')) {
                    i += 1;
                }
                i += 1 + hashes;
                out.push_str("\"\"");
            }
            ['"', ..] => {
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            [c, ..] => {
                out.push(*c);
                i += 1;
            }
            [] => break,
        }
    }
    out
}

/// `a::{b, c::{d, e}}` expanded to `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else { return vec![tree.to_owned()] };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty()).flat_map(|p| expand(&format!("{prefix}{}", p.trim()))).collect()
}

/// Every module path `text` names from `module`: the paths of its `use` items (groups
/// expanded) and every `crate::…`, `super::…` or `self::…` path in its code, as written
/// (resolution to files happens later).
fn references(module: &[String], text: &str) -> Vec<Vec<String>> {
    let mut paths: Vec<String> = Vec::new();
    for statement in text.split(';') {
        if let Some(at) = statement.find("use ") {
            let before = &statement[..at];
            if before.trim().is_empty() || before.trim_end().ends_with("pub") || before.trim_end().ends_with(')') {
                paths.extend(expand(statement[at + 4..].split(" as ").next().unwrap_or("")));
            }
        }
    }
    paths.extend(
        text.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .filter(|t| t.starts_with("crate::") || t.starts_with("super::") || t.starts_with("self::"))
            .map(str::to_owned),
    );
    let mut found = Vec::new();
    for path in paths {
        let mut parts: Vec<&str> = path.split("::").map(str::trim).collect();
        let root = match parts.first() {
            Some(&"crate") => {
                parts.remove(0);
                Vec::new()
            }
            Some(&"super") => {
                let mut levels = 0;
                while parts.first() == Some(&"super") {
                    parts.remove(0);
                    levels += 1;
                }
                match module.len().checked_sub(levels) {
                    Some(n) => module[..n].to_vec(),
                    None => continue,
                }
            }
            Some(&"self") => {
                parts.remove(0);
                module.to_vec()
            }
            _ => continue,
        };
        let mut resolved = root;
        for part in parts {
            if !part.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                break;
            }
            resolved.push(part.to_owned());
        }
        found.push(resolved);
    }
    found
}

/// The file-level dependency graph: module -> the modules it uses (the longest known
/// module prefix of each path it names), without itself, its ancestors' re-exports of
/// it, or its own submodules.
fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    let mut graph = BTreeMap::new();
    for (module, path) in &modules {
        let mut used = BTreeSet::new();
        for named in references(module, &code(path)) {
            let target = (0..=named.len()).rev().map(|n| named[..n].to_vec()).find(|m| modules.contains_key(m));
            if let Some(target) = target
                && !target.is_empty()
                && target != *module
                && !target.starts_with(module)
            {
                used.insert(target);
            }
        }
        graph.insert(module.clone(), used);
    }
    graph
}

fn wing(module: &[String]) -> usize {
    let first = module.first().map(String::as_str).unwrap_or("");
    WINGS.iter().position(|w| *w == first).unwrap_or_else(|| panic!("module {module:?} is in no wing of lib.rs"))
}

fn name(module: &[String]) -> String {
    module.join("::")
}

type Graph = BTreeMap<Vec<String>, BTreeSet<Vec<String>>>;

/// Every edge from a module to a module of a higher wing.
fn upward_edges(graph: &Graph) -> Vec<String> {
    let mut upward = Vec::new();
    for (from, used) in graph {
        if from.is_empty() {
            continue; // lib.rs: the table of contents re-exports every wing
        }
        for to in used {
            if wing(to) < wing(from) {
                upward.push(format!("{} -> {}", name(from), name(to)));
            }
        }
    }
    upward
}

/// A cycle of the graph, if it has one: its modules in order, the first repeated last.
fn first_cycle(graph: &Graph) -> Option<Vec<String>> {
    // Depth-first search for a back edge.
    fn visit(
        node: &Vec<String>,
        graph: &Graph,
        state: &mut BTreeMap<Vec<String>, bool>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<String>> {
        state.insert(node.clone(), false);
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if next.is_empty() {
                continue;
            }
            match state.get(next) {
                Some(false) => {
                    let at = stack.iter().position(|m| m == next).unwrap_or(0);
                    return Some(stack[at..].iter().chain([next]).map(|m| name(m)).collect());
                }
                Some(true) => {}
                None => {
                    if let Some(cycle) = visit(next, graph, state, stack) {
                        return Some(cycle);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.clone(), true);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys().filter(|m| !m.is_empty()) {
        if !state.contains_key(node)
            && let Some(cycle) = visit(node, graph, &mut state, &mut Vec::new())
        {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn every_wing_depends_only_on_the_wings_below_it() {
    let graph = graph();
    assert!(graph.len() > 40, "the walk found the library's files: {}", graph.len());
    if std::env::var_os("SHOW_MODULE_GRAPH").is_some() {
        for (from, used) in &graph {
            println!("{} -> {}", name(from), used.iter().map(|m| name(m)).collect::<Vec<_>>().join(", "));
        }
    }
    let upward = upward_edges(&graph);
    assert!(upward.is_empty(), "edges pointing up the wings of lib.rs:\n{}", upward.join("\n"));
}

#[test]
fn no_two_modules_depend_on_each_other_even_indirectly() {
    if let Some(cycle) = first_cycle(&graph()) {
        panic!("a dependency cycle: {}", cycle.join(" -> "));
    }
}

/// The check itself can fail: a made-up upward edge and a made-up cycle are found.
#[test]
fn the_layout_check_sees_an_upward_edge_and_a_cycle() {
    let module = vec!["data".to_owned(), "segments".to_owned()];
    let text = "use crate::engine::cache::Answer;\nuse super::{stats::Tally, index::{self, Span}};\nlet n = self::x();";
    let refs: Vec<String> = references(&module, text).iter().map(|m| m.join("::")).collect();
    assert_eq!(
        refs,
        [
            "engine::cache",
            "data::stats",
            "data::index::self",
            "data::index",
            "engine::cache",
            "data",
            "data::segments::x"
        ]
    );
    assert!(wing(&["engine".to_owned()]) < wing(&module), "engine sits above data");
    let text =
        "// use crate::app;\nlet x = 1; // crate::app\nlet u = \"amqps://\"; /* crate::app */ super::tls::AVAILABLE";
    let refs: Vec<String> = references(&module, &strip_comments(text)).iter().map(|m| m.join("::")).collect();
    assert_eq!(refs, ["data::tls"], "comments and strings are not dependencies, code after a string is");
    // A cycle and an upward edge in a made-up graph are reported.
    let a = vec!["engine".to_owned(), "a".to_owned()];
    let b = vec!["data".to_owned(), "b".to_owned()];
    let made_up = BTreeMap::from([(a.clone(), BTreeSet::from([b.clone()])), (b.clone(), BTreeSet::from([a.clone()]))]);
    assert_eq!(upward_edges(&made_up), ["data::b -> engine::a"]);
    assert_eq!(first_cycle(&made_up), Some(vec!["data::b".to_owned(), "engine::a".to_owned(), "data::b".to_owned()]));
}
