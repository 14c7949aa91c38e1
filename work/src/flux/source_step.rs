//! One `OCIRepository` of a work: fetched when due, its last good artifact kept through
//! failures, its status entry built from what it holds.

use serde_json::Value;
use spokelet_artifact::registry::Pulled;
use spokelet_flux::objects::{self, FluxKind, FluxObject, OciRepositorySpec};
use spokelet_flux::source::SourceError;
use tokio::time::Instant;

use super::memory::{FluxMemory, SourceMemory};
use super::readiness::{Native, string_value};
use super::reasons::{Cond, Failure, Reason, Status};
use super::step::{Step, refused_by_policy};
use super::support::FluxSupport;
use crate::expand::Expansion;

/// Whether a source with `spec` is to be fetched at `now`, given what it fetched before.
fn fetch_due(known: Option<&SourceMemory>, spec: &OciRepositorySpec, now: Instant) -> bool {
    match known {
        None => true,
        Some(m) if m.spec != *spec => true,
        Some(m) => now >= m.checked + m.wait(),
    }
}

/// One OCIRepository: fetched when due. Returns its result, its artifact (the last good one
/// through failures) and whether a layer was downloaded.
pub(super) async fn source_step(
    step: &Step<'_>,
    v: &Value,
    memory: &mut FluxMemory,
    x: &mut Expansion,
) -> (Native, Option<Pulled>, bool) {
    let mut native = Native::new(FluxKind::OciRepository, v);
    let repo = match accepted(step, v) {
        Ok(r) => r,
        Err(failure) => {
            native.fail(failure);
            return (native, None, false);
        }
    };
    let downloaded = fetch_when_due(step.support, step.input.reader, &repo, &native.id, memory).await;
    let Some(m) = memory.sources.get(&native.id) else {
        return (native, None, false);
    };
    x.look_again_by(m.checked + m.wait());
    describe(&mut native, &repo.spec, m);
    (native, m.pulled.clone(), downloaded)
}

/// The source, once read and allowed by the policy, with a fetcher to fetch it.
fn accepted(step: &Step<'_>, v: &Value) -> Result<FluxObject<OciRepositorySpec>, Failure> {
    let repo = objects::oci_repository(v).map_err(|e| Failure::new(Reason::of_spec(&e), e.to_string()))?;
    if let Some(message) = refused_by_policy(
        step.input.policy,
        FluxKind::OciRepository,
        &repo,
        &repo.spec.reads(),
    ) {
        return Err(Failure::new(Reason::DeniedByPolicy, message));
    }
    if let Err(e) = &step.support.fetcher {
        return Err(Failure::new(Reason::ArtifactCacheUnavailable, e.to_string()));
    }
    Ok(repo)
}

/// Fetches the source when it is due (a suspended source that holds an artifact is not);
/// whether a layer was downloaded.
async fn fetch_when_due(
    support: &FluxSupport,
    reader: &kube::Client,
    repo: &FluxObject<OciRepositorySpec>,
    id: &str,
    memory: &mut FluxMemory,
) -> bool {
    let Ok(fetcher) = &support.fetcher else {
        return false;
    };
    let now = Instant::now();
    let known = memory.sources.get(id);
    if !fetch_due(known, &repo.spec, now) || (repo.spec.suspend && known.is_some_and(|m| m.pulled.is_some()))
    {
        return false;
    }
    // A changed spec (a `verify` just added, say) must not be satisfied by what the old spec
    // fetched: only its cached layer is reused.
    let last = known
        .filter(|m| m.spec == repo.spec)
        .and_then(|m| m.pulled.clone());
    let result = fetcher.fetch(reader, repo, last.as_ref()).await;
    let entry = memory
        .sources
        .entry(id.to_string())
        .or_insert_with(|| SourceMemory {
            spec: repo.spec.clone(),
            pulled: None,
            checked: now,
            error: None,
            unverified: false,
        });
    entry.spec = repo.spec.clone();
    entry.checked = now;
    record_fetch(entry, id, result)
}

/// Takes a fetch's result into the source's memory; whether a layer was downloaded.
fn record_fetch(entry: &mut SourceMemory, id: &str, result: Result<Pulled, SourceError>) -> bool {
    match result {
        Ok(p) => {
            if entry.pulled.as_ref().map(|l| &l.revision) != Some(&p.revision) {
                tracing::info!(source = %id, revision = %p.revision, downloaded = p.downloaded, "fetched artifact");
            }
            let downloaded = p.downloaded;
            entry.pulled = Some(p);
            entry.error = None;
            entry.unverified = false;
            downloaded
        }
        Err(e) => {
            tracing::warn!(source = %id, error = %e, "cannot fetch artifact; keeping the last good one");
            entry.error = Some(Failure::new(Reason::Fetch(e.reason()), e.to_string()));
            entry.unverified = e.is_verification();
            false
        }
    }
}

/// The source's status entry from what it holds: `Ready`, `SourceVerified` with `verify`, and
/// the artifact's revision and digest.
fn describe(native: &mut Native, spec: &OciRepositorySpec, m: &SourceMemory) {
    if spec.verify.is_some() {
        native.verified = Some(verified(m));
    }
    if let Some(p) = &m.pulled {
        native.usable = true;
        native.revision = Some(p.revision.clone());
        native.values.push(string_value("artifactRevision", &p.revision));
        native
            .values
            .push(string_value("artifactDigest", &p.manifest.to_string()));
    }
    match (&m.error, &m.pulled) {
        (Some(f), Some(p)) => native.fail(Failure::new(
            f.reason,
            format!("{}; still serving revision {}", f.message, p.revision),
        )),
        (Some(f), None) => native.fail(f.clone()),
        (None, Some(p)) if spec.suspend => {
            let message = format!("suspended; serving revision {}", p.revision);
            native.ready = Cond::new(Status::True, Reason::Suspended, message);
        }
        (None, Some(p)) => {
            let message = format!("stored artifact for revision '{}'", p.revision);
            native.ready = Cond::new(Status::True, Reason::Succeeded, message);
        }
        (None, None) => {
            native.ready = Cond::new(
                Status::Unknown,
                Reason::Suspended,
                "suspended before its first fetch",
            );
        }
    }
}

/// The `SourceVerified` condition of a source with `verify`.
fn verified(m: &SourceMemory) -> Cond {
    match (&m.error, m.unverified, &m.pulled) {
        (Some(f), true, _) => Cond::new(Status::False, f.reason, f.message.clone()),
        (_, _, Some(p)) => Cond::new(
            Status::True,
            Reason::Succeeded,
            format!("verified signature of revision {}", p.revision),
        ),
        (_, _, None) => Cond::new(Status::Unknown, Reason::Progressing, "not fetched yet"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flux::memory::FAILED_SOURCE_RECHECK;
    use std::time::Duration;

    fn spec(interval: &str) -> OciRepositorySpec {
        let v = serde_json::json!({"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "OCIRepository",
            "metadata": {"name": "app"}, "spec": {"url": "oci://r/app", "interval": interval}});
        objects::oci_repository(&v).unwrap().spec
    }

    fn memory(spec: OciRepositorySpec, failed: bool) -> SourceMemory {
        SourceMemory {
            spec,
            pulled: None,
            checked: Instant::now(),
            error: failed.then(|| Failure::new(Reason::Fetch("OCIArtifactPullFailed"), "down")),
            unverified: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_is_fetched_first_then_once_per_interval() {
        let five = spec("5m");
        assert!(fetch_due(None, &five, Instant::now()), "never fetched");
        let m = memory(five.clone(), false);
        tokio::time::advance(Duration::from_secs(299)).await;
        assert!(!fetch_due(Some(&m), &five, Instant::now()), "within its interval");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(fetch_due(Some(&m), &five, Instant::now()), "its interval passed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_source_is_tried_again_within_seconds_and_a_changed_one_at_once() {
        let five = spec("5m");
        let failed = memory(five.clone(), true);
        tokio::time::advance(FAILED_SOURCE_RECHECK).await;
        assert!(fetch_due(Some(&failed), &five, Instant::now()));
        let m = memory(five, false);
        assert!(
            fetch_due(Some(&m), &spec("1m"), Instant::now()),
            "the spec changed"
        );
        // A failed source whose interval is shorter than the recheck waits its interval.
        let quick = memory(spec("2s"), true);
        assert_eq!(quick.wait(), Duration::from_secs(2));
    }

    #[test]
    fn a_failing_source_keeps_serving_its_last_artifact_and_says_so() {
        let mut m = memory(spec("5m"), true);
        let mut native = Native::new(FluxKind::OciRepository, &serde_json::json!({}));
        describe(&mut native, &m.spec.clone(), &m);
        assert_eq!(native.ready.reason, Reason::Fetch("OCIArtifactPullFailed"));
        assert!(!native.usable, "nothing fetched yet");
        m.error = None;
        let mut native = Native::new(FluxKind::OciRepository, &serde_json::json!({}));
        describe(&mut native, &m.spec.clone(), &m);
        assert_eq!(
            native.ready.status,
            Status::Unknown,
            "no artifact, no error: not fetched"
        );
    }
}
