//! Property tests with hostile generators for the unpacker: archives of random entries (names
//! with `..`, absolute paths, long names, every entry type, GNU long-name and PAX headers with
//! random sizes, data of any length), random bytes, and archives cut short, each unpacked
//! within small limits. Whatever the input: no panic, a typed result, nothing left behind on
//! failure, and never more unpacked than the limit allows.

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use proptest::prelude::*;
use spokelet_artifact::unpack::{UnpackLimits, unpack_tar_gz};
use tar::{EntryType, Header};

/// Limits small enough that generated inputs hit every one of them.
fn limits() -> UnpackLimits {
    UnpackLimits {
        max_compressed: 64 * 1024,
        max_uncompressed: 256 * 1024,
        max_files: 20,
        max_depth: 4,
        max_ratio: 200,
    }
}

/// Entry names an attacker would try, and ordinary ones.
fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"a.yaml".to_vec()),
        Just(b"../escape.yaml".to_vec()),
        Just(b"/etc/passwd".to_vec()),
        Just(b"a/../../b".to_vec()),
        Just(b"./".to_vec()),
        Just(b"a/b/c/d/e/f.yaml".to_vec()),
        Just(b"a/./b/../c".to_vec()),
        proptest::collection::vec(any::<u8>(), 1..99),
        "[a-z./]{1,40}".prop_map(String::into_bytes),
    ]
}

fn kind() -> impl Strategy<Value = EntryType> {
    prop_oneof![
        Just(EntryType::Regular),
        Just(EntryType::Directory),
        Just(EntryType::Symlink),
        Just(EntryType::Link),
        Just(EntryType::Char),
        Just(EntryType::Block),
        Just(EntryType::Fifo),
        Just(EntryType::GNULongName),
        Just(EntryType::XHeader),
        Just(EntryType::XGlobalHeader),
        Just(EntryType::GNUSparse),
        any::<u8>().prop_map(EntryType::new),
    ]
}

/// One raw entry: a header (its size may lie about the data) and its data.
fn entry() -> impl Strategy<Value = Vec<u8>> {
    (
        name(),
        kind(),
        proptest::collection::vec(any::<u8>(), 0..2048),
        0u64..(1 << 40),
        any::<bool>(),
    )
        .prop_map(|(name, kind, data, claimed, lie)| {
            let mut h = Header::new_gnu();
            let n = name.len().min(100);
            h.as_gnu_mut().unwrap().name[..n].copy_from_slice(&name[..n]);
            h.set_entry_type(kind);
            h.set_size(if lie { claimed } else { data.len() as u64 });
            h.set_mode(0o644);
            h.set_cksum();
            let mut out = h.as_bytes().to_vec();
            out.extend_from_slice(&data);
            out.resize(out.len().div_ceil(512) * 512, 0);
            out
        })
}

/// An input: a gzip of random entries (maybe cut short, maybe of zeros that compress well),
/// or bytes that are not gzip at all.
fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => (proptest::collection::vec(entry(), 0..8), any::<bool>(), 0usize..4096, 0usize..(512 * 1024)).prop_map(
            |(entries, cut, cut_at, zeros)| {
                let mut gz = GzEncoder::new(Vec::new(), Compression::default());
                for e in entries {
                    gz.write_all(&e).unwrap();
                }
                gz.write_all(&vec![0u8; zeros]).unwrap();
                let mut bytes = gz.finish().unwrap();
                if cut {
                    bytes.truncate(cut_at.min(bytes.len()));
                }
                bytes
            }
        ),
        1 => proptest::collection::vec(any::<u8>(), 0..4096),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_archive_unpacks_within_its_limits_or_is_refused_leaving_nothing(bytes in input()) {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("entry");
        let limits = limits();
        match unpack_tar_gz(&bytes[..], &dest, &limits) {
            Ok(done) => {
                prop_assert!(done.bytes <= limits.max_uncompressed);
                prop_assert!(done.files + done.directories <= limits.max_files);
                // Everything written is inside the destination.
                let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
                prop_assert_eq!(left, vec![std::ffi::OsString::from("entry")]);
            }
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
                prop_assert!(left.is_empty(), "a refused archive ({}) left {:?}", e, left);
            }
        }
    }
}
