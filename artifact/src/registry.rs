//! Talking to an OCI registry: pushing a directory as a Flux-format artifact, and pulling one
//! into the cache, the tag resolved to a digest once and everything after pulled by digest.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::OciImageManifest;
/// Re-exported so callers name credentials without depending on the client crate.
pub use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::io::AsyncWriteExt;

use std::sync::Arc;

use oci_client::errors::OciDistributionError;

use crate::cache::{ArtifactCache, CacheError, Check, ScratchFile};
/// Re-exported: the network timeouts belong to the HTTP client that applies them.
pub use crate::capped::Timeouts;
use crate::capped::{CappedClient, MAX_MANIFEST_BYTES, MAX_TAG_LIST_BYTES, Wanted};
use crate::digest::{Digest, DigestError};
use crate::pack::{PackError, pack_dir};
use crate::retry::{PullRetry, Transient, transient};
use crate::signature::{self, CosignKeys, SignatureError};
use crate::unpack::UnpackLimits;

/// Media type of a Flux artifact's config.
pub const FLUX_CONFIG_MEDIA_TYPE: &str = "application/vnd.cncf.flux.config.v1+json";
/// Media type of a Flux artifact's content layer.
pub const FLUX_CONTENT_MEDIA_TYPE: &str = "application/vnd.cncf.flux.content.v1.tar+gzip";
/// Media type of an OCI image manifest.
pub const OCI_MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of a Docker v2 image manifest (cosign may store signatures as one).
pub const DOCKER_MANIFEST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Media type of an OCI image index (one manifest per platform).
pub const OCI_INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// Why one simple-signing layer of a signature does not verify the artifact (each is tried;
/// the reasons of all are reported when none does).
#[derive(Debug, thiserror::Error)]
enum LayerRejected {
    #[error("a payload without a signature annotation")]
    NoSignature,
    #[error("a payload of {0} bytes")]
    Size(i64),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("fetching the payload: {0}")]
    Fetch(#[source] OciDistributionError),
    #[error("a payload that does not match its digest")]
    DigestMismatch,
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

/// Why a push or pull failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0:?} is not an oci://host/repository address")]
    Url(String),
    #[error("semver range {range:?} is not valid: {reason}")]
    SemverRange { range: String, reason: String },
    #[error("no tag of {url} matches semver range {range:?}")]
    NoMatchingTag { url: String, range: String },
    #[error("{reference} has over {limit} tags; a semver range is not resolved over so many")]
    TooManyTags { reference: String, limit: usize },
    #[error("registry request for {reference}: {}", answer(.source))]
    Request {
        reference: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// Answers of 429 or 5xx, still so after the retry policy's attempts.
    #[error("registry request for {reference}: {kind} after {attempts} attempts with backoff: {}", answer(.source))]
    Throttled {
        reference: String,
        kind: Transient,
        attempts: u32,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("the registry answered a digest that is not one: {0}")]
    Digest(#[from] DigestError),
    #[error("manifest {expected} arrived with digest {actual}")]
    ManifestDigest { expected: Digest, actual: Digest },
    #[error("manifest {0} is not an OCI image manifest: {1}")]
    Manifest(Digest, String),
    #[error("artifact {digest} has config media type {found:?}, not {FLUX_CONFIG_MEDIA_TYPE}")]
    NotFlux { digest: Digest, found: String },
    #[error("artifact {0} has no layers")]
    NoLayer(Digest),
    #[error("artifact {digest} has no layer of media type {media_type} (layerSelector.mediaType)")]
    NoSelectedLayer { digest: Digest, media_type: String },
    #[error("image index {digest} has no manifest for {platform} (it has: {available})")]
    NoPlatform {
        digest: Digest,
        platform: String,
        available: String,
    },
    #[error("layer {digest} is {size} bytes, over the {limit} byte limit")]
    LayerTooLarge { digest: Digest, size: i64, limit: u64 },
    #[error("downloading layer {digest}: {source}")]
    Download {
        digest: Digest,
        #[source]
        source: std::io::Error,
    },
    #[error("artifact {digest} is not signed: no cosign signature at tag {tag}")]
    Unsigned { digest: Digest, tag: String },
    #[error("artifact {digest}: no signature verifies it ({reasons})")]
    BadSignature { digest: Digest, reasons: String },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Pack(#[from] PackError),
}

/// Which version of an artifact to pull (Flux's `OCIRepository.spec.ref`): the digest beats
/// the semver range, which beats the tag; with none, the tag `latest`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArtifactRef {
    pub tag: Option<String>,
    /// A semver range such as `>=1.0.0, <2.0.0`; tags that are not versions (a leading `v` is
    /// allowed) are ignored.
    pub semver: Option<String>,
    /// A regular expression a tag must contain a match of before the semver range is tried (Flux's
    /// `semverFilter`, e.g. `.*-rc.*` for release candidates).
    pub semver_filter: Option<String>,
    /// `sha256:<hex>` of the manifest.
    pub digest: Option<String>,
    /// Which layer to take (Flux's `layerSelector.mediaType`): the first of this media type;
    /// None takes the first layer.
    pub layer_media_type: Option<String>,
}

impl ArtifactRef {
    /// The ref naming one tag.
    pub fn tag(tag: &str) -> ArtifactRef {
        ArtifactRef {
            tag: Some(tag.to_string()),
            ..ArtifactRef::default()
        }
    }
}

/// An artifact pulled into the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// As Flux writes it: `<tag>@sha256:<manifest digest>`.
    pub revision: String,
    pub manifest: Digest,
    pub layer: Digest,
    /// The unpacked layer in the cache.
    pub dir: PathBuf,
    /// False when the layer was already cached (no blob was requested).
    pub downloaded: bool,
    /// The fingerprint of the keys whose signature check this digest passed
    /// ([`CosignKeys::fingerprint`]); None when none was asked for. An unchanged digest is taken
    /// as it is only while the keys are the same: a key revoked since is asked again.
    pub verified_with: Option<String>,
}

/// The annotations of a pushed artifact.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushMeta {
    /// `org.opencontainers.image.source`: where the content came from (a repository URL).
    pub source: String,
    /// `org.opencontainers.image.revision`: its version there (e.g. `main@sha1:<commit>`).
    pub revision: String,
    /// `org.opencontainers.image.created` (RFC 3339); None leaves it out.
    pub created: Option<String>,
}

/// A registry client. `insecure` speaks plain HTTP (Flux's `insecure: true`). Clones share
/// the connection pool and the tokens the registry handed out.
#[derive(Clone)]
pub struct Registry {
    /// Pushes (oci-client).
    client: Client,
    /// Every pull request: answers read through caps (see [`crate::capped`]); or why it could
    /// not be made (a CA that is not PEM), which every pull then fails with.
    capped: Result<Arc<CappedClient>, String>,
    auth: RegistryAuth,
    /// How requests answered with 429 or 5xx are repeated.
    retry: PullRetry,
    /// Tags asked for per page of the tag list ([`TAG_PAGE`]; smaller in tests).
    tag_page: usize,
}

/// Tags per page of a tag list.
pub const TAG_PAGE: usize = 1000;
/// The most tags read to resolve a semver range.
pub const MAX_TAGS: usize = 100_000;

impl std::fmt::Debug for Registry {
    // The client holds credentials and tokens; none of it is worth printing.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new(insecure: bool, auth: RegistryAuth) -> Registry {
        Registry::with_roots(insecure, auth, None)
    }

    /// A client that trusts only the PEM certificates `ca` (a registry with its own CA, Flux's
    /// `certSecretRef` `ca.crt`), or the usual roots when None.
    pub fn with_roots(insecure: bool, auth: RegistryAuth, ca: Option<&[u8]>) -> Registry {
        Registry::configured(insecure, auth, ca, Timeouts::default())
    }

    /// [`Registry::with_roots`] with other network timeouts.
    pub fn configured(insecure: bool, auth: RegistryAuth, ca: Option<&[u8]>, timeouts: Timeouts) -> Registry {
        // The agent's TLS provider is ring; oci-client needs one installed before its first
        // client. Installing twice is refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let roots = ca
            .map(|pem| {
                vec![oci_client::client::Certificate {
                    encoding: oci_client::client::CertificateEncoding::Pem,
                    data: pem.to_vec(),
                }]
            })
            .unwrap_or_default();
        let config = ClientConfig {
            protocol: if insecure {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            tls_certs_only: roots,
            connect_timeout: Some(timeouts.connect),
            read_timeout: Some(timeouts.read),
            ..ClientConfig::default()
        };
        let capped = CappedClient::new(insecure, auth.clone(), ca, timeouts)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        Registry {
            client: Client::new(config),
            capped,
            auth,
            retry: PullRetry::default(),
            tag_page: TAG_PAGE,
        }
    }

    /// The same client reading tag lists `n` tags a page.
    pub fn with_tag_page(mut self, n: usize) -> Registry {
        self.tag_page = n.max(1);
        self
    }

    /// The same client with another retry policy (tests, and `artifact pull --no-retry`).
    pub fn with_retry(mut self, retry: PullRetry) -> Registry {
        self.retry = retry;
        self
    }

    /// Packs `dir` and pushes it as `oci://host/repo:tag` with the Flux media types and the
    /// `source`, `revision` and (when given) `created` annotations. Returns the manifest digest.
    pub async fn push_dir(
        &self,
        url: &str,
        tag: &str,
        dir: &Path,
        source: &str,
        revision: &str,
    ) -> Result<Digest, RegistryError> {
        let meta = PushMeta {
            source: source.to_string(),
            revision: revision.to_string(),
            created: None,
        };
        self.push_dir_with(url, tag, dir, &meta).await
    }

    /// [`Registry::push_dir`] with every annotation given.
    pub async fn push_dir_with(
        &self,
        url: &str,
        tag: &str,
        dir: &Path,
        meta: &PushMeta,
    ) -> Result<Digest, RegistryError> {
        let reference = reference(url, tag)?;
        let blob = pack_dir(dir, Vec::new())?;
        let layer = ImageLayer::new(blob, FLUX_CONTENT_MEDIA_TYPE.to_string(), None);
        let config = Config::new(b"{}".to_vec(), FLUX_CONFIG_MEDIA_TYPE.to_string(), None);
        let mut manifest = OciImageManifest::build(std::slice::from_ref(&layer), &config, None);
        let mut annotations: std::collections::BTreeMap<String, String> = [
            ("org.opencontainers.image.source", &meta.source),
            ("org.opencontainers.image.revision", &meta.revision),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
        if let Some(created) = &meta.created {
            annotations.insert("org.opencontainers.image.created".into(), created.clone());
        }
        manifest.annotations = Some(annotations);
        self.client
            .push(&reference, &[layer], config, &self.auth, Some(manifest))
            .await
            .map_err(request_err(&reference))?;
        let digest = self
            .client
            .fetch_manifest_digest(&reference, &self.auth)
            .await
            .map_err(request_err(&reference))?;
        Ok(Digest::parse(&digest)?)
    }

    /// The manifest digest `wanted` names, and the revision as Flux writes it: `sha256:<hex>`
    /// for a digest ref, `<tag>@sha256:<hex>` otherwise. A tag is resolved once; everything
    /// after is pulled by the digest, so a tag moved meanwhile cannot mix two versions.
    pub async fn resolve(&self, url: &str, wanted: &ArtifactRef) -> Result<(Digest, String), RegistryError> {
        if let Some(digest) = &wanted.digest {
            let digest = Digest::parse(digest)?;
            let revision = digest.to_string();
            return Ok((digest, revision));
        }
        let tag = match &wanted.semver {
            Some(range) => {
                self.highest_matching(url, range, wanted.semver_filter.as_deref())
                    .await?
            }
            None => wanted.tag.clone().unwrap_or_else(|| "latest".to_string()),
        };
        let by_tag = reference(url, &tag)?;
        let digest = self
            .retry
            .run("tag lookup", || self.tag_digest(&by_tag))
            .await
            .map_err(self.retried_err(&by_tag))?;
        let revision = format!("{tag}@{digest}");
        Ok((digest, revision))
    }

    /// The tag of `url` with the highest version in `range`.
    async fn highest_matching(
        &self,
        url: &str,
        range: &str,
        filter: Option<&str>,
    ) -> Result<String, RegistryError> {
        let req = semver::VersionReq::parse(range).map_err(|e| RegistryError::SemverRange {
            range: range.to_string(),
            reason: e.to_string(),
        })?;
        let filter = filter
            .map(|f| {
                regex::Regex::new(f).map_err(|e| RegistryError::SemverRange {
                    range: format!("semverFilter {f}"),
                    reason: e.to_string(),
                })
            })
            .transpose()?;
        let repo = repository(url)?;
        let tags = self.all_tags(&repo).await?;
        tags.into_iter()
            .filter(|t| filter.as_ref().is_none_or(|f| f.is_match(t)))
            .filter_map(|t| {
                let v = semver::Version::parse(t.strip_prefix('v').unwrap_or(&t)).ok()?;
                req.matches(&v).then_some((v, t))
            })
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, t)| t)
            .ok_or_else(|| RegistryError::NoMatchingTag {
                url: url.to_string(),
                range: range.to_string(),
            })
    }

    /// Every tag of `repo`, page by page (`n` and `last`, as the distribution API pages them):
    /// registries that page by default (GHCR, Docker Hub) would otherwise hide every tag past
    /// the first page from a semver range. At most [`MAX_TAGS`], in pages of [`TAG_PAGE`].
    async fn all_tags(&self, repo: &Reference) -> Result<Vec<String>, RegistryError> {
        let mut tags: Vec<String> = Vec::new();
        loop {
            let last = tags.last().cloned();
            let page = self
                .retry
                .run("tag list", || self.tag_page(repo, last.as_deref()))
                .await
                .map_err(self.retried_err(repo))?;
            let full = page.len() >= self.tag_page;
            // A registry that ignores `last` answers the same page again: stop there.
            let fresh: Vec<String> = page.into_iter().filter(|t| !tags.contains(t)).collect();
            if fresh.is_empty() {
                return Ok(tags);
            }
            tags.extend(fresh);
            if tags.len() > MAX_TAGS {
                return Err(RegistryError::TooManyTags {
                    reference: repo.whole(),
                    limit: MAX_TAGS,
                });
            }
            if !full {
                return Ok(tags);
            }
        }
    }

    /// The pull client, or why there is none.
    fn capped(&self) -> Result<&CappedClient, OciDistributionError> {
        self.capped
            .as_deref()
            .map_err(|e| OciDistributionError::GenericError(Some(e.clone())))
    }

    /// The manifest digest a tag names: the `Docker-Content-Digest` of a HEAD, or (a registry
    /// that sends none) the digest of the manifest itself, read within its cap.
    async fn tag_digest(&self, by_tag: &Reference) -> Result<Digest, OciDistributionError> {
        let capped = self.capped()?;
        let accept = [
            OCI_MANIFEST_MEDIA_TYPE,
            OCI_INDEX_MEDIA_TYPE,
            DOCKER_MANIFEST_MEDIA_TYPE,
        ];
        let path = manifest_path(by_tag);
        let headers = capped.head(by_tag, &path, &accept).await?;
        let announced = headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        if let Some(digest) = announced {
            return Ok(digest);
        }
        let wanted = Wanted {
            what: "manifest",
            cap: MAX_MANIFEST_BYTES,
        };
        let (bytes, _) = capped.get(by_tag, &path, &accept, wanted).await?;
        Ok(Digest::of(&bytes))
    }

    /// One page of `repo`'s tags after `last`, [`Registry::with_tag_page`] tags long at most.
    async fn tag_page(
        &self,
        repo: &Reference,
        last: Option<&str>,
    ) -> Result<Vec<String>, OciDistributionError> {
        let mut path = format!("tags/list?n={}", self.tag_page);
        if let Some(last) = last {
            path.push_str("&last=");
            path.push_str(&query_escape(last));
        }
        let wanted = Wanted {
            what: "tag list",
            cap: MAX_TAG_LIST_BYTES,
        };
        let (bytes, _) = self.capped()?.get(repo, &path, &[], wanted).await?;
        #[derive(serde::Deserialize)]
        struct TagList {
            tags: Option<Vec<String>>,
        }
        let list: TagList = serde_json::from_slice(&bytes)?;
        Ok(list.tags.unwrap_or_default())
    }

    /// Pulls the artifact `wanted` names from `url` into `cache`: resolved to a manifest digest
    /// ([`Registry::resolve`]), the manifest pulled by that digest and checked against it, and
    /// the content layer fetched only if the cache does not hold it.
    pub async fn pull(
        &self,
        url: &str,
        wanted: &ArtifactRef,
        cache: &ArtifactCache,
        limits: &UnpackLimits,
    ) -> Result<Pulled, RegistryError> {
        self.refresh(url, wanted, cache, limits, None, None).await
    }

    /// Like [`Registry::pull`], but when `wanted` still resolves to the manifest of `known`
    /// and the cache still holds its layer, nothing more is requested: an unchanged artifact
    /// costs the one tag lookup (none for a digest ref).
    pub async fn refresh(
        &self,
        url: &str,
        wanted: &ArtifactRef,
        cache: &ArtifactCache,
        limits: &UnpackLimits,
        known: Option<&Pulled>,
        keys: Option<&CosignKeys>,
    ) -> Result<Pulled, RegistryError> {
        let (manifest_digest, revision) = self.resolve(url, wanted).await?;
        let fingerprint = keys.map(CosignKeys::fingerprint);
        if let Some(known) = known.filter(|k| k.manifest == manifest_digest && k.verified_with == fingerprint)
            && let Some(dir) = cache.get(&known.layer, Check::Sizes)?
        {
            return Ok(Pulled {
                revision,
                dir,
                downloaded: false,
                ..known.clone()
            });
        }
        // A new digest, or new keys: the signature is checked before anything is downloaded.
        if let Some(keys) = keys {
            self.verify_signature(url, &manifest_digest, keys).await?;
        }
        let mut pulled = self
            .pull_resolved(url, wanted, manifest_digest, revision, cache, limits)
            .await?;
        pulled.verified_with = fingerprint;
        Ok(pulled)
    }

    /// Checks that a cosign signature of `manifest`, made with one of `keys`, is stored at
    /// its `sha256-<hex>.sig` tag.
    async fn verify_signature(
        &self,
        url: &str,
        manifest: &Digest,
        keys: &CosignKeys,
    ) -> Result<(), RegistryError> {
        let tag = signature::signature_tag(manifest);
        let by_tag = reference(url, &tag)?;
        let signature_manifest = Wanted {
            what: "signature manifest",
            cap: MAX_MANIFEST_BYTES,
        };
        let accept = [OCI_MANIFEST_MEDIA_TYPE, DOCKER_MANIFEST_MEDIA_TYPE];
        let (bytes, _) = match self
            .retry
            .run("signature manifest", || async {
                self.capped()?
                    .get(&by_tag, &manifest_path(&by_tag), &accept, signature_manifest)
                    .await
            })
            .await
        {
            Ok(found) => found,
            Err(
                OciDistributionError::ImageManifestNotFoundError(_)
                | OciDistributionError::RegistryError { .. }
                | OciDistributionError::ServerError { code: 404, .. },
            ) => {
                return Err(RegistryError::Unsigned {
                    digest: manifest.clone(),
                    tag,
                });
            }
            Err(e) => return Err(self.retried_err(&by_tag)(e)),
        };
        let sig_manifest: OciImageManifest = serde_json::from_slice(&bytes)
            .map_err(|e| RegistryError::Manifest(manifest.clone(), format!("signature manifest: {e}")))?;
        let mut reasons: Vec<String> = Vec::new();
        for layer in sig_manifest
            .layers
            .iter()
            .filter(|l| l.media_type == signature::SIMPLE_SIGNING_MEDIA_TYPE)
        {
            match self.verify_layer(&by_tag, layer, manifest, keys).await {
                Ok(()) => return Ok(()),
                Err(e) => reasons.push(e.to_string()),
            }
        }
        if reasons.is_empty() {
            reasons.push("the signature manifest has no simple-signing layer".into());
        }
        Err(RegistryError::BadSignature {
            digest: manifest.clone(),
            reasons: reasons.join("; "),
        })
    }

    /// One signature layer: its payload fetched (bounded, digest-checked) and verified.
    async fn verify_layer(
        &self,
        by_tag: &Reference,
        layer: &oci_client::manifest::OciDescriptor,
        manifest: &Digest,
        keys: &CosignKeys,
    ) -> Result<(), LayerRejected> {
        let sig = layer
            .annotations
            .as_ref()
            .and_then(|a| a.get(signature::SIGNATURE_ANNOTATION))
            .ok_or(LayerRejected::NoSignature)?;
        if layer.size < 0 || layer.size > signature::MAX_PAYLOAD_BYTES {
            return Err(LayerRejected::Size(layer.size));
        }
        let expected = Digest::parse(&layer.digest)?;
        let wanted = Wanted {
            what: "signature payload",
            cap: signature::MAX_PAYLOAD_BYTES as usize,
        };
        let fetched = async {
            self.capped()?
                .get(by_tag, &format!("blobs/{expected}"), &[], wanted)
                .await
        };
        let (payload, _) = fetched.await.map_err(LayerRejected::Fetch)?;
        if Digest::of(&payload) != expected {
            return Err(LayerRejected::DigestMismatch);
        }
        Ok(keys.verify(&payload, sig, manifest)?)
    }

    /// Pulls the manifest `manifest_digest` (already resolved) and its layer into `cache`.
    async fn pull_resolved(
        &self,
        url: &str,
        wanted: &ArtifactRef,
        manifest_digest: Digest,
        revision: String,
        cache: &ArtifactCache,
        limits: &UnpackLimits,
    ) -> Result<Pulled, RegistryError> {
        let repo = repository(url)?;
        let by_digest = Reference::with_digest(
            repo.registry().to_string(),
            repo.repository().to_string(),
            manifest_digest.to_string(),
        );
        let layer = self
            .content_layer(&by_digest, &manifest_digest, wanted.layer_media_type.as_deref())
            .await?;
        let layer_digest = Digest::parse(&layer.digest)?;
        if layer.size < 0 || layer.size as u64 > limits.max_compressed {
            return Err(RegistryError::LayerTooLarge {
                digest: layer_digest,
                size: layer.size,
                limit: limits.max_compressed,
            });
        }
        if let Some(dir) = cache.get(&layer_digest, Check::Sizes)? {
            return Ok(Pulled {
                revision,
                manifest: manifest_digest,
                layer: layer_digest,
                dir,
                downloaded: false,
                verified_with: None,
            });
        }
        let file = self.download(&by_digest, &layer, &layer_digest, cache).await?;
        let (put_cache, put_digest, put_limits) = (cache.clone(), layer_digest.clone(), *limits);
        let put = tokio::task::spawn_blocking(move || {
            // `file` is removed when this closure ends, whatever the outcome.
            std::fs::File::open(file.path())
                .map_err(|e| CacheError::Io {
                    path: file.path().to_path_buf(),
                    source: e,
                })
                .and_then(|blob| put_cache.put(&put_digest, std::io::BufReader::new(blob), &put_limits))
        })
        .await
        .map_err(|e| RegistryError::Download {
            digest: layer_digest.clone(),
            source: std::io::Error::other(e),
        })?;
        Ok(Pulled {
            revision,
            manifest: manifest_digest,
            layer: layer_digest,
            dir: put?,
            downloaded: true,
            verified_with: None,
        })
    }

    /// The manifest at `by_digest`, checked against `digest` (through an image index, the
    /// entry for this agent's platform, checked against its own digest), and the layer
    /// `layer_media_type` selects: the first of that media type, or else the first layer.
    async fn content_layer(
        &self,
        by_digest: &Reference,
        digest: &Digest,
        layer_media_type: Option<&str>,
    ) -> Result<oci_client::manifest::OciDescriptor, RegistryError> {
        let mut bytes = self.manifest_bytes(by_digest, digest).await?;
        let mut manifest_digest = digest.clone();
        if let Some(entry) = index_entry(&bytes, digest)? {
            manifest_digest = Digest::parse(&entry)?;
            let platform_ref = Reference::with_digest(
                by_digest.registry().to_string(),
                by_digest.repository().to_string(),
                entry,
            );
            bytes = self.manifest_bytes(&platform_ref, &manifest_digest).await?;
        }
        let manifest: OciImageManifest = serde_json::from_slice(&bytes)
            .map_err(|e| RegistryError::Manifest(manifest_digest.clone(), e.to_string()))?;
        if manifest.config.media_type != FLUX_CONFIG_MEDIA_TYPE {
            return Err(RegistryError::NotFlux {
                digest: manifest_digest,
                found: manifest.config.media_type,
            });
        }
        let mut layers = manifest.layers.into_iter();
        match layer_media_type {
            Some(wanted) => {
                layers
                    .find(|l| l.media_type == wanted)
                    .ok_or_else(|| RegistryError::NoSelectedLayer {
                        digest: manifest_digest,
                        media_type: wanted.to_string(),
                    })
            }
            None => layers.next().ok_or(RegistryError::NoLayer(manifest_digest)),
        }
    }

    /// A manifest's (or index's) bytes, checked against `digest`.
    async fn manifest_bytes(&self, by_digest: &Reference, digest: &Digest) -> Result<Vec<u8>, RegistryError> {
        let wanted = Wanted {
            what: "manifest",
            cap: MAX_MANIFEST_BYTES,
        };
        let accept = [OCI_MANIFEST_MEDIA_TYPE, OCI_INDEX_MEDIA_TYPE];
        let (bytes, _) = self
            .retry
            .run("manifest", || async {
                self.capped()?
                    .get(by_digest, &manifest_path(by_digest), &accept, wanted)
                    .await
            })
            .await
            .map_err(self.retried_err(by_digest))?;
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(RegistryError::ManifestDigest {
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Streams the layer blob into a scratch file of the cache (never whole in memory),
    /// refusing more bytes than the manifest announced. The file goes with the returned guard,
    /// and with this future when it fails or is dropped.
    async fn download(
        &self,
        by_digest: &Reference,
        layer: &oci_client::manifest::OciDescriptor,
        digest: &Digest,
        cache: &ArtifactCache,
    ) -> Result<ScratchFile, RegistryError> {
        let io_err = |source| RegistryError::Download {
            digest: digest.clone(),
            source,
        };
        let response = self
            .retry
            // Only the start is repeated: a stream cut halfway fails the pull, and the
            // source's retryInterval fetches it again into a fresh scratch file.
            .run("layer", || async {
                self.capped()?.stream(by_digest, &format!("blobs/{digest}")).await
            })
            .await
            .map_err(self.retried_err(by_digest))?;
        let mut stream = response.bytes_stream();
        let scratch = cache.scratch_file(digest);
        let mut file = tokio::fs::File::create(scratch.path()).await.map_err(io_err)?;
        let mut got = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| io_err(std::io::Error::other(e)))?;
            got += chunk.len() as u64;
            if got > layer.size as u64 {
                return Err(io_err(std::io::Error::other(
                    "the registry sent more bytes than the layer's size",
                )));
            }
            file.write_all(&chunk).await.map_err(io_err)?;
        }
        file.flush().await.map_err(io_err)?;
        Ok(scratch)
    }
}

/// The most of a registry's answer an error message carries. The message reaches the hub in the
/// source's condition, and a registry may answer a whole HTML page or anything it likes.
const MAX_ANSWER_CHARS: usize = 300;

/// A registry error as text, on one line and cut to [`MAX_ANSWER_CHARS`].
fn answer(e: &oci_client::errors::OciDistributionError) -> String {
    let text = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
    let total = text.chars().count();
    if total <= MAX_ANSWER_CHARS {
        return text;
    }
    let kept: String = text.chars().take(MAX_ANSWER_CHARS).collect();
    format!("{kept}… ({} more characters)", total - MAX_ANSWER_CHARS)
}

/// The OCI platform of this agent (`linux/amd64`, `linux/arm64`, ...).
pub fn agent_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    };
    (std::env::consts::OS, arch)
}

/// When `bytes` is an image index, the digest of its manifest for this agent's platform (an
/// error naming the platforms it has when none fits); None for a plain manifest.
fn index_entry(bytes: &[u8], digest: &Digest) -> Result<Option<String>, RegistryError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| RegistryError::Manifest(digest.clone(), e.to_string()))?;
    let is_index = v.get("mediaType").and_then(|m| m.as_str()) == Some(OCI_INDEX_MEDIA_TYPE)
        || (v.get("manifests").is_some() && v.get("layers").is_none());
    if !is_index {
        return Ok(None);
    }
    let (os, arch) = agent_platform();
    let entries = v
        .get("manifests")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    let platform_of = |e: &serde_json::Value| {
        let p = e.get("platform");
        let field = |k: &str| {
            p.and_then(|p| p.get(k))
                .and_then(|x| x.as_str())
                .unwrap_or("")
                .to_string()
        };
        (field("os"), field("architecture"))
    };
    let found = entries
        .iter()
        .find(|e| platform_of(e) == (os.to_string(), arch.to_string()));
    match found.and_then(|e| e.get("digest")).and_then(|d| d.as_str()) {
        Some(d) => Ok(Some(d.to_string())),
        None => Err(RegistryError::NoPlatform {
            digest: digest.clone(),
            platform: format!("{os}/{arch}"),
            available: entries
                .iter()
                .map(|e| {
                    let (o, a) = platform_of(e);
                    format!("{o}/{a}")
                })
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// `manifests/<digest or tag>` of a reference.
fn manifest_path(r: &Reference) -> String {
    format!("manifests/{}", r.digest().or(r.tag()).unwrap_or("latest"))
}

/// A tag for a query string: tags are `[A-Za-z0-9_.-]`, anything else is escaped.
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The repository of `oci://host/repo`, as a reference (its tag, `latest`, is not used).
fn repository(url: &str) -> Result<Reference, RegistryError> {
    reference(url, "latest")
}

/// `oci://host/repo` and a tag as a reference.
fn reference(url: &str, tag: &str) -> Result<Reference, RegistryError> {
    let rest = url
        .strip_prefix("oci://")
        .ok_or_else(|| RegistryError::Url(url.to_string()))?;
    format!("{rest}:{tag}")
        .parse::<Reference>()
        .map_err(|_| RegistryError::Url(url.to_string()))
}

fn request_err(
    reference: &Reference,
) -> impl Fn(oci_client::errors::OciDistributionError) -> RegistryError + '_ {
    move |source| RegistryError::Request {
        reference: reference.whole(),
        source,
    }
}

impl Registry {
    /// Like [`request_err`] for a request made under the retry policy: a 429 or 5xx that
    /// outlasted it says so, so the status tells "rate limited" apart from "not found".
    fn retried_err<'a>(
        &'a self,
        reference: &'a Reference,
    ) -> impl Fn(oci_client::errors::OciDistributionError) -> RegistryError + 'a {
        move |source| match transient(&source) {
            Some(kind) => RegistryError::Throttled {
                reference: reference.whole(),
                kind,
                attempts: self.retry.attempts,
                source,
            },
            None => RegistryError::Request {
                reference: reference.whole(),
                source,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registrys_long_answer_is_cut_to_one_short_line() {
        let page = format!("<html>\n<body>{}</body>\n</html>", "x".repeat(100_000));
        let err = RegistryError::Request {
            reference: "registry.example/apps/demo:v1".into(),
            source: oci_client::errors::OciDistributionError::ServerError {
                code: 500,
                url: "https://registry.example/v2/apps/demo/manifests/v1".into(),
                message: page,
            },
        };
        let text = err.to_string();
        assert!(text.chars().count() < 500, "{} characters", text.chars().count());
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains("more characters)"), "{text}");
        assert!(
            text.starts_with("registry request for registry.example/apps/demo:v1: "),
            "{text}"
        );
    }
}
