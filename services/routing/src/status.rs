//! The one mapping between domain errors and gRPC statuses. The stable code
//! and the field travel in metadata so the edge can rebuild the typed error.

use beseda_core::{Error, ErrorClass, ErrorCode};
use tonic::{Code, Status};

const CODE_KEY: &str = "x-beseda-error-code";
const FIELD_KEY: &str = "x-beseda-error-field";

pub fn grpc_code(class: ErrorClass) -> Code {
    match class {
        ErrorClass::InvalidArgument => Code::InvalidArgument,
        ErrorClass::Unauthenticated => Code::Unauthenticated,
        ErrorClass::PermissionDenied => Code::PermissionDenied,
        ErrorClass::NotFound => Code::NotFound,
        ErrorClass::AlreadyExists => Code::AlreadyExists,
        ErrorClass::FailedPrecondition => Code::FailedPrecondition,
        ErrorClass::ResourceExhausted => Code::ResourceExhausted,
        ErrorClass::Unavailable => Code::Unavailable,
        ErrorClass::Internal => Code::Internal,
    }
}

pub fn to_status(error: Error) -> Status {
    let mut status = Status::new(grpc_code(error.code.class()), error.message);
    if let Ok(value) = error.code.as_str().parse() {
        status.metadata_mut().insert(CODE_KEY, value);
    }
    if let Some(field) = error.field
        && let Ok(value) = field.parse()
    {
        status.metadata_mut().insert(FIELD_KEY, value);
    }
    status
}

/// Rebuilds the domain error from a status; statuses that did not come from
/// Beseda (transport failures) map by their gRPC code.
pub fn from_status(status: &Status) -> Error {
    let metadata = status.metadata();
    let code =
        metadata.get(CODE_KEY).and_then(|value| value.to_str().ok()).and_then(ErrorCode::from_code_str).unwrap_or(
            match status.code() {
                Code::InvalidArgument | Code::OutOfRange => ErrorCode::InvalidValue,
                Code::Unauthenticated => ErrorCode::Unauthenticated,
                Code::PermissionDenied => ErrorCode::PermissionDenied,
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => ErrorCode::Unavailable,
                _ => ErrorCode::Internal,
            },
        );
    let mut error = Error::new(code, status.message());
    error.field = metadata.get(FIELD_KEY).and_then(|value| value.to_str().ok()).map(str::to_owned);
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_survives_a_trip_through_grpc() {
        for code in ErrorCode::ALL {
            let original = Error::new(*code, "what went wrong").with_field("conversation.key");
            assert_eq!(from_status(&to_status(original.clone())), original);
        }
    }

    #[test]
    fn a_transport_failure_is_unavailable() {
        assert_eq!(from_status(&Status::unavailable("connection refused")).code, ErrorCode::Unavailable);
    }
}
