//! Flux `OCIRepository` + `Kustomization` in works, reconciled by the engine itself against
//! the real registry and the real API server: pulled, built, applied, updated, pruned, drift
//! corrected, and the last good revision kept through a dead registry and a broken build.

use std::path::Path;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use oci_client::secrets::RegistryAuth;
use serde_json::{Value, json};
use spokelet::work::flux::{FluxExpander, FluxObjects};
use spokelet::work::manifestwork::FieldValue;
use spokelet_artifact::registry::Registry;
use spokelet_artifact::unpack::UnpackLimits;
use spokelet_e2e::{OciRegistry, unique_name};

mod support;
use support::engine::*;

fn native(cache: &Path) -> FluxObjects {
    FluxObjects::Native {
        cache: cache.to_path_buf(),
        unpack: UnpackLimits::default(),
        // The test registry is plain HTTP on loopback: allowed by the agent's opt-in.
        insecure: spokelet::work::flux::InsecureRegistries {
            allow: true,
            hosts: Vec::new(),
        },
    }
}

/// An engine reconciling Flux objects natively, with a cache of its own, synced, and a fresh
/// namespace `<prefix>-...` on the spoke.
async fn flux_agent(prefix: &str) -> (Agent, tempfile::TempDir, String) {
    flux_agent_with(prefix, true).await
}

/// [`flux_agent`], with plain-HTTP and local registries allowed or not.
async fn flux_agent_with(prefix: &str, allow_insecure: bool) -> (Agent, tempfile::TempDir, String) {
    let cache = tempfile::tempdir().unwrap();
    let hub = unique_name("flux-hub");
    let mut cfg = test_config(&hub);
    let mut mode = native(cache.path());
    if let FluxObjects::Native { insecure, .. } = &mut mode {
        insecure.allow = allow_insecure;
    }
    cfg.expander = FluxExpander::for_setting(&mode);
    let agent = Agent::start_with(&hub, cfg).await;
    agent.synced();
    let ns = namespace(&agent.client, prefix).await;
    (agent, cache, ns)
}

fn oci_repository(name: &str, url: &str, tag: &str) -> Value {
    json!({"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "OCIRepository",
           "metadata": {"name": name, "namespace": "flux-system"},
           "spec": {"url": url, "ref": {"tag": tag}, "insecure": true, "interval": "1s"}})
}

fn kustomization(name: &str, source: &str, target_ns: &str, extra: Value) -> Value {
    let mut spec = json!({"sourceRef": {"kind": "OCIRepository", "name": source},
                          "path": "./deploy", "prune": true, "interval": "10m", "retryInterval": "1s",
                          "targetNamespace": target_ns});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    json!({"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
           "metadata": {"name": name, "namespace": "flux-system"}, "spec": spec})
}

/// Writes `files` (path → text) into a fresh directory and pushes it as `url:tag`.
async fn push(url: &str, tag: &str, files: &[(&str, String)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let client = Registry::new(true, RegistryAuth::Anonymous);
    client
        .push_dir(url, tag, dir.path(), "https://example.invalid/app", tag)
        .await
        .unwrap()
        .to_string()
}

fn cm_yaml(name: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: \"{value}\"\n")
}

fn string_feedback(v: Option<FieldValue>) -> Option<String> {
    v.and_then(|f| f.string)
}

async fn cm_value(client: &kube::Client, ns: &str, name: &str) -> Option<String> {
    get_cm(client, ns, name)
        .await
        .and_then(|c| c.data)
        .and_then(|d| d.get("value").cloned())
}

#[tokio::test]
async fn an_artifact_is_applied_updated_pruned_corrected_and_kept_through_a_dead_registry() {
    let registry = OciRegistry::start().await.unwrap();
    let url = format!("oci://{}/apps/web", registry.host());
    let (mut agent, _cache, ns) = flux_agent("flux").await;
    let client = agent.client.clone();

    let v1 = push(
        &url,
        "stable",
        &[
            ("deploy/a.yaml", cm_yaml("a", "one")),
            ("deploy/b.yaml", cm_yaml("b", "one")),
            ("README.md", "not applied\n".into()),
        ],
    )
    .await;
    let w = work(
        "flux-app",
        1,
        vec![
            oci_repository("web", &url, "stable"),
            kustomization("web", "web", &ns, json!({})),
        ],
    );
    agent.upsert(&w);
    let revision1 = format!("stable@{v1}");
    let r1 = revision1.clone();
    let u = agent
        .wait("flux-app", "the Kustomization Ready at revision 1", move |u| {
            string_feedback(feedback(u, 1, "lastAppliedRevision")).as_deref() == Some(r1.as_str())
        })
        .await;
    assert_eq!(manifest_cond(&u, 0, "Ready").status, "True", "{:?}", u.status);
    assert_eq!(manifest_cond(&u, 1, "Ready").reason, "ReconciliationSucceeded");
    assert_eq!(
        string_feedback(feedback(&u, 0, "artifactRevision")),
        Some(revision1.clone())
    );
    assert_eq!(feedback(&u, 1, "inventoryCount").and_then(|f| f.integer), Some(2));
    assert_eq!(manifest_cond(&u, 1, "Applied").status, "True");
    assert_eq!(
        u.status.resource_status.manifests.len(),
        2,
        "built objects are not listed as manifests"
    );
    assert_eq!(cm_value(&client, &ns, "a").await.as_deref(), Some("one"));
    let a = get_cm(&client, &ns, "a").await.unwrap();
    let labels = a.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels.get("kustomize.toolkit.fluxcd.io/name").map(String::as_str),
        Some("web")
    );
    assert!(
        a.metadata
            .owner_references
            .unwrap_or_default()
            .iter()
            .any(|o| o.kind == "AppliedManifestWork"),
        "owned by the work's record like an inline object"
    );

    // A hand edit of an object from the artifact is put back, as for inline objects.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"value": "edited"}})),
    )
    .await
    .unwrap();
    let (c, n) = (client.clone(), ns.clone());
    until("the edited ConfigMap put back", || {
        let (c, n) = (c.clone(), n.clone());
        async move {
            match cm_value(&c, &n, "a").await.as_deref() {
                Some("one") => Ok(()),
                other => Err(format!("value is {other:?}")),
            }
        }
    })
    .await;

    // A new artifact under the same tag: a changed, b gone (pruned), c new.
    let v2 = push(
        &url,
        "stable",
        &[
            ("deploy/a.yaml", cm_yaml("a", "two")),
            ("deploy/c.yaml", cm_yaml("c", "two")),
        ],
    )
    .await;
    let revision2 = format!("stable@{v2}");
    let r2 = revision2.clone();
    agent
        .wait("flux-app", "revision 2 applied", move |u| {
            string_feedback(feedback(u, 1, "lastAppliedRevision")).as_deref() == Some(r2.as_str())
        })
        .await;
    assert_eq!(cm_value(&client, &ns, "a").await.as_deref(), Some("two"));
    assert_eq!(cm_value(&client, &ns, "c").await.as_deref(), Some("two"));
    cm_gone(&client, &ns, "b", "b pruned once it left the artifact").await;

    // The registry dies: the source says so, and the objects stay applied and corrected.
    registry.stop().await;
    let u = agent
        .wait("flux-app", "the source failing", |u| {
            manifest_cond_opt(u, 0, "Ready").is_some_and(|c| c.status == "False")
        })
        .await;
    let ready = manifest_cond(&u, 0, "Ready");
    assert_eq!(ready.reason, "OCIArtifactPullFailed", "{ready:?}");
    assert!(
        ready
            .message
            .contains(&format!("still serving revision {revision2}")),
        "{ready:?}"
    );
    cms.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"value": "edited"}})),
    )
    .await
    .unwrap();
    let (c, n) = (client.clone(), ns.clone());
    until("c put back while the registry is down", || {
        let (c, n) = (c.clone(), n.clone());
        async move {
            match cm_value(&c, &n, "c").await.as_deref() {
                Some("two") => Ok(()),
                other => Err(format!("value is {other:?}")),
            }
        }
    })
    .await;
    assert_eq!(cm_value(&client, &ns, "a").await.as_deref(), Some("two"));
    agent.stop().await;
}

#[tokio::test]
async fn a_kustomization_with_an_unsupported_field_applies_nothing_and_other_works_go_on() {
    let registry = OciRegistry::start().await.unwrap();
    let url = format!("oci://{}/apps/generated", registry.host());
    let (mut agent, _cache, ns) = flux_agent("flux-bad").await;
    let client = agent.client.clone();
    push(
        &url,
        "v1",
        &[
            ("deploy/a.yaml", cm_yaml("a", "one")),
            (
                "deploy/kustomization.yaml",
                "resources: [a.yaml]\nconfigMapGenerator:\n- name: gen\n  literals: [k=v]\n".into(),
            ),
        ],
    )
    .await;
    agent.upsert(&work(
        "flux-bad",
        1,
        vec![
            oci_repository("gen", &url, "v1"),
            kustomization("gen", "gen", &ns, json!({})),
        ],
    ));
    agent.upsert(&work(
        "inline",
        1,
        vec![cm(&ns, "inline", json!({"value": "ok"}))],
    ));
    let u = agent
        .wait("flux-bad", "the Kustomization failing", |u| {
            manifest_cond_opt(u, 1, "Ready").is_some_and(|c| c.status == "False")
        })
        .await;
    let applied = manifest_cond(&u, 1, "Applied");
    assert_eq!(applied.reason, "UnsupportedKustomizeField", "{applied:?}");
    assert!(applied.message.contains("configMapGenerator"), "{applied:?}");
    assert!(
        get_cm(&client, &ns, "a").await.is_none(),
        "nothing of a failed build is applied"
    );
    agent.wait_applied("inline", 1).await;
    assert!(get_cm(&client, &ns, "inline").await.is_some());
    agent.stop().await;
    registry.stop().await;
}

#[tokio::test]
async fn with_flux_objects_passed_through_they_go_to_the_api_server() {
    let hub = unique_name("flux-hub");
    let mut cfg = test_config(&hub);
    cfg.expander = FluxExpander::for_setting(&FluxObjects::Passthrough);
    let mut agent = Agent::start_with(&hub, cfg).await;
    agent.synced();
    agent.upsert(&work(
        "flux-passthrough",
        1,
        vec![oci_repository("web", "oci://127.0.0.1:1/x", "v1")],
    ));
    // The spoke runs no Flux, so the API server does not know the kind: proof it was sent there.
    let u = agent
        .wait("flux-passthrough", "Applied=False", |u| {
            manifest_cond_opt(u, 0, "Applied").is_some_and(|c| c.status == "False")
        })
        .await;
    assert_eq!(manifest_cond(&u, 0, "Applied").reason, "UnknownKind");
    assert!(manifest_cond_opt(&u, 0, "Ready").is_none());
    agent.stop().await;
}

/// Substitution, commonMetadata and a failed re-build that keeps the last good objects.
#[tokio::test]
async fn post_build_variables_apply_and_a_broken_revision_keeps_the_last_good_one() {
    let registry = OciRegistry::start().await.unwrap();
    let url = format!("oci://{}/apps/vars", registry.host());
    let (mut agent, _cache, ns) = flux_agent("flux-vars").await;
    let client = agent.client.clone();
    push(
        &url,
        "v1",
        &[("deploy/a.yaml", cm_yaml("a", "${GREETING}-${MISSING:=fallback}"))],
    )
    .await;
    let extra = json!({"postBuild": {"substitute": {"GREETING": "hello"}},
                       "commonMetadata": {"labels": {"team": "ml"}}});
    let mut w = work(
        "flux-vars",
        1,
        vec![
            oci_repository("vars", &url, "v1"),
            kustomization("vars", "vars", &ns, extra.clone()),
        ],
    );
    agent.upsert(&w);
    agent
        .wait("flux-vars", "Ready", |u| {
            manifest_cond_opt(u, 1, "Ready").is_some_and(|c| c.status == "True")
        })
        .await;
    assert_eq!(
        cm_value(&client, &ns, "a").await.as_deref(),
        Some("hello-fallback")
    );
    let labels = get_cm(&client, &ns, "a")
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap_or_default();
    assert_eq!(labels.get("team").map(String::as_str), Some("ml"));

    // v2 is broken YAML: the build fails and says so; a stays as v1 made it.
    push(&url, "v2", &[("deploy/a.yaml", "kind: [unclosed\n".into())]).await;
    w.spec.workload.manifests[0] = oci_repository("vars", &url, "v2").into();
    w.metadata.generation = Some(2);
    agent.upsert(&w);
    let u = agent
        .wait("flux-vars", "the build failing", |u| {
            u.generation == 2 && manifest_cond_opt(u, 1, "Ready").is_some_and(|c| c.status == "False")
        })
        .await;
    let ready = manifest_cond(&u, 1, "Ready");
    assert_eq!(ready.reason, "BuildFailed", "{ready:?}");
    assert!(
        ready.message.contains("deploy/a.yaml") && ready.message.contains("stay applied"),
        "{ready:?}"
    );
    assert_eq!(
        cm_value(&client, &ns, "a").await.as_deref(),
        Some("hello-fallback")
    );
    agent.stop().await;
    registry.stop().await;
}

/// `v` moved to namespace `ns` (where its Secrets are read).
fn in_namespace(mut v: Value, ns: &str) -> Value {
    v["metadata"]["namespace"] = json!(ns);
    v
}

async fn secret(client: &kube::Client, ns: &str, name: &str, type_: &str, data: &[(&str, String)]) {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    let s = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        type_: Some(type_.into()),
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&kube::api::PostParams::default(), &s)
        .await
        .unwrap();
}

/// A registry with htpasswd users and a certificate from its own CA: reached with a
/// docker-config `secretRef` and a `certSecretRef` CA, refused clearly with a wrong password
/// or without the CA.
#[tokio::test]
async fn a_registry_with_a_password_and_its_own_ca_is_reached_through_secret_refs() {
    use spokelet_artifact::registry::RegistryAuth as Auth;
    use spokelet_e2e::RegistryOptions;
    let registry = OciRegistry::start_with(&RegistryOptions {
        users: vec![("puller".into(), "s3cret".into())],
        tls: true,
        ..RegistryOptions::default()
    })
    .await
    .unwrap();
    let ca = registry.ca_pem().unwrap().to_string();
    let url = format!("oci://{}/apps/private", registry.host());
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("deploy")).unwrap();
    std::fs::write(src.path().join("deploy/a.yaml"), cm_yaml("private", "yes")).unwrap();
    let pusher = Registry::with_roots(
        false,
        Auth::Basic("puller".into(), "s3cret".into()),
        Some(ca.as_bytes()),
    );
    pusher
        .push_dir(&url, "v1", src.path(), "src", "v1")
        .await
        .unwrap();

    let (mut agent, _cache, ns) = flux_agent("flux-auth").await;
    let client = agent.client.clone();
    let config = |password: &str| {
        json!({"auths": {registry.host(): {"username": "puller", "password": password}}}).to_string()
    };
    secret(
        &client,
        &ns,
        "regcred",
        "kubernetes.io/dockerconfigjson",
        &[(".dockerconfigjson", config("s3cret"))],
    )
    .await;
    secret(
        &client,
        &ns,
        "badcred",
        "kubernetes.io/dockerconfigjson",
        &[(".dockerconfigjson", config("wrong"))],
    )
    .await;
    secret(&client, &ns, "regca", "Opaque", &[("ca.crt", ca.clone())]).await;
    let repo = |secret: &str, ca: bool| {
        let mut r = in_namespace(oci_repository("private", &url, "v1"), &ns);
        r["spec"]["insecure"] = json!(false);
        r["spec"]["secretRef"] = json!({"name": secret});
        if ca {
            r["spec"]["certSecretRef"] = json!({"name": "regca"});
        }
        r
    };
    agent.upsert(&work(
        "private-ok",
        1,
        vec![
            repo("regcred", true),
            in_namespace(kustomization("private", "private", &ns, json!({})), &ns),
        ],
    ));
    agent.upsert(&work("private-badpass", 1, vec![repo("badcred", true)]));
    agent.upsert(&work("private-noca", 1, vec![repo("regcred", false)]));
    agent
        .wait("private-ok", "Ready", |u| {
            manifest_cond_opt(u, 1, "Ready").is_some_and(|c| c.status == "True")
        })
        .await;
    assert_eq!(cm_value(&client, &ns, "private").await.as_deref(), Some("yes"));
    let u = agent
        .wait("private-badpass", "the source failing", |u| {
            manifest_cond_opt(u, 0, "Ready").is_some_and(|c| c.status == "False")
        })
        .await;
    let ready = manifest_cond(&u, 0, "Ready");
    assert_eq!(ready.reason, "AuthenticationFailed", "{ready:?}");
    let u = agent
        .wait("private-noca", "the source failing", |u| {
            manifest_cond_opt(u, 0, "Ready").is_some_and(|c| c.status == "False")
        })
        .await;
    let ready = manifest_cond(&u, 0, "Ready");
    assert_eq!(ready.reason, "OCIArtifactPullFailed", "{ready:?}");
    agent.stop().await;
    registry.stop().await;
}

/// Pushes a cosign signature of `manifest` (in `repo`, `host/path`) made with `key` to the
/// `sha256-<hex>.sig` tag, in the layout cosign writes: one simple-signing payload layer with
/// its base64 signature as an annotation.
async fn push_signature(host: &str, repo: &str, manifest: &str, key: &p256::ecdsa::SigningKey) {
    use base64::Engine;
    use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
    use p256::ecdsa::signature::Signer;
    use spokelet_artifact::digest::Digest;
    use spokelet_artifact::signature::{
        SIGNATURE_ANNOTATION, SIMPLE_SIGNING_MEDIA_TYPE, payload, signature_tag,
    };
    let digest = Digest::parse(manifest).unwrap();
    let body = payload(&format!("{host}/{repo}"), &digest);
    let sig: p256::ecdsa::Signature = key.sign(&body);
    let annotations = [(
        SIGNATURE_ANNOTATION.to_string(),
        base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes()),
    )]
    .into_iter()
    .collect();
    let layer = ImageLayer::new(body, SIMPLE_SIGNING_MEDIA_TYPE.to_string(), Some(annotations));
    let config = Config::new(
        b"{}".to_vec(),
        "application/vnd.oci.image.config.v1+json".to_string(),
        None,
    );
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let reference: oci_client::Reference = format!("{host}/{repo}:{}", signature_tag(&digest))
        .parse()
        .unwrap();
    client
        .push(&reference, &[layer], config, &RegistryAuth::Anonymous, None)
        .await
        .unwrap();
}

/// `verify` with cosign and a public key: a signed artifact is applied, an unsigned or
/// wrongly signed one is refused with SourceVerified=False before anything of it is
/// downloaded or unpacked, and keyless verification is refused by name.
#[tokio::test]
async fn a_signed_artifact_is_applied_and_unsigned_or_wrongly_signed_ones_never_unpacked() {
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    let registry = OciRegistry::start().await.unwrap();
    let host = registry.host();
    let key = SigningKey::from_slice(&[11u8; 32]).unwrap();
    let stranger = SigningKey::from_slice(&[12u8; 32]).unwrap();
    let url = format!("oci://{host}/apps/signed");
    let signed = push(&url, "signed", &[("deploy/a.yaml", cm_yaml("signed", "yes"))]).await;
    push_signature(&host, "apps/signed", &signed, &key).await;
    let unsigned = push(&url, "unsigned", &[("deploy/a.yaml", cm_yaml("unsigned", "no"))]).await;
    let wrong = push(&url, "wrong", &[("deploy/a.yaml", cm_yaml("wrong", "no"))]).await;
    push_signature(&host, "apps/signed", &wrong, &stranger).await;

    let (mut agent, cache, ns) = flux_agent("flux-cosign").await;
    let client = agent.client.clone();
    let pem = key.verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
    secret(&client, &ns, "cosign-key", "Opaque", &[("cosign.pub", pem)]).await;
    let repo = |tag: &str, verify: Value| {
        let mut r = in_namespace(oci_repository(tag, &url, tag), &ns);
        r["spec"]["verify"] = verify;
        r
    };
    let by_key = json!({"provider": "cosign", "secretRef": {"name": "cosign-key"}});
    for tag in ["signed", "unsigned", "wrong"] {
        agent.upsert(&work(
            &format!("cosign-{tag}"),
            1,
            vec![
                repo(tag, by_key.clone()),
                in_namespace(kustomization(tag, tag, &ns, json!({})), &ns),
            ],
        ));
    }
    agent.upsert(&work(
        "cosign-keyless",
        1,
        vec![repo("signed", json!({"provider": "cosign"}))],
    ));
    let u = agent
        .wait("cosign-signed", "Ready", |u| {
            manifest_cond_opt(u, 1, "Ready").is_some_and(|c| c.status == "True")
        })
        .await;
    assert_eq!(manifest_cond(&u, 0, "SourceVerified").status, "True");
    assert_eq!(cm_value(&client, &ns, "signed").await.as_deref(), Some("yes"));
    for (tag, what) in [
        ("unsigned", "is not signed"),
        ("wrong", "no signature verifies it"),
    ] {
        let u = agent
            .wait(&format!("cosign-{tag}"), "SourceVerified=False", |u| {
                manifest_cond_opt(u, 0, "SourceVerified").is_some_and(|c| c.status == "False")
            })
            .await;
        let c = manifest_cond(&u, 0, "SourceVerified");
        assert_eq!(c.reason, "VerificationError", "{c:?}");
        assert!(c.message.contains(what), "{tag}: {c:?}");
        assert!(
            get_cm(&client, &ns, tag).await.is_none(),
            "{tag}: nothing applied"
        );
    }
    let u = agent
        .wait("cosign-keyless", "refused", |u| {
            manifest_cond_opt(u, 0, "Ready").is_some_and(|c| c.status == "False")
        })
        .await;
    assert!(
        manifest_cond(&u, 0, "Ready").message.contains("keyless"),
        "{:?}",
        u.status
    );
    // Nothing of the refused artifacts reached the cache: one unpacked layer, the signed one.
    let layers: Vec<_> = std::fs::read_dir(cache.path().join("layers"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .collect();
    assert_eq!(
        layers.len(),
        1,
        "only the signed artifact was unpacked: {layers:?}"
    );
    let _ = (unsigned, wrong);
    agent.stop().await;
    registry.stop().await;
}

/// A key taken out of `verify.secretRef` (revoked) no longer vouches for a digest fetched and
/// verified with it: the unchanged check verifies again when the keys changed, and refuses.
#[tokio::test]
async fn a_revoked_key_no_longer_vouches_for_a_digest_already_fetched() {
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    use spokelet_artifact::cache::ArtifactCache;
    use spokelet_artifact::registry::ArtifactRef;
    use spokelet_artifact::signature::CosignKeys;
    let registry = OciRegistry::start().await.unwrap();
    let host = registry.host();
    let url = format!("oci://{host}/apps/revoked");
    let key = SigningKey::from_slice(&[21u8; 32]).unwrap();
    let other = SigningKey::from_slice(&[22u8; 32]).unwrap();
    let signed = push(&url, "v1", &[("deploy/a.yaml", cm_yaml("a", "one"))]).await;
    push_signature(&host, "apps/revoked", &signed, &key).await;
    let keys_of = |k: &SigningKey| {
        let pem = k.verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
        CosignKeys::from_pems([("cosign.pub", pem.as_bytes())]).unwrap()
    };
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(cache_dir.path()).unwrap();
    let (limits, wanted) = (UnpackLimits::default(), ArtifactRef::tag("v1"));
    let client = Registry::new(true, RegistryAuth::Anonymous);
    let first = client
        .refresh(&url, &wanted, &cache, &limits, None, Some(&keys_of(&key)))
        .await
        .unwrap();
    // Unchanged, same key: taken as it is, nothing downloaded.
    let again = client
        .refresh(&url, &wanted, &cache, &limits, Some(&first), Some(&keys_of(&key)))
        .await
        .unwrap();
    assert!(!again.downloaded);
    // The Secret now holds another key: the digest it has is checked again, and refused.
    let err = client
        .refresh(
            &url,
            &wanted,
            &cache,
            &limits,
            Some(&again),
            Some(&keys_of(&other)),
        )
        .await
        .expect_err("the revoked key's signature no longer counts");
    assert!(err.to_string().contains("no signature verifies it"), "{err}");
    registry.stop().await;
}

/// Without the agent's opt-in, a source on plain HTTP or on a loopback address is refused before
/// anything is read or pulled: the hub picks the URL, and the agent would send the source's
/// credentials there.
#[tokio::test]
async fn a_plain_http_or_local_registry_is_refused_without_the_agents_opt_in() {
    let registry = OciRegistry::start().await.unwrap();
    let url = format!("oci://{}/apps/local", registry.host());
    push(&url, "v1", &[("deploy/a.yaml", cm_yaml("local", "one"))]).await;
    let pushed = registry.requests("/v2/apps/local").len();
    let (mut agent, _cache, ns) = flux_agent_with("flux-insecure", false).await;
    let client = agent.client.clone();
    agent.upsert(&work(
        "flux-insecure",
        1,
        vec![
            oci_repository("local", &url, "v1"),
            kustomization("local", "local", &ns, json!({})),
        ],
    ));
    let u = agent
        .wait("flux-insecure", "the source refused", |u| {
            manifest_cond_opt(u, 0, "Ready").is_some_and(|c| c.status == "False")
        })
        .await;
    let ready = manifest_cond(&u, 0, "Ready");
    assert!(ready.message.contains("--artifact-allow-insecure"), "{ready:?}");
    assert!(get_cm(&client, &ns, "local").await.is_none(), "nothing applied");
    assert_eq!(
        registry.requests("/v2/apps/local").len(),
        pushed,
        "nothing was asked of the registry"
    );
    agent.stop().await;
    registry.stop().await;
}

/// `prune: false`: what leaves the artifact stays on the cluster, released (no longer owned
/// by the work's record), as Flux leaves it.
#[tokio::test]
async fn without_prune_what_leaves_the_artifact_is_released_not_deleted() {
    let registry = OciRegistry::start().await.unwrap();
    let url = format!("oci://{}/apps/keep", registry.host());
    let (mut agent, _cache, ns) = flux_agent("flux-keep").await;
    let client = agent.client.clone();
    push(
        &url,
        "v1",
        &[
            ("deploy/a.yaml", cm_yaml("a", "one")),
            ("deploy/b.yaml", cm_yaml("b", "one")),
        ],
    )
    .await;
    let mut w = work(
        "flux-keep",
        1,
        vec![
            oci_repository("keep", &url, "v1"),
            kustomization("keep", "keep", &ns, json!({"prune": false})),
        ],
    );
    agent.upsert(&w);
    agent
        .wait("flux-keep", "Ready", |u| {
            manifest_cond_opt(u, 1, "Ready").is_some_and(|c| c.status == "True")
        })
        .await;
    push(&url, "v2", &[("deploy/a.yaml", cm_yaml("a", "two"))]).await;
    w.spec.workload.manifests[0] = oci_repository("keep", &url, "v2").into();
    w.metadata.generation = Some(2);
    agent.upsert(&w);
    let (c, n) = (client.clone(), ns.clone());
    until("b released: still there, no longer owned by the work", || {
        let (c, n) = (c.clone(), n.clone());
        async move {
            let b = get_cm(&c, &n, "b")
                .await
                .ok_or_else(|| "b was deleted".to_string())?;
            let owned = b
                .metadata
                .owner_references
                .unwrap_or_default()
                .iter()
                .any(|o| o.kind == "AppliedManifestWork");
            match (owned, cm_value(&c, &n, "a").await.as_deref()) {
                (false, Some("two")) => Ok(()),
                other => Err(format!("b owned, a value: {other:?}")),
            }
        }
    })
    .await;
    agent.stop().await;
    registry.stop().await;
}

fn immutable_cm_yaml(name: &str, value: &str) -> String {
    format!("{}immutable: true\n", cm_yaml(name, value))
}

async fn cm_uid(client: &kube::Client, ns: &str, name: &str) -> Option<String> {
    get_cm(client, ns, name).await.and_then(|c| c.metadata.uid)
}

/// A change to an immutable field (the data of an `immutable: true` ConfigMap): without
/// `force` the Kustomization fails with the API server's reason and the object stays as it
/// was; with `force: true` it is deleted and created anew (a new uid, the new data).
#[tokio::test]
async fn force_recreates_an_object_whose_immutable_field_changed_and_without_it_nothing_is_deleted() {
    let registry = OciRegistry::start().await.unwrap();
    let url = format!("oci://{}/apps/immutable", registry.host());
    let (mut agent, _cache, ns) = flux_agent("flux-force").await;
    let client = agent.client.clone();
    push(&url, "v1", &[("deploy/a.yaml", immutable_cm_yaml("a", "one"))]).await;
    push(&url, "v2", &[("deploy/a.yaml", immutable_cm_yaml("a", "two"))]).await;
    let mut w = work(
        "flux-force",
        1,
        vec![
            oci_repository("imm", &url, "v1"),
            kustomization("imm", "imm", &ns, json!({})),
        ],
    );
    agent.upsert(&w);
    agent
        .wait("flux-force", "v1 Ready", |u| {
            manifest_cond_opt(u, 1, "Ready").is_some_and(|c| c.status == "True")
        })
        .await;
    let first_uid = cm_uid(&client, &ns, "a").await.expect("a created");

    // v2 without force: refused as immutable, nothing deleted, v1's data stays.
    w.spec.workload.manifests[0] = oci_repository("imm", &url, "v2").into();
    w.metadata.generation = Some(2);
    agent.upsert(&w);
    let status = agent
        .wait("flux-force", "v2 refused as immutable", |u| {
            manifest_cond_opt(u, 1, "Ready")
                .is_some_and(|c| c.status == "False" && c.message.contains("immutable"))
        })
        .await;
    let ready = manifest_cond_opt(&status, 1, "Ready").unwrap();
    assert!(ready.message.contains("immutable"), "{}", ready.message);
    assert_eq!(cm_value(&client, &ns, "a").await.as_deref(), Some("one"));
    assert_eq!(cm_uid(&client, &ns, "a").await, Some(first_uid.clone()));

    // force: true: recreated with the new data.
    w.spec.workload.manifests[1] = kustomization("imm", "imm", &ns, json!({"force": true})).into();
    w.metadata.generation = Some(3);
    agent.upsert(&w);
    let (c, n) = (client.clone(), ns.clone());
    until("a recreated with v2's data", || {
        let (c, n, old) = (c.clone(), n.clone(), first_uid.clone());
        async move {
            match (cm_value(&c, &n, "a").await, cm_uid(&c, &n, "a").await) {
                (Some(v), Some(uid)) if v == "two" && uid != old => Ok(()),
                other => Err(format!("a: {other:?}")),
            }
        }
    })
    .await;
    agent
        .wait("flux-force", "v2 Ready after the recreation", |u| {
            manifest_cond_opt(u, 1, "Ready").is_some_and(|c| c.status == "True")
        })
        .await;
    agent.stop().await;
    registry.stop().await;
}

/// `force: true` never deletes an object the work adopted (one that existed before the work):
/// adopted objects are released, never deleted, so an immutable change to one is refused with
/// the reason and the object stays as it was.
#[tokio::test]
async fn force_does_not_recreate_an_object_the_work_adopted() {
    let registry = OciRegistry::start().await.unwrap();
    let url = format!("oci://{}/apps/adopted", registry.host());
    let (mut agent, _cache, ns) = flux_agent("flux-force-adopted").await;
    let client = agent.client.clone();
    // Someone's ConfigMap, there before the work.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let theirs: ConfigMap = serde_yaml::from_str(&immutable_cm_yaml("a", "one")).unwrap();
    cms.create(&Default::default(), &theirs).await.unwrap();
    let before = cm_uid(&client, &ns, "a").await.expect("created");
    push(&url, "v1", &[("deploy/a.yaml", immutable_cm_yaml("a", "one"))]).await;
    push(&url, "v2", &[("deploy/a.yaml", immutable_cm_yaml("a", "two"))]).await;
    let mut w = work(
        "flux-force-adopted",
        1,
        vec![
            oci_repository("adopted", &url, "v1"),
            kustomization("adopted", "adopted", &ns, json!({"force": true})),
        ],
    );
    agent.upsert(&w);
    agent
        .wait("flux-force-adopted", "v1 Ready (the ConfigMap adopted)", |u| {
            manifest_cond_opt(u, 1, "Ready").is_some_and(|c| c.status == "True")
        })
        .await;
    w.spec.workload.manifests[0] = oci_repository("adopted", &url, "v2").into();
    w.metadata.generation = Some(2);
    agent.upsert(&w);
    let status = agent
        .wait("flux-force-adopted", "v2 refused: adopted, not recreated", |u| {
            manifest_cond_opt(u, 1, "Ready")
                .is_some_and(|c| c.status == "False" && c.message.contains("adopted"))
        })
        .await;
    let ready = manifest_cond_opt(&status, 1, "Ready").unwrap();
    assert!(ready.message.contains("never deleted"), "{}", ready.message);
    assert_eq!(
        cm_uid(&client, &ns, "a").await,
        Some(before),
        "the adopted object is the same one"
    );
    assert_eq!(cm_value(&client, &ns, "a").await.as_deref(), Some("one"));
    agent.stop().await;
    registry.stop().await;
}

/// A hostile artifact (an entry climbing out with `..`) fails its source with the reason, nothing
/// of it is written, and a work beside it is applied as usual.
#[tokio::test]
async fn a_hostile_artifact_fails_its_source_and_disturbs_nothing_else() {
    use spokelet_artifact::registry::{FLUX_CONFIG_MEDIA_TYPE, FLUX_CONTENT_MEDIA_TYPE};
    use spokelet_e2e::{LayoutBlob, skopeo, write_oci_layout};
    let registry = OciRegistry::start().await.unwrap();
    // A tar whose one entry is named `deploy/../../escape.yaml`, written byte by byte (the tar
    // crate refuses to build such an entry).
    let mut header = [0u8; 512];
    let name = b"deploy/../../escape.yaml";
    header[..name.len()].copy_from_slice(name);
    header[100..108].copy_from_slice(b"0000644\0");
    header[108..116].copy_from_slice(b"0000000\0");
    header[116..124].copy_from_slice(b"0000000\0");
    let body = cm_yaml("escape", "x");
    header[124..136].copy_from_slice(format!("{:011o}\0", body.len()).as_bytes());
    header[136..148].copy_from_slice(b"00000000000\0");
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|b| *b as u32).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut tar = header.to_vec();
    tar.extend_from_slice(body.as_bytes());
    tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let layer = gz.finish().unwrap();
    let root = tempfile::tempdir().unwrap();
    write_oci_layout(
        &root.path().join("layout"),
        "v1",
        LayoutBlob {
            media_type: FLUX_CONFIG_MEDIA_TYPE,
            bytes: b"{}",
        },
        &[LayoutBlob {
            media_type: FLUX_CONTENT_MEDIA_TYPE,
            bytes: &layer,
        }],
    );
    let (ok, out) = skopeo(&[
        "copy".to_string(),
        "--dest-tls-verify=false".to_string(),
        format!("oci:{}:v1", root.path().join("layout").display()),
        format!("docker://{}/apps/hostile:v1", registry.host()),
    ])
    .await;
    assert!(ok, "skopeo copy: {out}");
    let (mut agent, cache, ns) = flux_agent("flux-hostile").await;
    let client = agent.client.clone();
    let url = format!("oci://{}/apps/hostile", registry.host());
    agent.upsert(&work(
        "hostile",
        1,
        vec![
            oci_repository("hostile", &url, "v1"),
            kustomization("hostile", "hostile", &ns, json!({})),
        ],
    ));
    agent.upsert(&work(
        "beside",
        1,
        vec![cm(&ns, "beside", json!({"value": "ok"}))],
    ));
    let u = agent
        .wait("hostile", "the source failing", |u| {
            manifest_cond_opt(u, 0, "Ready").is_some_and(|c| c.status == "False")
        })
        .await;
    let ready = manifest_cond(&u, 0, "Ready");
    assert_eq!(ready.reason, "OCIArtifactPullFailed", "{ready:?}");
    assert!(ready.message.contains(".."), "{ready:?}");
    assert_eq!(manifest_cond(&u, 1, "Ready").reason, "ArtifactFailed");
    agent.wait_applied("beside", 1).await;
    assert!(get_cm(&client, &ns, "escape").await.is_none());
    assert!(
        !cache.path().join("escape.yaml").exists()
            && !cache.path().parent().unwrap().join("escape.yaml").exists()
    );
    let layers = std::fs::read_dir(cache.path().join("layers"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(layers, 0, "no entry, not even a partial one");
    agent.stop().await;
    registry.stop().await;
}

/// `wait`, `dependsOn` and `suspend`: a Kustomization whose Deployment never becomes
/// available stays Progressing, one depending on it is held (nothing of it applied), and a
/// suspended one applies nothing.
#[tokio::test]
async fn wait_depends_on_and_suspend_hold_back_what_they_should() {
    let registry = OciRegistry::start().await.unwrap();
    let url = format!("oci://{}/apps/staged", registry.host());
    let (mut agent, _cache, ns) = flux_agent("flux-staged").await;
    let client = agent.client.clone();
    // No kubelet runs on the test spoke: a Deployment of one replica never becomes available.
    let deploy = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      containers:\n      - {name: web, image: registry.invalid/web:1}\n";
    push(
        &url,
        "v1",
        &[
            ("base/web.yaml", deploy.to_string()),
            ("base/settings.yaml", cm_yaml("settings", "one")),
            ("later/after.yaml", cm_yaml("after", "one")),
            ("paused/paused.yaml", cm_yaml("paused", "one")),
        ],
    )
    .await;
    let ks = |name: &str, path: &str, extra: Value| {
        let mut k = kustomization(name, "staged", &ns, extra);
        k["spec"]["path"] = json!(path);
        k
    };
    agent.upsert(&work(
        "flux-staged",
        1,
        vec![
            oci_repository("staged", &url, "v1"),
            ks("base", "./base", json!({"wait": true})),
            ks("later", "./later", json!({"dependsOn": [{"name": "base"}]})),
            ks("paused", "./paused", json!({"suspend": true})),
        ],
    ));
    let u = agent
        .wait("flux-staged", "base Progressing and later held", |u| {
            manifest_cond_opt(u, 1, "Ready")
                .is_some_and(|c| c.reason == "Progressing" && c.message.contains("Deployment"))
                && manifest_cond_opt(u, 2, "Ready").is_some_and(|c| c.reason == "DependencyNotReady")
        })
        .await;
    assert_eq!(
        manifest_cond(&u, 3, "Ready").reason,
        "Suspended",
        "{:?}",
        u.status
    );
    assert_eq!(
        cm_value(&client, &ns, "settings").await.as_deref(),
        Some("one"),
        "base is applied, only not ready"
    );
    if let Some(a) = get_cm(&client, &ns, "after").await {
        panic!(
            "a held Kustomization applies nothing, yet {:?} is there; status: {}",
            a.metadata.labels,
            serde_json::to_string(&u.status).unwrap()
        );
    }
    assert!(
        get_cm(&client, &ns, "paused").await.is_none(),
        "a suspended Kustomization applies nothing"
    );
    agent.stop().await;
    registry.stop().await;
}

/// The artifact cache outlives the agent: a new engine on the same cache applies the work
/// without downloading the layer again (the registry's access log shows no blob request); and
/// once the work is gone, the next download removes its unused entry.
#[tokio::test]
async fn the_cache_survives_a_restart_and_entries_no_work_holds_are_collected() {
    let registry = OciRegistry::start().await.unwrap();
    let url = format!("oci://{}/apps/cached", registry.host());
    let cache = tempfile::tempdir().unwrap();
    let start = |hub: String| {
        let mut cfg = test_config(&hub);
        cfg.expander = FluxExpander::for_setting(&native(cache.path()));
        async move {
            let a = Agent::start_with(&hub, cfg).await;
            a.synced();
            a
        }
    };
    let blob_gets = || registry.requests("\"GET /v2/apps/cached/blobs/").len();
    push(&url, "v1", &[("deploy/a.yaml", cm_yaml("cached", "one"))]).await;
    let hub = unique_name("flux-hub");
    let mut first = start(hub.clone()).await;
    let ns = namespace(&first.client, "flux-cache").await;
    let w = work(
        "cached",
        1,
        vec![
            oci_repository("cached", &url, "v1"),
            kustomization("cached", "cached", &ns, json!({})),
        ],
    );
    first.upsert(&w);
    first
        .wait("cached", "Ready", |u| {
            manifest_cond_opt(u, 1, "Ready").is_some_and(|c| c.status == "True")
        })
        .await;
    first.stop().await;
    let downloads = blob_gets();

    // A new engine (nothing in memory) on the same cache: no blob fetched again.
    let mut second = start(hub).await;
    second.upsert(&w);
    second
        .wait("cached", "Ready", |u| {
            manifest_cond_opt(u, 1, "Ready").is_some_and(|c| c.status == "True")
        })
        .await;
    assert_eq!(
        blob_gets(),
        downloads,
        "the cached layer was not downloaded again"
    );
    let entries = || {
        std::fs::read_dir(cache.path().join("layers"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .count()
    };
    assert_eq!(entries(), 1);

    // The work goes; another arrives with a new artifact: the old entry is collected.
    second.delete("cached");
    second
        .wait("cached", "deleted", |u| {
            spokelet::work::conditions::find(&u.status.conditions, "Deleted")
                .is_some_and(|c| c.status == "True")
        })
        .await;
    let other = format!("oci://{}/apps/other", registry.host());
    push(&other, "v1", &[("deploy/b.yaml", cm_yaml("other", "two"))]).await;
    second.upsert(&work(
        "other",
        1,
        vec![
            oci_repository("other", &other, "v1"),
            kustomization("other", "other", &ns, json!({})),
        ],
    ));
    second
        .wait("other", "Ready", |u| {
            manifest_cond_opt(u, 1, "Ready").is_some_and(|c| c.status == "True")
        })
        .await;
    until("only the held work's entry left", || async {
        match entries() {
            1 => Ok(()),
            n => Err(format!("{n} entries")),
        }
    })
    .await;
    second.stop().await;
    registry.stop().await;
}

/// A work may not have the agent read a Secret it could not write (the spoke's policy) or one
/// its executor may not read (the API server's RBAC): Flux objects read their Secrets and
/// ConfigMaps as the work, and nothing read that way reaches the hub.
#[tokio::test]
async fn flux_objects_read_secrets_only_as_the_work_may() {
    let registry = OciRegistry::start().await.unwrap();
    let url = format!("oci://{}/apps/leak", registry.host());
    push(&url, "v1", &[("deploy/a.yaml", cm_yaml("leak-${password}", "x"))]).await;
    let cache = tempfile::tempdir().unwrap();
    let hub = unique_name("flux-hub");
    let mut cfg = config_with_executors(&hub).await;
    cfg.expander = FluxExpander::for_setting(&native(cache.path()));
    let mut agent = Agent::start_with(&hub, cfg).await;
    agent.synced();
    let client = agent.client.clone();
    let team = namespace(&client, "flux-team").await;
    let other = namespace(&client, "flux-other").await;
    let protected = unique_name("cloud");
    let password = || vec![("password", "s3cr3t".to_string())];
    secret(&client, "kube-system", &protected, "Opaque", &password()).await;
    secret(&client, &other, "cloud", "Opaque", &password()).await;
    secret(&client, &team, "vars", "Opaque", &[("password", "mine".into())]).await;
    // The executor may manage ConfigMaps and Secrets in its own namespace, and nothing else.
    let rights = executor_with(&team, "deployer", &["configmaps", "secrets"], &["*"]);
    agent.upsert(&work("flux-leak-setup", 1, rights));
    agent.wait_applied("flux-leak-setup", 1).await;
    let executor = serde_json::from_value(json!(
        {"subject": {"type": "ServiceAccount", "serviceAccount": {"namespace": team, "name": "deployer"}}}
    ))
    .unwrap();
    let substitute =
        |secret: &str| json!({"postBuild": {"substituteFrom": [{"kind": "Secret", "name": secret}]}});
    let source = |name: &str| in_namespace(oci_repository(name, &url, "v1"), &team);
    let ks_from = |name: &str, ns: &str, secret: &str| {
        let mut ks = in_namespace(kustomization(name, name, &team, substitute(secret)), ns);
        ks["spec"]["sourceRef"]["namespace"] = json!(team);
        ks
    };

    // No executor: the agent's own rights could read kube-system, so the policy refuses first.
    agent.upsert(&work(
        "flux-leak-policy",
        1,
        vec![source("policy"), ks_from("policy", "kube-system", &protected)],
    ));
    // With an executor: the API server refuses it the other namespace's Secrets, for
    // substitution and for registry credentials alike.
    let auth_url = format!("oci://{}/apps/leak-auth", registry.host());
    let mut creds = in_namespace(oci_repository("creds", &auth_url, "v1"), &other);
    creds["spec"]["secretRef"] = json!({"name": "cloud"});
    let mut w = work(
        "flux-leak-executor",
        1,
        vec![source("rbac"), ks_from("rbac", &other, "cloud"), creds],
    );
    w.spec.executor = Some(executor);
    agent.upsert(&w);
    // And what it may read, it reads: its own namespace's Secret.
    let mut own = work(
        "flux-leak-own",
        1,
        vec![source("own"), ks_from("own", &team, "vars")],
    );
    own.spec.executor = w.spec.executor.clone();
    agent.upsert(&own);

    let u = agent
        .wait("flux-leak-policy", "the Kustomization refused", |u| {
            manifest_cond_opt(u, 1, "Ready").is_some_and(|c| c.status == "False")
        })
        .await;
    let ready = manifest_cond(&u, 1, "Ready");
    assert_eq!(ready.reason, "DeniedByPolicy", "{ready:?}");
    assert!(ready.message.contains("kube-system"), "{ready:?}");
    let u = agent
        .wait("flux-leak-executor", "both reads refused", |u| {
            // The Kustomization says ArtifactFailed until its source's first pull is in.
            [1, 2]
                .iter()
                .all(|&i| manifest_cond_opt(u, i, "Ready").is_some_and(|c| c.reason == "Forbidden"))
        })
        .await;
    for i in [1, 2] {
        let ready = manifest_cond(&u, i, "Ready");
        assert_eq!(ready.reason, "Forbidden", "manifest {i}: {ready:?}");
        assert!(ready.message.contains("system:serviceaccount:"), "{ready:?}");
    }
    assert!(
        registry.requests("/v2/apps/leak-auth").is_empty(),
        "no request (and no credential) went to the registry"
    );
    agent
        .wait("flux-leak-own", "its own Secret substituted", |u| {
            manifest_cond_opt(u, 1, "Ready").is_some_and(|c| c.status == "True")
        })
        .await;
    assert!(get_cm(&client, &team, "leak-mine").await.is_some());
    assert!(get_cm(&client, &team, "leak-s3cr3t").await.is_none());
    agent.drain();
    for u in &agent.all {
        let text = serde_json::to_string(&u.status).unwrap();
        assert!(!text.contains("s3cr3t"), "the value reached the hub: {text}");
    }
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), "kube-system");
    secrets.delete(&protected, &Default::default()).await.unwrap();
    agent.stop().await;
    registry.stop().await;
}

/// A registry that accepts connections and never answers holds up only its own work: sources
/// are fetched outside the engine's reconcile permits, so even with a single permit another
/// work is applied while the fetch still waits.
#[tokio::test]
async fn a_registry_that_never_answers_holds_up_no_other_work() {
    let registry = OciRegistry::start().await.unwrap();
    let front = spokelet_e2e::StallingFront::start(&registry.host())
        .await
        .unwrap();
    front.stall();
    let url = format!("oci://{}/apps/silent", front.host());
    let cache = tempfile::tempdir().unwrap();
    let hub = unique_name("flux-hub");
    let mut cfg = test_config(&hub);
    cfg.expander = FluxExpander::for_setting(&native(cache.path()));
    cfg.max_concurrent_works = 1;
    let mut agent = Agent::start_with(&hub, cfg).await;
    agent.synced();
    let ns = namespace(&agent.client, "flux-silent").await;
    agent.upsert(&work(
        "flux-silent",
        1,
        vec![
            oci_repository("silent", &url, "v1"),
            kustomization("silent", "silent", &ns, json!({})),
        ],
    ));
    // The fetch is under way: its request went into the stalled connection.
    spokelet_e2e::eventually("the fetch reaches the silent registry", || {
        let sent = front.dropped();
        async move {
            if sent > 0 {
                Ok(())
            } else {
                Err("nothing sent yet".to_string())
            }
        }
    })
    .await
    .unwrap();
    agent.upsert(&work("plain", 1, vec![cm(&ns, "plain", json!({"k": "v"}))]));
    agent.wait_applied("plain", 1).await;
    assert!(
        !agent.latest.contains_key("flux-silent"),
        "the other work waited for the silent registry: {:?}",
        agent.latest.get("flux-silent").map(|u| &u.status)
    );
    agent.stop().await;
    registry.stop().await;
}
