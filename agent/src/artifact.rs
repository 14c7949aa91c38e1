//! `spokelet artifact push DIR oci://HOST/REPO:TAG`: a directory packaged as a Flux-format
//! artifact, for hubs, CI systems and the tests; `spokelet artifact pull` fetches one into a
//! cache exactly as the agent does (to pre-seed a node's cache, or to see why a pull fails).

use std::path::PathBuf;

use spokelet_artifact::cache::ArtifactCache;
use spokelet_artifact::registry::{ArtifactRef, PushMeta, Registry, RegistryAuth, RegistryError};
use spokelet_artifact::unpack::UnpackLimits;

use spokelet_work_api::conditions::{now_rfc3339, rfc3339};

/// `spokelet artifact ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ArtifactCommand {
    /// Package DIR as a Flux-format OCI artifact and push it; prints its digest.
    Push(PushArgs),
    /// Pull a Flux-format artifact into a cache, verified and unpacked within the limits;
    /// prints its revision and directory.
    Pull(PullArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct PullArgs {
    /// What to pull: `oci://HOST[:PORT]/REPOSITORY:TAG` or `...@sha256:DIGEST`.
    pub reference: String,

    /// The cache directory (the agent's `--artifact-cache`).
    #[arg(
        long,
        env = "SPOKELET_ARTIFACT_CACHE",
        default_value = "/var/cache/spokelet/artifacts"
    )]
    pub cache: PathBuf,

    #[command(flatten)]
    pub registry: RegistryArgs,

    /// Bounds on the unpacked artifact (the agent's own flags).
    #[command(flatten)]
    pub limits: ArtifactLimitArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    /// The directory to package (symlinks and special files are skipped, as Flux does).
    pub dir: PathBuf,

    /// Where to push it: `oci://HOST[:PORT]/REPOSITORY:TAG`.
    pub reference: String,

    /// `org.opencontainers.image.source`: where the content came from.
    #[arg(long, default_value = "")]
    pub source: String,

    /// `org.opencontainers.image.revision`: its version there (default: the tag).
    #[arg(long)]
    pub revision: Option<String>,

    /// The same digest for the same directory on any machine and at any time: the `created`
    /// annotation is the Unix epoch instead of now. (Entries are always in lexical order
    /// with owners and times zeroed.)
    #[arg(long)]
    pub reproducible: bool,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// How to reach the registry, shared by `push` and `pull`.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Speak plain HTTP to the registry.
    #[arg(long)]
    pub insecure: bool,

    /// Registry user name (basic auth, or exchanged for a bearer token where the registry asks
    /// for one).
    #[arg(long, env = "SPOKELET_REGISTRY_USERNAME")]
    pub username: Option<String>,

    /// Registry password.
    #[arg(long, env = "SPOKELET_REGISTRY_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

impl RegistryArgs {
    /// A registry client with these settings.
    fn client(&self) -> Result<Registry, ArtifactCommandError> {
        let auth = match (&self.username, &self.password) {
            (Some(u), Some(p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            (None, None) => RegistryAuth::Anonymous,
            _ => return Err(ArtifactCommandError::HalfCredentials),
        };
        Ok(Registry::new(self.insecure, auth))
    }
}

/// The bounds on an unpacked artifact, shared by `spokelet run` and `spokelet artifact pull`.
#[derive(Debug, Clone, clap::Args)]
pub struct ArtifactLimitArgs {
    /// Largest compressed artifact layer, in bytes.
    #[arg(long, env = "SPOKELET_ARTIFACT_MAX_COMPRESSED_BYTES", default_value_t = 100 * 1024 * 1024)]
    pub artifact_max_compressed_bytes: u64,

    /// Largest unpacked artifact, in bytes of file contents.
    #[arg(long, env = "SPOKELET_ARTIFACT_MAX_UNCOMPRESSED_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub artifact_max_uncompressed_bytes: u64,

    /// Most entries (files and directories) of one artifact.
    #[arg(long, env = "SPOKELET_ARTIFACT_MAX_FILES", default_value_t = 10_000)]
    pub artifact_max_files: u64,

    /// Deepest path (in components) inside an artifact.
    #[arg(long, env = "SPOKELET_ARTIFACT_MAX_DEPTH", default_value_t = 32)]
    pub artifact_max_depth: usize,

    /// Highest compression ratio (unpacked bytes per compressed byte) of an artifact, checked
    /// after its first MiB: a compression bomb trips it long before it fills a disk.
    #[arg(long, env = "SPOKELET_ARTIFACT_MAX_RATIO", default_value_t = 200)]
    pub artifact_max_ratio: u64,
}

impl ArtifactLimitArgs {
    /// The limits; a depth or ratio of 0 is raised to 1.
    pub fn limits(&self) -> UnpackLimits {
        UnpackLimits {
            max_compressed: self.artifact_max_compressed_bytes,
            max_uncompressed: self.artifact_max_uncompressed_bytes,
            max_files: self.artifact_max_files,
            max_depth: self.artifact_max_depth.max(1),
            max_ratio: self.artifact_max_ratio.max(1),
        }
    }
}

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactCommandError {
    #[error("{0:?} is not oci://HOST/REPOSITORY:TAG")]
    Reference(String),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("--username and --password go together")]
    HalfCredentials,
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Cache(#[from] spokelet_artifact::cache::CacheError),
}

/// Pushes and returns `oci://HOST/REPOSITORY@sha256:...`.
pub async fn push(args: &PushArgs) -> Result<String, ArtifactCommandError> {
    let (url, tag) = split_reference(&args.reference)?;
    if !args.dir.is_dir() {
        return Err(ArtifactCommandError::NotADirectory(args.dir.clone()));
    }
    let meta = PushMeta {
        source: args.source.clone(),
        revision: args.revision.clone().unwrap_or_else(|| tag.to_string()),
        created: Some(if args.reproducible {
            rfc3339(0)
        } else {
            now_rfc3339()
        }),
    };
    let registry = args.registry.client()?;
    let digest = registry.push_dir_with(url, tag, &args.dir, &meta).await?;
    Ok(format!("{url}@{digest}"))
}

/// Pulls into the cache and returns `<revision> <directory>`.
pub async fn pull(args: &PullArgs) -> Result<String, ArtifactCommandError> {
    let (url, wanted) = match args.reference.split_once('@') {
        Some((url, digest)) => (
            url,
            ArtifactRef {
                digest: Some(digest.to_string()),
                ..ArtifactRef::default()
            },
        ),
        None => {
            let (url, tag) = split_reference(&args.reference)?;
            (url, ArtifactRef::tag(tag))
        }
    };
    let cache = ArtifactCache::open(&args.cache)?;
    let registry = args.registry.client()?;
    let pulled = registry.pull(url, &wanted, &cache, &args.limits.limits()).await?;
    Ok(format!("{} {}", pulled.revision, pulled.dir.display()))
}

/// `oci://host/repo:tag` as (`oci://host/repo`, `tag`); the tag is after the last `:` that
/// follows the last `/` (so a registry port is not taken for one).
fn split_reference(reference: &str) -> Result<(&str, &str), ArtifactCommandError> {
    let bad = || ArtifactCommandError::Reference(reference.to_string());
    let rest = reference.strip_prefix("oci://").ok_or_else(bad)?;
    let slash = rest.rfind('/').ok_or_else(bad)?;
    let colon = rest[slash..].rfind(':').map(|c| slash + c).ok_or_else(bad)?;
    let tag = &rest[colon + 1..];
    if tag.is_empty() || slash == 0 {
        return Err(bad());
    }
    Ok((&reference[..colon + "oci://".len()], tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_at_the_tag_not_the_port() {
        let (url, tag) = split_reference("oci://127.0.0.1:5000/team/app:v1.2").unwrap();
        assert_eq!((url, tag), ("oci://127.0.0.1:5000/team/app", "v1.2"));
        assert!(split_reference("oci://127.0.0.1:5000/team/app").is_err());
        assert!(split_reference("docker://r/app:v1").is_err());
        assert!(split_reference("oci://r/app:").is_err());
    }
}
