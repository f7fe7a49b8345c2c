use clap::Parser;

/// blockvol node agent: runs replicas, serves NBD, attaches block devices.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!(
        "blockvol-agent is not implemented yet: only --help and --version work in this build"
    )
}
