//! A directory standing in for a hub: a work source reading ManifestWork YAML files from it
//! (re-read on change; a removed file deletes its works), and a sink writing each work's status
//! next to it as `NAME.status.yaml`. For a single node or a test bed without a hub.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use spokelet_work_api::conditions::{FALSE, cond, now_rfc3339, types};
use spokelet_work_api::manifestwork::{ManifestWork, ManifestWorkStatus};
use spokelet_work_api::names::{MAX_WORK_NAME, subdomain_fault};
use spokelet_work_api::source::{
    Listing, SinkError, StatusSink, StatusUpdate, WorkEvent, WorkRef, WorkSource, log_status,
};

/// File-source failures (only construction can fail; bad files are reported, never fatal).
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    /// The directory cannot be read.
    #[error("works directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Why a work file is refused (its works keep their last good version).
#[derive(Debug, thiserror::Error)]
pub enum WorkFileError {
    #[error("not UTF-8: {0}")]
    NotUtf8(#[from] std::str::Utf8Error),
    /// A YAML document (counted from 0) does not parse, or is not a ManifestWork's shape.
    #[error("document {doc}: {source}")]
    Yaml {
        doc: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("document {doc}: kind is {kind:?}, expected ManifestWork")]
    WrongKind { doc: usize, kind: String },
    /// The name becomes a file name and part of an object name.
    #[error(
        "document {doc}: work name {name:?} must be a DNS-1123 subdomain: lower-case letters, digits, '-' or '.', at most 188"
    )]
    BadName { doc: usize, name: String },
    #[error("two documents define a work with the same name")]
    DuplicateName,
}

/// What was last read from one file.
#[derive(Debug, Clone)]
struct FileState {
    /// Hash of the file bytes, to skip unchanged files cheaply.
    hash: [u8; 32],
    /// Names of the works the file defined when it last parsed.
    works: Vec<String>,
    /// The current bytes parsed (false: `works` are from an earlier version, or none).
    parsed: bool,
}

/// Polls a directory for work files. Polling (default 1 s) needs no extra dependency and is
/// plenty for files edited by people or config management.
#[derive(Debug)]
pub struct FileSource {
    /// The directory.
    dir: PathBuf,
    /// Time between scans.
    poll: Duration,
    /// Per-file state.
    files: HashMap<PathBuf, FileState>,
    /// Per-work (spec hash, generation): files carry no generation, so bump it on spec changes.
    generations: HashMap<String, ([u8; 32], i64)>,
    /// Events not yet handed out.
    queue: VecDeque<WorkEvent>,
    /// Whether the initial Synced was queued.
    synced: bool,
    /// When the next scan is due. Kept here, not in the future, because the engine drops and
    /// re-creates `next_event` futures whenever another event wins its `select!`.
    next_scan: Option<tokio::time::Instant>,
}

impl FileSource {
    /// A source on `dir`, scanning every `poll`.
    pub fn new(dir: impl Into<PathBuf>, poll: Duration) -> Result<Self, FileSourceError> {
        let dir = dir.into();
        std::fs::read_dir(&dir).map_err(|source| FileSourceError::Dir {
            path: dir.clone(),
            source,
        })?;
        Ok(FileSource {
            dir,
            poll,
            files: HashMap::new(),
            generations: HashMap::new(),
            queue: VecDeque::new(),
            synced: false,
            next_scan: None,
        })
    }

    /// Scans once, queueing events for what changed.
    pub fn scan(&mut self) {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read works directory");
                return;
            }
        };
        let mut present = Vec::new();
        let mut complete = true;
        for entry in entries.flatten() {
            let path = entry.path();
            if is_work_file(&path) {
                complete &= self.scan_file(&path);
                present.push(path);
            }
        }
        self.forget_removed(&present);
        if !self.synced {
            self.synced = true;
            // A file that does not parse may define recorded works: the listing then proves
            // nothing about them, and they are kept as missing instead of deleted. Nor does a
            // directory empty at start: a volume not mounted or not yet filled looks the same as
            // one emptied on purpose, so its works are kept as missing too (removed after the
            // eviction grace period); files removed while the agent runs are deletions as usual.
            if present.is_empty() {
                tracing::warn!(dir = %self.dir.display(),
                    "the works directory is empty at start: works recorded on the spoke are kept as missing, not deleted, until the eviction grace period");
            }
            let listing = if complete && !present.is_empty() {
                Listing::Complete
            } else {
                Listing::Quiet
            };
            self.queue.push_back(WorkEvent::Synced(listing));
        }
    }

    /// Reads one work file if it changed: its works are upserted, works it no longer defines
    /// deleted. A file that does not parse keeps its last good works (a typo must not delete
    /// them). False when the file could not be read or parsed.
    fn scan_file(&mut self, path: &Path) -> bool {
        let Ok(bytes) = std::fs::read(path) else {
            return false;
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if let Some(f) = self.files.get(path)
            && f.hash == hash
        {
            return f.parsed;
        }
        let works = match parse_works(path, &bytes) {
            Ok(works) => works,
            Err(e) => {
                let prev = self.files.get(path).map(|f| f.works.clone()).unwrap_or_default();
                let state = FileState {
                    hash,
                    works: prev,
                    parsed: false,
                };
                self.files.insert(path.to_path_buf(), state);
                tracing::error!(file = %path.display(), error = %e, "invalid work file; ignoring it");
                write_file_error(&self.dir, path, &e.to_string());
                return false;
            }
        };
        let names: Vec<String> = works.iter().map(|w| w.name_any()).collect();
        let state = FileState {
            hash,
            works: names.clone(),
            parsed: true,
        };
        let old = self.files.insert(path.to_path_buf(), state);
        for gone in old.map(|o| o.works).unwrap_or_default() {
            if !names.contains(&gone) {
                self.delete_unless_elsewhere(gone, path);
            }
        }
        for w in works {
            let w = self.stamp(w);
            self.queue.push_back(WorkEvent::Upsert(Box::new(w)));
        }
        true
    }

    /// Deletes the works of files that are gone.
    fn forget_removed(&mut self, present: &[PathBuf]) {
        let removed: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for p in removed {
            for name in self.files.remove(&p).map(|st| st.works).unwrap_or_default() {
                self.delete_unless_elsewhere(name, &p);
            }
        }
    }

    /// Queues the deletion of a work `file` no longer defines, unless another file defines it.
    fn delete_unless_elsewhere(&mut self, name: String, file: &Path) {
        if !self.defined_elsewhere(&name, file) {
            self.generations.remove(&name);
            self.queue.push_back(WorkEvent::Delete(WorkRef::named(name)));
        }
    }

    fn defined_elsewhere(&self, name: &str, except: &Path) -> bool {
        self.files
            .iter()
            .any(|(p, f)| p != except && f.works.iter().any(|w| w == name))
    }

    /// Gives a file work a generation (bumped when its spec changes) and a stable UID.
    fn stamp(&mut self, mut w: ManifestWork) -> ManifestWork {
        let name = w.name_any();
        let spec_hash: [u8; 32] = Sha256::digest(serde_json::to_vec(&w.spec).unwrap_or_default()).into();
        let entry = self.generations.entry(name.clone()).or_insert((spec_hash, 1));
        if entry.0 != spec_hash {
            *entry = (spec_hash, entry.1 + 1);
        }
        if w.metadata.generation.is_none() {
            w.metadata.generation = Some(entry.1);
        }
        if w.metadata.uid.is_none() {
            w.metadata.uid = Some(hex::encode(&Sha256::digest(format!("file-work/{name}"))[..16]));
        }
        w
    }
}

impl WorkSource for FileSource {
    fn next_event(&mut self) -> BoxFuture<'_, Option<WorkEvent>> {
        Box::pin(async move {
            loop {
                if let Some(ev) = self.queue.pop_front() {
                    return Some(ev);
                }
                if let Some(at) = self.next_scan {
                    tokio::time::sleep_until(at).await;
                }
                self.scan();
                self.next_scan = Some(tokio::time::Instant::now() + self.poll);
            }
        })
    }
}

fn is_work_file(p: &Path) -> bool {
    let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
    yaml && !name.starts_with('.') && !name.contains(".status.")
}

fn stem(p: &Path) -> String {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("work");
    name.trim_end_matches(".yaml")
        .trim_end_matches(".yml")
        .to_string()
}

/// Parses every YAML document of a file as a ManifestWork. A missing name defaults to the file name.
pub fn parse_works(path: &Path, bytes: &[u8]) -> Result<Vec<ManifestWork>, WorkFileError> {
    let text = std::str::from_utf8(bytes)?;
    let mut out = Vec::new();
    for (doc, yaml) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let yaml_err = |source| WorkFileError::Yaml { doc, source };
        let mut v = serde_yaml::Value::deserialize_any_doc(yaml).map_err(yaml_err)?;
        if v.is_null() {
            continue;
        }
        if let Some(kind) = v.get("kind").and_then(|k| k.as_str())
            && kind != "ManifestWork"
        {
            let kind = kind.to_string();
            return Err(WorkFileError::WrongKind { doc, kind });
        }
        if let Some(m) = v.as_mapping_mut() {
            m.entry("metadata".into())
                .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
        }
        let mut w: ManifestWork = serde_yaml::from_value(v).map_err(yaml_err)?;
        if w.metadata.name.as_deref().unwrap_or("").is_empty() {
            w.metadata.name = Some(stem(path));
        }
        let name = w.name_any();
        // The engine's own rule (a DNS-1123 subdomain short enough for its record's name), so
        // a file cannot hold a work the engine would refuse; it also keeps NAME.status.yaml safe.
        if subdomain_fault(&name, MAX_WORK_NAME).is_some() {
            return Err(WorkFileError::BadName { doc, name });
        }
        out.push(w);
    }
    let mut names: Vec<String> = out.iter().map(|w| w.name_any()).collect();
    names.sort();
    if names.windows(2).any(|p| p[0] == p[1]) {
        return Err(WorkFileError::DuplicateName);
    }
    Ok(out)
}

/// Small extension so a document can be read as a Value.
trait DocExt {
    fn deserialize_any_doc(doc: serde_yaml::Deserializer<'_>)
    -> Result<serde_yaml::Value, serde_yaml::Error>;
}

impl DocExt for serde_yaml::Value {
    fn deserialize_any_doc(
        doc: serde_yaml::Deserializer<'_>,
    ) -> Result<serde_yaml::Value, serde_yaml::Error> {
        serde::Deserialize::deserialize(doc)
    }
}

/// Writes a status file for a file that does not parse, so the problem is visible next to it.
fn write_file_error(dir: &Path, file: &Path, msg: &str) {
    let status = ManifestWorkStatus {
        conditions: vec![{
            let mut c = cond(
                types::APPLIED,
                FALSE,
                "InvalidWorkFile",
                format!("{}: {msg}", file.display()),
                0,
            );
            c.last_transition_time = now_rfc3339();
            c
        }],
        ..Default::default()
    };
    if let Err(e) = write_atomic(&dir.join(format!("{}.status.yaml", stem(file))), &status) {
        tracing::warn!(error = %e, "cannot write status file");
    }
}

fn write_atomic(path: &Path, status: &ManifestWorkStatus) -> std::io::Result<()> {
    let body = serde_yaml::to_string(status).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}

/// Writes `NAME.status.yaml` in the works directory (atomically) and logs each update.
#[derive(Debug, Clone)]
pub struct FileStatusSink {
    /// The works directory.
    dir: PathBuf,
}

impl FileStatusSink {
    /// A sink writing into `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileStatusSink { dir: dir.into() }
    }

    /// Path of a work's status file.
    pub fn status_path(&self, work: &str) -> PathBuf {
        self.dir.join(format!("{work}.status.yaml"))
    }
}

impl StatusSink for FileStatusSink {
    fn publish(&self, u: StatusUpdate) -> BoxFuture<'_, Result<(), SinkError>> {
        log_status(&u);
        let path = self.status_path(&u.name);
        let r =
            write_atomic(&path, &u.status).map_err(|e| SinkError::Failed(format!("{}: {e}", path.display())));
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORK: &str = "apiVersion: work.open-cluster-management.io/v1\nkind: ManifestWork\nmetadata: {name: w1}\nspec:\n  workload:\n    manifests:\n      - {apiVersion: v1, kind: ConfigMap, metadata: {name: a, namespace: default}}\n";

    fn drain(s: &mut FileSource) -> Vec<WorkEvent> {
        s.scan();
        s.queue.drain(..).collect()
    }

    #[test]
    fn add_change_remove_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w1.yaml"), WORK).unwrap();
        std::fs::write(dir.path().join("broken.yaml"), "spec: [unclosed").unwrap();
        std::fs::write(dir.path().join("w1.status.yaml"), "ignored").unwrap();
        let mut s = FileSource::new(dir.path(), Duration::from_secs(1)).unwrap();
        let ev = drain(&mut s);
        assert!(
            matches!(&ev[0], WorkEvent::Upsert(w) if w.name_any() == "w1" && w.metadata.generation == Some(1)),
            "{ev:?}"
        );
        // The broken file may define recorded works: the first listing proves nothing about them.
        assert!(matches!(ev.last(), Some(WorkEvent::Synced(Listing::Quiet))));
        assert_eq!(ev.len(), 2);
        let err = std::fs::read_to_string(dir.path().join("broken.status.yaml")).unwrap();
        assert!(err.contains("InvalidWorkFile"), "{err}");
        // Unchanged: nothing.
        assert!(drain(&mut s).is_empty());
        // Changed spec: generation 2.
        std::fs::write(dir.path().join("w1.yaml"), WORK.replace("name: a", "name: b")).unwrap();
        let ev = drain(&mut s);
        assert!(matches!(&ev[0], WorkEvent::Upsert(w) if w.metadata.generation == Some(2)));
        // Broken edit keeps the work.
        std::fs::write(dir.path().join("w1.yaml"), "{{{{").unwrap();
        assert!(drain(&mut s).is_empty());
        // Removed: delete.
        std::fs::remove_file(dir.path().join("w1.yaml")).unwrap();
        let ev = drain(&mut s);
        assert!(matches!(&ev[0], WorkEvent::Delete(r) if r.name == "w1"), "{ev:?}");
    }

    #[test]
    fn a_directory_of_good_files_is_a_complete_listing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w1.yaml"), WORK).unwrap();
        let mut s = FileSource::new(dir.path(), Duration::from_secs(1)).unwrap();
        let ev = drain(&mut s);
        assert!(
            matches!(ev.last(), Some(WorkEvent::Synced(Listing::Complete))),
            "{ev:?}"
        );
    }

    #[test]
    fn a_directory_empty_at_start_proves_no_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileSource::new(dir.path(), Duration::from_secs(1)).unwrap();
        let ev = drain(&mut s);
        assert!(
            matches!(ev.as_slice(), [WorkEvent::Synced(Listing::Quiet)]),
            "{ev:?}"
        );
    }

    #[test]
    fn a_missing_directory_is_an_error_not_an_empty_listing() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileSource::new(dir.path().join("absent"), Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("absent"), "{err}");
    }

    #[test]
    fn unsafe_names_are_rejected() {
        for n in ["../escape", "UPPER", ".hidden", "a/b"] {
            let y = format!("metadata: {{name: {n:?}}}\nspec: {{}}\n");
            assert!(parse_works(Path::new("x.yaml"), y.as_bytes()).is_err(), "{n}");
        }
    }

    #[test]
    fn wrong_kind_is_rejected_and_name_defaults() {
        assert!(parse_works(Path::new("x.yaml"), b"kind: ConfigMap\n").is_err());
        let w = parse_works(Path::new("/d/named.yaml"), b"spec: {}\n").unwrap();
        assert_eq!(w[0].name_any(), "named");
    }
}
