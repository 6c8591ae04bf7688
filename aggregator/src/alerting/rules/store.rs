//! The live rule set: swapped whole on a good reload or API update, read by shards once per sealed second.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tracing::{error, info};

use super::config::{RuleSet, RulesError, WebhookPolicy, parse_rules_with};

/// How often the rules file is checked for changes.
pub(crate) const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Why new rules were not applied.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The rules did not validate; the old ones stay.
    #[error(transparent)]
    Invalid(#[from] RulesError),
    /// The rules file could not be read or written.
    #[error("rules file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The current rules and, if any, the file they live in.
pub(crate) struct RulesStore {
    current: RwLock<Arc<RuleSet>>,
    /// Held while new rules are written and put in force (two updates at once would otherwise share the temporary
    /// file, and the one in force could differ from the one on disk), and while a reload puts the file's in force.
    replacing: Mutex<()>,
    /// Updates through [`Self::replace`] so far: a reload that read the file before one of them does not put what
    /// it read in force (it would undo the update until the next reload).
    replaced: AtomicU64,
    path: Option<PathBuf>,
    policy: WebhookPolicy,
}

impl RulesStore {
    /// Loads `path` (when given) with no webhook allow list; a bad file is an error at start-up.
    #[cfg(test)]
    pub(crate) fn open(path: Option<PathBuf>) -> Result<Arc<Self>, StoreError> {
        Self::open_with(path, WebhookPolicy::default())
    }

    /// Loads `path` (when given); every version of the rules must pass `policy`. A bad file is an error at start-up.
    pub(crate) fn open_with(
        path: Option<PathBuf>,
        policy: WebhookPolicy,
    ) -> Result<Arc<Self>, StoreError> {
        let rules = match &path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| StoreError::Io {
                    path: p.clone(),
                    source,
                })?;
                parse_rules_with(&text, &policy)?
            }
            None => RuleSet::default(),
        };
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(rules)),
            replacing: Mutex::new(()),
            replaced: AtomicU64::new(0),
            path,
            policy,
        }))
    }

    /// The rules in force.
    pub(crate) fn current(&self) -> Arc<RuleSet> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Validates and applies new rules; writes them to the file (atomically) when there is one. Blocks on file
    /// I/O: call it off the async threads.
    pub(crate) fn replace(&self, source: &str) -> Result<Arc<RuleSet>, StoreError> {
        let rules = Arc::new(parse_rules_with(source, &self.policy)?);
        let _one_at_a_time = self.replacing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = &self.path {
            let tmp = path.with_extension("toml.tmp");
            // The file holds webhook secrets: the new one keeps the old one's permissions (0600 stays 0600).
            let permissions = std::fs::metadata(path).map(|m| m.permissions()).ok();
            std::fs::write(&tmp, source)
                .and_then(|()| match permissions {
                    Some(permissions) => std::fs::set_permissions(&tmp, permissions),
                    None => Ok(()),
                })
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|source| StoreError::Io {
                    path: path.clone(),
                    source,
                })?;
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = rules.clone();
        self.replaced.fetch_add(1, Ordering::SeqCst);
        Ok(rules)
    }

    /// Puts `rules`, read from the file when [`Self::replace`] had made `updates_before` updates, in force unless it
    /// has made more since (what was read would undo them until the next reload); whether it did.
    fn reload(&self, rules: RuleSet, updates_before: u64) -> bool {
        let _one_at_a_time = self.replacing.lock().unwrap_or_else(|e| e.into_inner());
        if self.replaced.load(Ordering::SeqCst) != updates_before {
            return false;
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rules);
        true
    }

    /// Re-reads the file every second and applies it when its content changed. A bad edit is logged with its
    /// line and reason, and the old rules stay.
    pub(crate) async fn watch(self: Arc<Self>) {
        let Some(path) = self.path.clone() else {
            // Nothing to watch; stay, like every task the aggregator runs until shutdown.
            return std::future::pending().await;
        };
        let mut interval = tokio::time::interval(RELOAD_INTERVAL);
        let mut rejected: Option<String> = None;
        let mut unreadable = false;
        loop {
            interval.tick().await;
            let updates_before = self.replaced.load(Ordering::SeqCst);
            let text = match tokio::fs::read_to_string(&path).await {
                Ok(text) => {
                    unreadable = false;
                    text
                }
                Err(error) => {
                    // Said once per outage, not every second; the rules in force stay.
                    if !unreadable {
                        error!(message = "Rules file unreadable; the previous rules stay.", path = %path.display(), %error);
                    }
                    unreadable = true;
                    continue;
                }
            };
            if text == self.current().source || rejected.as_deref() == Some(text.as_str()) {
                continue;
            }
            match parse_rules_with(&text, &self.policy) {
                Ok(rules) => {
                    let count = rules.rules.len();
                    // Updated through the API since the file was read: the next round reads the update.
                    if self.reload(rules, updates_before) {
                        info!(message = "Rules reloaded.", path = %path.display(), rules = count);
                        rejected = None;
                    }
                }
                Err(error) => {
                    error!(message = "Rules file rejected; the previous rules stay.", path = %path.display(), %error);
                    rejected = Some(text);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rules other than the file's (none either way: which source is in force is what counts).
    const RULE: &str = "# updated through the API\n";

    /// A reload that read the file before an update through the API does not put the old rules back; one that read
    /// it after does put the file's rules in force.
    #[test]
    fn a_reload_read_before_an_update_does_not_undo_it() {
        let dir = std::env::temp_dir().join(format!("strobe-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("rules-{}.toml", rand::random::<u64>()));
        std::fs::write(&path, "").unwrap();
        let store = RulesStore::open(Some(path.clone())).unwrap();
        let before = store.replaced.load(Ordering::SeqCst);
        let read_before = parse_rules_with("", &store.policy).unwrap();
        store.replace(RULE).unwrap();
        assert!(!store.reload(read_before, before));
        assert_eq!(store.current().source, RULE);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), RULE);
        let after = store.replaced.load(Ordering::SeqCst);
        assert!(store.reload(parse_rules_with("", &store.policy).unwrap(), after));
        assert_eq!(store.current().source, "");
        std::fs::remove_file(&path).ok();
    }
}
