//! The layout ARCHITECTURE.md draws, checked against the source: which room may import which, no two modules
//! importing each other, pure modules free of I/O, leaves free of the crate. Reads `src/` as text.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each room and the rooms it may import (`crate::<room>`). The composition root (`lib.rs`, `config`) and
/// `kernels` (the benchmarks' window) may import anything.
const ALLOWED: &[(&str, &[&str])] = &[
    ("model", &[]),
    ("limits", &[]),
    ("auth", &[]),
    ("tls", &[]),
    ("health", &["model"]),
    ("alerting", &["model", "health"]),
    ("publish", &["model", "health", "alerting", "auth"]),
    ("cluster", &["model", "health", "alerting", "publish"]),
    (
        "pipeline",
        &["model", "health", "alerting", "publish", "cluster"],
    ),
    (
        "ingest",
        &[
            "model", "health", "limits", "auth", "pipeline", "cluster", "alerting",
        ],
    ),
];

/// Modules that do no I/O and use no async runtime: time and data come in as arguments.
const PURE: &[&str] = &[
    "model",
    "limits",
    "auth",
    "ingest::validate",
    "pipeline::windows",
    "pipeline::merge",
    "alerting::event",
    "alerting::escalation",
    "alerting::rules::config",
    "alerting::rules::eval",
    "alerting::canary",
    "alerting::canary::stats",
    "alerting::canary::inputs",
    "alerting::canary::verdict",
    "alerting::canary::alert",
    "alerting::alerts::payload",
    "publish::overview",
    "cluster::rendezvous",
];

/// Leaf modules: they import nothing of the crate.
const LEAVES: &[&str] = &[
    "model",
    "limits",
    "auth",
    "tls",
    "alerting::event",
    "alerting::escalation",
    "alerting::canary::verdict",
];

/// What a pure module may not mention: I/O, runtimes, and clocks (time comes in as an argument).
const IO: &[&str] = &[
    "SystemTime",
    "Instant::now",
    "unix_millis",
    "tokio",
    "axum",
    "reqwest",
    "tonic",
    "std::net",
    "std::fs",
    "std::thread",
];

/// Every module's source without its `#[cfg(test)]` items, by module path (`""` is the crate root).
fn sources() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src is readable") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    files
        .into_iter()
        .filter(|p| !p.ends_with("architecture_tests.rs"))
        .map(|path| {
            let rel = path
                .strip_prefix(&root)
                .expect("under src")
                .with_extension("");
            let rel = rel.to_string_lossy().replace('/', "::");
            let module = match rel.as_str() {
                "lib" => String::new(),
                other => other.strip_suffix("::mod").unwrap_or(other).to_owned(),
            };
            let text = std::fs::read_to_string(&path).expect("source is readable");
            (module, without_tests(&text))
        })
        .collect()
}

/// `text` without comments and without every item that follows a `#[cfg(test)]` attribute (up to its matching
/// closing brace, or its semicolon).
fn without_tests(text: &str) -> String {
    let code: String = text
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .map(|line| format!("{line}\n"))
        .collect();
    let mut out = String::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let end = match (item.find('{'), item.find(';')) {
            (Some(open), semi) if semi.is_none_or(|semi| open < semi) => {
                let mut depth = 0usize;
                let mut end = item.len();
                for (i, c) in item[open..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = open + i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (_, Some(semi)) => semi + 1,
            _ => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into its full paths.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
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
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand(p).into_iter().map(move |e| format!("{prefix}{e}")))
        .collect()
}

/// The modules `code` (the source of `module`) imports: every `use` path and every inline `crate::` or `super::`
/// path, made absolute and resolved to the longest known module.
fn imports(module: &str, code: &str, modules: &BTreeSet<&str>) -> BTreeSet<String> {
    let mut paths: Vec<String> = Vec::new();
    for (at, _) in code.match_indices("use ") {
        if at > 0 && !code[..at].ends_with(|c: char| c.is_whitespace() || c == ')') {
            continue;
        }
        if let Some(end) = code[at..].find(';') {
            paths.extend(expand(&code[at + 4..at + end]));
        }
    }
    // Inline paths may be split across lines: read them with the whitespace taken out.
    let compact: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    for anchor in ["crate::", "super::"] {
        for (at, _) in compact.match_indices(anchor) {
            if at > 0
                && compact[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':')
            {
                continue;
            }
            let path: String = compact[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            paths.push(path);
        }
    }
    // A file's parent for `super::` is its module's parent, except that `mod.rs` and `lib.rs` are their module.
    let mut found = BTreeSet::new();
    for path in paths {
        let mut parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
        let mut base: Vec<&str> = module.split("::").filter(|p| !p.is_empty()).collect();
        let absolute = match parts.first() {
            Some(&"crate") => {
                parts.remove(0);
                parts
            }
            Some(&"super") => {
                while parts.first() == Some(&"super") {
                    parts.remove(0);
                    base.pop();
                }
                base.extend(parts);
                base
            }
            _ => continue,
        };
        let best = (1..=absolute.len())
            .map(|n| absolute[..n].join("::"))
            .rfind(|candidate| modules.contains(candidate.as_str()));
        if let Some(best) = best
            && best != module
        {
            found.insert(best);
        }
    }
    found
}

fn room(module: &str) -> &str {
    module.split("::").next().unwrap_or("")
}

#[test]
fn rooms_import_only_the_rooms_below_them_and_no_two_modules_import_each_other() {
    let sources = sources();
    let modules: BTreeSet<&str> = sources.keys().map(String::as_str).collect();
    assert!(modules.contains("pipeline::shard") && modules.contains("alerting::canary"));
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut graph: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (module, code) in &sources {
        let imported = imports(module, code, &modules);
        if let Some(may) = allowed.get(room(module)) {
            for target in &imported {
                let to = room(target);
                if to != room(module) && !may.contains(&to) {
                    wrong.push(format!("{module} imports {target}"));
                }
            }
        }
        graph.insert(module, imported);
    }
    assert!(
        wrong.is_empty(),
        "imports across rooms not in ARCHITECTURE.md: {wrong:#?}"
    );
    // No cycle at all, two modules importing each other included: a depth-first search from every module.
    fn visit<'a>(
        module: &'a str,
        graph: &'a BTreeMap<&str, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(at) = path.iter().position(|m| *m == module) {
            panic!(
                "import cycle: {}",
                path[at..].join(" -> ") + " -> " + module
            );
        }
        if !done.insert(module) {
            return;
        }
        path.push(module);
        for next in graph.get(module).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        visit(module, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_import_reader_sees_grouped_relative_and_split_paths() {
    let modules = BTreeSet::from(["a", "a::b", "a::c", "d", "d::e"]);
    let code = "use crate::{a::b::Thing, d::{e::X, Y}};\nuse super::c;\n";
    let found = imports("a::b", code, &modules);
    let expected: BTreeSet<String> = ["a::c", "d", "d::e"].map(String::from).into();
    assert_eq!(found, expected);
    let split = imports(
        "a",
        "fn f() { let x = crate::\n    d::e::g(); }\n",
        &modules,
    );
    assert_eq!(split, BTreeSet::from(["d::e".to_owned()]));
    let stripped = without_tests(
        "fn kept() {}\n#[cfg(test)]\nmod tests {\n    use crate::x;\n}\nfn also_kept() {}\n",
    );
    assert!(stripped.contains("also_kept") && !stripped.contains("crate::x"));
}

#[test]
fn pure_modules_do_no_io_and_leaves_import_nothing_of_the_crate() {
    let sources = sources();
    for module in PURE {
        let code: String = sources
            .get(*module)
            .unwrap_or_else(|| panic!("{module} exists"))
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect();
        for word in IO {
            assert!(!code.contains(word), "pure module {module} mentions {word}");
        }
    }
    for module in LEAVES {
        let code = sources
            .get(*module)
            .unwrap_or_else(|| panic!("{module} exists"));
        assert!(
            !code.contains("crate::"),
            "leaf module {module} imports from the crate"
        );
    }
}
