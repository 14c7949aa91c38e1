//! `spokelet artifact push DIR oci://HOST/REPO:TAG`: a directory packaged as a Flux-format
//! artifact, for hubs, CI systems and the tests.

use std::path::PathBuf;

use spokelet_artifact::registry::{PushMeta, Registry, RegistryAuth, RegistryError};

use crate::work::conditions::{now_rfc3339, rfc3339};

/// `spokelet artifact ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ArtifactCommand {
    /// Package DIR as a Flux-format OCI artifact and push it; prints its digest.
    Push(PushArgs),
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

    /// Speak plain HTTP to the registry.
    #[arg(long)]
    pub insecure: bool,

    /// Registry user name (basic auth, or exchanged for a bearer token where the registry
    /// asks for one).
    #[arg(long, env = "SPOKELET_REGISTRY_USERNAME")]
    pub username: Option<String>,

    /// Registry password.
    #[arg(long, env = "SPOKELET_REGISTRY_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
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
}

/// Pushes and returns `oci://HOST/REPOSITORY@sha256:...`.
pub async fn push(args: &PushArgs) -> Result<String, ArtifactCommandError> {
    let (url, tag) = split_reference(&args.reference)?;
    if !args.dir.is_dir() {
        return Err(ArtifactCommandError::NotADirectory(args.dir.clone()));
    }
    let auth = match (&args.username, &args.password) {
        (Some(u), Some(p)) => RegistryAuth::Basic(u.clone(), p.clone()),
        (None, None) => RegistryAuth::Anonymous,
        _ => return Err(ArtifactCommandError::HalfCredentials),
    };
    let meta = PushMeta {
        source: args.source.clone(),
        revision: args.revision.clone().unwrap_or_else(|| tag.to_string()),
        created: Some(if args.reproducible {
            rfc3339(0)
        } else {
            now_rfc3339()
        }),
    };
    let registry = Registry::new(args.insecure, auth);
    let digest = registry.push_dir_with(url, tag, &args.dir, &meta).await?;
    Ok(format!("{url}@{digest}"))
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
