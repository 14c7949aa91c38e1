//! Assembling a directory of an unpacked artifact into plain objects: multi-document YAML
//! files in lexical order, or a `kustomization.yaml` with the fields the hub may use
//! (`resources`, `namespace`, `namePrefix`/`nameSuffix`, `labels`/`commonLabels`,
//! `commonAnnotations`, `patches` and `patchesJson6902`). Any other kustomize field fails the
//! build with [`BuildError::Unsupported`] naming it: the hub renders, the spoke only assembles.
//!
//! Paths never leave the artifact: each is resolved component by component under its root.

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::patch::{self, PatchError, PatchSpec, Target};
use crate::transform::{self, LabelReach};

/// Names kustomize looks for, in its order.
const KUSTOMIZATION_FILES: &[&str] = &["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// Bounds on one build, so that an artifact within the unpack limits still cannot make the
/// agent hold an unbounded number of objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildLimits {
    /// Objects one build may produce (the engine's manifests-per-work limit).
    pub max_objects: usize,
    /// Bytes of one YAML file read into memory.
    pub max_file_bytes: u64,
    /// Nesting of kustomizations through `resources`.
    pub max_nesting: usize,
    /// Directories and files read by one build, counting each time one is reached: nesting
    /// alone does not bound a walk (17 levels each listing the next four times is 4^16 visits,
    /// all within the depth limit and producing no object).
    pub max_reads: usize,
    /// Bytes of YAML read by one build, all files together.
    pub max_total_bytes: u64,
    /// Wall time of one build: it holds a reconcile permit while it runs.
    pub max_duration: std::time::Duration,
}

impl Default for BuildLimits {
    fn default() -> Self {
        BuildLimits {
            max_objects: 5_000,
            max_file_bytes: 16 * 1024 * 1024,
            max_nesting: 16,
            max_reads: 10_000,
            max_total_bytes: 256 * 1024 * 1024,
            max_duration: std::time::Duration::from_secs(60),
        }
    }
}

/// Why a build failed. [`BuildError::Unsupported`] is Flux's `UnsupportedKustomizeField` case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("{file}: {field} is not supported: the hub renders, spokelet only assembles ({why})")]
    Unsupported {
        file: String,
        field: String,
        why: &'static str,
    },
    #[error("path {path:?} {why}")]
    Path { path: String, why: &'static str },
    #[error("{file}: {message}")]
    Read { file: String, message: String },
    #[error("{file}: document {doc}: {message}")]
    Yaml {
        file: String,
        doc: usize,
        message: String,
    },
    #[error("the build produces over {limit} objects")]
    TooManyObjects { limit: usize },
    #[error("kustomizations nest more than {limit} deep (or include each other)")]
    TooDeep { limit: usize },
    #[error("{path}: includes itself through resources (a cycle)")]
    Cycle { path: String },
    #[error("the build reads over {limit} directories and files")]
    TooManyReads { limit: usize },
    #[error("the build reads over {limit} bytes of YAML")]
    TooManyBytes { limit: u64 },
    #[error("the build took longer than {limit:?}")]
    TookTooLong { limit: std::time::Duration },
    #[error("{0}")]
    Patch(String),
    /// A patch only a strategic merge would apply (also `UnsupportedKustomizeField`).
    #[error("{0}")]
    Strategic(String),
    #[error("the build defines {0} twice")]
    Duplicate(String),
    /// What the build produced is over one of the work's own limits (size, nesting).
    #[error("{0}")]
    OverWorkLimit(String),
}

impl BuildError {
    /// Whether this is a kustomize field spokelet does not implement (rather than a broken
    /// artifact).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, BuildError::Unsupported { .. } | BuildError::Strategic(_))
    }
}

impl From<PatchError> for BuildError {
    fn from(e: PatchError) -> Self {
        match e {
            PatchError::Strategic(m) => BuildError::Strategic(m),
            e => BuildError::Patch(e.to_string()),
        }
    }
}

/// What Flux's `Kustomization` adds over the directory's own kustomization: its own overlay.
#[derive(Debug, Clone, Default)]
pub struct Overlay {
    pub target_namespace: Option<String>,
    pub name_prefix: Option<String>,
    pub name_suffix: Option<String>,
    /// `commonMetadata`: onto every object's metadata, not into selectors or templates.
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `spec.patches` of the Kustomization, as JSON values (`{patch, target}`).
    pub patches: Vec<Value>,
}

/// The fields of a kustomization file spokelet understands; others are refused by name.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KustomizationFile {
    #[serde(default)]
    resources: Vec<String>,
    namespace: Option<String>,
    name_prefix: Option<String>,
    name_suffix: Option<String>,
    #[serde(default)]
    labels: Vec<LabelsEntry>,
    #[serde(default)]
    common_labels: BTreeMap<String, String>,
    #[serde(default)]
    common_annotations: BTreeMap<String, String>,
    #[serde(default)]
    patches: Vec<PatchEntry>,
    #[serde(default, rename = "patchesJson6902")]
    patches_json6902: Vec<PatchEntry>,
}

const FILE_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "namePrefix",
    "nameSuffix",
    "labels",
    "commonLabels",
    "commonAnnotations",
    "patches",
    "patchesJson6902",
];

/// `labels[]` of a kustomization file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LabelsEntry {
    #[serde(default)]
    pairs: BTreeMap<String, String>,
    #[serde(default)]
    include_selectors: bool,
    #[serde(default)]
    include_templates: bool,
}

/// `patches[]` (and `patchesJson6902[]`) of a kustomization file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchEntry {
    path: Option<String>,
    patch: Option<String>,
    target: Option<Target>,
    /// kustomize's `allowNameChange`/`allowKindChange`; only their default (false) is honoured.
    options: Option<BTreeMap<String, bool>>,
}

/// Builds the objects of `path` (relative to `root`, the unpacked artifact) with Flux's
/// `overlay` applied last, in kustomize's transformer order.
pub fn build(
    root: &Path,
    path: &str,
    overlay: &Overlay,
    limits: &BuildLimits,
) -> Result<Vec<Value>, BuildError> {
    let dir = resolve(root, Path::new(""), path)?;
    if !dir.is_dir() {
        return Err(BuildError::Path {
            path: path.to_string(),
            why: "is not a directory of the artifact",
        });
    }
    let mut b = Builder {
        root,
        limits,
        count: 0,
        reads: 0,
        bytes: 0,
        deadline: std::time::Instant::now() + limits.max_duration,
        walking: Vec::new(),
    };
    let mut objs = b.dir(&dir, 0)?;
    let patches: Vec<PatchEntry> = overlay
        .patches
        .iter()
        .map(|p| {
            serde_json::from_value(p.clone())
                .map_err(|e| BuildError::Patch(format!("Kustomization spec.patches: {e}")))
        })
        .collect::<Result<_, _>>()?;
    b.patch_all(&mut objs, &patches, "Kustomization spec.patches", &dir)?;
    if let Some(ns) = &overlay.target_namespace {
        transform::set_namespace(&mut objs, ns);
    }
    transform::rename(
        &mut objs,
        overlay.name_prefix.as_deref().unwrap_or(""),
        overlay.name_suffix.as_deref().unwrap_or(""),
    );
    transform::add_labels(&mut objs, &overlay.labels, LabelReach::default());
    transform::add_annotations(&mut objs, &overlay.annotations, false);
    check_unique(&objs)?;
    Ok(objs)
}

/// One build's walk.
struct Builder<'a> {
    root: &'a Path,
    limits: &'a BuildLimits,
    /// Objects read so far, against `max_objects`.
    count: usize,
    /// Directories and files reached so far, against `max_reads`.
    reads: usize,
    /// YAML bytes read so far, against `max_total_bytes`.
    bytes: u64,
    /// When the build must have ended (`max_duration`).
    deadline: std::time::Instant,
    /// The directories being walked, outermost first: one reached again is a cycle.
    walking: Vec<PathBuf>,
}

impl Builder<'_> {
    /// A directory: its kustomization if it has one, or else every YAML file in it and below
    /// (a subdirectory with a kustomization counts as one resource).
    fn dir(&mut self, dir: &Path, depth: usize) -> Result<Vec<Value>, BuildError> {
        if depth > self.limits.max_nesting {
            return Err(BuildError::TooDeep {
                limit: self.limits.max_nesting,
            });
        }
        if self.walking.iter().any(|d| d == dir) {
            return Err(BuildError::Cycle {
                path: self.shown(dir),
            });
        }
        self.spend()?;
        self.walking.push(dir.to_path_buf());
        let objs = self.dir_contents(dir, depth);
        self.walking.pop();
        objs
    }

    /// One more directory or file read: within the read budget and the time limit, or an error.
    fn spend(&mut self) -> Result<(), BuildError> {
        self.reads += 1;
        if self.reads > self.limits.max_reads {
            return Err(BuildError::TooManyReads {
                limit: self.limits.max_reads,
            });
        }
        if std::time::Instant::now() > self.deadline {
            return Err(BuildError::TookTooLong {
                limit: self.limits.max_duration,
            });
        }
        Ok(())
    }

    /// What [`Builder::dir`] reads once the directory is admitted.
    fn dir_contents(&mut self, dir: &Path, depth: usize) -> Result<Vec<Value>, BuildError> {
        if let Some(file) = kustomization_file(dir) {
            return self.kustomization(dir, &file, depth);
        }
        let mut objs = Vec::new();
        for entry in sorted_entries(dir, self.root)? {
            if entry.is_dir() {
                objs.extend(self.dir(&entry, depth + 1)?);
            } else if is_manifest_file(&entry) {
                objs.extend(self.file(&entry)?);
            }
        }
        Ok(objs)
    }

    /// A directory with a kustomization file.
    fn kustomization(&mut self, dir: &Path, file: &Path, depth: usize) -> Result<Vec<Value>, BuildError> {
        let shown = self.shown(file);
        let text = self.read(file)?;
        let raw: Value = serde_yaml::from_str(&text).map_err(|e| BuildError::Yaml {
            file: shown.clone(),
            doc: 1,
            message: e.to_string(),
        })?;
        if let Some(map) = raw.as_object()
            && let Some(k) = map.keys().find(|k| !FILE_FIELDS.contains(&k.as_str()))
        {
            return Err(BuildError::Unsupported {
                file: shown,
                field: k.clone(),
                why: "only resources, namespace, namePrefix, nameSuffix, labels, commonLabels, commonAnnotations and patches are assembled",
            });
        }
        let k: KustomizationFile = serde_json::from_value(raw).map_err(|e| BuildError::Yaml {
            file: shown.clone(),
            doc: 1,
            message: e.to_string(),
        })?;
        let mut objs = Vec::new();
        for r in &k.resources {
            if r.contains("://") || r.starts_with("github.com/") || r.contains("?ref=") {
                return Err(BuildError::Unsupported {
                    file: shown,
                    field: format!("resources: {r}"),
                    why: "remote resources are never fetched",
                });
            }
            let p = resolve(self.root, dir, r)?;
            if p.is_dir() {
                objs.extend(self.dir(&p, depth + 1)?);
            } else if p.is_file() {
                objs.extend(self.file(&p)?);
            } else {
                return Err(BuildError::Path {
                    path: r.clone(),
                    why: "is listed in resources but is not in the artifact",
                });
            }
        }
        self.patch_all(&mut objs, &k.patches, &format!("{shown} patches"), dir)?;
        if let Some(ns) = &k.namespace {
            transform::set_namespace(&mut objs, ns);
        }
        transform::rename(
            &mut objs,
            k.name_prefix.as_deref().unwrap_or(""),
            k.name_suffix.as_deref().unwrap_or(""),
        );
        let selecting = LabelReach {
            selectors: true,
            templates: true,
        };
        transform::add_labels(&mut objs, &k.common_labels, selecting);
        for l in &k.labels {
            let reach = LabelReach {
                selectors: l.include_selectors,
                templates: l.include_templates,
            };
            transform::add_labels(&mut objs, &l.pairs, reach);
        }
        transform::add_annotations(&mut objs, &k.common_annotations, true);
        self.patch_all(
            &mut objs,
            &k.patches_json6902,
            &format!("{shown} patchesJson6902"),
            dir,
        )?;
        Ok(objs)
    }

    /// Applies each patch in order.
    fn patch_all(
        &mut self,
        objs: &mut [Value],
        entries: &[PatchEntry],
        origin: &str,
        dir: &Path,
    ) -> Result<(), BuildError> {
        for (i, e) in entries.iter().enumerate() {
            let origin = format!("{origin}[{i}]");
            if e.options.as_ref().is_some_and(|o| o.values().any(|v| *v)) {
                return Err(BuildError::Unsupported {
                    file: origin,
                    field: "options".into(),
                    why: "patches may not change names or kinds",
                });
            }
            let text = match (&e.patch, &e.path) {
                (Some(text), None) => text.clone(),
                (None, Some(path)) => self.read(&resolve(self.root, dir, path)?)?,
                _ => {
                    return Err(BuildError::Patch(format!(
                        "{origin}: needs exactly one of patch and path"
                    )));
                }
            };
            patch::apply(
                objs,
                &PatchSpec {
                    origin,
                    text,
                    target: e.target.clone(),
                },
            )?;
        }
        Ok(())
    }

    /// The objects of one multi-document YAML (or JSON) file; `kind: List` is unwrapped.
    fn file(&mut self, path: &Path) -> Result<Vec<Value>, BuildError> {
        let shown = self.shown(path);
        let text = self.read(path)?;
        let mut objs = Vec::new();
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let yaml_err = |message: String| BuildError::Yaml {
                file: shown.clone(),
                doc: i + 1,
                message,
            };
            let v = Value::deserialize(doc).map_err(|e| yaml_err(e.to_string()))?;
            let items = match v {
                Value::Null => continue,
                Value::Object(ref m)
                    if m.get("kind")
                        .and_then(Value::as_str)
                        .is_some_and(|k| k.ends_with("List"))
                        && m.contains_key("items") =>
                {
                    m.get("items")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                }
                Value::Object(_) => vec![v],
                _ => return Err(yaml_err("is not an object".into())),
            };
            for obj in items {
                self.count += 1;
                if self.count > self.limits.max_objects {
                    return Err(BuildError::TooManyObjects {
                        limit: self.limits.max_objects,
                    });
                }
                if !obj.is_object() {
                    return Err(yaml_err("a List item is not an object".into()));
                }
                objs.push(obj);
            }
        }
        Ok(objs)
    }

    fn read(&mut self, path: &Path) -> Result<String, BuildError> {
        self.spend()?;
        let shown = self.shown(path);
        let err = |message: String| BuildError::Read {
            file: shown.clone(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        if meta.len() > self.limits.max_file_bytes {
            return Err(err(format!(
                "is over the {} byte limit for one file",
                self.limits.max_file_bytes
            )));
        }
        self.bytes = self.bytes.saturating_add(meta.len());
        if self.bytes > self.limits.max_total_bytes {
            return Err(BuildError::TooManyBytes {
                limit: self.limits.max_total_bytes,
            });
        }
        std::fs::read_to_string(path).map_err(|e| err(e.to_string()))
    }

    /// `path` as the artifact names it.
    fn shown(&self, path: &Path) -> String {
        path.strip_prefix(self.root).unwrap_or(path).display().to_string()
    }
}

/// `rel` under `base` (itself under `root`), by components: absolute paths and any `..` that
/// would climb out of the root are refused.
fn resolve(root: &Path, base: &Path, rel: &str) -> Result<PathBuf, BuildError> {
    let refuse = |why| BuildError::Path {
        path: rel.to_string(),
        why,
    };
    let base = base.strip_prefix(root).unwrap_or(base);
    let mut parts: Vec<_> = base
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(_) => parts.push(c),
            Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(refuse("climbs out of the artifact"));
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err(refuse("is absolute")),
        }
    }
    Ok(parts.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

fn kustomization_file(dir: &Path) -> Option<PathBuf> {
    KUSTOMIZATION_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

fn is_manifest_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The entries of `dir`, in lexical order of their names.
fn sorted_entries(dir: &Path, root: &Path) -> Result<Vec<PathBuf>, BuildError> {
    let shown = dir.strip_prefix(root).unwrap_or(dir).display().to_string();
    let rd = std::fs::read_dir(dir).map_err(|e| BuildError::Read {
        file: shown.clone(),
        message: e.to_string(),
    })?;
    let mut entries = rd
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BuildError::Read {
            file: shown,
            message: e.to_string(),
        })?;
    entries.sort();
    Ok(entries)
}

/// Refuses two objects of the same kind, namespace and name: one would silently win.
fn check_unique(objs: &[Value]) -> Result<(), BuildError> {
    let mut seen = HashSet::new();
    for o in objs {
        let text = |p: &str| o.pointer(p).and_then(Value::as_str).unwrap_or_default();
        let api = text("/apiVersion");
        let group = api.rsplit_once('/').map_or("", |(g, _)| g);
        let id = format!(
            "{group}/{} {}/{}",
            text("/kind"),
            text("/metadata/namespace"),
            text("/metadata/name")
        );
        if !seen.insert(id.clone()) {
            return Err(BuildError::Duplicate(id));
        }
    }
    Ok(())
}
