//! What the client sees when the proxy cannot complete a forwarded request:
//! a FHIR OperationOutcome with a status that says whose fault it was.

use pingora::{Error, ErrorSource, ErrorType};

use crate::fhir::outcome::{IssueType, Outcome};

/// Maps a pingora proxy error to the outcome sent to the client, or `None` when
/// the client connection itself is gone and nothing can be written.
pub fn outcome_for_proxy_error(error: &Error) -> Option<Outcome> {
    let etype = error.etype();
    if let ErrorType::HTTPStatus(code) = etype {
        return Some(Outcome::error(
            *code,
            IssueType::Processing,
            format!("request failed with status {code}"),
        ));
    }
    match error.esource() {
        ErrorSource::Upstream => Some(upstream_failure(etype)),
        ErrorSource::Downstream => match etype {
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => None,
            ErrorType::ReadTimedout => Some(Outcome::error(
                408,
                IssueType::Timeout,
                "the client did not send the request body in time",
            )),
            _ => Some(Outcome::error(
                400,
                IssueType::Invalid,
                format!("the request could not be read: {etype:?}"),
            )),
        },
        ErrorSource::Internal | ErrorSource::Unset => Some(Outcome::error(
            500,
            IssueType::Exception,
            format!("internal proxy error ({})", etype.as_str()),
        )),
    }
}

fn upstream_failure(etype: &ErrorType) -> Outcome {
    match etype {
        ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout => Outcome::error(
            504,
            IssueType::Timeout,
            "the upstream FHIR server did not accept a connection in time",
        ),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => Outcome::error(
            504,
            IssueType::Timeout,
            "the upstream FHIR server did not answer in time",
        ),
        ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => {
            Outcome::error(
                502,
                IssueType::Transient,
                "the upstream FHIR server is unreachable (connection refused or no route)",
            )
        }
        other => Outcome::error(
            502,
            IssueType::Transient,
            format!(
                "the upstream FHIR server failed mid-request ({})",
                other.as_str()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(etype: ErrorType) -> Box<Error> {
        Error::new_up(etype)
    }

    #[test]
    fn refused_connection_is_bad_gateway() {
        let outcome = outcome_for_proxy_error(&upstream(ErrorType::ConnectRefused)).unwrap();
        assert_eq!(outcome.status, 502);
        assert_eq!(outcome.issues[0].code, IssueType::Transient);
    }

    #[test]
    fn timeouts_are_gateway_timeout() {
        for etype in [ErrorType::ConnectTimedout, ErrorType::ReadTimedout] {
            let outcome = outcome_for_proxy_error(&upstream(etype)).unwrap();
            assert_eq!(outcome.status, 504);
            assert_eq!(outcome.issues[0].code, IssueType::Timeout);
        }
    }

    #[test]
    fn vanished_client_gets_nothing() {
        let e = Error::new_down(ErrorType::ConnectionClosed);
        assert!(outcome_for_proxy_error(&e).is_none());
    }
}
