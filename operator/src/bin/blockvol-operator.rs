use clap::Parser;

/// blockvol operator: placement, epochs, in-sync set, failover, rebuild.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!(
        "blockvol-operator is not implemented yet: only --help and --version work in this build"
    )
}
