//! The Kubernetes name rules a work's own name is held to, shared by the transports (which
//! refuse a work they could not record) and the engine (which names its record after it).

/// Longest work name: its record is `<64 hex>-<name>`, itself at most 253 characters.
pub const MAX_WORK_NAME: usize = 253 - 65;

/// Why `value` is not a DNS-1123 label (namespaces: a-z, 0-9 and '-', alphanumeric at both
/// ends, at most 63 characters), if it is not.
pub fn label_fault(value: &str) -> Option<&'static str> {
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = !value.starts_with('-') && !value.ends_with('-');
    (value.is_empty() || value.len() > 63 || !ok_chars || !ok_ends)
        .then_some("must be a DNS-1123 label (a-z, 0-9, '-'; at most 63)")
}

/// Why `value` is not a DNS-1123 subdomain of at most `max` characters (work names), if it is
/// not.
pub fn subdomain_fault(value: &str, max: usize) -> Option<&'static str> {
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let alnum = |c: Option<u8>| c.is_some_and(|b| b.is_ascii_alphanumeric());
    let ok_ends = alnum(value.bytes().next()) && alnum(value.bytes().last());
    (value.len() > max || !ok_chars || !ok_ends)
        .then_some("must be a DNS-1123 subdomain (a-z, 0-9, '-', '.') within the length limit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_subdomains() {
        assert_eq!(label_fault("team-a"), None);
        for bad in ["", "-a", "a-", "A", "a.b", &"a".repeat(64)] {
            assert!(label_fault(bad).is_some(), "{bad:?}");
        }
        assert_eq!(subdomain_fault("app.v1-x", MAX_WORK_NAME), None);
        for bad in ["", ".a", "a.", "a_b", "Ab", &"a".repeat(MAX_WORK_NAME + 1)] {
            assert!(subdomain_fault(bad, MAX_WORK_NAME).is_some(), "{bad:?}");
        }
    }
}
