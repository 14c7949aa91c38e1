//! Bounded, typed reads of sysfs and procfs files below a configurable root.
//!
//! Every reader in this crate goes through these helpers so that the rules for
//! a hostile or broken tree live in one place: reads are capped, non-UTF-8 is
//! reported rather than guessed at, a missing attribute is "absent" rather than
//! an error, and anything else becomes a warning that names the path.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

/// Largest sysfs attribute we read. The kernel caps text attributes at one
/// page, so anything bigger is not a real attribute; the cap keeps a hostile
/// tree (or a mistaken `--root`) from making us read gigabytes.
pub(crate) const ATTR_LIMIT: u64 = 64 * 1024;

/// Largest procfs table (`/proc/cpuinfo`, `/proc/meminfo`) we read.
/// `/proc/cpuinfo` grows with the CPU count (about 1.6 KiB per x86 thread, so
/// roughly 1.6 MiB on a 1024-thread machine); 16 MiB leaves ample headroom
/// while still bounding memory.
pub(crate) const PROC_LIMIT: u64 = 16 * 1024 * 1024;

/// Why a file under the root could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// The file exists (or should) but the OS refused to read or resolve it.
    #[error("{path}: {source}", path = .path.display())]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The file is larger than the cap for its kind; it was not parsed.
    #[error("{path}: larger than {limit} bytes, ignored", path = .path.display())]
    TooLarge {
        /// The oversized file.
        path: PathBuf,
        /// The cap that applied.
        limit: u64,
    },
    /// The file is not UTF-8 text.
    #[error("{path}: not valid UTF-8, ignored", path = .path.display())]
    NotUtf8 {
        /// The file with binary content.
        path: PathBuf,
    },
    /// The file was read but its content is not what the kernel writes there.
    #[error("{path}: unexpected value {value:?} (expected {expected})", path = .path.display())]
    Parse {
        /// The file with the odd value.
        path: PathBuf,
        /// The value as read (already trimmed, shortened if long).
        value: String,
        /// What we wanted, for the message.
        expected: &'static str,
    },
}

impl SysfsError {
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The file does not exist: for optional attributes that is an answer,
    /// not a problem.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    /// The kernel refused the read with `EINVAL`, which is how several
    /// attributes say "no value right now" (e.g. `speed` on a link that is
    /// down, `gid_attrs/ndevs/0` on an InfiniBand port).
    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::InvalidInput)
    }

    /// `EOPNOTSUPP`/`ENOSYS`: the driver has no answer for this attribute.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::Unsupported)
    }
}

/// Reads at most `limit` bytes of `path`; a longer file is an error rather
/// than silently truncated, since a truncated table parses into wrong counts.
pub(crate) fn read_bytes(path: &Path, limit: u64) -> Result<Vec<u8>, SysfsError> {
    read_impl(path, limit, false, |_| false)
}

/// Reads `path` like [`read_bytes`], but stops early once `done` says the
/// bytes read so far are enough. Procfs tables are generated as they are
/// read, so stopping early skips work in the kernel, not just copying.
pub(crate) fn read_until(
    path: &Path,
    limit: u64,
    done: impl Fn(&[u8]) -> bool,
) -> Result<Vec<u8>, SysfsError> {
    read_impl(path, limit, false, done)
}

/// The reader behind the others. With `short_read_is_eof`, a read that does
/// not fill the buffer ends the file: sysfs builds an attribute's whole
/// value on the first read, so this saves the extra `read` that would only
/// return 0. Procfs tables must not use it (they come one record at a time).
fn read_impl(
    path: &Path,
    limit: u64,
    short_read_is_eof: bool,
    done: impl Fn(&[u8]) -> bool,
) -> Result<Vec<u8>, SysfsError> {
    // O_NONBLOCK: a FIFO planted where an attribute should be would
    // otherwise block `open` forever waiting for a writer. Regular files,
    // sysfs and procfs ignore the flag.
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| SysfsError::io(path, e))?;
    let too_large = || SysfsError::TooLarge {
        path: path.to_path_buf(),
        limit,
    };
    // One byte past the limit proves the file is too large; never read more.
    let cap = usize::try_from(limit).unwrap_or(usize::MAX).saturating_add(1);
    // Sysfs files report a size of 4096 whatever they hold, so the length
    // hint is useless. One page holds any sysfs attribute and starts a
    // procfs table with a single read, without small probe reads.
    let mut buf = vec![0; CHUNK.min(cap)];
    let mut len = 0;
    loop {
        if len == buf.len() {
            if len >= cap {
                return Err(too_large());
            }
            buf.resize(len.saturating_mul(2).min(cap), 0);
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if short_read_is_eof && len < buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(SysfsError::io(path, e)),
        }
        if done(&buf[..len]) {
            break;
        }
    }
    if len >= cap {
        return Err(too_large());
    }
    buf.truncate(len);
    Ok(buf)
}

/// First read size: one page.
const CHUNK: usize = 4096;

/// Reads a text file with the given cap, requiring UTF-8.
pub(crate) fn read_text(path: &Path, limit: u64) -> Result<String, SysfsError> {
    let bytes = read_bytes(path, limit)?;
    String::from_utf8(bytes).map_err(|_| SysfsError::NotUtf8 {
        path: path.to_path_buf(),
    })
}

/// Reads a single-value attribute, trimmed; `Ok(None)` when it does not exist.
pub(crate) fn read_attr(path: &Path) -> Result<Option<String>, SysfsError> {
    let text = read_impl(path, ATTR_LIMIT, true, |_| false).and_then(|bytes| {
        String::from_utf8(bytes).map_err(|_| SysfsError::NotUtf8 {
            path: path.to_path_buf(),
        })
    });
    match text {
        Ok(mut s) => {
            let end = s.trim_end().len();
            s.truncate(end);
            let start = s.len() - s.trim_start().len();
            if start > 0 {
                s.drain(..start);
            }
            Ok(Some(s))
        }
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Shortens a value for an error message, so a garbage attribute cannot make a
/// warning kilobytes long.
pub(crate) fn excerpt(value: &str) -> String {
    const MAX: usize = 40;
    match value.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &value[..end]),
        None => value.to_owned(),
    }
}

/// Parses an attribute's text into `T`, describing a failure by `expected`.
pub(crate) fn parse_value<T: FromStr>(
    path: &Path,
    value: &str,
    expected: &'static str,
) -> Result<T, SysfsError> {
    value.parse().map_err(|_| SysfsError::Parse {
        path: path.to_path_buf(),
        value: excerpt(value),
        expected,
    })
}

/// The filesystem root everything is read below: `/` on a host, `/host` in a
/// DaemonSet that mounts the host, or a fixture tree in tests.
#[derive(Debug, Clone)]
pub(crate) struct Root {
    /// Canonical form of the root, so that resolved symlink targets (which
    /// are canonical too) can be turned back into root-relative paths.
    path: PathBuf,
}

impl Root {
    /// Canonicalises `path`; when that fails the path is used as given, and
    /// the individual reads below it will report what is wrong.
    pub(crate) fn new(path: &Path, warnings: &mut Warnings) -> Self {
        match fs::canonicalize(path) {
            Ok(path) => Self { path },
            Err(source) => {
                warnings.push(SysfsError::io(path, source));
                Self {
                    path: path.to_path_buf(),
                }
            }
        }
    }

    /// `rel` is written without a leading slash, e.g. `"sys/class/net"`.
    pub(crate) fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Turns a resolved path back into the path the host itself would see
    /// (`/sys/devices/...`). Output stays identical whether we run on the
    /// host, in a container with the host under `/host`, or on a fixture.
    pub(crate) fn host_path(&self, resolved: &Path) -> String {
        match resolved.strip_prefix(&self.path) {
            Ok(rel) => format!("/{}", rel.display()),
            // A symlink that points outside the root (only possible in a
            // tampered tree): show it as it is.
            Err(_) => resolved.display().to_string(),
        }
    }

    /// Follows `path` if it is a symlink; its parent must already be
    /// resolved. Sysfs links are relative and point at real directories, so
    /// one `readlink` plus lexical normalisation resolves them, where
    /// `realpath` would `readlink` every component (a dozen syscalls for a
    /// device deep in the PCIe tree). Anything unusual (an absolute target,
    /// a link to a link) is handed to `realpath`, which also turns loops
    /// into `ELOOP` errors.
    pub(crate) fn resolve(&self, path: &Path) -> Result<PathBuf, SysfsError> {
        let os_resolve = || fs::canonicalize(path).map_err(|e| SysfsError::io(path, e));
        let target = match fs::read_link(path) {
            Ok(target) => target,
            // EINVAL: not a symlink, so already resolved.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => return Ok(path.to_path_buf()),
            Err(e) => return Err(SysfsError::io(path, e)),
        };
        let Some(parent) = path.parent().filter(|_| target.is_relative()) else {
            return os_resolve();
        };
        let candidate = normalize(&parent.join(target));
        match fs::symlink_metadata(&candidate) {
            Ok(meta) if !meta.file_type().is_symlink() => Ok(candidate),
            Ok(_) => os_resolve(),
            Err(e) => Err(SysfsError::io(path, e)),
        }
    }
}

/// Removes `.` and `..` lexically (`a/b/../c` becomes `a/c`).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Lists the entries of a directory by name, sorted so that output does not
/// depend on directory order. `Ok(None)` when the directory does not exist.
pub(crate) fn list_dir(path: &Path, warnings: &mut Warnings) -> Result<Option<Vec<String>>, SysfsError> {
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SysfsError::io(path, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| SysfsError::io(path, e))?;
        match entry.file_name().into_string() {
            Ok(name) => names.push(name),
            // The kernel only creates ASCII names here; anything else was
            // put there by someone else and has no meaning to us.
            Err(name) => warnings.push(format!(
                "{}: skipping entry with a non-UTF-8 name {:?}",
                path.display(),
                name
            )),
        }
    }
    names.sort_unstable_by(|a, b| natural_cmp(a, b));
    Ok(Some(names))
}

/// Orders `eth2` before `eth10` and `cpu9` before `cpu10`, the way people
/// (and `ls -v`) expect device names to be ordered.
pub(crate) fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let ord = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if ord != std::cmp::Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|c| **c == b'0').count();
    &digits[zeros..]
}

/// The last component of a symlink's target, e.g. `mlx5_core` for
/// `device/driver -> ../../../bus/pci/drivers/mlx5_core`. `Ok(None)` when the
/// link does not exist (no driver bound).
pub(crate) fn link_name(path: &Path) -> Result<Option<String>, SysfsError> {
    match fs::read_link(path) {
        Ok(target) => Ok(target.components().next_back().and_then(|c| match c {
            Component::Normal(name) => name.to_str().map(str::to_owned),
            _ => None,
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SysfsError::io(path, e)),
    }
}

/// Whether `path` exists, without following a final symlink (so a dangling
/// or looping `physfn` link still counts as present).
pub(crate) fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Collects the problems met during discovery. Discovery never fails as a
/// whole: each problem is recorded here and the affected value is left out.
#[derive(Debug, Default)]
pub(crate) struct Warnings {
    messages: Vec<String>,
}

impl Warnings {
    pub(crate) fn push(&mut self, message: impl fmt::Display) {
        self.messages.push(message.to_string());
    }

    /// An optional attribute: absent is `None` without a warning, any other
    /// problem is `None` with one.
    pub(crate) fn attr(&mut self, path: &Path) -> Option<String> {
        match read_attr(path) {
            Ok(value) => value,
            Err(e) => {
                self.push(e);
                None
            }
        }
    }

    /// An optional numeric (or otherwise parsed) attribute.
    pub(crate) fn parse<T: FromStr>(&mut self, path: &Path, expected: &'static str) -> Option<T> {
        let value = self.attr(path)?;
        match parse_value(path, &value, expected) {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(e);
                None
            }
        }
    }

    /// A directory listing; a missing directory is an empty list, silently.
    pub(crate) fn list(&mut self, path: &Path) -> Vec<String> {
        match list_dir(path, self) {
            Ok(names) => names.unwrap_or_default(),
            Err(e) => {
                self.push(e);
                Vec::new()
            }
        }
    }

    /// A symlink's last component (driver names); problems become warnings.
    pub(crate) fn link(&mut self, path: &Path) -> Option<String> {
        match link_name(path) {
            Ok(name) => name,
            Err(e) => {
                self.push(e);
                None
            }
        }
    }

    pub(crate) fn into_vec(self) -> Vec<String> {
        self.messages
    }
}

/// Parses a `numa_node` attribute: the kernel writes `-1` when the platform
/// did not say which node a device hangs off, which is "unknown", not node -1.
pub(crate) fn numa_node(path: &Path, warnings: &mut Warnings) -> Option<u32> {
    let node: i64 = warnings.parse(path, "a NUMA node number")?;
    u32::try_from(node).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_normalisation() {
        assert_eq!(
            normalize(Path::new("/r/sys/class/net/../../devices/./pci0000:00/x")),
            Path::new("/r/sys/devices/pci0000:00/x")
        );
        assert_eq!(normalize(Path::new("/../a")), Path::new("/a"));
    }

    #[test]
    fn resolve_follows_relative_links_and_reports_loops() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path(), &mut Warnings::default());
        let r = root.join("");
        fs::create_dir_all(r.join("sys/devices/pci0000:00/0000:00:03.0")).unwrap();
        fs::create_dir_all(r.join("sys/class/net")).unwrap();
        std::os::unix::fs::symlink(
            "../../devices/pci0000:00/0000:00:03.0",
            r.join("sys/class/net/eth0"),
        )
        .unwrap();
        std::os::unix::fs::symlink("eth0", r.join("sys/class/net/alias")).unwrap();
        std::os::unix::fs::symlink("loop", r.join("sys/class/net/loop")).unwrap();
        std::os::unix::fs::symlink("gone", r.join("sys/class/net/dangling")).unwrap();
        let eth0 = root.resolve(&r.join("sys/class/net/eth0")).unwrap();
        assert_eq!(root.host_path(&eth0), "/sys/devices/pci0000:00/0000:00:03.0");
        let alias = root.resolve(&r.join("sys/class/net/alias")).unwrap();
        assert_eq!(alias, eth0, "links to links go through realpath");
        let plain = r.join("sys/devices");
        assert_eq!(root.resolve(&plain).unwrap(), plain);
        let e = root.resolve(&r.join("sys/class/net/loop")).unwrap_err();
        assert!(e.to_string().contains("symbolic links"), "{e}");
        assert!(
            root.resolve(&r.join("sys/class/net/dangling"))
                .unwrap_err()
                .is_not_found()
        );
    }

    #[test]
    fn read_until_stops_early() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("table");
        fs::write(&p, "a\n\nb\n".repeat(10_000)).unwrap();
        let head = read_until(&p, PROC_LIMIT, |b| b.windows(2).any(|w| w == b"\n\n")).unwrap();
        assert_eq!(head.len(), CHUNK, "one read was enough");
        assert_eq!(read_bytes(&p, PROC_LIMIT).unwrap().len(), 50_000);
        assert!(matches!(read_bytes(&p, 49_999), Err(SysfsError::TooLarge { .. })));
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["eth10", "eth2", "eth1", "cpu100", "cpu9", "a", "eth01"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["a", "cpu9", "cpu100", "eth1", "eth01", "eth2", "eth10"]);
    }

    #[test]
    fn excerpt_shortens_on_char_boundary() {
        let long = "é".repeat(100);
        let short = excerpt(&long);
        assert_eq!(short.chars().count(), 41);
        assert_eq!(excerpt("short"), "short");
    }

    #[test]
    fn attr_trims_and_reports_missing_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mtu");
        fs::write(&p, "  1500\n").unwrap();
        assert_eq!(read_attr(&p).unwrap().as_deref(), Some("1500"));
        assert_eq!(read_attr(&dir.path().join("nope")).unwrap(), None);
    }

    #[test]
    fn oversized_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        fs::write(&p, vec![b'1'; (ATTR_LIMIT + 1) as usize]).unwrap();
        assert!(matches!(read_attr(&p), Err(SysfsError::TooLarge { .. })));
        fs::write(&p, vec![b'1'; ATTR_LIMIT as usize]).unwrap();
        assert!(read_attr(&p).unwrap().is_some());
    }
}
