//! blockvol-check: lost-write checker CLI. `write` appends a round of self-describing
//! writes to an NBD export and records them in a ledger file; `verify` reads the export
//! back and exits non-zero if any acknowledged-and-flushed write is missing, stale or torn.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use e2e::checker::{Checker, CheckerConfig, Ledger, Target, verify_ledger};

#[derive(Parser)]
#[command(name = "blockvol-check", about = "lost-write checker for NBD exports")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Conn {
    /// TCP address of the NBD server.
    #[arg(long, conflicts_with = "unix")]
    tcp: Option<SocketAddr>,
    /// Unix socket of the NBD server.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// Export name.
    #[arg(long, default_value = "")]
    export: String,
    /// Ledger file (created by the first `write`).
    #[arg(long)]
    ledger: PathBuf,
}

impl Conn {
    fn target(&self) -> anyhow::Result<Target> {
        match (&self.tcp, &self.unix) {
            (Some(addr), None) => Ok(Target::Tcp {
                addr: *addr,
                export: self.export.clone(),
            }),
            (None, Some(path)) => Ok(Target::Unix {
                path: path.clone(),
                export: self.export.clone(),
            }),
            _ => bail!("give exactly one of --tcp or --unix"),
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one round of writes and flushes, extending the ledger.
    Write {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value_t = 1000)]
        writes: u64,
        #[arg(long, default_value_t = 4)]
        workers: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value = "blockvol-check")]
        volume_id: String,
        #[arg(long, default_value_t = 4096)]
        block_size_bytes: u32,
        #[arg(long, default_value_t = 0)]
        lba_start: u64,
        #[arg(long, default_value_t = 1024)]
        lba_count: u64,
        #[arg(long, default_value_t = 16)]
        flush_every_writes: u32,
    },
    /// Read the export back and report lost, stale and torn writes.
    Verify {
        #[command(flatten)]
        conn: Conn,
    },
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Write {
            conn,
            writes,
            workers,
            seed,
            volume_id,
            block_size_bytes,
            lba_start,
            lba_count,
            flush_every_writes,
        } => {
            let target = conn.target()?;
            let ledger = if conn.ledger.exists() {
                Ledger::load(&conn.ledger)?
            } else {
                Ledger::new(CheckerConfig {
                    volume_id,
                    seed,
                    workers,
                    block_size_bytes,
                    lba_start,
                    lba_count,
                    flush_every_writes,
                })?
            };
            let checker = Checker::new(ledger);
            let sum = checker.run_writes(&target, writes).await;
            checker
                .ledger()
                .save(&conn.ledger)
                .context("saving the ledger")?;
            println!(
                "seed {seed}: writes sent {}, acked {}, made durable {}, flushes acked {}",
                sum.writes_sent, sum.writes_acked, sum.writes_made_durable, sum.flushes_acked
            );
            for s in &sum.stopped_by {
                println!("stopped early: {s}");
            }
            Ok(())
        }
        Cmd::Verify { conn } => {
            let target = conn.target()?;
            let ledger = Ledger::load(&conn.ledger)?;
            let report = verify_ledger(&target, &ledger).await?;
            println!("{report}");
            if !report.is_clean() {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
