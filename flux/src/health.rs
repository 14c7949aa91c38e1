//! Whether an applied object is healthy, for a Kustomization's `wait` and `healthChecks`: the
//! rules of Flux's kstatus for the kinds that have them, a `Ready` condition for anything else.

use serde_json::Value;

/// The health of one live object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ready,
    /// Not yet; the message says what is awaited.
    Progressing(String),
    /// Will not become ready without a change (a rollout past its deadline, a failed Job).
    Failed(String),
}

fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a Value> {
    obj.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

fn condition_is(obj: &Value, kind: &str, status: &str) -> bool {
    condition(obj, kind)
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        == Some(status)
}

fn int(obj: &Value, pointer: &str) -> i64 {
    obj.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

/// The health of `obj`, of kind `kind`, as it is live. The kind is given, not read from the
/// object: objects that arrive in a list (the drift cache's first fill) carry no `kind`, and a
/// Deployment without one would pass for an object with no status, that is, ready.
pub fn health(kind: &str, obj: &Value) -> Health {
    let generation = int(obj, "/metadata/generation");
    let observed = obj.pointer("/status/observedGeneration").and_then(Value::as_i64);
    if let Some(observed) = observed
        && observed < generation
    {
        return Health::Progressing(format!(
            "generation {generation} not yet observed (at {observed})"
        ));
    }
    match kind {
        "Deployment" => deployment(obj),
        "StatefulSet" => replicas(obj, "readyReplicas", "ready"),
        "ReplicaSet" => replicas(obj, "availableReplicas", "available"),
        "DaemonSet" => daemon_set(obj),
        "Job" => job(obj),
        "CustomResourceDefinition" => {
            if condition_is(obj, "Established", "True") {
                Health::Ready
            } else {
                Health::Progressing("not yet Established".into())
            }
        }
        "PersistentVolumeClaim" => phase(obj, "Bound"),
        "Namespace" => phase(obj, "Active"),
        _ => ready_condition(obj),
    }
}

fn deployment(obj: &Value) -> Health {
    if let Some(c) = condition(obj, "Progressing")
        && c.get("reason").and_then(Value::as_str) == Some("ProgressDeadlineExceeded")
    {
        return Health::Failed("rollout exceeded its progress deadline".into());
    }
    let want = obj.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
    let updated = int(obj, "/status/updatedReplicas");
    let available = int(obj, "/status/availableReplicas");
    if updated < want || available < want {
        return Health::Progressing(format!("{updated} of {want} updated, {available} available"));
    }
    Health::Ready
}

fn replicas(obj: &Value, field: &str, word: &str) -> Health {
    let want = obj.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
    let have = int(obj, &format!("/status/{field}"));
    if have < want {
        return Health::Progressing(format!("{have} of {want} {word}"));
    }
    Health::Ready
}

fn daemon_set(obj: &Value) -> Health {
    let want = int(obj, "/status/desiredNumberScheduled");
    let updated = int(obj, "/status/updatedNumberScheduled");
    let available = int(obj, "/status/numberAvailable");
    if obj.pointer("/status/desiredNumberScheduled").is_none() || updated < want || available < want {
        return Health::Progressing(format!("{updated} of {want} updated, {available} available"));
    }
    Health::Ready
}

fn job(obj: &Value) -> Health {
    if condition_is(obj, "Failed", "True") {
        return Health::Failed("the Job failed".into());
    }
    if condition_is(obj, "Complete", "True") {
        return Health::Ready;
    }
    Health::Progressing("the Job has not completed".into())
}

fn phase(obj: &Value, want: &str) -> Health {
    match obj.pointer("/status/phase").and_then(Value::as_str) {
        Some(p) if p == want => Health::Ready,
        Some(p) => Health::Progressing(format!("phase {p}, not {want}")),
        None => Health::Progressing(format!("no phase yet, awaiting {want}")),
    }
}

/// Anything else: Ready when its `Ready` condition is True, and ready when it has none (as
/// kstatus treats objects without status, such as ConfigMaps).
fn ready_condition(obj: &Value) -> Health {
    match condition(obj, "Ready") {
        None => Health::Ready,
        Some(c) => match c.get("status").and_then(Value::as_str) {
            Some("True") => Health::Ready,
            _ => Health::Progressing(
                c.get("message")
                    .and_then(Value::as_str)
                    .filter(|m| !m.is_empty())
                    .unwrap_or("Ready is not True")
                    .to_string(),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deployments_need_every_replica_updated_and_available() {
        let d = |updated, available| {
            json!({"kind": "Deployment", "metadata": {"generation": 2}, "spec": {"replicas": 2},
                   "status": {"observedGeneration": 2, "updatedReplicas": updated, "availableReplicas": available}})
        };
        assert_eq!(health("Deployment", &d(2, 2)), Health::Ready);
        assert!(matches!(health("Deployment", &d(2, 1)), Health::Progressing(_)));
        let stale = json!({"kind": "Deployment", "metadata": {"generation": 3}, "spec": {"replicas": 0},
                           "status": {"observedGeneration": 2}});
        assert!(matches!(health("Deployment", &stale), Health::Progressing(m) if m.contains("generation 3")));
        let stuck = json!({"kind": "Deployment", "status": {"conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}});
        assert!(matches!(health("Deployment", &stuck), Health::Failed(_)));
    }

    #[test]
    fn jobs_crds_and_ready_conditions() {
        let job = |t: &str| json!({"kind": "Job", "status": {"conditions": [{"type": t, "status": "True"}]}});
        assert_eq!(health("Job", &job("Complete")), Health::Ready);
        assert!(matches!(health("Job", &job("Failed")), Health::Failed(_)));
        let crd = json!({"kind": "CustomResourceDefinition", "status": {"conditions": [{"type": "Established", "status": "True"}]}});
        assert_eq!(health("CustomResourceDefinition", &crd), Health::Ready);
        let cr = json!({"kind": "Model", "status": {"conditions": [{"type": "Ready", "status": "False", "message": "loading"}]}});
        assert_eq!(health("Model", &cr), Health::Progressing("loading".into()));
        assert_eq!(health("ConfigMap", &json!({})), Health::Ready);
        // A Deployment as a list returns it (no kind) is still judged as a Deployment.
        let listed = json!({"spec": {"replicas": 1}, "status": {"updatedReplicas": 1}});
        assert!(matches!(health("Deployment", &listed), Health::Progressing(_)));
    }
}
