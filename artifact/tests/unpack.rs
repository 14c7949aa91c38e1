//! Hostile and ordinary artifacts through the unpacker: each hostile one is refused with its
//! own reason, and nothing is left on disk, inside the cache directory or out of it.

use std::io::{Read, Write};
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use spokelet_artifact::unpack::{UnpackError, UnpackLimits, Unpacked, unpack_tar_gz};
use tar::{EntryType, Header};

/// One tar entry with any name bytes (the `tar` builder refuses `..` and absolute names, which
/// is exactly what these tests need to send).
fn raw_entry(name: &[u8], kind: EntryType, data: &[u8]) -> Vec<u8> {
    let mut h = Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// A gzip-compressed tarball of `entries`, with the two zero blocks that end an archive.
fn tar_gz(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    for e in entries {
        gz.write_all(e).unwrap();
    }
    gz.write_all(&[0u8; 1024]).unwrap();
    gz.finish().unwrap()
}

fn file(name: &str, data: &str) -> Vec<u8> {
    raw_entry(name.as_bytes(), EntryType::Regular, data.as_bytes())
}

/// Unpacks `archive` into `<tmp>/cache/entry` and checks that whatever happened, the only thing
/// under `<tmp>` is that entry (on success) or nothing at all (on failure).
fn unpack(archive: impl Read, limits: &UnpackLimits) -> (tempfile::TempDir, Result<Unpacked, UnpackError>) {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let dest = cache.join("entry");
    let result = unpack_tar_gz(archive, &dest, limits);
    let left: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    match &result {
        Ok(_) => assert_eq!(left, vec!["entry".to_string()]),
        Err(e) => assert!(left.is_empty(), "a failed unpack ({e}) left {left:?}"),
    }
    let outside: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(
        outside.len(),
        1,
        "only the cache directory exists under the temp dir"
    );
    (tmp, result)
}

fn refused(archive: Vec<u8>) -> UnpackError {
    match unpack(&archive[..], &UnpackLimits::default()).1 {
        Ok(done) => panic!("unpacked a hostile archive: {done:?}"),
        Err(e) => e,
    }
}

#[test]
fn an_ordinary_artifact_unpacks_with_its_tree_and_modes() {
    use std::os::unix::fs::PermissionsExt;
    let mut exec = raw_entry(b"bin/run.sh", EntryType::Regular, b"#!/bin/sh\n");
    // mode 0o4755: the setuid bit must not survive.
    let mut h = Header::from_byte_slice(&exec[..512]).clone();
    h.set_mode(0o4755);
    h.set_cksum();
    exec[..512].copy_from_slice(h.as_bytes());
    let archive = tar_gz(&[
        raw_entry(b"./deploy/", EntryType::Directory, b""),
        file("./deploy/app.yaml", "kind: ConfigMap\n"),
        file("deploy/nested/more.yaml", "kind: Secret\n"),
        exec,
    ]);
    let (tmp, done) = unpack(&archive[..], &UnpackLimits::default());
    let done = done.unwrap();
    assert_eq!((done.files, done.directories, done.skipped_links), (3, 1, 0));
    let root = tmp.path().join("cache/entry");
    assert_eq!(
        std::fs::read_to_string(root.join("deploy/app.yaml")).unwrap(),
        "kind: ConfigMap\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("deploy/nested/more.yaml")).unwrap(),
        "kind: Secret\n"
    );
    let mode = std::fs::metadata(root.join("bin/run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
}

#[test]
fn path_traversal_and_absolute_paths_are_refused() {
    let e = refused(tar_gz(&[file("ok.yaml", "a"), file("a/../../escape", "x")]));
    assert!(
        matches!(e, UnpackError::ParentComponent(ref p) if p == "a/../../escape"),
        "{e}"
    );
    let e = refused(tar_gz(&[file("/etc/cron.d/x", "x")]));
    assert!(matches!(e, UnpackError::AbsolutePath(_)), "{e}");
    assert!(e.to_string().contains("/etc/cron.d/x"), "{e}");
}

#[test]
fn links_are_skipped_and_counted_never_extracted() {
    let mut link = Header::new_gnu();
    link.set_entry_type(EntryType::Symlink);
    link.set_path("evil").unwrap();
    link.set_link_name("/etc/passwd").unwrap();
    link.set_size(0);
    link.set_cksum();
    let mut hard = Header::new_gnu();
    hard.set_entry_type(EntryType::Link);
    hard.set_path("hard").unwrap();
    hard.set_link_name("/etc/shadow").unwrap();
    hard.set_size(0);
    hard.set_cksum();
    let archive = tar_gz(&[
        link.as_bytes().to_vec(),
        hard.as_bytes().to_vec(),
        file("a.yaml", "a"),
    ]);
    let (tmp, done) = unpack(&archive[..], &UnpackLimits::default());
    let done = done.unwrap();
    assert_eq!((done.files, done.skipped_links), (1, 2));
    let root = tmp.path().join("cache/entry");
    assert!(!root.join("evil").exists() && std::fs::symlink_metadata(root.join("evil")).is_err());
    assert!(!root.join("hard").exists());
}

#[test]
fn devices_and_fifos_are_refused() {
    for (kind, name) in [
        (EntryType::Char, "character device"),
        (EntryType::Block, "block device"),
        (EntryType::Fifo, "FIFO"),
    ] {
        let e = refused(tar_gz(&[raw_entry(b"dev/x", kind, b"")]));
        assert!(
            matches!(e, UnpackError::ForbiddenEntry { kind: k, .. } if k == name),
            "{e}"
        );
    }
}

#[test]
fn a_path_given_twice_is_refused() {
    let e = refused(tar_gz(&[file("a.yaml", "one"), file("./a.yaml", "two")]));
    assert!(matches!(e, UnpackError::DuplicatePath(_)), "{e}");
}

#[test]
fn paths_deeper_than_the_limit_are_refused() {
    let deep = format!("{}f.yaml", "d/".repeat(32));
    let e = refused(tar_gz(&[file(&deep, "x")]));
    assert!(
        matches!(
            e,
            UnpackError::TooDeep {
                depth: 33,
                limit: 32,
                ..
            }
        ),
        "{e}"
    );
}

/// An endless stream: a tar header announcing a 10 GB file, then zeros forever.
struct Bomb {
    header: Vec<u8>,
    at: usize,
}

impl Read for Bomb {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at < self.header.len() {
            let n = buf.len().min(self.header.len() - self.at);
            buf[..n].copy_from_slice(&self.header[self.at..self.at + n]);
            self.at += n;
            return Ok(n);
        }
        buf.fill(0);
        Ok(buf.len())
    }
}

/// Unpacks `h` followed by endless zeros, compressed on the fly: the unpacker must stop long
/// before the size the header announces is made.
fn unpack_bomb(h: &Header) -> UnpackError {
    let bomb = Bomb {
        header: h.as_bytes().to_vec(),
        at: 0,
    };
    let stream = flate2::read::GzEncoder::new(bomb, Compression::best());
    let (_tmp, result) = unpack(stream, &UnpackLimits::default());
    result.unwrap_err()
}

#[test]
fn a_10_gb_gzip_bomb_is_stopped_by_the_ratio() {
    let mut h = Header::new_gnu();
    h.set_path("zeros").unwrap();
    h.set_size(10 * 1024 * 1024 * 1024);
    h.set_cksum();
    let e = unpack_bomb(&h);
    assert!(matches!(e, UnpackError::RatioTooHigh { limit: 200 }), "{e}");
}

/// A GNU long-name header or a PAX record is metadata the tar reader keeps whole in memory: one
/// announcing 800 MiB of zeros (about 800 KB compressed) is stopped by the ratio as it is
/// decompressed, before it is held.
#[test]
fn an_800_mib_long_name_or_pax_header_is_stopped_as_it_decompresses() {
    for kind in [EntryType::GNULongName, EntryType::XHeader] {
        let mut h = Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        h.set_entry_type(kind);
        h.set_size(800 * 1024 * 1024);
        h.set_cksum();
        let e = unpack_bomb(&h);
        assert!(
            matches!(e, UnpackError::RatioTooHigh { limit: 200 }),
            "{kind:?}: {e}"
        );
    }
}

#[test]
fn size_limits_hold_for_compressed_and_uncompressed_bytes() {
    let body = "x".repeat(4096);
    let archive = tar_gz(&[file("a", &body), file("b", &body)]);
    let limits = UnpackLimits {
        max_uncompressed: 6000,
        ..UnpackLimits::default()
    };
    let e = unpack(&archive[..], &limits).1.unwrap_err();
    assert!(
        matches!(e, UnpackError::UncompressedTooLarge { limit: 6000 }),
        "{e}"
    );
    let limits = UnpackLimits {
        max_compressed: 64,
        ..UnpackLimits::default()
    };
    let e = unpack(&archive[..], &limits).1.unwrap_err();
    assert!(matches!(e, UnpackError::CompressedTooLarge { limit: 64 }), "{e}");
}

/// A stream of `n` empty files named `f<i>`, made as it is read.
struct ManyFiles {
    next: u64,
    n: u64,
    block: Vec<u8>,
    at: usize,
}

impl Read for ManyFiles {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.block.len() {
            if self.next == self.n {
                return Ok(0);
            }
            self.block = file(&format!("f{}", self.next), "");
            self.next += 1;
            self.at = 0;
        }
        let n = buf.len().min(self.block.len() - self.at);
        buf[..n].copy_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[test]
fn a_million_empty_files_stop_at_the_entry_limit() {
    let files = ManyFiles {
        next: 0,
        n: 1_000_000,
        block: Vec::new(),
        at: 0,
    };
    let stream = flate2::read::GzEncoder::new(files, Compression::fast());
    let (_tmp, result) = unpack(stream, &UnpackLimits::default());
    let e = result.unwrap_err();
    assert!(matches!(e, UnpackError::TooManyEntries { limit: 10_000 }), "{e}");
}

#[test]
fn truncated_and_non_gzip_input_is_corrupt() {
    let archive = tar_gz(&[file("a.yaml", &"y".repeat(10_000))]);
    let e = refused(archive[..archive.len() / 2].to_vec());
    assert!(matches!(e, UnpackError::Corrupt(_)), "{e}");
    let e = refused(b"{\"not\": \"a tarball\"}".to_vec());
    assert!(matches!(e, UnpackError::Corrupt(_)), "{e}");
}

#[test]
fn an_existing_destination_is_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("entry");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("keep"), "mine").unwrap();
    let archive = tar_gz(&[file("keep", "theirs")]);
    let e = unpack_tar_gz(&archive[..], &dest, &UnpackLimits::default()).unwrap_err();
    assert!(matches!(e, UnpackError::DestinationExists(_)), "{e}");
    assert_eq!(
        std::fs::read_to_string(Path::new(&dest).join("keep")).unwrap(),
        "mine"
    );
}

#[test]
fn a_layer_is_put_in_place_only_when_it_matches_its_digest() {
    use spokelet_artifact::digest::Digest;
    use spokelet_artifact::unpack::unpack_layer;
    let archive = tar_gz(&[file("app.yaml", "kind: ConfigMap\n")]);
    let digest = Digest::of(&archive);
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    let done = unpack_layer(&archive[..], &digest, &good, &UnpackLimits::default()).unwrap();
    assert_eq!(done.files, 1);
    assert!(good.join("app.yaml").exists());

    // Bytes after the archive are part of the blob: changing them breaks the digest.
    let mut tampered = archive.clone();
    tampered.extend_from_slice(b"appended");
    let (_tmp, result) = unpack(
        spokelet_artifact::digest::Verifying::new(&tampered[..], digest.clone()),
        &UnpackLimits::default(),
    );
    let e = result.unwrap_err();
    assert!(matches!(e, UnpackError::DigestMismatch(_)), "{e}");
    assert!(e.to_string().contains(&digest.to_string()), "{e}");
}
