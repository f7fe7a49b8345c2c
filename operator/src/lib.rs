//! The blockvol operator: the only writer of placement, epochs and the committed
//! in-sync set of each `BlockVolume`. Decisions are pure functions (one module each,
//! table-tested); [`controller`] observes the API, runs [`plan`] and performs it, and
//! [`run`] does so only while this process holds the leader Lease.

pub mod cache;
pub mod controller;
pub mod drain;
pub mod expansion;
pub mod in_sync;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod placement;
pub mod plan;
pub mod primary_move;
pub mod promotion;
pub mod recovery;
pub mod replacement;
pub mod status;

use std::sync::Arc;

pub use controller::{Context, ControllerSettings};
pub use leader::{LeaderElector, LeaderSettings};
pub use metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("object lacks {0}")]
    MissingField(&'static str),
    /// Not a failure: the volume waits for something outside the operator (detach,
    /// node agents freeing disks).
    #[error("{0}")]
    Waiting(String),
    /// A conditional write met an object changed since the plan was computed: the plan
    /// came from a stale view and is recomputed (see [`controller::perform`]).
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("lost leadership: {0}")]
    LostLeadership(String),
    #[error("metrics endpoint: {0}")]
    Metrics(#[source] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// True for the deliberate "try again later" of a waiting deletion, and for a plan
    /// refused as stale (recomputed at the same pace).
    pub fn is_waiting(&self) -> bool {
        match self {
            Error::Waiting(_) | Error::Conflict(_) => true,
            Error::Finalizer(f) => matches!(
                &**f,
                kube::runtime::finalizer::Error::CleanupFailed(e) | kube::runtime::finalizer::Error::ApplyFailed(e)
                    if e.is_waiting()
            ),
            _ => false,
        }
    }

    /// The `reason` label of a failed reconcile; `metrics::RECONCILE_ERROR_REASONS` lists
    /// every value (keep them in step).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApi",
            Error::Finalizer(f) => match &**f {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                kube::runtime::finalizer::Error::AddFinalizer(_)
                | kube::runtime::finalizer::Error::RemoveFinalizer(_) => "Finalizer",
                _ => "Finalizer",
            },
            Error::MissingField(_) => "MissingField",
            Error::Waiting(_) => "Waiting",
            Error::Conflict(_) => "Conflict",
            Error::LostLeadership(_) => "LostLeadership",
            Error::Metrics(_) => "Metrics",
        }
    }
}

/// Runs the operator: waits for leadership, then reconciles volumes until leadership
/// is lost (returns the error; the process should exit and restart as a candidate) or
/// `shutdown` resolves (releases the Lease and returns `Ok`).
pub async fn run(
    ctx: Arc<Context>,
    elector: LeaderElector,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(());
    };
    tokio::pin!(shutdown);
    tokio::select! {
        r = elector.acquire() => r?,
        _ = &mut shutdown => return Ok(()),
    }
    tracing::info!(identity = %elector.settings().identity, "leading");
    ctx.metrics.set_leader(true);
    let (ctl_stop_tx, ctl_stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Polled here rather than spawned: dropping this future (a crash in tests) stops the
    // controller too.
    let mut controller = std::pin::pin!(controller::run(ctx.clone(), async move {
        let _ = ctl_stop_rx.await;
    }));
    let result = tokio::select! {
        lost = elector.hold() => Err(lost),
        _ = &mut shutdown => Ok(()),
        () = &mut controller => {
            ctx.metrics.set_leader(false);
            return Err(Error::LostLeadership("the controller stopped".into()));
        }
    };
    let _ = ctl_stop_tx.send(());
    controller.await;
    drop(stop_rx);
    ctx.metrics.set_leader(false);
    if result.is_ok() {
        elector.release().await?;
    }
    result
}
