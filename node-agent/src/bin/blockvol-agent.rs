use clap::Parser;

use node_agent::attach::launcher::{self, LauncherSettings};
use node_agent::attach::proxy::{self, ProxySettings};

/// The subcommand that runs the attach proxy instead of the agent.
const ATTACH_PROXY: &str = "attach-proxy";
/// The subcommand that runs the attach launcher, which starts attach proxies outside the
/// agent's container.
const ATTACH_LAUNCHER: &str = "attach-launcher";

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).is_some_and(|a| a == ATTACH_PROXY) {
        let settings = ProxySettings::parse_from(std::env::args().skip(1));
        telemetry::logging::init_from_env()?;
        tokio::runtime::Runtime::new()?.block_on(proxy::run(settings))?;
        return Ok(());
    }
    if std::env::args()
        .nth(1)
        .is_some_and(|a| a == ATTACH_LAUNCHER)
    {
        let settings = LauncherSettings::parse_from(std::env::args().skip(1));
        telemetry::logging::init_from_env()?;
        return launcher::run(settings);
    }
    let settings = node_agent::agent::Settings::parse();
    telemetry::logging::init_from_env()?;
    tokio::runtime::Runtime::new()?.block_on(node_agent::agent::run(settings))?;
    Ok(())
}
