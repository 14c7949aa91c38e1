//! The two Flux kinds spokelet reconciles itself, `OCIRepository` and `Kustomization`: their
//! specs as typed values, and the fields spokelet refuses rather than ignores.
//!
//! A field Flux honours and spokelet does not is never skipped silently: it would change what
//! lands on the cluster (an `ignore` list, a decryption key, an impersonated account). Such a
//! spec is refused whole with the field's name.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use spokelet_base::duration::parse_duration;

/// `source.toolkit.fluxcd.io`.
pub const SOURCE_GROUP: &str = "source.toolkit.fluxcd.io";
/// `kustomize.toolkit.fluxcd.io`.
pub const KUSTOMIZE_GROUP: &str = "kustomize.toolkit.fluxcd.io";

/// Flux's default `timeout` of a pull.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a Flux object's spec cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{kind} {name}: spec.{field} is not supported by spokelet ({why})")]
    Unsupported {
        kind: &'static str,
        name: String,
        field: String,
        why: &'static str,
    },
    #[error("{kind} {name}: {message}")]
    Invalid {
        kind: &'static str,
        name: String,
        message: String,
    },
}

/// Which of the two kinds a manifest is, if either (by group, any version of `v1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FluxKind {
    OciRepository,
    Kustomization,
}

impl FluxKind {
    /// The kind of a manifest of `apiVersion` and `kind`, when spokelet handles it.
    pub fn of(api_version: &str, kind: &str) -> Option<FluxKind> {
        let (group, version) = api_version.split_once('/')?;
        // v1 only: the beta versions differ in fields, and guessing would apply them wrongly.
        if version != "v1" {
            return None;
        }
        match (group, kind) {
            (SOURCE_GROUP, "OCIRepository") => Some(FluxKind::OciRepository),
            (KUSTOMIZE_GROUP, "Kustomization") => Some(FluxKind::Kustomization),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FluxKind::OciRepository => "OCIRepository",
            FluxKind::Kustomization => "Kustomization",
        }
    }

    /// The API group, as the write policy names it.
    pub fn group(self) -> &'static str {
        match self {
            FluxKind::OciRepository => SOURCE_GROUP,
            FluxKind::Kustomization => KUSTOMIZE_GROUP,
        }
    }
}

/// A Secret or ConfigMap a Flux object reads, in its own namespace: what the write policy and
/// the work's identity are checked against before it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRef {
    /// `Secret` or `ConfigMap`.
    pub kind: &'static str,
    pub name: String,
    /// The field that names it, for messages (`spec.secretRef`, ...).
    pub field: &'static str,
}

/// A reference to a Secret or ConfigMap by name, in the Flux object's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct LocalRef {
    pub name: String,
}

/// `OCIRepository.spec.ref`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciRef {
    pub tag: Option<String>,
    pub semver: Option<String>,
    /// A regular expression tags must match before the semver range is applied.
    pub semver_filter: Option<String>,
    pub digest: Option<String>,
}

/// What to do with the selected layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerOperation {
    /// Unpack it (a tar+gzip).
    #[default]
    Extract,
    /// Keep it as one file, as it came.
    Copy,
}

/// `OCIRepository.spec.layerSelector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerSelector {
    pub media_type: Option<String>,
    #[serde(default)]
    pub operation: LayerOperation,
}

/// `OCIRepository.spec.verify`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verify {
    pub provider: String,
    pub secret_ref: Option<LocalRef>,
    #[serde(default)]
    pub match_oidc_identity: Vec<Value>,
}

/// `OCIRepository.spec`, the fields spokelet acts on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciRepositorySpec {
    pub url: String,
    #[serde(rename = "ref", default)]
    pub reference: OciRef,
    pub layer_selector: Option<LayerSelector>,
    /// Flux's `generic` is the only provider that needs no cloud identity.
    pub provider: Option<String>,
    pub secret_ref: Option<LocalRef>,
    pub cert_secret_ref: Option<LocalRef>,
    #[serde(default)]
    pub insecure: bool,
    /// How often the source is looked at again (parsed once, here).
    #[serde(deserialize_with = "interval")]
    pub interval: Duration,
    /// How long one pull may take; Flux's default when absent.
    #[serde(default, deserialize_with = "timeout")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub suspend: bool,
    pub verify: Option<Verify>,
}

impl OciRepositorySpec {
    /// The Secrets a fetch reads: credentials, CA and verification keys.
    pub fn reads(&self) -> Vec<ReadRef> {
        let secret = |r: &Option<LocalRef>, field| {
            r.as_ref().map(|r| ReadRef {
                kind: "Secret",
                name: r.name.clone(),
                field,
            })
        };
        [
            secret(&self.secret_ref, "spec.secretRef"),
            secret(&self.cert_secret_ref, "spec.certSecretRef"),
            self.verify
                .as_ref()
                .and_then(|v| secret(&v.secret_ref, "spec.verify.secretRef")),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// `Kustomization.spec.sourceRef`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceRef {
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
    pub api_version: Option<String>,
}

/// `Kustomization.spec.commonMetadata`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct CommonMetadata {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// One entry of `postBuild.substituteFrom`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SubstituteFrom {
    /// `ConfigMap` or `Secret`.
    pub kind: String,
    pub name: String,
    /// A missing optional source is skipped; a missing required one fails the build.
    #[serde(default)]
    pub optional: bool,
}

/// `Kustomization.spec.postBuild`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PostBuild {
    #[serde(default)]
    pub substitute: BTreeMap<String, String>,
    #[serde(default)]
    pub substitute_from: Vec<SubstituteFrom>,
}

/// A namespaced object reference (`dependsOn`, `healthChecks`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
}

/// `Kustomization.spec`, the fields spokelet acts on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KustomizationSpec {
    pub source_ref: SourceRef,
    pub path: Option<String>,
    /// How often it is built again from an unchanged source (parsed once, here).
    #[serde(deserialize_with = "interval")]
    pub interval: Duration,
    /// How soon a failed build is tried again; `interval` when absent.
    #[serde(default, deserialize_with = "retry_interval")]
    pub retry_interval: Option<Duration>,
    #[serde(default, deserialize_with = "timeout")]
    pub timeout: Option<Duration>,
    /// Required by Flux; objects that leave the build are deleted only when true.
    pub prune: bool,
    #[serde(default)]
    pub wait: bool,
    #[serde(default)]
    pub health_checks: Vec<ObjectRef>,
    /// Delete and recreate an object whose immutable fields changed, instead of failing.
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub suspend: bool,
    pub target_namespace: Option<String>,
    pub common_metadata: Option<CommonMetadata>,
    pub post_build: Option<PostBuild>,
    #[serde(default)]
    pub depends_on: Vec<ObjectRef>,
    pub name_prefix: Option<String>,
    pub name_suffix: Option<String>,
    #[serde(default)]
    pub patches: Vec<Value>,
}

impl KustomizationSpec {
    /// The Secrets and ConfigMaps a build reads (`postBuild.substituteFrom`).
    pub fn reads(&self) -> Vec<ReadRef> {
        self.post_build
            .iter()
            .flat_map(|p| &p.substitute_from)
            .map(|f| ReadRef {
                kind: if f.kind == "ConfigMap" {
                    "ConfigMap"
                } else {
                    "Secret"
                },
                name: f.name.clone(),
                field: "spec.postBuild.substituteFrom",
            })
            .collect()
    }
}

/// A parsed Flux object: its kind, name, namespace and spec.
#[derive(Debug, Clone, PartialEq)]
pub struct FluxObject<S> {
    pub name: String,
    pub namespace: String,
    pub generation: i64,
    pub spec: S,
}

/// Fields of `OCIRepository.spec` that are understood.
const OCI_FIELDS: &[&str] = &[
    "url",
    "ref",
    "layerSelector",
    "provider",
    "secretRef",
    "certSecretRef",
    "insecure",
    "interval",
    "timeout",
    "suspend",
    "verify",
];

/// Fields of `OCIRepository.spec` that Flux has and spokelet refuses, with the reason.
const OCI_REFUSED: &[(&str, &str)] = &[
    (
        "ignore",
        "excluding files from the artifact is not implemented; render them out on the hub",
    ),
    (
        "serviceAccountName",
        "image pull secrets of a service account are not read; use secretRef",
    ),
    ("proxySecretRef", "registry proxies are not supported"),
];

/// Fields of `Kustomization.spec` that are understood.
const KS_FIELDS: &[&str] = &[
    "sourceRef",
    "path",
    "interval",
    "retryInterval",
    "timeout",
    "prune",
    "wait",
    "healthChecks",
    "force",
    "suspend",
    "targetNamespace",
    "commonMetadata",
    "postBuild",
    "dependsOn",
    "namePrefix",
    "nameSuffix",
    "patches",
];

/// Fields of `Kustomization.spec` that Flux has and spokelet refuses, with the reason.
const KS_REFUSED: &[(&str, &str)] = &[
    ("decryption", "SOPS decryption is not implemented"),
    (
        "serviceAccountName",
        "impersonation is the work's executor, not the Kustomization's",
    ),
    ("kubeConfig", "spokelet applies to its own cluster only"),
    ("images", "image overrides are rendered on the hub"),
    ("components", "kustomize components are rendered on the hub"),
    ("healthCheckExprs", "CEL health checks are not implemented"),
    (
        "deletionPolicy",
        "deletion follows the ManifestWork's deleteOption",
    ),
];

/// Parses an `OCIRepository` manifest.
pub fn oci_repository(obj: &Value) -> Result<FluxObject<OciRepositorySpec>, SpecError> {
    let kind = FluxKind::OciRepository.name();
    let (name, spec) = checked_spec(obj, kind, OCI_FIELDS, OCI_REFUSED)?;
    let spec: OciRepositorySpec = typed(spec, kind, &name)?;
    let invalid = |message: String| SpecError::Invalid {
        kind,
        name: name.clone(),
        message,
    };
    if !spec.url.starts_with("oci://") {
        return Err(invalid(format!(
            "spec.url {:?} is not an oci:// address",
            spec.url
        )));
    }
    if let Some(p) = spec.provider.as_deref().filter(|p| *p != "generic") {
        return Err(SpecError::Unsupported {
            kind,
            name,
            field: format!("provider: {p}"),
            why: "cloud identity providers are not supported; use secretRef",
        });
    }
    if spec
        .layer_selector
        .as_ref()
        .is_some_and(|l| l.operation == LayerOperation::Copy)
    {
        return Err(SpecError::Unsupported {
            kind,
            name,
            field: "layerSelector.operation: copy".into(),
            why: "a Kustomization can only build an extracted layer",
        });
    }
    Ok(FluxObject {
        namespace: namespace_of(obj),
        generation: generation_of(obj),
        name,
        spec,
    })
}

/// Parses a `Kustomization` manifest.
pub fn kustomization(obj: &Value) -> Result<FluxObject<KustomizationSpec>, SpecError> {
    let kind = FluxKind::Kustomization.name();
    let (name, spec) = checked_spec(obj, kind, KS_FIELDS, KS_REFUSED)?;
    let spec: KustomizationSpec = typed(spec, kind, &name)?;
    let invalid = |message: String| SpecError::Invalid {
        kind,
        name: name.clone(),
        message,
    };
    if spec.source_ref.kind != "OCIRepository" {
        return Err(SpecError::Unsupported {
            kind,
            name,
            field: format!("sourceRef.kind: {}", spec.source_ref.kind),
            why: "only OCIRepository sources are fetched by spokelet",
        });
    }
    for from in spec.post_build.iter().flat_map(|p| &p.substitute_from) {
        if from.kind != "ConfigMap" && from.kind != "Secret" {
            return Err(invalid(format!(
                "postBuild.substituteFrom kind {:?} is neither ConfigMap nor Secret",
                from.kind
            )));
        }
    }
    Ok(FluxObject {
        namespace: namespace_of(obj),
        generation: generation_of(obj),
        name,
        spec,
    })
}

/// The object's name and spec, once every spec field is known to be understood.
fn checked_spec<'a>(
    obj: &'a Value,
    kind: &'static str,
    understood: &[&str],
    refused: &[(&str, &'static str)],
) -> Result<(String, &'a Value), SpecError> {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let Some(spec) = obj.get("spec").filter(|s| s.is_object()) else {
        return Err(SpecError::Invalid {
            kind,
            name,
            message: "has no spec".into(),
        });
    };
    for key in spec.as_object().into_iter().flat_map(|m| m.keys()) {
        if let Some((_, why)) = refused.iter().find(|(f, _)| f == key) {
            return Err(SpecError::Unsupported {
                kind,
                name,
                field: key.clone(),
                why,
            });
        }
        if !understood.contains(&key.as_str()) {
            return Err(SpecError::Unsupported {
                kind,
                name,
                field: key.clone(),
                why: "unknown field",
            });
        }
    }
    Ok((name, spec))
}

fn typed<S: serde::de::DeserializeOwned>(
    spec: &Value,
    kind: &'static str,
    name: &str,
) -> Result<S, SpecError> {
    S::deserialize(spec).map_err(|e| SpecError::Invalid {
        kind,
        name: name.to_string(),
        message: format!("spec: {e}"),
    })
}

/// A Flux duration field (the same notation as spokelet's own settings), its error naming it.
fn duration<E: serde::de::Error>(text: &str, field: &str) -> Result<Duration, E> {
    parse_duration(text).map_err(|e| E::custom(format_args!("spec.{field}: {e}")))
}

/// `spec.interval`, parsed as the spec is read.
fn interval<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration(&String::deserialize(d)?, "interval")
}

/// An optional duration field, parsed as the spec is read.
fn optional_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
    field: &str,
) -> Result<Option<Duration>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|text| duration(&text, field))
        .transpose()
}

fn timeout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    optional_duration(d, "timeout")
}

fn retry_interval<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    optional_duration(d, "retryInterval")
}

fn namespace_of(obj: &Value) -> String {
    obj.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_string()
}

fn generation_of(obj: &Value) -> i64 {
    obj.pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn repo(spec: Value) -> Value {
        json!({"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "OCIRepository",
               "metadata": {"name": "app", "namespace": "apps"}, "spec": spec})
    }

    #[test]
    fn kinds_are_recognised_by_group_and_v1_only() {
        assert_eq!(
            FluxKind::of("source.toolkit.fluxcd.io/v1", "OCIRepository"),
            Some(FluxKind::OciRepository)
        );
        assert_eq!(
            FluxKind::of("kustomize.toolkit.fluxcd.io/v1", "Kustomization"),
            Some(FluxKind::Kustomization)
        );
        assert_eq!(
            FluxKind::of("source.toolkit.fluxcd.io/v1beta2", "OCIRepository"),
            None
        );
        assert_eq!(
            FluxKind::of("kustomize.config.k8s.io/v1beta1", "Kustomization"),
            None
        );
        assert_eq!(FluxKind::of("v1", "ConfigMap"), None);
    }

    #[test]
    fn a_repository_parses_with_its_ref_and_defaults() {
        let r = oci_repository(&repo(
            json!({"url": "oci://r/app", "interval": "5m", "ref": {"semver": ">=1"}}),
        ))
        .unwrap();
        assert_eq!(r.name, "app");
        assert_eq!(r.namespace, "apps");
        assert_eq!(r.spec.reference.semver.as_deref(), Some(">=1"));
        assert!(!r.spec.insecure);
    }

    #[test]
    fn refused_and_unknown_fields_are_named() {
        let e = oci_repository(&repo(
            json!({"url": "oci://r/app", "interval": "5m", "ignore": "*.md"}),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("spec.ignore"), "{e}");
        let e =
            oci_repository(&repo(json!({"url": "oci://r/app", "interval": "5m", "bogus": 1}))).unwrap_err();
        assert!(
            e.to_string().contains("spec.bogus") && e.to_string().contains("unknown"),
            "{e}"
        );
        let e = oci_repository(&repo(json!({"url": "https://r/app", "interval": "5m"}))).unwrap_err();
        assert!(e.to_string().contains("oci://"), "{e}");
        let e = oci_repository(&repo(json!({"url": "oci://r/app", "interval": "soon"}))).unwrap_err();
        assert!(e.to_string().contains("spec.interval"), "{e}");
        let e = oci_repository(&repo(
            json!({"url": "oci://r/app", "interval": "1m", "provider": "aws"}),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("provider: aws"), "{e}");
    }

    #[test]
    fn a_kustomization_needs_an_oci_source_and_prune() {
        let ks = |spec: Value| {
            kustomization(
                &json!({"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                                  "metadata": {"name": "app"}, "spec": spec}),
            )
        };
        let ok = ks(
            json!({"sourceRef": {"kind": "OCIRepository", "name": "app"}, "interval": "10m", "prune": true}),
        )
        .unwrap();
        assert_eq!(ok.namespace, "default");
        assert!(ok.spec.prune);
        let e = ks(
            json!({"sourceRef": {"kind": "GitRepository", "name": "app"}, "interval": "10m", "prune": true}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("GitRepository"), "{e}");
        let e = ks(json!({"sourceRef": {"kind": "OCIRepository", "name": "app"}, "interval": "10m"}))
            .unwrap_err();
        assert!(e.to_string().contains("prune"), "{e}");
        let e = ks(
            json!({"sourceRef": {"kind": "OCIRepository", "name": "app"}, "interval": "10m", "prune": true,
                          "decryption": {"provider": "sops"}}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("spec.decryption"), "{e}");
    }
}
