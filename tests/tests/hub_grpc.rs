//! Transport-level tests of the CloudEvents gRPC hub connection against the test hub (no API server).
//!
//! Real sockets and real time: every wait is bounded and fails with a message saying what did
//! not happen; nothing asserts on elapsed wall-clock time.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};
use spokelet::hub::config::{HubSettings, HubUrl, KeepAliveConfig};
use spokelet::hub::tls::{PemSource, TlsOptions};
use spokelet::hub::{GrpcHub, GrpcHubOptions, HubState};
use spokelet::work::manifestwork::{Condition, ManifestWorkStatus};
use spokelet::work::source::{Listing, StatusSink, StatusUpdate, WorkEvent, WorkSource};
use spokelet_e2e::cloudevents_hub::{HubPki, Received, TestHub, TestHubOptions, spec_event};
use spokelet_e2e::pki::CertAndKey;
use spokelet_proto::{Attr, CloudEvent, CloudEventAttributeValue, Data, MANIFEST_BUNDLES};
use tokio_util::sync::CancellationToken;

const CLUSTER: &str = "cluster1";
/// Hang guard for any single wait, not a speed check: generous enough that a loaded CI
/// machine never trips it, short enough that a real hang fails the run with a message.
const WAIT: Duration = Duration::from_secs(300);

/// Polls `f` until it returns Some, or fails the test saying `what` never happened.
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Awaits `fut` with the bound, failing with `what`.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for: {what}"))
}

/// A hub, an agent identity on disk, and the running transport.
struct Fixture {
    /// The hub's PKI, to issue more certificates (rotation).
    pki: HubPki,
    /// The test hub.
    hub: TestHub,
    /// Holds the agent's CA, certificate and key files (rewritten by rotation tests).
    dir: tempfile::TempDir,
    /// The transport under test.
    agent: GrpcHub,
    /// Stops the transport; cancelled on drop so no task outlives its test.
    shutdown: CancellationToken,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn write_identity(dir: &std::path::Path, id: &CertAndKey) -> (PathBuf, PathBuf) {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    // Write to a temporary name and rename, as a secret volume or cert-manager does.
    std::fs::write(dir.join(".tls.crt.tmp"), &id.cert_pem).unwrap();
    std::fs::write(dir.join(".tls.key.tmp"), &id.key_pem).unwrap();
    std::fs::rename(dir.join(".tls.key.tmp"), &key).unwrap();
    std::fs::rename(dir.join(".tls.crt.tmp"), &cert).unwrap();
    (cert, key)
}

fn settings(url: &str, ca_pem: &str, dir: &std::path::Path, id: &CertAndKey) -> HubSettings {
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, ca_pem).unwrap();
    let (cert, key) = write_identity(dir, id);
    HubSettings {
        url: HubUrl::parse(url).unwrap(),
        tls: TlsOptions {
            ca: Some(PemSource::File(ca)),
            client_cert: Some(PemSource::File(cert)),
            client_key: Some(PemSource::File(key)),
            allow_tls12: false,
        },
        token: None,
        keep_alive: KeepAliveConfig::default(),
        cluster_name: CLUSTER.into(),
        agent_id: "agent-1".into(),
        heartbeat_timeout: Duration::from_secs(2),
        insecure_plaintext: false,
    }
}

fn options(settings: HubSettings) -> GrpcHubOptions {
    let mut o = GrpcHubOptions::new(settings);
    o.sync_quiet = Duration::from_millis(300);
    o.sync_max_wait = Duration::from_secs(5);
    o.backoff_min = Duration::from_millis(100);
    o.backoff_max = Duration::from_secs(1);
    o.connect_timeout = Duration::from_secs(5);
    o.publish_timeout = Duration::from_secs(5);
    o
}

impl Fixture {
    async fn start() -> Fixture {
        Self::start_with(|_| {}).await
    }

    async fn start_with(prepare: impl FnOnce(&TestHub)) -> Fixture {
        let pki = HubPki::generate().unwrap();
        let hub = TestHub::start(TestHubOptions::new(&pki).unwrap()).await.unwrap();
        prepare(&hub);
        let dir = tempfile::tempdir().unwrap();
        let id = pki
            .client(CLUSTER, &["system:open-cluster-management:managed-clusters"])
            .unwrap();
        let s = settings(&hub.url(), pki.serving_ca.cert_pem(), dir.path(), &id);
        let shutdown = CancellationToken::new();
        let agent = GrpcHub::start(options(s), shutdown.clone()).unwrap();
        Fixture {
            pki,
            hub,
            dir,
            agent,
            shutdown,
        }
    }

    async fn next(&mut self) -> WorkEvent {
        within("the next work event", self.agent.source.next_event())
            .await
            .expect("work source ended")
    }

    async fn next_upsert(&mut self) -> spokelet::work::manifestwork::ManifestWork {
        match self.next().await {
            WorkEvent::Upsert(w) => *w,
            other => panic!("expected an upsert, got {other:?}"),
        }
    }

    async fn wait_state(&mut self, what: &str, pred: impl FnMut(&HubState) -> bool) -> HubState {
        within(what, self.agent.handle.wait_for(pred)).await
    }
}

fn bundle(cm: &str) -> serde_json::Value {
    serde_json::json!({
        "manifests": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": cm, "namespace": "default"}}],
        "deleteOption": {"propagationPolicy": "Foreground"},
    })
}

fn status(reason: &str) -> ManifestWorkStatus {
    ManifestWorkStatus {
        conditions: vec![Condition {
            type_: "Applied".into(),
            status: "True".into(),
            observed_generation: 1,
            last_transition_time: "2025-01-01T00:00:00Z".into(),
            reason: reason.into(),
            message: String::new(),
        }],
        ..Default::default()
    }
}

fn hash(s: &ManifestWorkStatus) -> String {
    hex::encode(Sha256::digest(serde_json::to_vec(s).unwrap()))
}

fn update(
    w: &spokelet::work::manifestwork::ManifestWork,
    s: ManifestWorkStatus,
    deleted: bool,
) -> StatusUpdate {
    StatusUpdate {
        name: w.metadata.name.clone().unwrap(),
        namespace: w.metadata.namespace.clone(),
        uid: w.metadata.uid.clone(),
        generation: w.metadata.generation.unwrap_or(0),
        status_hash: hash(&s),
        status: s,
        deleted,
    }
}

fn statuses_with_hash(hub: &TestHub, h: &str) -> Vec<Received> {
    hub.statuses()
        .into_iter()
        .filter(|r| r.ext("statushash").as_deref() == Some(h))
        .collect()
}

#[tokio::test]
async fn subscribes_resyncs_and_delivers_create_update_delete() {
    let mut f = Fixture::start_with(|hub| {
        hub.upsert_work(CLUSTER, "w1", bundle("a"));
        hub.upsert_work("other-cluster", "not-ours", bundle("x"));
    })
    .await;

    // The resync answer brings the work that existed before we connected, then Synced.
    let w1 = f.next_upsert().await;
    assert_eq!(w1.metadata.name.as_deref(), Some("w1"));
    assert_eq!(w1.metadata.namespace.as_deref(), Some(CLUSTER));
    let hub_w1 = f.hub.work(CLUSTER, "w1").unwrap();
    assert_eq!(w1.metadata.uid.as_deref(), Some(hub_w1.uid.as_str()));
    assert_eq!(w1.metadata.generation, Some(1));
    assert_eq!(w1.spec.workload.manifests.len(), 1);
    assert!(
        matches!(f.next().await, WorkEvent::Synced(Listing::Quiet)),
        "Synced follows the initial resync"
    );

    let subs = f.hub.subscriptions();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].source, "");
    assert_eq!(subs[0].cluster_name, CLUSTER);
    assert_eq!(subs[0].data_type, MANIFEST_BUNDLES);
    let resync = f.hub.received_of("spec.resync_request");
    assert_eq!(resync.len(), 1);
    assert_eq!(resync[0].ext("clustername").as_deref(), Some(CLUSTER));
    assert_eq!(resync[0].event.source, "agent-1");
    assert_eq!(
        resync[0].json().unwrap(),
        serde_json::json!({"resourceVersions": []})
    );
    assert_eq!(
        resync[0].client_cn.as_deref(),
        Some(CLUSTER),
        "the hub saw our client certificate"
    );

    f.hub.upsert_work(CLUSTER, "w1", bundle("b"));
    let w1b = f.next_upsert().await;
    assert_eq!(w1b.metadata.generation, Some(2));
    assert_eq!(
        w1b.spec.workload.manifests[0].value().unwrap()["metadata"]["name"],
        "b"
    );

    f.hub.upsert_work(CLUSTER, "w2", bundle("c"));
    assert_eq!(f.next_upsert().await.metadata.name.as_deref(), Some("w2"));

    f.hub.delete_work(CLUSTER, "w1").unwrap();
    match f.next().await {
        WorkEvent::Delete(r) => assert_eq!(r.name, "w1"),
        other => panic!("expected delete of w1, got {other:?}"),
    }
    assert_eq!(f.agent.handle.state().sessions, 1);
}

#[tokio::test]
async fn status_carries_every_extension_and_answers_status_resync() {
    let mut f = Fixture::start_with(|hub| {
        hub.upsert_work(CLUSTER, "w1", bundle("a"));
    })
    .await;
    let w1 = f.next_upsert().await;
    let uid = w1.metadata.uid.clone().unwrap();

    let s1 = status("AppliedManifestWorkComplete");
    let h1 = hash(&s1);
    f.agent
        .sink
        .publish(update(&w1, s1.clone(), false))
        .await
        .unwrap();
    let got = eventually("the first status at the hub", || {
        statuses_with_hash(&f.hub, &h1).pop()
    })
    .await;
    assert!(
        got.event.r#type.ends_with(".status.update_request"),
        "{}",
        got.event.r#type
    );
    assert_eq!(got.event.source, "agent-1");
    assert_eq!(got.event.spec_version, "1.0");
    assert_eq!(got.ext("resourceid").as_deref(), Some(uid.as_str()));
    assert_eq!(got.ext("resourceversion").as_deref(), Some("1"));
    assert!(matches!(
        got.event
            .attributes
            .get("ce-resourceversion")
            .and_then(|v| v.attr.as_ref()),
        Some(Attr::CeInteger(1))
    ));
    assert_eq!(got.ext("clustername").as_deref(), Some(CLUSTER));
    assert_eq!(got.ext("originalsource").as_deref(), Some("test-hub"));
    let seq1: u64 = got.ext("sequenceid").unwrap().parse().unwrap();
    let meta: serde_json::Value = serde_json::from_str(&got.ext("metadata").unwrap()).unwrap();
    assert_eq!(meta["name"], "w1");
    assert_eq!(meta["uid"], uid.as_str());
    let ct = got
        .event
        .attributes
        .get("contenttype")
        .and_then(|v| v.attr.as_ref());
    assert!(matches!(ct, Some(Attr::CeString(c)) if c == "application/json"));
    let data = got.json().unwrap();
    assert_eq!(data["conditions"][0]["reason"], "AppliedManifestWorkComplete");
    assert!(data["resourceStatus"].is_array());

    let s2 = status("Changed");
    let h2 = hash(&s2);
    f.agent.sink.publish(update(&w1, s2, false)).await.unwrap();
    let got2 = eventually("the second status", || statuses_with_hash(&f.hub, &h2).pop()).await;
    let seq2: u64 = got2.ext("sequenceid").unwrap().parse().unwrap();
    assert!(seq2 > seq1, "sequence ids increase: {seq1} then {seq2}");

    // Status resync: a current hash gets no answer; a stale one gets a resync_response.
    f.hub.request_status_resync(CLUSTER, &[(uid.clone(), h2.clone())]);
    f.hub
        .request_status_resync(CLUSTER, &[(uid.clone(), "stale".into())]);
    let resp = eventually("a status resync response", || {
        f.hub.received_of("status.resync_response").pop()
    })
    .await;
    assert_eq!(resp.ext("statushash").as_deref(), Some(h2.as_str()));
    assert_eq!(resp.ext("resourceid").as_deref(), Some(uid.as_str()));
    // Both requests were handled in order; the first produced nothing, so exactly one answer.
    // A third (empty = all) request is answered too; wait for it to make the count final.
    f.hub.request_status_resync(CLUSTER, &[]);
    eventually("the answer to the send-all resync", || {
        (f.hub.received_of("status.resync_response").len() == 2).then_some(())
    })
    .await;

    // The final status of a deleted work.
    f.hub.delete_work(CLUSTER, "w1");
    loop {
        match f.next().await {
            WorkEvent::Delete(r) if r.name == "w1" => break,
            WorkEvent::Synced(_) | WorkEvent::Disconnected => continue,
            other => panic!("expected the delete of w1, got {other:?}"),
        }
    }
    let mut gone = ManifestWorkStatus::default();
    gone.conditions.push(Condition {
        type_: "Deleted".into(),
        status: "True".into(),
        reason: "ManifestsDeleted".into(),
        ..Default::default()
    });
    let hd = hash(&gone);
    f.agent.sink.publish(update(&w1, gone, true)).await.unwrap();
    let last = eventually("the Deleted status", || statuses_with_hash(&f.hub, &hd).pop()).await;
    assert_eq!(last.json().unwrap()["conditions"][0]["type"], "Deleted");
}

#[tokio::test]
async fn hub_restart_reconnects_and_resyncs() {
    let mut f = Fixture::start_with(|hub| {
        hub.upsert_work(CLUSTER, "w1", bundle("a"));
        hub.upsert_work(CLUSTER, "w2", bundle("b"));
    })
    .await;
    let mut names = vec![
        f.next_upsert().await.metadata.name.unwrap(),
        f.next_upsert().await.metadata.name.unwrap(),
    ];
    names.sort();
    assert_eq!(names, ["w1", "w2"]);
    assert!(matches!(f.next().await, WorkEvent::Synced(Listing::Quiet)));
    let uid1 = f.hub.work(CLUSTER, "w1").unwrap().uid;
    let uid2 = f.hub.work(CLUSTER, "w2").unwrap().uid;

    f.hub.stop().await;
    f.wait_state("the agent to notice the hub is gone", |s| !s.connected)
        .await;
    // While we are away: w1 is deleted and w2 updated; both events are lost.
    f.hub.delete_work(CLUSTER, "w1");
    f.hub.upsert_work(CLUSTER, "w2", bundle("b2"));
    f.hub.restart().await.unwrap();

    f.wait_state("a second session", |s| s.sessions >= 2).await;
    let mut saw_delete = false;
    let mut saw_update = false;
    while !(saw_delete && saw_update) {
        match f.next().await {
            WorkEvent::Delete(r) => {
                assert_eq!(r.name, "w1");
                assert_eq!(
                    r.uid.as_deref(),
                    Some(uid1.as_str()),
                    "a delete names its work by uid"
                );
                saw_delete = true;
            }
            WorkEvent::Upsert(w) => {
                assert_eq!(w.metadata.name.as_deref(), Some("w2"));
                assert_eq!(w.metadata.generation, Some(2));
                saw_update = true;
            }
            // Each session's resync ends quiet; a broken session says so.
            WorkEvent::Synced(Listing::Quiet) | WorkEvent::Disconnected => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let resync = f.hub.received_of("spec.resync_request");
    assert_eq!(resync.len(), 2);
    let body = resync[1].json().unwrap();
    let mut listed: Vec<(String, i64)> = body["resourceVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["resourceID"].as_str().unwrap().to_string(),
                v["resourceVersion"].as_i64().unwrap(),
            )
        })
        .collect();
    listed.sort();
    let mut want = vec![(uid1, 1), (uid2, 1)];
    want.sort();
    assert_eq!(listed, want, "the resync lists what the agent holds");
}

#[tokio::test]
async fn silent_hub_hits_the_heartbeat_timeout_and_we_reconnect() {
    let mut f = Fixture::start().await;
    f.wait_state("the first session", |s| s.connected && s.sessions == 1)
        .await;
    f.hub.set_silent(true);
    let st = f
        .wait_state("a heartbeat-timeout failure", |s| s.failures >= 1)
        .await;
    assert!(
        st.last_error.as_deref().unwrap_or("").contains("heartbeat"),
        "{st:?}"
    );
    f.hub.set_silent(false);
    f.wait_state("a new session after the timeout", |s| {
        s.connected && s.sessions >= 2
    })
    .await;
    // The new stream works.
    f.hub.upsert_work(CLUSTER, "after", bundle("x"));
    loop {
        match f.next().await {
            WorkEvent::Upsert(w) => {
                assert_eq!(w.metadata.name.as_deref(), Some("after"));
                break;
            }
            WorkEvent::Synced(_) | WorkEvent::Disconnected => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn status_produced_while_disconnected_is_delivered_once_latest_only() {
    let mut f = Fixture::start_with(|hub| {
        hub.upsert_work(CLUSTER, "w1", bundle("a"));
        hub.upsert_work(CLUSTER, "w2", bundle("b"));
    })
    .await;
    let a = f.next_upsert().await;
    let b = f.next_upsert().await;
    f.wait_state("Synced", |s| s.synced).await;

    f.hub.stop().await;
    f.wait_state("disconnected", |s| !s.connected).await;
    let (sa1, sa2, sa3, sb) = (status("A1"), status("A2"), status("A3"), status("B1"));
    for s in [&sa1, &sa2, &sa3] {
        f.agent.sink.publish(update(&a, s.clone(), false)).await.unwrap();
    }
    f.agent.sink.publish(update(&b, sb.clone(), false)).await.unwrap();
    assert!(f.hub.statuses().is_empty());
    f.hub.restart().await.unwrap();

    eventually("the latest status of w1", || {
        statuses_with_hash(&f.hub, &hash(&sa3)).pop()
    })
    .await;
    eventually("the status of w2", || {
        statuses_with_hash(&f.hub, &hash(&sb)).pop()
    })
    .await;
    // A marker status sent after everything queued: once it is in, the outbox (FIFO) was drained.
    let marker = status("Marker");
    f.agent
        .sink
        .publish(update(&b, marker.clone(), false))
        .await
        .unwrap();
    eventually("the marker status", || {
        statuses_with_hash(&f.hub, &hash(&marker)).pop()
    })
    .await;

    assert_eq!(
        statuses_with_hash(&f.hub, &hash(&sa1)).len(),
        0,
        "superseded status was sent"
    );
    assert_eq!(
        statuses_with_hash(&f.hub, &hash(&sa2)).len(),
        0,
        "superseded status was sent"
    );
    assert_eq!(
        statuses_with_hash(&f.hub, &hash(&sa3)).len(),
        1,
        "latest status sent once"
    );
    assert_eq!(
        statuses_with_hash(&f.hub, &hash(&sb)).len(),
        1,
        "w2 status sent once"
    );
}

fn der_of(pem: &str) -> Vec<u8> {
    rustls_pemfile_certs(pem)
}

fn rustls_pemfile_certs(pem: &str) -> Vec<u8> {
    // Base64 between the PEM armour lines.
    use base64::Engine as _;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

#[tokio::test]
async fn rotated_certificate_is_used_by_new_handshakes_without_dropping_the_stream() {
    let mut f = Fixture::start().await;
    f.wait_state("the first session", |s| s.connected).await;
    let first = f.hub.handshakes();
    assert_eq!(first.len(), 1);

    let rotated = f
        .pki
        .client(CLUSTER, &["system:open-cluster-management:managed-clusters"])
        .unwrap();
    write_identity(f.dir.path(), &rotated);

    // The established stream keeps working: no reconnect, events still flow.
    f.hub.upsert_work(CLUSTER, "after-rotation", bundle("x"));
    loop {
        match f.next().await {
            WorkEvent::Upsert(w) => {
                assert_eq!(w.metadata.name.as_deref(), Some("after-rotation"));
                break;
            }
            WorkEvent::Synced(_) | WorkEvent::Disconnected => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        f.agent.handle.state().sessions,
        1,
        "rotation must not drop the stream"
    );
    assert_eq!(
        f.hub.handshakes().len(),
        1,
        "no new handshake without a reconnect"
    );

    // The next handshake presents the new certificate.
    f.hub.restart().await.unwrap();
    f.wait_state("a reconnect", |s| s.connected && s.sessions >= 2)
        .await;
    let hs = f.hub.handshakes();
    let last = hs.iter().rev().find(|h| h.error.is_none()).unwrap();
    assert_eq!(
        last.client_cert_der.as_deref(),
        Some(der_of(&rotated.cert_pem).as_slice())
    );
    assert_ne!(first[0].client_cert_der, last.client_cert_der);
}

/// Starts an agent with the given pieces and waits until it has failed `n` times.
async fn failing_agent(hub: &TestHub, ca_pem: &str, id: &CertAndKey, url: Option<String>) -> HubState {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&url.unwrap_or_else(|| hub.url()), ca_pem, dir.path(), id);
    let shutdown = CancellationToken::new();
    let mut agent = GrpcHub::start(options(s), shutdown.clone()).unwrap();
    let st = within("a refused connection", agent.handle.wait_for(|s| s.failures >= 2)).await;
    shutdown.cancel();
    // Shown with --nocapture: the error line an operator would see.
    eprintln!("agent error: {:?}", st.last_error);
    assert_eq!(st.sessions, 0, "no session may be established: {st:?}");
    st
}

#[tokio::test]
async fn untrusted_hub_certificate_is_refused() {
    let pki = HubPki::generate().unwrap();
    let hub = TestHub::start(TestHubOptions::new(&pki).unwrap()).await.unwrap();
    let id = pki.client(CLUSTER, &[]).unwrap();
    let st = failing_agent(&hub, pki.other_ca.cert_pem(), &id, None).await;
    let err = st.last_error.unwrap();
    assert!(
        err.contains("invalid peer certificate") && err.contains("UnknownIssuer"),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_server_name_is_refused() {
    let pki = HubPki::generate().unwrap();
    let mut opts = TestHubOptions::new(&pki).unwrap();
    opts.serving = pki.serving_for(&["hub.example.com"]).unwrap();
    let hub = TestHub::start(opts).await.unwrap();
    let id = pki.client(CLUSTER, &[]).unwrap();
    let st = failing_agent(&hub, pki.serving_ca.cert_pem(), &id, None).await;
    let err = st.last_error.unwrap();
    assert!(
        err.contains("invalid peer certificate") && err.to_lowercase().contains("name"),
        "{err}"
    );
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let pki = HubPki::generate().unwrap();
    let hub = TestHub::start(TestHubOptions::new(&pki).unwrap()).await.unwrap();
    let id = pki.expired_client(CLUSTER).unwrap();
    let st = failing_agent(&hub, pki.serving_ca.cert_pem(), &id, None).await;
    let err = st.last_error.unwrap();
    assert!(
        err.contains("CertificateExpired"),
        "agent error names the reason: {err}"
    );
    let hs = hub.handshakes();
    assert!(hs.iter().all(|h| h.error.is_some()), "{hs:?}");
    assert!(
        hs[0].error.as_deref().unwrap().to_lowercase().contains("expired"),
        "{hs:?}"
    );
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let pki = HubPki::generate().unwrap();
    let hub = TestHub::start(TestHubOptions::new(&pki).unwrap()).await.unwrap();
    let id = pki.foreign_client(CLUSTER).unwrap();
    let st = failing_agent(&hub, pki.serving_ca.cert_pem(), &id, None).await;
    assert!(st.last_error.is_some());
    let hs = hub.handshakes();
    assert!(
        hs[0].error.as_deref().unwrap().contains("UnknownIssuer"),
        "{hs:?}"
    );
}

#[tokio::test]
async fn plaintext_is_refused_without_opt_in() {
    let pki = HubPki::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let id = pki.client(CLUSTER, &[]).unwrap();
    let s = settings("http://127.0.0.1:1", pki.serving_ca.cert_pem(), dir.path(), &id);
    let err = GrpcHub::start(options(s), CancellationToken::new()).unwrap_err();
    assert!(err.to_string().contains("plaintext"), "{err}");
}

fn with_attr(mut ev: CloudEvent, key: &str, v: &str) -> CloudEvent {
    ev.attributes.insert(
        key.into(),
        CloudEventAttributeValue {
            attr: Some(Attr::CeString(v.into())),
        },
    );
    ev
}

#[tokio::test]
async fn malformed_events_are_logged_reported_and_the_stream_keeps_flowing() {
    let mut f = Fixture::start().await;
    f.wait_state("the first session", |s| s.connected).await;
    assert!(matches!(f.next().await, WorkEvent::Synced(Listing::Quiet)));
    let mk = |uid: &str| spokelet_e2e::cloudevents_hub::HubWork {
        name: format!("bad-{uid}"),
        cluster: CLUSTER.into(),
        uid: uid.into(),
        generation: 1,
        labels: Default::default(),
        bundle: bundle("x"),
    };
    // Bad JSON.
    let mut bad_json = spec_event("test-hub", &mk("u-json"), "create_request");
    bad_json.data = Some(Data::BinaryData(b"{not json".to_vec()));
    // Unknown type.
    let mut unknown = spec_event("test-hub", &mk("u-type"), "create_request");
    unknown.r#type = format!("{MANIFEST_BUNDLES}.spec.frobnicate");
    // Missing resourceid.
    let mut no_id = spec_event("test-hub", &mk("u-noid"), "create_request");
    no_id.attributes.remove("ce-resourceid");
    // Wrong cluster name.
    let wrong = with_attr(
        spec_event("test-hub", &mk("u-wrong"), "create_request"),
        "ce-clustername",
        "cluster2",
    );
    // 5 MB payload.
    let mut huge = spec_event("test-hub", &mk("u-huge"), "create_request");
    huge.data = Some(Data::BinaryData(vec![b' '; 5 * 1024 * 1024]));
    for ev in [bad_json, unknown, no_id, wrong, huge] {
        assert_eq!(f.hub.send_raw(CLUSTER, ev), 1);
    }
    // A valid event afterwards still arrives. Before it, the engine hears only of the broken
    // works it can identify, as unreadable (it leaves their objects alone and reports why).
    f.hub.upsert_work(CLUSTER, "good", bundle("g"));
    let mut unreadable = Vec::new();
    let w = loop {
        match f.next().await {
            WorkEvent::Upsert(w) => break w,
            WorkEvent::Unreadable { work, reason, .. } => {
                assert!(reason.contains("InvalidManifestBundle"), "{reason}");
                assert_eq!(
                    work.name,
                    format!("bad-{}", work.uid.as_deref().unwrap()),
                    "named by its metadata"
                );
                unreadable.push(work.uid.unwrap());
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(w.metadata.name.as_deref(), Some("good"));
    assert_eq!(
        f.agent.handle.state().sessions,
        1,
        "malformed events must not break the stream"
    );
    // Nothing for the event of another cluster, an event type we do not know, or one without id.
    assert_eq!(unreadable, ["u-json", "u-huge"]);
}

#[tokio::test]
async fn bearer_token_from_file_is_sent_and_reread_on_connect() {
    let pki = HubPki::generate().unwrap();
    let hub = TestHub::start(TestHubOptions::new(&pki).unwrap()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let id = pki.client(CLUSTER, &[]).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "first-token\n").unwrap();
    let mut s = settings(&hub.url(), pki.serving_ca.cert_pem(), dir.path(), &id);
    s.token = Some(spokelet::hub::config::TokenSource::File(token.clone()));
    let shutdown = CancellationToken::new();
    let mut agent = GrpcHub::start(options(s), shutdown.clone()).unwrap();
    let auth_of_resync = |n: usize| {
        let r = hub.received_of("spec.resync_request");
        (r.len() >= n).then(|| r[n - 1].authorization.clone())
    };
    let first = eventually("the first resync request", || auth_of_resync(1)).await;
    assert_eq!(first.as_deref(), Some("Bearer first-token"));
    std::fs::write(&token, "second-token").unwrap();
    hub.restart().await.unwrap();
    within("a reconnect", agent.handle.wait_for(|s| s.sessions >= 2)).await;
    let second = eventually("the second resync request", || auth_of_resync(2)).await;
    assert_eq!(second.as_deref(), Some("Bearer second-token"));
    shutdown.cancel();
}

#[tokio::test]
async fn ca_bundle_change_applies_to_new_connections() {
    let pki = HubPki::generate().unwrap();
    let hub = TestHub::start(TestHubOptions::new(&pki).unwrap()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let id = pki.client(CLUSTER, &[]).unwrap();
    // Start with the wrong CA: every connect fails.
    let s = settings(&hub.url(), pki.other_ca.cert_pem(), dir.path(), &id);
    let shutdown = CancellationToken::new();
    let mut agent = GrpcHub::start(options(s), shutdown.clone()).unwrap();
    within("a refused connect", agent.handle.wait_for(|s| s.failures >= 1)).await;
    // Fix the CA on disk; the next attempt picks it up without a restart.
    let tmp = dir.path().join(".ca.tmp");
    std::fs::write(&tmp, pki.serving_ca.cert_pem()).unwrap();
    std::fs::rename(&tmp, dir.path().join("ca.crt")).unwrap();
    let st = within(
        "a session with the new CA",
        agent.handle.wait_for(|s| s.connected),
    )
    .await;
    assert_eq!(st.sessions, 1);
    shutdown.cancel();
}

#[tokio::test]
async fn queued_statuses_are_flushed_on_shutdown() {
    let mut f = Fixture::start_with(|hub| {
        hub.upsert_work(CLUSTER, "w1", bundle("a"));
    })
    .await;
    let w1 = f.next_upsert().await;
    let last = status("FinalBeforeShutdown");
    f.agent
        .sink
        .publish(update(&w1, last.clone(), false))
        .await
        .unwrap();
    f.shutdown.cancel();
    within("the transport to stop", &mut f.agent.task).await.unwrap();
    assert_eq!(
        statuses_with_hash(&f.hub, &hash(&last)).len(),
        1,
        "the queued status went out before exit"
    );
}

#[tokio::test]
async fn insecure_plaintext_connects_only_when_opted_in() {
    let pki = HubPki::generate().unwrap();
    let mut opts = TestHubOptions::new(&pki).unwrap();
    opts.plaintext = true;
    let hub = TestHub::start(opts).await.unwrap();
    assert!(hub.url().starts_with("http://"));
    let dir = tempfile::tempdir().unwrap();
    let id = pki.client(CLUSTER, &[]).unwrap();
    let mut s = settings(&hub.url(), pki.serving_ca.cert_pem(), dir.path(), &id);
    s.insecure_plaintext = true;
    let shutdown = CancellationToken::new();
    let mut agent = GrpcHub::start(options(s), shutdown.clone()).unwrap();
    within("a plaintext session", agent.handle.wait_for(|s| s.connected)).await;
    hub.upsert_work(CLUSTER, "w", bundle("a"));
    let ev = within("the work", agent.source.next_event()).await.unwrap();
    assert!(matches!(ev, WorkEvent::Upsert(_)), "{ev:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn tls12_only_hub_needs_an_explicit_opt_in() {
    let pki = HubPki::generate().unwrap();
    let mut opts = TestHubOptions::new(&pki).unwrap();
    opts.tls12_only = true;
    let hub = TestHub::start(opts).await.unwrap();
    let id = pki.client(CLUSTER, &[]).unwrap();
    // Default: TLS 1.3 only, so the handshake fails.
    let st = failing_agent(&hub, pki.serving_ca.cert_pem(), &id, None).await;
    let err = st.last_error.unwrap();
    assert!(err.contains("TLS handshake"), "{err}");
    // minTLSVersion "1.2" (allow_tls12) connects.
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&hub.url(), pki.serving_ca.cert_pem(), dir.path(), &id);
    s.tls.allow_tls12 = true;
    let shutdown = CancellationToken::new();
    let mut agent = GrpcHub::start(options(s), shutdown.clone()).unwrap();
    within("a TLS 1.2 session", agent.handle.wait_for(|s| s.connected)).await;
    shutdown.cancel();
}

#[tokio::test]
async fn a_status_the_hub_refuses_as_too_large_does_not_hold_up_the_others() {
    let mut f = Fixture::start_with(|hub| {
        hub.upsert_work(CLUSTER, "big", bundle("a"));
        hub.upsert_work(CLUSTER, "small", bundle("b"));
    })
    .await;
    let mut works = [f.next_upsert().await, f.next_upsert().await];
    works.sort_by_key(|w| w.metadata.name.clone());
    let [big, small] = &works[..] else { unreachable!() };
    f.wait_state("synced", |s| s.synced).await;
    // A Go gRPC hub refuses messages over 4 MiB with RESOURCE_EXHAUSTED.
    f.hub.set_max_status_bytes(4 * 1024 * 1024);
    let mut huge = status("Huge");
    huge.conditions[0].message = "x".repeat(5 * 1024 * 1024);
    let huge_hash = hash(&huge);
    f.agent.sink.publish(update(big, huge, false)).await.unwrap();
    let fine = status("Small");
    let fine_hash = hash(&fine);
    f.agent.sink.publish(update(small, fine, false)).await.unwrap();

    // Refused first, then the next work's status still goes out, on the same connection.
    eventually("the small work's status on the hub", || {
        statuses_with_hash(&f.hub, &fine_hash).pop()
    })
    .await;
    assert!(
        statuses_with_hash(&f.hub, &huge_hash).is_empty(),
        "the hub accepted nothing over its limit"
    );
    assert_eq!(
        f.agent.handle.state().sessions,
        1,
        "a refused status must not break the connection"
    );
    // Later statuses of the refused work go through when they fit.
    let smaller = status("Smaller");
    let smaller_hash = hash(&smaller);
    f.agent.sink.publish(update(big, smaller, false)).await.unwrap();
    eventually("the big work's next status", || {
        statuses_with_hash(&f.hub, &smaller_hash).pop()
    })
    .await;
    assert_eq!(f.agent.handle.state().sessions, 1);
}
