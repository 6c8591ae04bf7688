//! Alert state on disk, the way Alertmanager keeps its notification log: every alert the manager holds, with its
//! acknowledgement, its place on the escalation chain and which (transition, step) notifications were queued and
//! which of those were settled. One JSON file, replaced atomically (written beside it, synced, renamed), so a crash
//! leaves either the old state or the new one.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::alerting::event::{AlertRecord, NotifyTransition};

/// The file's format version; a file with another is refused (and set aside), never misread.
const FORMAT: u32 = 1;
/// The file inside the state directory.
const FILE: &str = "alerts.json";

/// Why alert state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The directory could not be created or the file not read or written.
    #[error("alert state {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The file is not alert state this version understands.
    #[error("alert state {path} is unreadable: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// One alert as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SavedAlert {
    /// The alert as people see it (state, acknowledgement, targets told).
    pub(crate) record: AlertRecord,
    /// Rule, service and labels: how a breach still going on after a restart finds this alert again.
    pub(crate) key: String,
    /// The next escalation step to notify.
    pub(crate) next_step: usize,
    /// Escalation steps told that it fired, in order.
    pub(crate) told: Vec<usize>,
    /// Notifications handed to delivery.
    pub(crate) queued: Vec<(NotifyTransition, usize)>,
    /// Of those, the ones delivery finished with (delivered, refused or given up); the rest are queued again after
    /// a restart.
    pub(crate) settled: Vec<(NotifyTransition, usize)>,
}

/// What a state file held.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// When it was written (unix milliseconds); `None` when there was no file.
    pub(crate) saved_at_ms: Option<i64>,
    /// The alerts.
    pub(crate) alerts: Vec<SavedAlert>,
}

#[derive(Serialize, Deserialize)]
struct StateFileBody {
    format: u32,
    saved_at_ms: i64,
    alerts: Vec<SavedAlert>,
}

/// The state file of one aggregator.
#[derive(Debug)]
pub(crate) struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The state file in `dir`, creating the directory if needed.
    pub(crate) fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Io {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            path: dir.join(FILE),
        })
    }

    /// Where the file is.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// What was saved last, and when; nothing if there is no file yet.
    pub(crate) fn load(&self) -> Result<Loaded, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Loaded::default());
            }
            Err(source) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let corrupt = |reason: String| StateError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let body: StateFileBody =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if body.format != FORMAT {
            return Err(corrupt(format!(
                "format {} (this version reads {FORMAT})",
                body.format
            )));
        }
        Ok(Loaded {
            saved_at_ms: Some(body.saved_at_ms),
            alerts: body.alerts,
        })
    }

    /// Moves an unreadable file aside (to `alerts.json.unreadable`) so that the next save does not destroy it.
    pub(crate) fn set_aside(&self) -> Result<PathBuf, StateError> {
        let aside = self.path.with_extension("json.unreadable");
        std::fs::rename(&self.path, &aside).map_err(|source| StateError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(aside)
    }

    /// Replaces the file with `alerts`: written to a temporary file beside it, synced, then renamed over it.
    pub(crate) fn save(&self, alerts: Vec<SavedAlert>) -> Result<(), StateError> {
        let body = StateFileBody {
            format: FORMAT,
            saved_at_ms: strobe_proto::clock::unix_millis(),
            alerts,
        };
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let bytes = serde_json::to_vec(&body).map_err(|e| StateError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let temporary = self.path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&temporary).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&temporary, &self.path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerting::alerts::manager::tests_support::record;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "strobe-state-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn saved_alerts_load_back_and_an_unreadable_file_is_refused_then_set_aside() {
        let dir = dir("roundtrip");
        let file = StateFile::open(&dir.join("nested")).unwrap();
        let nothing = file.load().unwrap();
        assert!(
            nothing.alerts.is_empty() && nothing.saved_at_ms.is_none(),
            "no file yet is no state"
        );
        let saved = SavedAlert {
            record: record("a"),
            key: "k".into(),
            next_step: 2,
            told: vec![0, 1],
            queued: vec![(NotifyTransition::Firing, 0), (NotifyTransition::Firing, 1)],
            settled: vec![(NotifyTransition::Firing, 0)],
        };
        let before = strobe_proto::clock::unix_millis();
        file.save(vec![saved]).unwrap();
        let Loaded {
            saved_at_ms,
            alerts: loaded,
        } = file.load().unwrap();
        assert!(
            saved_at_ms.is_some_and(|at| at >= before),
            "{saved_at_ms:?}"
        );
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].record.id, "a");
        assert_eq!(loaded[0].told, vec![0, 1]);
        assert_eq!(loaded[0].settled, vec![(NotifyTransition::Firing, 0)]);

        std::fs::write(file.path(), b"{\"format\": 1, \"alerts\": [tru").unwrap();
        assert!(matches!(file.load(), Err(StateError::Corrupt { .. })));
        let aside = file.set_aside().unwrap();
        assert!(aside.exists());
        assert!(file.load().unwrap().alerts.is_empty());

        std::fs::write(
            file.path(),
            b"{\"format\": 99, \"saved_at_ms\": 0, \"alerts\": []}",
        )
        .unwrap();
        let error = file.load().unwrap_err().to_string();
        assert!(error.contains("format 99"), "{error}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
