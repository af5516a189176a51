//! The optional HMAC-SHA256 signature of webhook bodies.

use super::*;

// ---- signatures --------------------------------------------------------------

/// `sha256=<lowercase hex HMAC-SHA256(secret, body)>`: the header value a
/// request signed with `secret` carries.
pub fn signature_for(secret: &str, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        // HMAC takes keys of any length; this branch is unreachable.
        return String::new();
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

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
    let expected = signature_for(secret, body);
    if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(Reject::unauthorized(format!(
            "the {SIGNATURE_HEADER} header does not match the body: expected sha256=<lowercase hex HMAC-SHA256 \
             of the exact request body bytes keyed with the integration's signing secret>"
        )))
    }
}
