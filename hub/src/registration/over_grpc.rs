//! Joining over OCM's CloudEvents gRPC server (`server grpc`), as OCM's registration agent does
//! with `--registration-auth=grpc`: the ManagedCluster and the certificate signing request
//! travel whole as CloudEvents (`...managedclusters.spec.create_request`,
//! `...certificatesigningrequests.spec.create_request`, signer `open-cluster-management.io/grpc`);
//! the hub sends them back as they change, the signed certificate in the CSR's
//! `status.certificate`. What is kept is OCM's gRPC `config.yaml` with the certificate and key
//! beside it, which the gRPC transport then runs from.

use std::path::PathBuf;

use base64::Engine;
use serde_json::{Value, json};
use spokelet_proto::{CERTIFICATE_SIGNING_REQUESTS, MANAGED_CLUSTERS};

use super::csr::{self, Issued};
use super::join::{
    AGENT_NAME_LABEL, CLUSTER_NAME_LABEL, JoinError, JoinSettings, Waiting, grpc_config_in, hub_endpoint,
    keep, new_managed_cluster, say_csr_wait,
};
use crate::cloudevents::action;
use crate::config::HubSettings;
use crate::grpc::dial_hub;
use crate::grpc::objects::{ObjectFeed, Refusal};
use crate::object_events::ObjectEvent;
use crate::tls::PemSource;

/// The signer of client certificates for OCM's gRPC server.
const GRPC_SIGNER: &str = "open-cluster-management.io/grpc";

/// Joins over gRPC with `bootstrap`; returns the gRPC config to run from.
pub(super) async fn join(s: &JoinSettings, bootstrap: &HubSettings) -> Result<PathBuf, JoinError> {
    let client = dial_hub(bootstrap).await.map_err(JoinError::Grpc)?;
    let mut clusters = ObjectFeed::open(&client, &s.cluster, MANAGED_CLUSTERS)
        .await
        .map_err(JoinError::Grpc)?;
    ensure_managed_cluster(&mut clusters, s).await?;
    let endpoint = hub_endpoint(s).await?;
    let (issued, name) = obtain(s, &client, endpoint).await?;
    tracing::info!(cluster = %s.cluster, csr = %name, not_after = ?issued.not_after, "joined the hub over gRPC: certificate issued and kept");
    wait_accepted(&mut clusters, &s.cluster).await?;
    Ok(grpc_config_in(&s.dir))
}

/// Renews over gRPC in the agent's own name: the certificate and key kept in `s.dir`.
pub(super) async fn renew(
    s: &JoinSettings,
    bootstrap: &HubSettings,
    endpoint: (String, Option<Vec<u8>>),
) -> Result<Issued, JoinError> {
    let client = dial_hub(&joined_settings(bootstrap, s))
        .await
        .map_err(JoinError::Grpc)?;
    let (issued, _) = obtain(s, &client, endpoint).await?;
    Ok(issued)
}

/// Whether the hub refuses the certificate kept in `s.dir`: a subscription opened with it
/// fails with a TLS alert about it or `Unauthenticated`, or fails in any way while one opened
/// with the bootstrap credential succeeds. The second test is needed because with TLS 1.3 the
/// server's alert about a client certificate comes after the client's handshake is done, so
/// the client may see only a closed connection, depending on timing.
pub(super) async fn refuses_kept(s: &JoinSettings, bootstrap: &HubSettings) -> bool {
    let subscribed = |settings: HubSettings| async move {
        let client = dial_hub(&settings).await?;
        ObjectFeed::open(&client, &s.cluster, MANAGED_CLUSTERS).await
    };
    match subscribed(joined_settings(bootstrap, s)).await {
        Ok(_) => false,
        Err(e) if crate::grpc::credentials_refused(&e) => true,
        Err(_) => subscribed(bootstrap.clone()).await.is_ok(),
    }
}

/// The bootstrap's hub, reached with the certificate the join kept instead of the bootstrap's
/// own certificate or token.
fn joined_settings(bootstrap: &HubSettings, s: &JoinSettings) -> HubSettings {
    let mut settings = bootstrap.clone();
    settings.token = None;
    settings.tls.client_cert = Some(PemSource::File(s.dir.join(super::store::CERT)));
    settings.tls.client_key = Some(PemSource::File(s.dir.join("tls.key")));
    settings
}

/// Creates the ManagedCluster unless the hub has it, naming the spoke's API server. Over gRPC
/// the create is sent at once and "already exists" taken as done: asking first would mean
/// waiting out a silence to learn that the hub has none (a list of nothing sends nothing).
async fn ensure_managed_cluster(feed: &mut ObjectFeed, s: &JoinSettings) -> Result<(), JoinError> {
    let cluster = new_managed_cluster(s);
    match feed
        .write("spec", action::CREATE, &cluster)
        .await
        .map_err(JoinError::Grpc)?
    {
        Ok(()) => {
            tracing::info!(cluster = %s.cluster, "created the ManagedCluster on the hub");
            Ok(())
        }
        // The hub has it (made by an admin, an earlier join or another machine of the pool).
        Err(Refusal::Exists) => Ok(()),
        Err(Refusal::Conflict) => Err(JoinError::Refused {
            what: "creating the ManagedCluster",
            why: "a conflicting write".into(),
        }),
        Err(Refusal::Other(why)) => Err(JoinError::Refused {
            what: "creating the ManagedCluster",
            why,
        }),
    }
}

/// Asks for a certificate over `client` (as whoever it authenticates), waits until it is
/// signed, checks and keeps it. Returns what was issued and the request's name.
async fn obtain(
    s: &JoinSettings,
    client: &crate::grpc::dial::Client,
    endpoint: (String, Option<Vec<u8>>),
) -> Result<(Issued, String), JoinError> {
    let mut feed = ObjectFeed::open(client, &s.cluster, CERTIFICATE_SIGNING_REQUESTS)
        .await
        .map_err(JoinError::Grpc)?;
    let request = csr::request(&s.cluster, &s.agent)?;
    // The server creates the CSR as sent, so the name is ours to make: OCM's agent adds five
    // random characters to `<cluster>-`, as `generateName` would.
    let name = format!("{}-{}", s.cluster, random_suffix());
    let csr = csr_object(s, &name, &request.csr_pem);
    match feed
        .write("spec", action::CREATE, &csr)
        .await
        .map_err(JoinError::Grpc)?
    {
        Ok(()) => tracing::info!(csr = %name, "certificate request sent to the hub over gRPC"),
        Err(Refusal::Exists | Refusal::Conflict) => {
            return Err(JoinError::Refused {
                what: "the certificate request",
                why: format!("a request named {name} exists already"),
            });
        }
        Err(Refusal::Other(why)) => {
            return Err(JoinError::Refused {
                what: "the certificate request",
                why,
            });
        }
    }
    let cert_pem = wait_for(
        &mut feed,
        |ev| issued_in(ev, &name),
        |approved| say_csr_wait(&name, approved),
    )
    .await?;
    let issued = keep(s, request, cert_pem, endpoint).await?;
    Ok((issued, name))
}

/// The CSR as OCM's server creates it: whole, with the cluster and agent labels.
fn csr_object(s: &JoinSettings, name: &str, csr_pem: &str) -> Value {
    json!({
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {
            "name": name,
            "labels": {CLUSTER_NAME_LABEL: s.cluster, AGENT_NAME_LABEL: s.agent},
        },
        "spec": {
            "request": base64::engine::general_purpose::STANDARD.encode(csr_pem),
            "signerName": GRPC_SIGNER,
            "usages": ["digital signature", "key encipherment", "client auth"],
        },
    })
}

/// Five characters from the alphabet Kubernetes' `generateName` uses.
fn random_suffix() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// What an event says of request `name`: its certificate, a denial, whether it is approved
/// (for the wait's message); `None` for other objects.
fn issued_in(ev: &ObjectEvent, name: &str) -> Option<Step<Vec<u8>>> {
    if ev.name() != name {
        return None;
    }
    if ev.deleted() {
        return Some(Step::Failed(JoinError::Denied {
            name: name.to_string(),
            reason: "the request was deleted on the hub".into(),
        }));
    }
    let status = &ev.object["status"];
    let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
    if let Some(c) = conditions
        .iter()
        .find(|c| c["type"] == "Denied" || c["type"] == "Failed")
    {
        return Some(Step::Failed(JoinError::Denied {
            name: name.to_string(),
            reason: format!(
                "{}: {}",
                c["reason"].as_str().unwrap_or_default(),
                c["message"].as_str().unwrap_or_default()
            ),
        }));
    }
    let certificate = status["certificate"]
        .as_str()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .filter(|c| !c.is_empty());
    Some(match certificate {
        Some(cert) => Step::Done(cert),
        None => Step::Waiting {
            approved: conditions.iter().any(|c| c["type"] == "Approved"),
        },
    })
}

/// Waits until the hub accepts the cluster (`spec.hubAcceptsClient`).
async fn wait_accepted(feed: &mut ObjectFeed, cluster: &str) -> Result<(), JoinError> {
    wait_for(
        feed,
        |ev| {
            (ev.name() == cluster).then(|| {
                if ev.object["spec"]["hubAcceptsClient"].as_bool() == Some(true) {
                    Step::Done(())
                } else {
                    Step::Waiting { approved: false }
                }
            })
        },
        |_| {
            tracing::info!(
                cluster,
                "waiting for the hub to accept the cluster (spec.hubAcceptsClient on its ManagedCluster)"
            );
        },
    )
    .await
}

/// Where a wait stands after an event.
enum Step<T> {
    Done(T),
    Failed(JoinError),
    /// Not yet; `approved` tells the message which step is awaited.
    Waiting {
        approved: bool,
    },
}

/// Lists the feed's objects at the pace of a [`Waiting`] and reads what the hub sends until
/// `check` finds the end; `say` tells where it waits, at once and every so often.
async fn wait_for<T>(
    feed: &mut ObjectFeed,
    mut check: impl FnMut(&ObjectEvent) -> Option<Step<T>>,
    mut say: impl FnMut(bool),
) -> Result<T, JoinError> {
    let mut waiting = Waiting::new();
    let mut approved = false;
    loop {
        // A list each look: an event missed (before the subscription was in place, say) is
        // sent again.
        feed.list().await.map_err(JoinError::Grpc)?;
        let next_look = waiting.next_look();
        loop {
            let left = next_look.saturating_duration_since(tokio::time::Instant::now());
            let Some(ev) = feed.next_within(left).await.map_err(JoinError::Grpc)? else {
                break;
            };
            match check(&ev) {
                Some(Step::Done(v)) => return Ok(v),
                Some(Step::Failed(e)) => return Err(e),
                Some(Step::Waiting { approved: a }) => approved = a,
                None => {}
            }
        }
        if waiting.time_to_say() {
            say(approved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: &str, object: Value) -> ObjectEvent {
        ObjectEvent {
            subresource: "spec".into(),
            action: action.into(),
            object,
        }
    }

    #[test]
    fn a_request_event_says_issued_denied_or_waiting() {
        let cert = base64::engine::general_purpose::STANDARD.encode("PEM");
        let issued = event(
            "update_request",
            json!({"metadata": {"name": "c-abcde"}, "status": {"certificate": cert,
                "conditions": [{"type": "Approved", "status": "True"}]}}),
        );
        assert!(matches!(issued_in(&issued, "c-abcde"), Some(Step::Done(c)) if c == b"PEM"));
        assert!(issued_in(&issued, "c-other").is_none());
        let denied = event(
            "update_request",
            json!({"metadata": {"name": "c-abcde"}, "status": {"conditions": [
                {"type": "Denied", "status": "True", "reason": "NotOurs", "message": "no"}]}}),
        );
        assert!(matches!(issued_in(&denied, "c-abcde"),
            Some(Step::Failed(JoinError::Denied { reason, .. })) if reason == "NotOurs: no"));
        let approved = event(
            "update_request",
            json!({"metadata": {"name": "c-abcde"}, "status": {"conditions": [{"type": "Approved"}]}}),
        );
        assert!(matches!(
            issued_in(&approved, "c-abcde"),
            Some(Step::Waiting { approved: true })
        ));
        let gone = event("delete_request", json!({"metadata": {"name": "c-abcde"}}));
        assert!(matches!(issued_in(&gone, "c-abcde"), Some(Step::Failed(_))));
    }

    #[test]
    fn names_end_in_five_generate_name_characters() {
        let a = random_suffix();
        assert_eq!(a.len(), 5);
        assert!(
            a.bytes().all(|c| b"bcdfghjklmnpqrstvwxz2456789".contains(&c)),
            "{a}"
        );
    }
}
