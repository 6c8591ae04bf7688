//! The layout ARCHITECTURE.md draws, checked against the source: which room may import which, no two modules
//! importing each other, pure modules free of I/O, leaves free of the crate. Reads `src/` as text.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each room and the rooms it may import (`crate::<room>`). The composition root (`lib.rs`, `config`) and
/// `kernels` (the benchmarks' window) may import anything.
const ALLOWED: &[(&str, &[&str])] = &[
    ("model", &[]),
    ("limits", &[]),
    ("health", &["model"]),
    ("alerting", &["model", "health"]),
    ("publish", &["model", "health", "alerting"]),
    ("pipeline", &["model", "health", "alerting", "publish"]),
    ("ingest", &["model", "health", "limits", "pipeline"]),
];

/// Modules that do no I/O and use no async runtime: time and data come in as arguments.
const PURE: &[&str] = &[
    "model",
    "limits",
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
];

/// Leaf modules: they import nothing of the crate.
const LEAVES: &[&str] = &[
    "model",
    "limits",
    "alerting::event",
    "alerting::escalation",
    "alerting::canary::verdict",
];

/// What a pure module may not mention.
const IO: &[&str] = &[
    "tokio",
    "axum",
    "reqwest",
    "tonic",
    "std::net",
    "std::fs",
    "std::thread",
];

/// Every module's source without its unit tests, by module path (`""` is the crate root).
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
            let mut module = rel.to_string_lossy().replace('/', "::");
            for suffix in ["::mod", "mod", "lib"] {
                if let Some(stripped) = module.strip_suffix(suffix)
                    && (stripped.is_empty() || suffix != "mod")
                {
                    module = stripped.to_owned();
                }
            }
            let text = std::fs::read_to_string(&path).expect("source is readable");
            let code = match text.find("#[cfg(test)]\nmod tests") {
                Some(at) => text[..at].to_owned(),
                None => match text.find("#[cfg(test)]\npub(crate) mod tests") {
                    Some(at) => text[..at].to_owned(),
                    None => text,
                },
            };
            (module, code)
        })
        .collect()
}

/// The modules `code` imports through `crate::` paths, each resolved to the longest known module.
fn imports(code: &str, modules: &BTreeSet<&str>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let path: String = code[at + "crate::".len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
        let best = (1..=parts.len())
            .map(|n| parts[..n].join("::"))
            .rfind(|candidate| modules.contains(candidate.as_str()));
        if let Some(best) = best {
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
        let imported = imports(code, &modules);
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
    for (a, targets) in &graph {
        for b in targets {
            assert!(
                !graph.get(b.as_str()).is_some_and(|back| back.contains(*a)),
                "{a} and {b} import each other"
            );
        }
    }
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
