//! Who is calling. The edge authenticates and attaches an encoded
//! [`Caller`] to each routing request; every routing operation starts by
//! reading it, so no operation can run without a tenant.

use beseda_core::{Error, ErrorCode, Result};
use beseda_proto::v1::Caller as WireCaller;
use prost::Message;
use tonic::metadata::MetadataValue;

const CALLER_KEY: &str = "x-beseda-caller-bin";

/// The authenticated caller of a routing operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub application_id: String,
    /// The user acted as; `None` for the application itself.
    pub user_id: Option<String>,
    /// Privileged mode: the application's own credentials were presented.
    pub privileged: bool,
}

impl Caller {
    pub fn user(&self) -> Result<&str> {
        self.user_id.as_deref().ok_or_else(|| {
            Error::new(
                ErrorCode::FieldRequired,
                "this operation acts as a user: authenticate with a user token or set X-Beseda-Act-As-User",
            )
            .with_field("actAsUserId")
        })
    }

    pub fn require_privileged(&self, what: &str) -> Result<()> {
        if self.privileged {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::PrivilegedModeRequired,
            format!("{what} needs privileged mode (application credentials)"),
        ))
    }

    pub fn to_wire(&self) -> WireCaller {
        WireCaller {
            application_id: self.application_id.clone(),
            user_id: self.user_id.clone().unwrap_or_default(),
            privileged: self.privileged,
        }
    }

    pub fn from_wire(wire: WireCaller) -> Result<Self> {
        if wire.application_id.is_empty() {
            return Err(Error::new(ErrorCode::Unauthenticated, "the caller has no application"));
        }
        Ok(Caller {
            application_id: wire.application_id,
            user_id: Some(wire.user_id).filter(|user_id| !user_id.is_empty()),
            privileged: wire.privileged,
        })
    }

    /// Wraps a message in a request carrying this caller.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert_bin(CALLER_KEY, MetadataValue::from_bytes(&self.to_wire().encode_to_vec()));
        request
    }

    /// Reads the caller from a request's metadata.
    pub fn from_request<T>(request: &tonic::Request<T>) -> Result<Self> {
        let value = request
            .metadata()
            .get_bin(CALLER_KEY)
            .ok_or_else(|| Error::new(ErrorCode::Unauthenticated, "no credentials were presented"))?;
        let bytes = value
            .to_bytes()
            .map_err(|_| Error::new(ErrorCode::Unauthenticated, "caller metadata is not valid base64"))?;
        let wire = WireCaller::decode(bytes.as_ref())
            .map_err(|_| Error::new(ErrorCode::Unauthenticated, "caller metadata does not decode"))?;
        Caller::from_wire(wire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_round_trips_through_metadata() {
        let caller = Caller { application_id: "app".into(), user_id: Some("user".into()), privileged: true };
        assert_eq!(Caller::from_request(&caller.request(())).unwrap(), caller);
    }

    #[test]
    fn a_request_without_caller_is_unauthenticated() {
        assert_eq!(Caller::from_request(&tonic::Request::new(())).unwrap_err().code, ErrorCode::Unauthenticated);
    }
}
