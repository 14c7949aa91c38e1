//! Packing: reproducible bytes, lexical order, zeroed owners and times, modes kept, and a round
//! trip through the unpacker.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use spokelet_artifact::digest::Digest;
use spokelet_artifact::pack::{PackError, pack_dir};
use spokelet_artifact::unpack::{UnpackLimits, unpack_layer};

fn tree(root: &Path) {
    std::fs::create_dir_all(root.join("deploy/b")).unwrap();
    std::fs::create_dir_all(root.join("deploy/a")).unwrap();
    std::fs::write(root.join("deploy/b/z.yaml"), "kind: Secret\n").unwrap();
    std::fs::write(root.join("deploy/a/y.yaml"), "kind: ConfigMap\n").unwrap();
    std::fs::write(root.join("run.sh"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn set_mtime(path: &Path, secs: i64) {
    let status = std::process::Command::new("touch")
        .arg("-d")
        .arg(format!("@{secs}"))
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn the_same_tree_gives_the_same_bytes_whatever_its_times() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tree(one.path());
    tree(two.path());
    set_mtime(&one.path().join("deploy/a/y.yaml"), 1_000_000_000);
    set_mtime(&two.path().join("deploy/a/y.yaml"), 1_700_000_000);
    let a = pack_dir(one.path(), Vec::new()).unwrap();
    let b = pack_dir(two.path(), Vec::new()).unwrap();
    assert_eq!(Digest::of(&a), Digest::of(&b));
}

#[test]
fn entries_are_in_lexical_order_with_owners_and_times_zeroed_and_modes_kept() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    let blob = pack_dir(dir.path(), Vec::new()).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
    let mut names = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let h = entry.header();
        assert_eq!(
            (h.mtime().unwrap(), h.uid().unwrap(), h.gid().unwrap()),
            (0, 0, 0)
        );
        assert_eq!(h.username().unwrap(), Some(""));
        let name = String::from_utf8(entry.path_bytes().to_vec()).unwrap();
        if name == "run.sh" {
            assert_eq!(h.mode().unwrap(), 0o755);
        }
        names.push(name);
    }
    assert_eq!(
        names,
        [
            "deploy/",
            "deploy/a/",
            "deploy/a/y.yaml",
            "deploy/b/",
            "deploy/b/z.yaml",
            "run.sh"
        ]
    );
    // The gzip header carries no time either.
    assert_eq!(&blob[4..8], &[0, 0, 0, 0]);
}

#[test]
fn a_packed_tree_unpacks_to_the_same_files() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    let blob = pack_dir(dir.path(), Vec::new()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("entry");
    let done = unpack_layer(&blob[..], &Digest::of(&blob), &dest, &UnpackLimits::default()).unwrap();
    assert_eq!(done.files, 3);
    let mut text = String::new();
    std::fs::File::open(dest.join("deploy/b/z.yaml"))
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "kind: Secret\n");
    let mode = std::fs::metadata(dest.join("run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
}

#[test]
fn a_symlink_is_refused_rather_than_lost() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path());
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("deploy/link")).unwrap();
    let e = pack_dir(dir.path(), Vec::new()).unwrap_err();
    assert!(
        matches!(e, PackError::Unsupported(ref p) if p.ends_with("deploy/link")),
        "{e}"
    );
}
