//! Flux-format artifacts against the real registry (Debian's `docker-registry` on loopback):
//! pushed by spokelet, seen by skopeo, pulled into the cache, and an unchanged tag costs no
//! blob download (checked in the registry's own access log).

use oci_client::secrets::RegistryAuth;
use spokelet_artifact::cache::ArtifactCache;
use spokelet_artifact::registry::{FLUX_CONFIG_MEDIA_TYPE, FLUX_CONTENT_MEDIA_TYPE, Registry, RegistryError};
use spokelet_artifact::unpack::UnpackLimits;
use spokelet_e2e::OciRegistry;

/// How many GETs of `blobs/sha256:<hex>` the registry's access log (its combined-format
/// lines, one per request) holds.
fn blob_gets(registry: &OciRegistry, hex: &str) -> usize {
    let log = std::fs::read_to_string(registry.dir().join("docker-registry.log")).unwrap_or_default();
    let request = format!("\"GET /v2/apps/demo/blobs/sha256:{hex} ");
    log.lines().filter(|l| l.contains(&request)).count()
}

async fn skopeo_raw(reference: &str) -> serde_json::Value {
    let out = tokio::process::Command::new("skopeo")
        .args(["--insecure-policy", "inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run skopeo (run tests/env/install.sh): {e}"));
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
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
    let first = client.pull(&url, "v1", &cache, &limits).await.unwrap();
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
    let second = client.pull(&url, "v1", &cache, &limits).await.unwrap();
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
    let e = client.pull(&url, "missing", &cache, &limits).await.unwrap_err();
    assert!(matches!(e, RegistryError::Request { .. }), "{e}");
    assert!(first.dir.join("deploy/app.yaml").exists());
    registry.stop().await;
}
