//! The crate's shape: no import circles between sibling modules, at any depth of `src/`.
//!
//! Each file of `src/` is a module (`engine/worker/retry.rs` is `engine::worker::retry`). A
//! path in code (`crate::store::append`, `super::Worker`, `use crate::{a, b::c}`) is an edge
//! from the file's module to the module it names; a name re-exported by `lib.rs` counts as the
//! module it comes from. An edge between two modules counts between the two children of their
//! closest common parent that hold them (a child using its parent, or a parent its child, is
//! no edge: a type's helpers are its submodules). Those children must form no circle.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// A module path, from the crate root: `["engine", "worker", "retry"]`.
type ModulePath = Vec<String>;

#[test]
fn sibling_modules_import_each_other_in_one_direction_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let circles = import_circles(&src);
    assert!(
        circles.is_empty(),
        "import circles between sibling modules (each line: the modules of one circle):\n{}",
        circles
            .iter()
            .map(|circle| format!("  {}", circle.join(" <-> ")))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_circle_between_siblings_is_found() {
    let dir = std::env::temp_dir().join(format!("projector-shape-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("engine")).expect("temporary folder");
    let files = [
        ("lib.rs", "mod engine; mod store; pub use store::Database;"),
        ("engine/mod.rs", "mod worker; use crate::Database;"),
        (
            "engine/worker.rs",
            "use super::super::store::x; // crate::nothing",
        ),
        (
            "store.rs",
            "fn f() { crate::engine::run(); } const S: &str = \"crate::cli\";",
        ),
    ];
    for (name, text) in files {
        fs::write(dir.join(name), text).expect("a temporary source file");
    }
    let circles = import_circles(&dir);
    let _ = fs::remove_dir_all(&dir);
    assert_eq!(circles, [vec!["engine".to_owned(), "store".to_owned()]]);
}

/// Every circle among siblings, as the sorted names of its members (full module paths).
fn import_circles(src: &Path) -> Vec<Vec<String>> {
    let modules = modules_of(src);
    let known: BTreeSet<ModulePath> = modules.keys().cloned().collect();
    let exports = root_exports(&modules, &known);
    let mut edges: BTreeMap<ModulePath, BTreeSet<ModulePath>> = BTreeMap::new();
    for (module, file) in &modules {
        let code = code_only(&fs::read_to_string(file).expect("a readable source file"));
        for path in paths_in(&code) {
            let Some(target) = resolve(module, &path, &known, &exports) else {
                continue;
            };
            if let Some((from, to)) = sibling_edge(module, &target) {
                edges.entry(from).or_default().insert(to);
            }
        }
    }
    let mut circles: Vec<Vec<String>> = strongly_connected(&edges)
        .into_iter()
        .filter(|group| group.len() > 1)
        .map(|group| group.iter().map(|m| m.join("::")).collect())
        .collect();
    circles.sort();
    circles
}

/// Each module's file: `src/a/mod.rs` is `a`, `src/a/b.rs` is `a::b`, `lib.rs` the root.
fn modules_of(src: &Path) -> BTreeMap<ModulePath, PathBuf> {
    let mut modules = BTreeMap::new();
    let mut folders = vec![src.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in fs::read_dir(&folder).expect("a readable source folder") {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                folders.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("a file under src");
            let mut parts: ModulePath = relative
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            if relative.as_os_str() == "main.rs" {
                continue;
            }
            modules.insert(parts, path);
        }
    }
    modules
}

/// The names `lib.rs` re-exports (`pub use store::{append, Database}`) and their modules.
fn root_exports(
    modules: &BTreeMap<ModulePath, PathBuf>,
    known: &BTreeSet<ModulePath>,
) -> BTreeMap<String, ModulePath> {
    let mut exports = BTreeMap::new();
    let Some(lib) = modules.get(&Vec::new()) else {
        return exports;
    };
    let code = code_only(&fs::read_to_string(lib).expect("a readable lib.rs"));
    for statement in code.split(';') {
        let Some(tree) = statement.trim().strip_prefix("pub use ") else {
            continue;
        };
        for path in use_tree_paths(tree) {
            let Some(name) = path.last() else { continue };
            let module = longest_module(&path, known);
            if !module.is_empty() {
                exports.insert(name.clone(), module);
            }
        }
    }
    exports
}

/// The source without comments, string and character literals.
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut code = String::with_capacity(source.len());
    let mut i = 0;
    while i < chars.len() {
        let rest = &chars[i..];
        if rest.starts_with(&['/', '/']) {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if rest.starts_with(&['/', '*']) {
            i += 2;
            while i < chars.len() && !chars[i..].starts_with(&['*', '/']) {
                i += 1;
            }
            i += 2;
        } else if chars[i] == 'r' && rest.get(1).is_some_and(|c| *c == '"' || *c == '#') {
            let hashes = rest[1..].iter().take_while(|c| **c == '#').count();
            if rest.get(1 + hashes) != Some(&'"') {
                code.push(chars[i]);
                i += 1;
                continue;
            }
            i += 2 + hashes;
            let end: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            while i < chars.len() && !chars[i..].starts_with(&end) {
                i += 1;
            }
            i += end.len();
            code.push_str("\"\"");
        } else if chars[i] == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            code.push_str("\"\"");
        } else if chars[i] == '\'' && rest.get(2) == Some(&'\'') {
            i += 3;
        } else if chars[i] == '\'' && rest.get(1) == Some(&'\\') {
            i += 2;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else {
            code.push(chars[i]);
            i += 1;
        }
    }
    code
}

/// Every path starting with `crate::` or `super::` in `code`, use trees expanded.
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let bytes = code.as_bytes();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(found) = code[from..].find(start) {
            let at = from + found;
            from = at + start.len();
            let before = at.checked_sub(1).map(|b| bytes[b]);
            if before.is_some_and(|b| b.is_ascii_alphanumeric() || b"_$:".contains(&b)) {
                continue;
            }
            let tree = use_tree_text(&code[at..]);
            paths.extend(use_tree_paths(tree));
        }
    }
    paths
}

/// The text of one path or use tree at the start of `code`: up to the end of its braces.
fn use_tree_text(code: &str) -> &str {
    let mut depth = 0usize;
    for (i, c) in code.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return &code[..i],
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &code[..=i];
                }
            }
            c if depth == 0 && !(c.is_alphanumeric() || c == '_' || c == ':') => {
                return &code[..i];
            }
            _ => {}
        }
    }
    code
}

/// `a::{b, c::{d, e}}` as `a::b`, `a::c::d`, `a::c::e` (each a list of segments).
fn use_tree_paths(tree: &str) -> Vec<Vec<String>> {
    let tree = without_renames(tree);
    let Some(open) = tree.find('{') else {
        let segments: Vec<String> = tree
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        return vec![segments];
    };
    let prefix: Vec<String> = tree[..open]
        .split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|item| !item.is_empty())
        .flat_map(|item| {
            use_tree_paths(item).into_iter().map(|rest| {
                let mut path = prefix.clone();
                path.extend(rest.into_iter().filter(|s| s != "self"));
                path
            })
        })
        .collect()
}

/// `tree` without whitespace and without renames (`a::B as C` is `a::B`).
fn without_renames(tree: &str) -> String {
    let spaced: String = tree
        .chars()
        .flat_map(|c| match c {
            '{' | '}' | ',' => vec![' ', c, ' '],
            c => vec![c],
        })
        .collect();
    let mut words = spaced.split_whitespace();
    let mut text = String::new();
    while let Some(word) = words.next() {
        if word == "as" {
            words.next();
        } else {
            text.push_str(word);
        }
    }
    text
}

/// The module a path in `module` names: `crate::`/`super::` resolved, then the longest known
/// module that the path starts with (a re-exported root name counts as its own module).
fn resolve(
    module: &ModulePath,
    path: &[String],
    known: &BTreeSet<ModulePath>,
    exports: &BTreeMap<String, ModulePath>,
) -> Option<ModulePath> {
    let mut absolute: ModulePath = Vec::new();
    let mut rest = path;
    if rest.first().is_some_and(|s| s == "crate") {
        rest = &rest[1..];
    } else {
        absolute = module.clone();
        while rest.first().is_some_and(|s| s == "super") {
            absolute.pop()?;
            rest = &rest[1..];
        }
    }
    absolute.extend(rest.iter().cloned());
    let target = longest_module(&absolute, known);
    if target.is_empty() {
        return absolute.first().and_then(|name| exports.get(name)).cloned();
    }
    Some(target)
}

fn longest_module(path: &[String], known: &BTreeSet<ModulePath>) -> ModulePath {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|prefix| known.contains(prefix))
        .unwrap_or_default()
}

/// The edge between the children of the closest common parent that hold `from` and `to`;
/// none when one holds the other.
fn sibling_edge(from: &ModulePath, to: &ModulePath) -> Option<(ModulePath, ModulePath)> {
    let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
    if common == from.len() || common == to.len() {
        return None;
    }
    Some((from[..=common].to_vec(), to[..=common].to_vec()))
}

/// The strongly connected groups of a directed graph (Tarjan's algorithm).
fn strongly_connected(
    edges: &BTreeMap<ModulePath, BTreeSet<ModulePath>>,
) -> Vec<BTreeSet<ModulePath>> {
    struct State<'a> {
        edges: &'a BTreeMap<ModulePath, BTreeSet<ModulePath>>,
        index: BTreeMap<ModulePath, usize>,
        low: BTreeMap<ModulePath, usize>,
        stack: Vec<ModulePath>,
        on_stack: BTreeSet<ModulePath>,
        groups: Vec<BTreeSet<ModulePath>>,
    }
    fn visit(state: &mut State<'_>, node: &ModulePath) {
        let n = state.index.len();
        state.index.insert(node.clone(), n);
        state.low.insert(node.clone(), n);
        state.stack.push(node.clone());
        state.on_stack.insert(node.clone());
        let edges = state.edges;
        for next in edges.get(node).into_iter().flatten() {
            if !state.index.contains_key(next) {
                visit(state, next);
                let low = state.low[node].min(state.low[next]);
                state.low.insert(node.clone(), low);
            } else if state.on_stack.contains(next) {
                let low = state.low[node].min(state.index[next]);
                state.low.insert(node.clone(), low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut group = BTreeSet::new();
            while let Some(member) = state.stack.pop() {
                state.on_stack.remove(&member);
                let last = member == *node;
                group.insert(member);
                if last {
                    break;
                }
            }
            state.groups.push(group);
        }
    }
    let mut state = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        groups: Vec::new(),
    };
    let nodes: Vec<ModulePath> = edges.keys().cloned().collect();
    for node in nodes {
        if !state.index.contains_key(&node) {
            visit(&mut state, &node);
        }
    }
    state.groups
}
