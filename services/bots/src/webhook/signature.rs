//! The optional HMAC-SHA256 signature of webhook bodies.

use super::*;

// ---- signatures --------------------------------------------------------------

/// Checks the signature header when the integration has a signing secret
/// (an empty secret counts as none). The comparison takes constant time.
pub fn check_signature(secret: Option<&str>, body: &[u8], header: &str) -> Outcome<()> {
    let Some(secret) = secret.filter(|secret| !secret.is_empty()) else {
        return Ok(());
    };
    let header = header.trim();
    if header.is_empty() {
        return Err(Reject::unauthorized(format!(
            "this integration requires the {SIGNATURE_HEADER} header: \
             sha256=<lowercase hex HMAC-SHA256 of the request body keyed with the integration's signing secret>"
        )));
    }
    // Only the scheme name and hex digits are normalised; neither depends on the secret.
    let presented = match header.split_once('=') {
        Some((scheme, digest)) if scheme.eq_ignore_ascii_case("sha256") => {
            format!("sha256={}", digest.trim().to_ascii_lowercase())
        }
        _ => header.to_owned(),
    };
    let expected = crate::signature::sign(secret, body);
    if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(Reject::unauthorized(format!(
            "the {SIGNATURE_HEADER} header does not match the body: expected sha256=<lowercase hex HMAC-SHA256 \
             of the exact request body bytes keyed with the integration's signing secret>"
        )))
    }
}
