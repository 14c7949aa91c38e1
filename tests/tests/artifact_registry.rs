//! Flux-format artifacts against the real registry (Debian's `docker-registry` on loopback):
//! pushed by spokelet, seen by skopeo, pulled into the cache, and an unchanged tag costs no
//! blob download (checked in the registry's own access log).

use oci_client::secrets::RegistryAuth;
use spokelet_artifact::cache::ArtifactCache;
use spokelet_artifact::registry::{
    ArtifactRef, FLUX_CONFIG_MEDIA_TYPE, FLUX_CONTENT_MEDIA_TYPE, Registry, RegistryError, Timeouts,
};
use spokelet_artifact::retry::PullRetry;
use spokelet_artifact::unpack::UnpackLimits;
use spokelet_e2e::{CuttingFront, OciRegistry, RateLimitedFront, RegistryOptions};
use spokelet_e2e::{LayoutBlob, skopeo, write_oci_layout};

/// How many GETs of `blobs/sha256:<hex>` the registry's access log (its combined-format
/// lines, one per request) holds.
fn blob_gets(registry: &OciRegistry, hex: &str) -> usize {
    registry
        .requests(&format!("\"GET /v2/apps/demo/blobs/sha256:{hex} "))
        .len()
}

async fn skopeo_raw(reference: &str) -> serde_json::Value {
    let (ok, out) = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ])
    .await;
    assert!(ok, "skopeo: {out}");
    serde_json::from_str(&out).unwrap()
}

#[tokio::test]
async fn a_pushed_directory_pulls_into_the_cache_and_an_unchanged_tag_downloads_nothing() {
    let registry = OciRegistry::start().await.unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("deploy")).unwrap();
    std::fs::write(src.path().join("deploy/app.yaml"), "kind: ConfigMap\n").unwrap();
    let client = Registry::new(true, RegistryAuth::Anonymous);
    let url = format!("oci://{}/apps/demo", registry.host());
    let pushed = client
        .push_dir(
            &url,
            "v1",
            src.path(),
            "https://example.invalid/apps",
            "main@sha1:0123",
        )
        .await
        .unwrap();

    // An independent client sees a Flux-format artifact.
    let raw = skopeo_raw(&format!("{}/apps/demo:v1", registry.host())).await;
    assert_eq!(raw["config"]["mediaType"], FLUX_CONFIG_MEDIA_TYPE);
    assert_eq!(raw["layers"][0]["mediaType"], FLUX_CONTENT_MEDIA_TYPE);
    assert_eq!(
        raw["annotations"]["org.opencontainers.image.revision"],
        "main@sha1:0123"
    );

    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(cache_dir.path()).unwrap();
    let limits = UnpackLimits::default();
    let first = client
        .pull(&url, &ArtifactRef::tag("v1"), &cache, &limits)
        .await
        .unwrap();
    assert!(first.downloaded);
    assert_eq!(first.revision, format!("v1@{pushed}"));
    assert_eq!(
        std::fs::read_to_string(first.dir.join("deploy/app.yaml")).unwrap(),
        "kind: ConfigMap\n"
    );
    // The registry logs a request once it has answered it: give the line a moment to land.
    let mut gets = 0;
    for _ in 0..100 {
        gets = blob_gets(&registry, first.layer.hex());
        if gets > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(gets, 1, "one blob download for the first pull");

    // Unchanged: the manifest is asked for, the blob is not.
    let second = client
        .pull(&url, &ArtifactRef::tag("v1"), &cache, &limits)
        .await
        .unwrap();
    assert!(!second.downloaded);
    // Let any late access-log line land before counting.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(second.dir, first.dir);
    assert_eq!(
        blob_gets(&registry, first.layer.hex()),
        gets,
        "no blob request for a cached layer"
    );

    // A tag that does not exist is a clear error, and the cache keeps what it had.
    let e = client
        .pull(&url, &ArtifactRef::tag("missing"), &cache, &limits)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Request { .. }), "{e}");
    assert!(first.dir.join("deploy/app.yaml").exists());
    registry.stop().await;
}

/// Writes an OCI layout tagged `v1` holding a Flux-format artifact made by other tools (GNU
/// tar and gzip) with config media type `config_type`; returns the layout directory.
fn flux_layout_by_hand(root: &std::path::Path, config_type: &str) -> std::path::PathBuf {
    let layout = root.join("layout");
    let content = root.join("content");
    std::fs::create_dir_all(content.join("deploy")).unwrap();
    std::fs::write(content.join("deploy/other.yaml"), "kind: Secret\n").unwrap();
    let tar = std::process::Command::new("tar")
        .args(["--sort=name", "--owner=0", "--group=0", "--mtime=@0", "-C"])
        .arg(&content)
        .args(["-czf", "-", "deploy"])
        .output()
        .unwrap();
    assert!(tar.status.success(), "tar failed");
    let config = LayoutBlob {
        media_type: config_type,
        bytes: b"{}",
    };
    let layer = LayoutBlob {
        media_type: FLUX_CONTENT_MEDIA_TYPE,
        bytes: &tar.stdout,
    };
    write_oci_layout(&layout, "v1", config, &[layer]);
    layout
}

async fn skopeo_copy(layout: &std::path::Path, dest: &str) {
    let (ok, out) = skopeo(&[
        "copy".to_string(),
        "--preserve-digests".to_string(),
        "--dest-tls-verify=false".to_string(),
        format!("oci:{}:v1", layout.display()),
        format!("docker://{dest}"),
    ])
    .await;
    assert!(ok, "skopeo copy: {out}");
}

#[tokio::test]
async fn an_artifact_pushed_by_another_client_pulls_and_a_non_flux_one_is_refused() {
    let registry = OciRegistry::start().await.unwrap();
    let client = Registry::new(true, RegistryAuth::Anonymous);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(cache_dir.path()).unwrap();
    let limits = UnpackLimits::default();

    let flux = tempfile::tempdir().unwrap();
    let layout = flux_layout_by_hand(flux.path(), FLUX_CONFIG_MEDIA_TYPE);
    skopeo_copy(&layout, &format!("{}/apps/other:v1", registry.host())).await;
    let url = format!("oci://{}/apps/other", registry.host());
    let pulled = client
        .pull(&url, &ArtifactRef::tag("v1"), &cache, &limits)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(pulled.dir.join("deploy/other.yaml")).unwrap(),
        "kind: Secret\n"
    );

    let image = tempfile::tempdir().unwrap();
    let layout = flux_layout_by_hand(image.path(), "application/vnd.oci.image.config.v1+json");
    skopeo_copy(&layout, &format!("{}/apps/image:v1", registry.host())).await;
    let url = format!("oci://{}/apps/image", registry.host());
    let e = client
        .pull(&url, &ArtifactRef::tag("v1"), &cache, &limits)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::NotFlux { .. }), "{e}");
    assert!(
        e.to_string().contains("application/vnd.oci.image.config.v1+json"),
        "{e}"
    );
    registry.stop().await;
}

#[tokio::test]
async fn the_digest_beats_the_semver_range_which_beats_the_tag() {
    let registry = OciRegistry::start().await.unwrap();
    let client = Registry::new(true, RegistryAuth::Anonymous);
    let url = format!("oci://{}/apps/versions", registry.host());
    let src = tempfile::tempdir().unwrap();
    let mut digests = std::collections::HashMap::new();
    for tag in ["v1.0.0", "v1.2.0", "v2.0.0", "latest", "not-a-version"] {
        std::fs::write(src.path().join("version.yaml"), format!("version: {tag}\n")).unwrap();
        let d = client.push_dir(&url, tag, src.path(), "src", tag).await.unwrap();
        digests.insert(tag, d);
    }
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(cache_dir.path()).unwrap();
    let limits = UnpackLimits::default();
    let version = |p: &spokelet_artifact::registry::Pulled| {
        std::fs::read_to_string(p.dir.join("version.yaml")).unwrap()
    };

    let semver = ArtifactRef {
        tag: Some("latest".into()),
        semver: Some(">=1.0.0, <2.0.0".into()),
        semver_filter: None,
        digest: None,
        layer_media_type: None,
    };
    let p = client.pull(&url, &semver, &cache, &limits).await.unwrap();
    assert_eq!(version(&p), "version: v1.2.0\n");
    assert_eq!(p.revision, format!("v1.2.0@{}", digests["v1.2.0"]));

    let pinned = ArtifactRef {
        digest: Some(digests["v1.0.0"].to_string()),
        ..semver.clone()
    };
    let p = client.pull(&url, &pinned, &cache, &limits).await.unwrap();
    assert_eq!(version(&p), "version: v1.0.0\n");
    assert_eq!(p.revision, digests["v1.0.0"].to_string());

    let p = client
        .pull(&url, &ArtifactRef::default(), &cache, &limits)
        .await
        .unwrap();
    assert_eq!(version(&p), "version: latest\n");

    let none = ArtifactRef {
        semver: Some(">=3.0.0".into()),
        ..ArtifactRef::default()
    };
    let e = client.pull(&url, &none, &cache, &limits).await.unwrap_err();
    assert!(matches!(e, RegistryError::NoMatchingTag { .. }), "{e}");

    // semverFilter narrows the tags first: only the 1.0 line.
    let filtered = ArtifactRef {
        semver: Some(">=1.0.0".into()),
        semver_filter: Some(r"^v1\.0\.".into()),
        ..ArtifactRef::default()
    };
    let p = client.pull(&url, &filtered, &cache, &limits).await.unwrap();
    assert_eq!(version(&p), "version: v1.0.0\n");

    // refresh: an unchanged tag costs one lookup and hands back the known artifact.
    let first = client.pull(&url, &semver, &cache, &limits).await.unwrap();
    let again = client
        .refresh(&url, &semver, &cache, &limits, Some(&first), None)
        .await
        .unwrap();
    assert_eq!(again.manifest, first.manifest);
    assert!(!again.downloaded);

    // The tag list read page by page (two tags a page here): the range still sees every tag,
    // also those past the first page, as on registries that page by default.
    let lists_before = registry.requests("/tags/list").len();
    let paged = Registry::new(true, RegistryAuth::Anonymous).with_tag_page(2);
    let p = paged.pull(&url, &semver, &cache, &limits).await.unwrap();
    assert_eq!(version(&p), "version: v1.2.0\n");
    let pages = registry.requests("/tags/list").len() - lists_before;
    assert!(pages >= 3, "{pages} tag-list requests for five tags two a page");
    registry.stop().await;
}

/// `spokelet artifact push`, parsed from its command line as the binary does: Flux media
/// types and annotations as skopeo reads them, and `--reproducible` giving one digest for the
/// same content whatever its files' times.
#[tokio::test]
async fn the_push_command_writes_flux_artifacts_and_reproducible_ones_have_one_digest() {
    use spokelet::artifact::{ArtifactCommand, push};
    use spokelet::config::{Cli, Command};
    let registry = OciRegistry::start().await.unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("deploy")).unwrap();
    std::fs::write(src.path().join("deploy/a.yaml"), "kind: ConfigMap\n").unwrap();
    let reference = format!("oci://{}/apps/cli:v1", registry.host());
    let run = |extra: &[&str]| {
        let mut argv = vec![
            "spokelet",
            "artifact",
            "push",
            src.path().to_str().unwrap(),
            &reference,
            "--insecure",
        ];
        argv.extend_from_slice(extra);
        let cli = Cli::load_from(argv.iter().map(|s| s.to_string())).unwrap();
        match cli.command {
            Command::Artifact(ArtifactCommand::Push(args)) => args,
            other => panic!("parsed as {other:?}"),
        }
    };
    let first = push(&run(&[
        "--reproducible",
        "--source",
        "https://example.invalid/app",
    ]))
    .await
    .unwrap();
    assert!(
        first.starts_with(&format!("oci://{}/apps/cli@sha256:", registry.host())),
        "{first}"
    );
    let raw = skopeo_raw(&format!("{}/apps/cli:v1", registry.host())).await;
    assert_eq!(raw["config"]["mediaType"], FLUX_CONFIG_MEDIA_TYPE);
    assert_eq!(raw["layers"][0]["mediaType"], FLUX_CONTENT_MEDIA_TYPE);
    let annotations = &raw["annotations"];
    assert_eq!(
        annotations["org.opencontainers.image.source"],
        "https://example.invalid/app"
    );
    assert_eq!(annotations["org.opencontainers.image.revision"], "v1");
    assert_eq!(
        annotations["org.opencontainers.image.created"],
        "1970-01-01T00:00:00Z"
    );

    // Touch the files (new mtimes) and push again: the same digest.
    std::fs::write(src.path().join("deploy/a.yaml"), "kind: ConfigMap\n").unwrap();
    let again = push(&run(&[
        "--reproducible",
        "--source",
        "https://example.invalid/app",
    ]))
    .await
    .unwrap();
    assert_eq!(again, first);
    // Without --reproducible the creation time is now, so the manifest differs.
    let dated = push(&run(&["--source", "https://example.invalid/app"]))
        .await
        .unwrap();
    assert_ne!(dated, first);
    let e = push(&run(&["--username", "only-half"])).await.unwrap_err();
    assert!(e.to_string().contains("go together"), "{e}");
    registry.stop().await;
}

/// An image index resolves to the manifest of the agent's platform (or fails naming the
/// platforms it has), and `layerSelector.mediaType` picks a layer other than the first.
#[tokio::test]
async fn an_index_gives_this_platforms_artifact_and_a_layer_selector_picks_its_layer() {
    use spokelet_artifact::registry::{OCI_INDEX_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE, agent_platform};
    let registry = OciRegistry::start().await.unwrap();
    let client = Registry::new(true, RegistryAuth::Anonymous);
    let url = format!("oci://{}/apps/multi", registry.host());
    let src = tempfile::tempdir().unwrap();
    let mut entries = Vec::new();
    let (os, arch) = agent_platform();
    for (tag, platform) in [("other", ("linux", "s390x")), ("mine", (os, arch))] {
        std::fs::write(src.path().join("which.yaml"), format!("which: {tag}\n")).unwrap();
        let digest = client.push_dir(&url, tag, src.path(), "src", tag).await.unwrap();
        let raw = oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::Http,
            ..Default::default()
        });
        let reference: oci_client::Reference =
            format!("{}/apps/multi:{tag}", registry.host()).parse().unwrap();
        let (bytes, _) = raw
            .pull_manifest_raw(&reference, &RegistryAuth::Anonymous, &[OCI_MANIFEST_MEDIA_TYPE])
            .await
            .unwrap();
        entries.push(
            serde_json::json!({"mediaType": OCI_MANIFEST_MEDIA_TYPE, "digest": digest.to_string(),
            "size": bytes.len(), "platform": {"os": platform.0, "architecture": platform.1}}),
        );
    }
    let push_index = |tag: &'static str, manifests: Vec<serde_json::Value>| {
        let host = registry.host();
        async move {
            let raw = oci_client::Client::new(oci_client::client::ClientConfig {
                protocol: oci_client::client::ClientProtocol::Http,
                ..Default::default()
            });
            let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX_MEDIA_TYPE, "manifests": manifests});
            let reference: oci_client::Reference = format!("{host}/apps/multi:{tag}").parse().unwrap();
            raw.push_manifest_raw(
                &reference,
                serde_json::to_vec(&index).unwrap(),
                http::HeaderValue::from_static(OCI_INDEX_MEDIA_TYPE),
            )
            .await
            .unwrap();
        }
    };
    push_index("multi", entries.clone()).await;
    push_index("foreign", vec![entries[0].clone()]).await;
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(cache_dir.path()).unwrap();
    let limits = UnpackLimits::default();
    let p = client
        .pull(&url, &ArtifactRef::tag("multi"), &cache, &limits)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(p.dir.join("which.yaml")).unwrap(),
        "which: mine\n"
    );
    assert!(p.revision.starts_with("multi@sha256:"), "{}", p.revision);
    let e = client
        .pull(&url, &ArtifactRef::tag("foreign"), &cache, &limits)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::NoPlatform { .. }), "{e}");
    assert!(
        e.to_string().contains("linux/s390x") && e.to_string().contains(&format!("{os}/{arch}")),
        "{e}"
    );

    // Two layers, the Flux content second: only the selector finds it.
    let root = tempfile::tempdir().unwrap();
    let content = root.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("app.yaml"), "kind: ConfigMap\n").unwrap();
    let tar = spokelet_artifact::pack::pack_dir(&content, Vec::new()).unwrap();
    let layout = root.path().join("layout");
    write_oci_layout(
        &layout,
        "v1",
        LayoutBlob {
            media_type: FLUX_CONFIG_MEDIA_TYPE,
            bytes: b"{}",
        },
        &[
            LayoutBlob {
                media_type: "text/markdown",
                bytes: b"# notes\n",
            },
            LayoutBlob {
                media_type: FLUX_CONTENT_MEDIA_TYPE,
                bytes: &tar,
            },
        ],
    );
    skopeo_copy(&layout, &format!("{}/apps/layers:v1", registry.host())).await;
    let url = format!("oci://{}/apps/layers", registry.host());
    let selected = ArtifactRef {
        layer_media_type: Some(FLUX_CONTENT_MEDIA_TYPE.into()),
        ..ArtifactRef::tag("v1")
    };
    let p = client.pull(&url, &selected, &cache, &limits).await.unwrap();
    assert!(p.dir.join("app.yaml").exists());
    let e = client
        .pull(&url, &ArtifactRef::tag("v1"), &cache, &limits)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("gzip") || e.to_string().contains("archive"),
        "the first layer is no tarball: {e}"
    );
    let missing = ArtifactRef {
        layer_media_type: Some("application/x-none".into()),
        ..ArtifactRef::tag("v1")
    };
    let e = client.pull(&url, &missing, &cache, &limits).await.unwrap_err();
    assert!(matches!(e, RegistryError::NoSelectedLayer { .. }), "{e}");
    registry.stop().await;
}

/// The check the agent makes every interval for an unchanged artifact costs one request (the
/// tag lookup, a HEAD without a body), on an open registry and on one that asks for
/// credentials, whose authorization the client keeps.
#[tokio::test]
async fn an_unchanged_check_costs_one_request_with_or_without_credentials() {
    for users in [vec![("puller".to_string(), "s3cret".to_string())], vec![]] {
        let registry = OciRegistry::start_with(&RegistryOptions {
            users: users.clone(),
            ..RegistryOptions::default()
        })
        .await
        .unwrap();
        let auth = match users.first() {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        let client = Registry::new(true, auth);
        let url = format!("oci://{}/apps/checked", registry.host());
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("a.yaml"), "kind: ConfigMap\n").unwrap();
        client
            .push_dir(&url, "v1", src.path(), "src", "v1")
            .await
            .unwrap();
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(cache_dir.path()).unwrap();
        let limits = UnpackLimits::default();
        let wanted = ArtifactRef::tag("v1");
        let known = client.pull(&url, &wanted, &cache, &limits).await.unwrap();
        const CHECKS: usize = 20;
        // One HEAD each: no `/v2/` ping, and the registry's authorization is reused.
        let expected = CHECKS;
        let before = registry.v2_requests().len();
        for _ in 0..CHECKS {
            let p = client
                .refresh(&url, &wanted, &cache, &limits, Some(&known), None)
                .await
                .unwrap();
            assert!(!p.downloaded);
        }
        // The registry logs a request after answering it: wait for the lines, bounded.
        let seen = spokelet_e2e::eventually("the checks' access-log lines", || async {
            let n = registry.v2_requests().len() - before;
            if n >= expected {
                Ok(n)
            } else {
                Err(format!("{n} lines so far"))
            }
        })
        .await
        .unwrap();
        assert_eq!(
            seen,
            expected,
            "users {users:?}: {:?}",
            &registry.v2_requests()[before..]
        );
        let lines = &registry.v2_requests()[before..];
        assert!(
            lines.iter().all(|l| !l.contains("/blobs/")),
            "no blob fetched: {lines:?}"
        );
        registry.stop().await;
    }
}

/// A rate-limited registry: the first answers are `429 Too Many Requests`; the pull waits
/// (jittered, a second or more) and then succeeds with the artifact. One that keeps answering
/// 429 fails after the policy's attempts with an error naming the limit, not a hang.
#[tokio::test]
async fn a_rate_limited_registry_is_retried_after_a_delay_and_a_persistent_limit_is_a_clear_error() {
    let registry = OciRegistry::start().await.unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("cm.yaml"), "kind: ConfigMap\n").unwrap();
    let direct = Registry::new(true, RegistryAuth::Anonymous);
    let pushed = direct
        .push_dir(
            &format!("oci://{}/apps/limited", registry.host()),
            "v1",
            src.path(),
            "src",
            "rev",
        )
        .await
        .unwrap();

    // Two rejected connections, then through. One tag lookup is one HEAD (and a GET when the
    // HEAD brought no digest), so the first attempt surely fails and the pull has to wait and
    // retry, twice.
    let front = RateLimitedFront::start(&registry.host(), 2, 1).await.unwrap();
    let url = format!("oci://{}/apps/limited", front.host());
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(cache_dir.path()).unwrap();
    let limits = UnpackLimits::default();
    let start = std::time::Instant::now();
    let pulled = Registry::new(true, RegistryAuth::Anonymous)
        .pull(&url, &ArtifactRef::tag("v1"), &cache, &limits)
        .await
        .expect("pulled once the limit lifted");
    assert_eq!(pulled.manifest, pushed);
    assert_eq!(front.rejected(), 2);
    // The retry of a 429 waits at least three quarters of a second (1 s, jittered by 25%).
    assert!(
        start.elapsed() >= std::time::Duration::from_millis(750),
        "retried after only {:?}",
        start.elapsed()
    );

    // A limit that never lifts: every attempt is refused, then a clear error.
    let stuck = RateLimitedFront::start(&registry.host(), u32::MAX, 1)
        .await
        .unwrap();
    let quick = PullRetry {
        first_delay: std::time::Duration::from_millis(10),
        first_delay_rate_limited: std::time::Duration::from_millis(10),
        ..PullRetry::default()
    };
    let err = Registry::new(true, RegistryAuth::Anonymous)
        .with_retry(quick.clone())
        .pull(
            &format!("oci://{}/apps/limited", stuck.host()),
            &ArtifactRef::tag("v1"),
            &cache,
            &limits,
        )
        .await
        .expect_err("the limit never lifts");
    assert!(
        err.to_string()
            .contains("rate limited (HTTP 429) after 4 attempts"),
        "{err}"
    );
    // Each attempt is one tag lookup, at most two requests: bounded, not a loop.
    let rejected = stuck.rejected();
    assert!(
        (quick.attempts..=4 * quick.attempts).contains(&rejected),
        "{rejected} requests for {} attempts",
        quick.attempts
    );
    registry.stop().await;
}

/// A registry with bearer-token authentication (the `WWW-Authenticate: Bearer realm=...` flow):
/// with the right credentials the client fetches a token from the realm and pushes and pulls
/// with it; with a wrong password or none the token server refuses and so does the pull, with
/// an authentication error.
#[tokio::test]
async fn a_bearer_token_registry_is_pushed_to_and_pulled_from_with_credentials_and_refused_without() {
    let registry = OciRegistry::start_with(&RegistryOptions {
        users: vec![("alice".into(), "s3cret".into())],
        token: true,
        ..RegistryOptions::default()
    })
    .await
    .unwrap();
    let tokens = registry.token_server().unwrap();
    let url = format!("oci://{}/apps/tokened", registry.host());
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("cm.yaml"), "kind: ConfigMap\n").unwrap();
    let alice = RegistryAuth::Basic("alice".into(), "s3cret".into());
    let pushed = Registry::new(true, alice.clone())
        .push_dir(&url, "v1", src.path(), "src", "rev")
        .await
        .expect("push with a token");

    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(cache_dir.path()).unwrap();
    let limits = UnpackLimits::default();
    let before = tokens.issued();
    let pulled = Registry::new(true, alice)
        .pull(&url, &ArtifactRef::tag("v1"), &cache, &limits)
        .await
        .expect("pull with a token");
    assert_eq!(pulled.manifest, pushed);
    assert!(tokens.issued() > before, "the pull fetched a token");
    assert_eq!(
        std::fs::read_to_string(pulled.dir.join("cm.yaml")).unwrap(),
        "kind: ConfigMap\n"
    );

    for auth in [
        RegistryAuth::Basic("alice".into(), "wrong".into()),
        RegistryAuth::Anonymous,
    ] {
        let refused = tokens.refused();
        let err = Registry::new(true, auth)
            .pull(&url, &ArtifactRef::tag("v1"), &cache, &limits)
            .await
            .expect_err("no token, no pull");
        assert!(
            tokens.refused() > refused,
            "the token server was asked and said no: {err}"
        );
        let text = format!("{err}: {:?}", std::error::Error::source(&err));
        assert!(
            text.contains("Authentication failure") || text.contains("Not authorized"),
            "{text}"
        );
    }
    registry.stop().await;
}

/// A download the registry cuts halfway fails the pull and leaves no scratch file in the cache,
/// so a source retried every few seconds cannot fill the cache volume; the next pull through a
/// sound connection succeeds.
#[tokio::test]
async fn a_download_cut_halfway_leaves_nothing_in_the_cache() {
    use rand::RngCore as _;
    let registry = OciRegistry::start().await.unwrap();
    let src = tempfile::tempdir().unwrap();
    // Incompressible, so the layer is as large as the file: far past the front's cap.
    let mut blob = vec![0u8; 4 << 20];
    rand::rng().fill_bytes(&mut blob);
    std::fs::write(src.path().join("weights.bin"), &blob).unwrap();
    let direct = Registry::new(true, RegistryAuth::Anonymous);
    direct
        .push_dir(
            &format!("oci://{}/apps/cut", registry.host()),
            "v1",
            src.path(),
            "src",
            "rev",
        )
        .await
        .unwrap();

    let front = CuttingFront::start(&registry.host(), 256 << 10).await.unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(cache_dir.path()).unwrap();
    let limits = UnpackLimits::default();
    let scratch = || -> Vec<String> {
        walk(cache_dir.path())
            .into_iter()
            .filter(|n| n.contains(".download-") || n.contains(".partial-"))
            .collect()
    };
    for attempt in 0..3 {
        let err = Registry::new(true, RegistryAuth::Anonymous)
            .pull(
                &format!("oci://{}/apps/cut", front.host()),
                &ArtifactRef::tag("v1"),
                &cache,
                &limits,
            )
            .await
            .expect_err("the connection is cut before the layer is whole");
        assert!(
            scratch().is_empty(),
            "attempt {attempt} ({err}) left {:?}",
            scratch()
        );
    }
    // Cancelled halfway (the pull's future dropped): nothing left either.
    let cancelled = tokio::time::timeout(
        std::time::Duration::from_millis(1),
        Registry::new(true, RegistryAuth::Anonymous).pull(
            &format!("oci://{}/apps/cut", registry.host()),
            &ArtifactRef::tag("v1"),
            &cache,
            &limits,
        ),
    )
    .await;
    if cancelled.is_err() {
        assert!(scratch().is_empty(), "a cancelled pull left {:?}", scratch());
    }
    Registry::new(true, RegistryAuth::Anonymous)
        .pull(
            &format!("oci://{}/apps/cut", registry.host()),
            &ArtifactRef::tag("v1"),
            &cache,
            &limits,
        )
        .await
        .expect("pulled over a sound connection");
    assert!(scratch().is_empty(), "{:?}", scratch());
    registry.stop().await;
}

/// Every path under `dir`, as text.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        out.push(path.display().to_string());
        if path.is_dir() {
            out.extend(walk(&path));
        }
    }
    out
}

/// A registry that accepts connections and then says nothing fails the pull by the client's own
/// timeouts, instead of holding it (and the reconcile above it) until the source's `timeout`.
#[tokio::test]
async fn a_silent_registry_fails_the_pull_by_the_clients_timeouts() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn); // never read, never answered, never closed
        }
    });
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(cache_dir.path()).unwrap();
    let short = Timeouts {
        connect: std::time::Duration::from_millis(500),
        read: std::time::Duration::from_millis(500),
    };
    let once = PullRetry {
        attempts: 1,
        ..PullRetry::default()
    };
    let registry = Registry::configured(true, RegistryAuth::Anonymous, None, short).with_retry(once);
    let (url, wanted, limits) = (
        format!("oci://{host}/apps/silent"),
        ArtifactRef::tag("v1"),
        UnpackLimits::default(),
    );
    let pull = registry.pull(&url, &wanted, &cache, &limits);
    // The guard only turns a hang into a failure with a message; the client must end it itself.
    let result = tokio::time::timeout(std::time::Duration::from_secs(120), pull)
        .await
        .expect("the client gave up by itself");
    let err = result.expect_err("nothing was ever answered");
    let chain = format!("{err:?}");
    assert!(
        chain.contains("timed out") || chain.contains("TimedOut"),
        "{chain}"
    );
    silent.abort();
}

/// A "registry" on loopback whose answers never end: every manifest, tag list and error page
/// streams for ever (or announces 2 GiB). Counts what it managed to send.
struct EndlessRegistry {
    port: u16,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl EndlessRegistry {
    async fn start() -> EndlessRegistry {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = sent.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(Self::serve(conn, counter.clone()));
            }
        });
        EndlessRegistry { port, sent, task }
    }

    /// Answers requests on one connection until it streams an endless body.
    async fn serve(mut conn: tokio::net::TcpStream, sent: std::sync::Arc<std::sync::atomic::AtomicU64>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut head = Vec::new();
        loop {
            let mut byte = [0u8; 1];
            if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
            if !head.ends_with(b"\r\n\r\n") {
                continue;
            }
            let line = String::from_utf8_lossy(&head)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            head.clear();
            let mut parts = line.split(' ');
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if method == "HEAD" {
                let digest = format!("sha256:{}", "ab".repeat(32));
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nDocker-Content-Digest: {digest}\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 0\r\n\r\n"
                );
                if conn.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            let (status, framing) = if path.starts_with("/v2/announced/") {
                ("200 OK", "Content-Length: 2147483648")
            } else if path.starts_with("/v2/errors/") {
                ("404 Not Found", "Transfer-Encoding: chunked")
            } else {
                ("200 OK", "Transfer-Encoding: chunked")
            };
            let chunked = framing.starts_with("Transfer");
            let answer = format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n");
            if conn.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            let block = vec![b' '; 64 * 1024];
            loop {
                let written = if chunked {
                    let size = format!("{:x}\r\n", block.len());
                    conn.write_all(size.as_bytes()).await.is_ok()
                        && conn.write_all(&block).await.is_ok()
                        && conn.write_all(b"\r\n").await.is_ok()
                } else {
                    conn.write_all(&block).await.is_ok()
                };
                if !written {
                    return;
                }
                sent.fetch_add(block.len() as u64, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    fn url(&self, repo: &str) -> String {
        format!("oci://127.0.0.1:{}/{repo}", self.port)
    }
}

impl Drop for EndlessRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Manifests, tag lists and error pages are read only up to their caps: a registry answering
/// without end (or announcing 2 GiB) fails the pull with a reason naming the limit, and the
/// client stops reading at the cap instead of holding the answer.
#[tokio::test]
async fn endless_manifests_tag_lists_and_error_pages_are_read_only_up_to_their_caps() {
    let server = EndlessRegistry::start().await;
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(cache_dir.path()).unwrap();
    let limits = UnpackLimits::default();
    let client = Registry::new(true, RegistryAuth::Anonymous).with_retry(PullRetry::none());
    let semver = ArtifactRef {
        semver: Some(">=1.0.0".into()),
        ..ArtifactRef::default()
    };
    let cases = [
        (
            "endless",
            ArtifactRef::tag("v1"),
            "manifest is over the 4194304 byte limit",
        ),
        (
            "announced",
            ArtifactRef::tag("v1"),
            "manifest is over the 4194304 byte limit",
        ),
        ("tags", semver, "tag list is over the 16777216 byte limit"),
        (
            "errors",
            ArtifactRef::tag("v1"),
            "error answer is over the 65536 byte limit",
        ),
    ];
    for (repo, wanted, reason) in cases {
        let before = server.sent.load(std::sync::atomic::Ordering::SeqCst);
        let err = client
            .pull(&server.url(repo), &wanted, &cache, &limits)
            .await
            .expect_err("refused");
        assert!(err.to_string().contains(reason), "{repo}: {err}");
        // The client hung up at its cap: what the server got out is the cap and what the
        // socket buffers held when the connection closed, nowhere near the endless answer.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let sent = server.sent.load(std::sync::atomic::Ordering::SeqCst) - before;
        assert!(sent < 64 * 1024 * 1024, "{repo}: the server sent {sent} bytes");
        println!("{repo}: refused after the server sent {sent} bytes: {err}");
    }
}
