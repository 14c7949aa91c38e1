//! OCI content digests (`sha256:<hex>`), and a reader that checks one while the content streams.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

/// A content digest. Only SHA-256 is accepted: it is what registries and Flux use, and an
/// algorithm we do not check must not pass as checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest {
    /// 64 lowercase hex characters.
    hex: String,
}

/// Why a digest string is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} is not of the form sha256:<64 lowercase hex characters>")]
    Malformed(String),
    #[error("digest algorithm {0:?} is not supported (only sha256)")]
    Algorithm(String),
}

impl Digest {
    /// Parses `sha256:<hex>`.
    pub fn parse(text: &str) -> Result<Digest, DigestError> {
        let (algorithm, hex) = text
            .split_once(':')
            .ok_or_else(|| DigestError::Malformed(cut(text)))?;
        if algorithm != "sha256" {
            return Err(DigestError::Algorithm(cut(algorithm)));
        }
        let valid = hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid {
            return Err(DigestError::Malformed(cut(text)));
        }
        Ok(Digest { hex: hex.to_string() })
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest {
            hex: hex::encode(Sha256::digest(bytes)),
        }
    }

    /// The hex part, a safe file name (cache entries are named by it).
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// At most 100 characters of hostile text, for error messages.
fn cut(text: &str) -> String {
    text.chars().take(100).collect()
}

/// The content did not match its digest; carried inside `io::Error` by [`Verifying`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("content digest is {actual}, expected {expected}")]
pub struct DigestMismatch {
    pub expected: Digest,
    pub actual: Digest,
}

/// Reads through to `inner`, hashing what passes; at the end of the stream it fails with a
/// [`DigestMismatch`] (inside an `io::Error` of kind `InvalidData`) unless the content matched.
/// A consumer that stops early has verified nothing: read to the end ([`Verifying::finish`]).
pub struct Verifying<R> {
    inner: R,
    hasher: Sha256,
    expected: Digest,
    /// The verdict once the end was reached, so a second read at the end answers the same.
    verdict: Option<Result<(), DigestMismatch>>,
}

impl<R> std::fmt::Debug for Verifying<R> {
    // The reader and the hash state say nothing useful; what is expected does.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifying")
            .field("expected", &self.expected)
            .field("verdict", &self.verdict)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Verifying<R> {
    pub fn new(inner: R, expected: Digest) -> Self {
        Verifying {
            inner,
            hasher: Sha256::new(),
            expected,
            verdict: None,
        }
    }

    /// Reads what is left and returns the verdict.
    pub fn finish(mut self) -> io::Result<()> {
        io::copy(&mut self, &mut io::sink()).map(|_| ())
    }
}

impl<R: Read> Read for Verifying<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(verdict) = &self.verdict {
            return verdict
                .clone()
                .map(|()| 0)
                .map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m));
        }
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.hasher.update(&buf[..n]);
            return Ok(n);
        }
        let actual = Digest {
            hex: hex::encode(std::mem::take(&mut self.hasher).finalize()),
        };
        let verdict = if actual == self.expected {
            Ok(())
        } else {
            Err(DigestMismatch {
                expected: self.expected.clone(),
                actual,
            })
        };
        self.verdict = Some(verdict);
        self.read(buf)
    }
}

/// The [`DigestMismatch`] inside an `io::Error`, if that is what it carries.
pub fn mismatch_of(e: &io::Error) -> Option<&DigestMismatch> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<DigestMismatch>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_sha256_digests_parse() {
        let d = Digest::of(b"hello");
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        assert!(matches!(
            Digest::parse("sha512:ab"),
            Err(DigestError::Algorithm(_))
        ));
        for bad in [
            "",
            "sha256",
            "sha256:",
            "sha256:XYZ",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(
                matches!(Digest::parse(bad), Err(DigestError::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_verdict_comes_at_the_end_of_the_stream() {
        let good = Digest::of(b"content");
        let mut out = Vec::new();
        Verifying::new(&b"content"[..], good.clone())
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"content");
        let e = Verifying::new(&b"tampered"[..], good.clone())
            .finish()
            .unwrap_err();
        let m = mismatch_of(&e).unwrap();
        assert_eq!(m.expected, good);
        assert_eq!(m.actual, Digest::of(b"tampered"));
        // Truncated content is a mismatch too.
        assert!(Verifying::new(&b"cont"[..], good).finish().is_err());
    }
}
