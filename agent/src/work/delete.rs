//! Deleting a work from the spoke, honouring its deleteOption. Everything needed comes from the
//! AppliedManifestWork, so a deletion interrupted by a restart is finished by the next agent.

use std::time::Duration;

use kube::api::Api;
use kube::{Client, ResourceExt};

use super::applied_work::{self, AppliedWorkError};
use super::manifestwork::{
    AppliedManifestResourceMeta, AppliedManifestWork, DeleteOption, DeletePropagationPolicy,
};
use super::object::ObjKey;
use super::prune::{self, Mode, PruneError, PruneOutcome, key_of};

/// How often deletion progress is polled.
const POLL: Duration = Duration::from_millis(200);

/// Deletion failures.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// Removing an object failed.
    #[error(transparent)]
    Prune(#[from] PruneError),
    /// Deleting the record failed.
    #[error(transparent)]
    Record(#[from] AppliedWorkError),
}

/// Whether `e` matches one of the SelectivelyOrphan rules.
pub fn is_orphaned(option: &DeleteOption, e: &AppliedManifestResourceMeta) -> bool {
    match option.propagation_policy {
        DeletePropagationPolicy::Orphan => true,
        DeletePropagationPolicy::Foreground => false,
        DeletePropagationPolicy::SelectivelyOrphan => option
            .selectively_orphans
            .as_ref()
            .map(|s| {
                s.orphaning_rules.iter().any(|r| {
                    r.group == e.group
                        && r.resource == e.resource
                        && r.name == e.name
                        && r.namespace == e.namespace
                })
            })
            .unwrap_or(false),
    }
}

/// Deletes (or orphans) everything the work applied, waits until deleted objects are gone while
/// calling `progress(remaining, total)` whenever the count changes, then deletes the record.
pub async fn delete_work(
    client: &Client,
    amw: &AppliedManifestWork,
    option: &DeleteOption,
    claimed_elsewhere: impl Fn(&ObjKey) -> bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<(), DeleteError> {
    let owner_uid = amw.uid().unwrap_or_default();
    let entries = applied_work::resources(amw);
    let mut waiting = Vec::new();
    for e in &entries {
        let mode = if is_orphaned(option, e) {
            Mode::Orphan
        } else {
            Mode::Delete
        };
        let out = prune::remove(client, e, &owner_uid, claimed_elsewhere(&key_of(e)), mode).await?;
        if out == PruneOutcome::Deleted {
            waiting.push(e.clone());
        }
    }
    let total = waiting.len();
    let mut last = usize::MAX;
    loop {
        let mut still = Vec::new();
        for e in waiting {
            if prune::still_present(client, &e).await? {
                still.push(e);
            }
        }
        waiting = still;
        if waiting.len() != last {
            last = waiting.len();
            progress(last, total);
        }
        if waiting.is_empty() {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let api: Api<AppliedManifestWork> = Api::all(client.clone());
    applied_work::delete(&api, &amw.name_any()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::work::manifestwork::{OrphaningRule, SelectivelyOrphan};

    fn e(name: &str) -> AppliedManifestResourceMeta {
        AppliedManifestResourceMeta {
            resource: "configmaps".into(),
            namespace: "n".into(),
            name: name.into(),
            version: "v1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn orphan_rules() {
        let fg = DeleteOption::default();
        assert!(!is_orphaned(&fg, &e("a")));
        let all = DeleteOption {
            propagation_policy: DeletePropagationPolicy::Orphan,
            ..Default::default()
        };
        assert!(is_orphaned(&all, &e("a")));
        let sel = DeleteOption {
            propagation_policy: DeletePropagationPolicy::SelectivelyOrphan,
            selectively_orphans: Some(SelectivelyOrphan {
                orphaning_rules: vec![OrphaningRule {
                    group: "".into(),
                    resource: "configmaps".into(),
                    name: "keep".into(),
                    namespace: "n".into(),
                }],
            }),
            ..Default::default()
        };
        assert!(is_orphaned(&sel, &e("keep")));
        assert!(!is_orphaned(&sel, &e("drop")));
    }
}
