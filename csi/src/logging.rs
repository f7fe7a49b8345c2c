//! Logging set-up shared by the CSI driver and the node agent binaries (the operator has
//! its own, operator/src/logging.rs, with the same contract): the filter from `RUST_LOG`
//! (default `info`), the format from `BLOCKVOL_LOG_FORMAT`: `text` (default) or `json`
//! (one object per line). Any other format is refused at start.

/// Installs the global tracing subscriber as the module docs say.
pub fn init_logging() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match std::env::var("BLOCKVOL_LOG_FORMAT").as_deref() {
        Err(_) | Ok("") | Ok("text") => builder.init(),
        Ok("json") => builder.json().init(),
        Ok(other) => {
            anyhow::bail!("BLOCKVOL_LOG_FORMAT={other:?} is not a log format; use text or json")
        }
    }
    Ok(())
}
