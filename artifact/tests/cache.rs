//! The artifact cache: hits without unpacking, broken and half-written entries found and
//! removed, garbage collected, across reopening (a restart).

use std::collections::HashSet;
use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use spokelet_artifact::cache::{ArtifactCache, CacheError, Check};
use spokelet_artifact::digest::Digest;
use spokelet_artifact::unpack::{UnpackError, UnpackLimits};

/// A layer blob holding the given files, and its digest.
fn layer(files: &[(&str, &str)]) -> (Vec<u8>, Digest) {
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    for (name, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, name, body.as_bytes()).unwrap();
    }
    let mut gz = tar.into_inner().unwrap();
    gz.flush().unwrap();
    let blob = gz.finish().unwrap();
    let digest = Digest::of(&blob);
    (blob, digest)
}

#[test]
fn a_cached_layer_is_a_hit_after_a_restart_and_needs_no_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let (blob, digest) = layer(&[("app.yaml", "kind: ConfigMap\n")]);
    let cache = ArtifactCache::open(tmp.path()).unwrap();
    assert!(cache.get(&digest, Check::Sizes).unwrap().is_none());
    let dir = cache.put(&digest, &blob[..], &UnpackLimits::default()).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("app.yaml")).unwrap(),
        "kind: ConfigMap\n"
    );

    let reopened = ArtifactCache::open(tmp.path()).unwrap();
    assert_eq!(reopened.get(&digest, Check::Contents).unwrap(), Some(dir.clone()));
    // A put of a held digest reads nothing of the blob.
    let empty: &[u8] = &[];
    assert_eq!(
        reopened.put(&digest, empty, &UnpackLimits::default()).unwrap(),
        dir
    );
}

#[test]
fn an_entry_changed_on_disk_is_removed_and_fetched_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (blob, digest) = layer(&[("a.yaml", "one"), ("b.yaml", "two")]);
    let cache = ArtifactCache::open(tmp.path()).unwrap();
    let dir = cache.put(&digest, &blob[..], &UnpackLimits::default()).unwrap();
    // Same size, other content: only the full check sees it.
    std::fs::write(dir.join("a.yaml"), "ONE").unwrap();
    assert!(cache.get(&digest, Check::Sizes).unwrap().is_some());
    assert!(cache.get(&digest, Check::Contents).unwrap().is_none());
    assert!(!dir.exists(), "the broken entry is gone");
    // A truncated file: the cheap check sees it.
    let dir = cache.put(&digest, &blob[..], &UnpackLimits::default()).unwrap();
    std::fs::write(dir.join("b.yaml"), "t").unwrap();
    assert!(cache.get(&digest, Check::Sizes).unwrap().is_none());
    assert!(cache.put(&digest, &blob[..], &UnpackLimits::default()).is_ok());
}

#[test]
fn half_written_entries_are_swept_and_never_served() {
    let tmp = tempfile::tempdir().unwrap();
    let (blob, digest) = layer(&[("a.yaml", "one")]);
    let cache = ArtifactCache::open(tmp.path()).unwrap();
    cache.put(&digest, &blob[..], &UnpackLimits::default()).unwrap();
    let layers = tmp.path().join("layers");
    // A crash between the directory's rename and its list: no list.
    std::fs::remove_file(layers.join(format!("{}.json", digest.hex()))).unwrap();
    // And a crash mid-unpack: a staging directory.
    std::fs::create_dir(layers.join(".x.partial-0123")).unwrap();
    let reopened = ArtifactCache::open(tmp.path()).unwrap();
    assert!(!layers.join(".x.partial-0123").exists());
    assert!(reopened.get(&digest, Check::Sizes).unwrap().is_none());
    assert!(!layers.join(digest.hex()).exists());
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let (blob, _) = layer(&[("a.yaml", "one")]);
    let (_, other) = layer(&[("a.yaml", "two")]);
    let cache = ArtifactCache::open(tmp.path()).unwrap();
    let e = cache
        .put(&other, &blob[..], &UnpackLimits::default())
        .unwrap_err();
    assert!(
        matches!(e, CacheError::Unpack(UnpackError::DigestMismatch(_))),
        "{e}"
    );
    assert!(cache.get(&other, Check::Sizes).unwrap().is_none());
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("layers")).unwrap().collect();
    assert!(left.is_empty(), "nothing left: {left:?}");
}

#[test]
fn entries_no_work_references_are_collected() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(tmp.path()).unwrap();
    let (a, da) = layer(&[("a.yaml", "a")]);
    let (b, db) = layer(&[("b.yaml", "b")]);
    cache.put(&da, &a[..], &UnpackLimits::default()).unwrap();
    cache.put(&db, &b[..], &UnpackLimits::default()).unwrap();
    assert_eq!(cache.collect_garbage(&HashSet::from([da.clone()])).unwrap(), 1);
    assert!(cache.get(&da, Check::Contents).unwrap().is_some());
    assert!(cache.get(&db, Check::Sizes).unwrap().is_none());
    let names: Vec<String> = std::fs::read_dir(tmp.path().join("layers"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "only a's directory and list: {names:?}");
}

/// Two works pulling the same artifact at once: both puts succeed with the same entry (the
/// second finds the first's), many times over, from clones of one cache as the agent shares it.
#[test]
fn concurrent_puts_of_one_layer_all_succeed_with_one_entry() {
    let files: Vec<(String, String)> = (0..200)
        .map(|i| {
            (
                format!("deploy/cm-{i}.yaml"),
                format!("kind: ConfigMap\nvalue: {i}\n"),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let (blob, digest) = layer(&refs);
    for _ in 0..10 {
        let tmp = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(tmp.path()).unwrap();
        let dirs: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let (cache, blob, digest) = (cache.clone(), &blob, &digest);
                    s.spawn(move || cache.put(digest, &blob[..], &UnpackLimits::default()))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for d in &dirs {
            assert_eq!(d.as_ref().unwrap(), dirs[0].as_ref().unwrap());
        }
        assert!(cache.get(&digest, Check::Contents).unwrap().is_some());
    }
}
