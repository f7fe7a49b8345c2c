use clap::Parser;

use node_agent::attach::launcher::{self, LauncherSettings};
use node_agent::attach::proxy::{self, ProxySettings};

/// The subcommand that runs the attach proxy instead of the agent.
const ATTACH_PROXY: &str = "attach-proxy";
/// The subcommand that runs the attach launcher, which starts attach proxies outside the
/// agent's container.
const ATTACH_LAUNCHER: &str = "attach-launcher";

/// Logging by `RUST_LOG` (default `info`) and `BLOCKVOL_LOG_FORMAT`: `text` (default)
/// or `json`, as the operator and the CSI driver read them (operator/src/logging.rs).
fn init_tracing() -> anyhow::Result<()> {
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

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).is_some_and(|a| a == ATTACH_PROXY) {
        let settings = ProxySettings::parse_from(std::env::args().skip(1));
        init_tracing()?;
        tokio::runtime::Runtime::new()?.block_on(proxy::run(settings))?;
        return Ok(());
    }
    if std::env::args()
        .nth(1)
        .is_some_and(|a| a == ATTACH_LAUNCHER)
    {
        let settings = LauncherSettings::parse_from(std::env::args().skip(1));
        init_tracing()?;
        return launcher::run(settings);
    }
    let settings = node_agent::agent::Settings::parse();
    init_tracing()?;
    tokio::runtime::Runtime::new()?.block_on(node_agent::agent::run(settings))?;
    Ok(())
}
