//! Packing a directory as a Flux-format artifact layer: a gzip-compressed tarball whose bytes
//! depend only on the files' paths, contents and permission bits.
//!
//! Entries go in lexical order of their paths; owners, group names and times are zeroed; the
//! gzip header carries no time or file name. So the same tree gives the same digest on any
//! machine, in any time zone, at any time (what `--reproducible` promises).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use flate2::{Compression, GzBuilder};
use tar::{EntryType, Header};

/// Why a directory could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Symlinks and special files would be lost or refused on the spoke: refused here instead.
    #[error("{0} is not a regular file or directory; artifacts hold only those")]
    Unsupported(PathBuf),
    #[error("{0} is not valid UTF-8; artifact paths must be")]
    NotUtf8(PathBuf),
    #[error("writing the artifact: {0}")]
    Write(#[source] io::Error),
}

/// Packs the tree under `dir` into `out` (the layer, gzip-compressed); returns `out`.
pub fn pack_dir<W: Write>(dir: &Path, out: W) -> Result<W, PackError> {
    let mut paths = Vec::new();
    walk(dir, Path::new(""), &mut paths)?;
    // Lexical order of the archive paths, whatever order the filesystem lists them in.
    paths.sort_by(|a, b| a.0.cmp(&b.0));
    let gz = GzBuilder::new().mtime(0).write(out, Compression::best());
    let mut tar = tar::Builder::new(gz);
    for (name, path, is_dir) in paths {
        let meta = fs::metadata(&path).map_err(read_err(&path))?;
        let mut h = Header::new_ustar();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_username("").map_err(PackError::Write)?;
        h.set_groupname("").map_err(PackError::Write)?;
        h.set_mode(permission_bits(&meta));
        if is_dir {
            h.set_entry_type(EntryType::Directory);
            h.set_size(0);
            tar.append_data(&mut h, format!("{name}/"), io::empty())
                .map_err(PackError::Write)?;
        } else {
            h.set_entry_type(EntryType::Regular);
            h.set_size(meta.len());
            let file = fs::File::open(&path).map_err(read_err(&path))?;
            tar.append_data(&mut h, &name, file).map_err(PackError::Write)?;
        }
    }
    let gz = tar.into_inner().map_err(PackError::Write)?;
    gz.finish().map_err(PackError::Write)
}

/// Collects `(archive path, disk path, is a directory)` under `root/rel`.
fn walk(root: &Path, rel: &Path, out: &mut Vec<(String, PathBuf, bool)>) -> Result<(), PackError> {
    let here = root.join(rel);
    for entry in fs::read_dir(&here).map_err(read_err(&here))? {
        let entry = entry.map_err(read_err(&here))?;
        let path = entry.path();
        let rel = rel.join(entry.file_name());
        let name = rel
            .to_str()
            .ok_or_else(|| PackError::NotUtf8(path.clone()))?
            .to_string();
        // symlink_metadata: a link is reported as one, never followed.
        let kind = fs::symlink_metadata(&path).map_err(read_err(&path))?.file_type();
        if kind.is_dir() {
            out.push((name, path, true));
            walk(root, &rel, out)?;
        } else if kind.is_file() {
            out.push((name, path, false));
        } else {
            return Err(PackError::Unsupported(path));
        }
    }
    Ok(())
}

/// The permission bits only: ownership-like bits (setuid, setgid, sticky) are not carried.
fn permission_bits(meta: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o777
}

fn read_err(path: &Path) -> impl Fn(io::Error) -> PackError + '_ {
    move |source| PackError::Read {
        path: path.to_path_buf(),
        source,
    }
}
