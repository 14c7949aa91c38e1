//! The content-addressed artifact cache on disk (`--artifact-cache DIR`): unpacked layers named
//! by their digest, so an unchanged artifact costs no download, across restarts too.
//!
//! Layout: `layers/<hex>/` holds an unpacked layer and `layers/<hex>.json` lists its files
//! (path, size, sha256). The list is written last, atomically: it is the commit point. A
//! directory without its list is a half-written entry (a crash mid-unpack or mid-commit) and is
//! removed; an entry whose files no longer match their list was changed on disk and is removed
//! too. Either way the caller fetches the layer again.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use spokelet_base::lock::lock;

use crate::digest::Digest;
use crate::unpack::{FileSum, UnpackError, UnpackLimits, Unpacked, unpack_layer};

/// Why the cache could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("artifact cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    /// Another unpack of the same digest was in the way and its entry turned out broken; the
    /// blob is spent, so the caller fetches it again.
    #[error("artifact cache entry {0} was replaced while unpacking; fetch the layer again")]
    Raced(Digest),
}

/// How thoroughly [`ArtifactCache::get`] checks an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Every listed file exists with its size (a stat each): cheap enough for every poll.
    Sizes,
    /// Every listed file hashes to its digest: reads the whole entry.
    Contents,
}

/// The cache; every method works on the disk, so several agents' restarts see the same state.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    layers: PathBuf,
    /// One lock per digest being put, shared by the clones: two works pulling the same artifact
    /// at once unpack it once, the second finding the first's entry, instead of the second
    /// finding a directory whose file list is not yet written (and taking it for a broken one).
    putting: Arc<Mutex<HashMap<String, Arc<Mutex<()>>>>>,
}

impl ArtifactCache {
    /// Opens (creating) the cache under `dir`, removing half-written entries left by a crash.
    pub fn open(dir: &Path) -> Result<ArtifactCache, CacheError> {
        let layers = dir.join("layers");
        fs::create_dir_all(&layers).map_err(io_err(&layers))?;
        let cache = ArtifactCache {
            layers,
            putting: Arc::default(),
        };
        cache.sweep_partial()?;
        Ok(cache)
    }

    /// The unpacked layer of `digest`, if the cache holds it intact; a broken entry is removed
    /// and reported as absent.
    pub fn get(&self, digest: &Digest, check: Check) -> Result<Option<PathBuf>, CacheError> {
        let dir = self.entry_dir(digest);
        let list = match fs::read(self.list_path(digest)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // A directory without its list never finished.
                self.remove(digest)?;
                return Ok(None);
            }
            Err(e) => return Err(io_err(&self.list_path(digest))(e)),
        };
        let intact = serde_json::from_slice::<Vec<FileSum>>(&list)
            .ok()
            .is_some_and(|sums| matches_disk(&dir, &sums, check));
        if !intact {
            self.remove(digest)?;
            return Ok(None);
        }
        Ok(Some(dir))
    }

    /// Unpacks layer `blob` (checked against `digest` as it streams) into the cache and returns
    /// its directory. Another unpack of the same digest finishing first is a hit, not an error.
    pub fn put(
        &self,
        digest: &Digest,
        blob: impl Read,
        limits: &UnpackLimits,
    ) -> Result<PathBuf, CacheError> {
        let mine = lock(&self.putting)
            .entry(digest.hex().to_string())
            .or_default()
            .clone();
        let result = {
            let _held = lock(&mine);
            self.put_locked(digest, blob, limits)
        };
        // The last one out removes the digest's lock (the map holds one count, this call one).
        let mut putting = lock(&self.putting);
        if Arc::strong_count(&mine) <= 2 {
            putting.remove(digest.hex());
        }
        result
    }

    /// [`ArtifactCache::put`] while holding the digest's lock.
    fn put_locked(
        &self,
        digest: &Digest,
        blob: impl Read,
        limits: &UnpackLimits,
    ) -> Result<PathBuf, CacheError> {
        // A hit needs no unpack; a broken entry in the way is removed by `get`.
        if let Some(dir) = self.get(digest, Check::Sizes)? {
            return Ok(dir);
        }
        let dir = self.entry_dir(digest);
        let done: Unpacked = match unpack_layer(blob, digest, &dir, limits) {
            Ok(done) => done,
            Err(UnpackError::DestinationExists(_)) => {
                return self
                    .get(digest, Check::Sizes)?
                    .ok_or_else(|| CacheError::Raced(digest.clone()));
            }
            Err(e) => return Err(e.into()),
        };
        let list = self.list_path(digest);
        let tmp = list.with_extension("json.partial");
        let text = serde_json::to_vec(&done.sums).map_err(|e| io_err(&list)(io::Error::other(e)))?;
        fs::write(&tmp, text).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &list).map_err(io_err(&list))?;
        Ok(dir)
    }

    /// Removes every entry whose digest is not in `keep`; returns how many went.
    pub fn collect_garbage(&self, keep: &HashSet<Digest>) -> Result<usize, CacheError> {
        // An entry is its directory, its list, or both (half-written or half-removed).
        let held: HashSet<Digest> = self
            .names()?
            .iter()
            .filter_map(|name| Digest::parse(&format!("sha256:{}", name.trim_end_matches(".json"))).ok())
            .collect();
        let mut removed = 0;
        for digest in held.difference(keep) {
            self.remove(digest)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// A fresh file for a layer blob being downloaded, on the cache's filesystem. It is removed
    /// when the returned guard is dropped, so a download that fails or is cancelled halfway
    /// leaves nothing behind (a retry every few seconds would otherwise fill the volume); one
    /// left by a crash is removed at the next open.
    pub fn scratch_file(&self, digest: &Digest) -> ScratchFile {
        ScratchFile {
            path: self.layers.join(format!(
                ".{}.download-{:016x}",
                digest.hex(),
                rand::random::<u64>()
            )),
        }
    }

    fn entry_dir(&self, digest: &Digest) -> PathBuf {
        self.layers.join(digest.hex())
    }

    fn list_path(&self, digest: &Digest) -> PathBuf {
        self.layers.join(format!("{}.json", digest.hex()))
    }

    /// Removes an entry and its list (the list first, so a crash in between leaves a directory
    /// without a list: half-written, removed next time).
    fn remove(&self, digest: &Digest) -> Result<(), CacheError> {
        let list = self.list_path(digest);
        match fs::remove_file(&list) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&list)(e)),
            _ => {}
        }
        let dir = self.entry_dir(digest);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// Names in `layers/`.
    fn names(&self) -> Result<Vec<String>, CacheError> {
        let read = fs::read_dir(&self.layers).map_err(io_err(&self.layers))?;
        Ok(read
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    }

    /// Removes staging directories and half-written lists of unpacks that never finished.
    fn sweep_partial(&self) -> Result<(), CacheError> {
        for name in self.names()? {
            let path = self.layers.join(&name);
            if name.starts_with('.') && name.contains(".partial-") {
                fs::remove_dir_all(&path).map_err(io_err(&path))?;
            } else if name.ends_with(".json.partial")
                || (name.starts_with('.') && name.contains(".download-"))
            {
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
        Ok(())
    }
}

/// A download's scratch file, removed when dropped (the file need not exist yet).
#[derive(Debug)]
pub struct ScratchFile {
    path: PathBuf,
}

impl ScratchFile {
    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a download's scratch file");
            }
            _ => {}
        }
    }
}

/// Whether the files under `dir` are the listed ones.
fn matches_disk(dir: &Path, sums: &[FileSum], check: Check) -> bool {
    sums.iter().all(|s| {
        let path = dir.join(&s.path);
        match check {
            Check::Sizes => fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == s.size),
            Check::Contents => hash_file(&path).is_ok_and(|(size, hex)| size == s.size && hex == s.sha256),
        }
    })
}

/// Size and hex sha256 of a file, streamed.
fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let size = io::copy(&mut fs::File::open(path)?, &mut hasher)?;
    Ok((size, hex::encode(hasher.finalize())))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}
