//! The one HMAC-SHA256 signature of Beseda's HTTP bodies: checked on
//! inbound webhook requests, put on outbound event POSTs.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying `sha256=<lowercase hex HMAC-SHA256(secret, body)>`.
pub const SIGNATURE_HEADER: &str = "X-Beseda-Signature";

/// Lowercase hex HMAC-SHA256 of `body` keyed with `secret`.
pub fn hmac_sha256_hex(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length, so this never fails.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return String::new() };
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The [`SIGNATURE_HEADER`] value for `body` under `secret`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    format!("sha256={}", hmac_sha256_hex(secret.as_bytes(), body))
}
