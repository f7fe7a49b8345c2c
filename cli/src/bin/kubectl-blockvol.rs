//! `kubectl-blockvol`: parses the command line, connects, runs the command from the
//! library and turns an error into a message on stderr and exit status 1.

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = kubectl_blockvol::Cli::parse();
    let result = match kubectl_blockvol::connect(&cli).await {
        Ok(cluster) => kubectl_blockvol::run(&cli, &cluster, &mut std::io::stdout()).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
