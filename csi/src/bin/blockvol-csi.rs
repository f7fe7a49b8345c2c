use clap::Parser;

/// blockvol CSI driver: controller and node services.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!(
        "blockvol-csi is not implemented yet: only --help and --version work in this build"
    )
}
