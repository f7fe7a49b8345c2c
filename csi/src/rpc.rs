//! The frame every RPC runs in: a span carrying the method and volume id, one log line
//! for the outcome (with the gRPC code on failure), and the error mapped to a Status.

use std::future::Future;

use tonic::{Response, Status};
use tracing::Instrument;

use crate::error::Result;

/// Runs one RPC body in a span named for it, logs the outcome, converts the error.
pub async fn run<T, F>(
    method: &'static str,
    volume_id: &str,
    body: F,
) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T>>,
{
    let span = tracing::info_span!("rpc", method, volume_id = %volume_id);
    async move {
        tracing::debug!("request received");
        match body.await {
            Ok(reply) => {
                tracing::info!("request succeeded");
                Ok(Response::new(reply))
            }
            Err(e) => {
                let status: Status = e.into();
                tracing::warn!(code = ?status.code(), error = %status.message(), "request failed");
                Err(status)
            }
        }
    }
    .instrument(span)
    .await
}

/// Fails with InvalidArgument naming `field` when `value` is empty.
pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() {
        return Err(crate::error::Error::InvalidArgument(format!(
            "{field} is required"
        )));
    }
    Ok(value)
}

/// Fails with InvalidArgument when the request carries no `volume_capability`, and
/// checks the one it carries ([`crate::params::check_capability`]).
pub fn required_capability(
    cap: Option<&crate::csi_proto::VolumeCapability>,
) -> Result<crate::params::Capability> {
    let cap = cap.ok_or_else(|| {
        crate::error::Error::InvalidArgument("volume_capability is required".into())
    })?;
    crate::params::check_capability(cap)
}
