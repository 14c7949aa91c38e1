//! Streamed, bounded unpacking of a gzip-compressed tarball into one directory.
//!
//! An artifact comes from a registry the hub chose, so it is treated as hostile: it is read as a
//! stream (never whole in memory), every limit is checked while reading, and entries are written
//! into a staging directory next to the destination that is renamed into place only when the
//! whole archive passed. A failed unpack leaves nothing behind. Written here rather than with
//! `tar::Archive::unpack` because that follows Flux's trade-offs (it extracts symlinks and has
//! no size, count or ratio limits); the `tar` crate still does the parsing.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;
use tar::EntryType;

use crate::digest::{Digest, DigestMismatch, Verifying, mismatch_of};

/// Bounds on one archive. Every one is checked while streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Bytes of the compressed stream.
    pub max_compressed: u64,
    /// Bytes of file contents once decompressed.
    pub max_uncompressed: u64,
    /// Entries (files and directories).
    pub max_files: u64,
    /// Path components of an entry.
    pub max_depth: usize,
    /// Decompressed bytes per compressed byte, checked once [`RATIO_GRACE`] bytes are out:
    /// a gzip bomb trips it long before it fills a disk.
    pub max_ratio: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_compressed: 100 * 1024 * 1024,
            max_uncompressed: 1024 * 1024 * 1024,
            max_files: 10_000,
            max_depth: 32,
            max_ratio: 200,
        }
    }
}

/// Decompressed bytes before the ratio is checked: a small archive of repetitive text may well
/// compress better than the ratio, and cannot hurt anyone.
pub const RATIO_GRACE: u64 = 1024 * 1024;

/// Why an archive was refused. Every variant names what was wrong; nothing of the archive is
/// left on disk.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("the compressed artifact is over the {limit} byte limit")]
    CompressedTooLarge { limit: u64 },
    #[error("the artifact unpacks to over the {limit} byte limit")]
    UncompressedTooLarge { limit: u64 },
    #[error("the artifact decompresses more than {limit}:1 (a compression bomb)")]
    RatioTooHigh { limit: u64 },
    #[error("the artifact has over {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("entry {path:?} is {depth} components deep, over the limit of {limit}")]
    TooDeep {
        path: String,
        depth: usize,
        limit: usize,
    },
    #[error("entry {0:?} has an absolute path")]
    AbsolutePath(String),
    #[error("entry {0:?} has a '..' component")]
    ParentComponent(String),
    #[error("entry {path:?} is a {kind}, which an artifact may not hold")]
    ForbiddenEntry { path: String, kind: &'static str },
    #[error("entry {0:?} appears twice")]
    DuplicatePath(String),
    #[error("entry {0:?} has an empty path")]
    EmptyPath(String),
    #[error("{0} already exists")]
    DestinationExists(PathBuf),
    /// The layer's bytes are not the ones its digest names (tampered with, or truncated).
    #[error("the layer does not match its digest: {0}")]
    DigestMismatch(#[from] DigestMismatch),
    /// The stream is not a valid gzip-compressed tarball (or is truncated).
    #[error("the artifact is not a valid gzip-compressed tarball: {0}")]
    Corrupt(String),
    /// Writing the files failed.
    #[error("unpacking into {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One file an unpack wrote: its path under the entry, size and content digest, so a cache
/// can later tell whether the files on disk are still the ones unpacked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileSum {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// What an unpack wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Regular files written.
    pub files: u64,
    /// Directories created from directory entries.
    pub directories: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
    /// Symlinks and hard links skipped (never extracted, as Flux skips symlinks).
    pub skipped_links: u64,
    /// Every file written, in archive order.
    pub sums: Vec<FileSum>,
}

/// Unpacks the gzip-compressed tarball read from `archive` into `dest`, which must not exist.
/// On error nothing is left: neither `dest` nor the staging directory.
pub fn unpack_tar_gz<R: Read>(
    archive: R,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<Unpacked, UnpackError> {
    if dest.exists() {
        return Err(UnpackError::DestinationExists(dest.to_path_buf()));
    }
    let staging = staging_path(dest);
    let result = unpack_into(archive, &staging, limits).and_then(|done| {
        fs::rename(&staging, dest).map_err(|source| UnpackError::Write {
            path: dest.to_path_buf(),
            source,
        })?;
        Ok(done)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

/// Unpacks a layer blob that must hash to `digest`: the whole blob is read and checked before
/// the entry is put in place, so a tampered or truncated layer leaves nothing behind.
pub fn unpack_layer<R: Read>(
    blob: R,
    digest: &Digest,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<Unpacked, UnpackError> {
    unpack_tar_gz(Verifying::new(blob, digest.clone()), dest, limits)
}

/// A fresh sibling of `dest`: on the same filesystem, so the final rename is atomic.
fn staging_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.partial-{:016x}", rand::random::<u64>()))
}

/// Counts the bytes read through it and refuses more than `limit`.
struct Counted<R> {
    inner: R,
    read: std::rc::Rc<std::cell::Cell<u64>>,
    limit: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let total = self.read.get() + n as u64;
        self.read.set(total);
        if total > self.limit {
            return Err(io::Error::other(LimitHit::Compressed));
        }
        Ok(n)
    }
}

/// A limit hit inside a reader, carried through `io::Error` and turned back into its
/// [`UnpackError`] by [`from_io`].
#[derive(Debug, Clone, Copy, thiserror::Error)]
enum LimitHit {
    #[error("compressed size limit")]
    Compressed,
    #[error("unpacked size limit")]
    Uncompressed,
    #[error("compression ratio limit")]
    Ratio,
}

fn from_io(e: io::Error, limits: &UnpackLimits) -> UnpackError {
    if let Some(m) = mismatch_of(&e) {
        return UnpackError::DigestMismatch(m.clone());
    }
    match e.get_ref().and_then(|inner| inner.downcast_ref::<LimitHit>()) {
        Some(LimitHit::Compressed) => UnpackError::CompressedTooLarge {
            limit: limits.max_compressed,
        },
        Some(LimitHit::Uncompressed) => UnpackError::UncompressedTooLarge {
            limit: limits.max_uncompressed,
        },
        Some(LimitHit::Ratio) => UnpackError::RatioTooHigh {
            limit: limits.max_ratio,
        },
        None => UnpackError::Corrupt(e.to_string()),
    }
}

/// The gzip decoder's output, every byte counted against the unpacked size and ratio limits:
/// file contents, and tar headers, GNU long names and PAX records alike. The tar reader keeps a
/// long name or a PAX record whole in memory, so counting only file contents let a header of
/// 800 MiB of zeros (800 KB compressed) through; counted here, it stops within the ratio limit.
struct Decompressed<R> {
    inner: R,
    limits: UnpackLimits,
    /// Compressed bytes read so far (the [`Counted`] under the decoder).
    compressed: std::rc::Rc<std::cell::Cell<u64>>,
    /// Decompressed bytes given so far.
    uncompressed: u64,
}

impl<R: Read> Read for Decompressed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.uncompressed += n as u64;
        if self.uncompressed > self.limits.max_uncompressed {
            return Err(io::Error::other(LimitHit::Uncompressed));
        }
        let compressed = self.compressed.get().max(1);
        if self.uncompressed > RATIO_GRACE && self.uncompressed / compressed > self.limits.max_ratio {
            return Err(io::Error::other(LimitHit::Ratio));
        }
        Ok(n)
    }
}

fn unpack_into<R: Read>(archive: R, staging: &Path, limits: &UnpackLimits) -> Result<Unpacked, UnpackError> {
    fs::create_dir(staging).map_err(write_err(staging))?;
    let compressed = std::rc::Rc::new(std::cell::Cell::new(0));
    let counted = Counted {
        inner: archive,
        read: compressed.clone(),
        limit: limits.max_compressed,
    };
    let mut tar = tar::Archive::new(Decompressed {
        inner: GzDecoder::new(counted),
        limits: *limits,
        compressed,
        uncompressed: 0,
    });
    let mut run = Extraction {
        staging,
        limits,
        seen: HashSet::new(),
        count: 0,
        done: Unpacked::default(),
    };
    for entry in tar.entries().map_err(|e| from_io(e, limits))? {
        run.take(entry.map_err(|e| from_io(e, limits))?)?;
    }
    // Read the input to its end (still bounded): bytes after the archive are part of the blob,
    // and a verifying reader gives its verdict only there.
    let mut rest = tar.into_inner().inner.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| from_io(e, limits))?;
    Ok(run.done)
}

/// One unpack between its entries.
struct Extraction<'a> {
    staging: &'a Path,
    limits: &'a UnpackLimits,
    /// Paths written so far, to refuse a second entry for one.
    seen: HashSet<PathBuf>,
    /// Entries read, skipped ones too: a million symlinks cost as much to read as files.
    count: u64,
    done: Unpacked,
}

impl Extraction<'_> {
    /// Checks one entry and writes it, skips it, or refuses the archive.
    fn take<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let limits = self.limits;
        self.count += 1;
        if self.count > limits.max_files {
            return Err(UnpackError::TooManyEntries {
                limit: limits.max_files,
            });
        }
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        match kind {
            // Archive-wide metadata (`git archive` writes one), not a file.
            EntryType::XGlobalHeader => return Ok(()),
            EntryType::Symlink | EntryType::Link => {
                self.done.skipped_links += 1;
                return Ok(());
            }
            _ => {}
        }
        let rel = checked_path(&raw, limits.max_depth)?;
        if !self.seen.insert(rel.clone()) {
            return Err(UnpackError::DuplicatePath(raw));
        }
        let target = self.staging.join(&rel);
        match kind {
            EntryType::Directory => {
                fs::create_dir_all(&target).map_err(write_err(&target))?;
                self.done.directories += 1;
            }
            EntryType::Regular | EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(write_err(parent))?;
                }
                let mode = entry.header().mode().unwrap_or(0o644);
                let (size, sha256) = copy_file(&mut entry, &target, mode, limits)?;
                self.done.bytes += size;
                self.done.files += 1;
                let path = rel.to_string_lossy().into_owned();
                self.done.sums.push(FileSum { path, size, sha256 });
            }
            other => {
                return Err(UnpackError::ForbiddenEntry {
                    path: raw,
                    kind: kind_name(other),
                });
            }
        }
        Ok(())
    }
}

/// A write failure at `path`.
fn write_err(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// The entry's path relative to the archive root, refused if absolute, if any component is
/// `..` (by component, not by text), if empty, or deeper than `max_depth`.
fn checked_path(raw: &str, max_depth: usize) -> Result<PathBuf, UnpackError> {
    let mut rel = PathBuf::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(UnpackError::ParentComponent(raw.to_string())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(UnpackError::AbsolutePath(raw.to_string()));
            }
        }
    }
    let depth = rel.components().count();
    if depth == 0 {
        return Err(UnpackError::EmptyPath(raw.to_string()));
    }
    if depth > max_depth {
        return Err(UnpackError::TooDeep {
            path: raw.to_string(),
            depth,
            limit: max_depth,
        });
    }
    Ok(rel)
}

/// Writes one file's contents as they stream (counted where they are decompressed). The file is
/// created new (an existing path, which a duplicate entry or a directory would be, fails), and
/// keeps only the permission bits (no setuid, setgid or sticky bit). Returns its size and
/// hex sha256.
fn copy_file(
    from: &mut impl Read,
    to: &Path,
    mode: u32,
    limits: &UnpackLimits,
) -> Result<(u64, String), UnpackError> {
    use sha2::Digest as _;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let werr = |source| UnpackError::Write {
        path: to.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o777)
        .open(to)
        .map_err(werr)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    let mut hasher = sha2::Sha256::new();
    loop {
        let n = from.read(&mut buf).map_err(|e| from_io(e, limits))?;
        if n == 0 {
            return Ok((written, hex::encode(hasher.finalize())));
        }
        file.write_all(&buf[..n]).map_err(werr)?;
        hasher.update(&buf[..n]);
        written += n as u64;
    }
}

/// A name for an entry type an artifact may not hold.
fn kind_name(kind: EntryType) -> &'static str {
    match kind {
        EntryType::Char => "character device",
        EntryType::Block => "block device",
        EntryType::Fifo => "FIFO",
        EntryType::GNUSparse => "sparse file",
        _ => "special entry",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_by_component() {
        assert_eq!(checked_path("./a/b.yaml", 32).unwrap(), PathBuf::from("a/b.yaml"));
        assert!(matches!(
            checked_path("a/../../x", 32),
            Err(UnpackError::ParentComponent(_))
        ));
        assert!(matches!(
            checked_path("/etc/passwd", 32),
            Err(UnpackError::AbsolutePath(_))
        ));
        assert!(matches!(checked_path("./", 32), Err(UnpackError::EmptyPath(_))));
        // Dots inside a name are a name, not a parent directory.
        assert!(checked_path("a/..b/c..", 32).is_ok());
        assert!(matches!(
            checked_path("a/b/c", 2),
            Err(UnpackError::TooDeep { depth: 3, .. })
        ));
    }
}
