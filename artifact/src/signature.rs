//! Cosign signatures with a public key: the "simple signing" payload stored at the
//! `sha256-<digest>.sig` tag, signed with ECDSA P-256 over SHA-256.
//!
//! The format is checked here and the cryptography done by RustCrypto's `p256`, which is
//! pure Rust. The `sigstore` crate would do both, but its cosign support pulls in a second
//! TLS and crypto stack (aws-lc-rs through rustls-webpki, and its own registry client) beside
//! the ring provider the agent already uses, and its keyless parts (Fulcio, Rekor, OIDC) are
//! refused here anyway.

use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde_json::Value;

use crate::digest::Digest;

/// Media type of a cosign simple-signing payload layer.
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation of a payload layer that holds its base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The payload's `critical.type`.
pub const PAYLOAD_TYPE: &str = "cosign container image signature";
/// Largest payload read: a real one is a few hundred bytes.
pub const MAX_PAYLOAD_BYTES: i64 = 64 * 1024;

/// Why a signature does not verify an artifact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("public key {name}: {message}")]
    Key { name: String, message: String },
    #[error("no public key given")]
    NoKeys,
    #[error("the signature is not valid base64 DER: {0}")]
    Encoding(String),
    #[error("the signed payload is not a cosign payload: {0}")]
    Payload(String),
    #[error("the signed payload names {signed}, not {expected}")]
    WrongDigest { signed: String, expected: Digest },
    #[error("no given public key verifies the signature")]
    NoMatchingKey,
}

/// The public keys an artifact must be signed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CosignKeys(Vec<VerifyingKey>);

impl CosignKeys {
    /// Keys from PEM `PUBLIC KEY` blocks (cosign's `cosign.pub`), each named for messages.
    pub fn from_pems<'a>(
        pems: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<CosignKeys, SignatureError> {
        let mut keys = Vec::new();
        for (name, pem) in pems {
            let key_err = |message: String| SignatureError::Key {
                name: name.to_string(),
                message,
            };
            let text = std::str::from_utf8(pem).map_err(|_| key_err("is not text".into()))?;
            let key = VerifyingKey::from_public_key_pem(text.trim())
                .map_err(|e| key_err(format!("is not an ECDSA P-256 public key in PEM: {e}")))?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(SignatureError::NoKeys);
        }
        Ok(CosignKeys(keys))
    }

    /// What identifies this set of keys (sha256 of their SEC1 encodings, in order): a digest
    /// verified with one set is not taken as verified by another.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        for key in &self.0 {
            h.update(key.to_encoded_point(false).as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// Checks that `payload`, signed with `signature_b64`, is a cosign payload for `manifest`
    /// and that one of the keys made the signature.
    pub fn verify(
        &self,
        payload: &[u8],
        signature_b64: &str,
        manifest: &Digest,
    ) -> Result<(), SignatureError> {
        use base64::Engine;
        let der = base64::engine::general_purpose::STANDARD
            .decode(signature_b64.trim())
            .map_err(|e| SignatureError::Encoding(e.to_string()))?;
        let signature = Signature::from_der(&der).map_err(|e| SignatureError::Encoding(e.to_string()))?;
        if !self.0.iter().any(|k| k.verify(payload, &signature).is_ok()) {
            return Err(SignatureError::NoMatchingKey);
        }
        // Only a payload a key signed is worth reading.
        let v: Value = serde_json::from_slice(payload).map_err(|e| SignatureError::Payload(e.to_string()))?;
        let critical = v
            .get("critical")
            .ok_or_else(|| SignatureError::Payload("no critical section".into()))?;
        let kind = critical
            .pointer("/type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if kind != PAYLOAD_TYPE {
            return Err(SignatureError::Payload(format!("type is {kind:?}")));
        }
        let signed = critical
            .pointer("/image/docker-manifest-digest")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if signed != manifest.to_string() {
            return Err(SignatureError::WrongDigest {
                signed: signed.to_string(),
                expected: manifest.clone(),
            });
        }
        Ok(())
    }
}

/// The tag cosign stores the signatures of `manifest` under.
pub fn signature_tag(manifest: &Digest) -> String {
    format!("sha256-{}.sig", manifest.hex())
}

/// The payload cosign signs for `manifest` in `repository` (`host/repo`): what a signer
/// writes, so tests and tools can produce signatures in the same shape.
pub fn payload(repository: &str, manifest: &Digest) -> Vec<u8> {
    let v = serde_json::json!({
        "critical": {
            "identity": {"docker-reference": repository},
            "image": {"docker-manifest-digest": manifest.to_string()},
            "type": PAYLOAD_TYPE,
        },
        "optional": null,
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer;
    use p256::pkcs8::{EncodePublicKey, LineEnding};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn pem(k: &SigningKey) -> String {
        k.verifying_key().to_public_key_pem(LineEnding::LF).unwrap()
    }

    fn sign(k: &SigningKey, payload: &[u8]) -> String {
        let s: Signature = k.sign(payload);
        base64::engine::general_purpose::STANDARD.encode(s.to_der().as_bytes())
    }

    #[test]
    fn a_payload_signed_by_a_given_key_verifies_and_nothing_else_does() {
        let digest = Digest::of(b"manifest");
        let other = Digest::of(b"other");
        let (signer, stranger) = (key(7), key(9));
        let keys = CosignKeys::from_pems([("cosign.pub", pem(&signer).as_bytes())]).unwrap();
        let p = payload("r/app", &digest);
        keys.verify(&p, &sign(&signer, &p), &digest).unwrap();
        assert_eq!(
            keys.verify(&p, &sign(&stranger, &p), &digest),
            Err(SignatureError::NoMatchingKey)
        );
        let wrong = payload("r/app", &other);
        assert!(matches!(
            keys.verify(&wrong, &sign(&signer, &wrong), &digest),
            Err(SignatureError::WrongDigest { .. })
        ));
        let mut tampered = p.clone();
        tampered[5] ^= 1;
        assert_eq!(
            keys.verify(&tampered, &sign(&signer, &p), &digest),
            Err(SignatureError::NoMatchingKey)
        );
        assert!(matches!(
            keys.verify(&p, "!!", &digest),
            Err(SignatureError::Encoding(_))
        ));
    }

    #[test]
    fn keys_must_be_p256_public_keys() {
        assert!(matches!(
            CosignKeys::from_pems([("bad.pub", b"not a key".as_slice())]),
            Err(SignatureError::Key { .. })
        ));
        assert_eq!(
            CosignKeys::from_pems(std::iter::empty()),
            Err(SignatureError::NoKeys)
        );
        assert_eq!(
            signature_tag(&Digest::of(b"x")),
            format!("sha256-{}.sig", Digest::of(b"x").hex())
        );
    }
}
