//! Serves one volume over NBD for manual tools and benchmarks:
//!
//! ```text
//! nbd_serve --file /var/tmp/v.img --size-mib 1024 --create           # engine volume
//! nbd_serve --file /var/tmp/raw.img --size-mib 1024 --backend raw    # plain file
//! nbdinfo nbd://127.0.0.1:10809/vol
//! ```
//!
//! `--backend engine` (default) formats or opens an engine volume in the file;
//! `--backend raw` serves the file's bytes directly (pread/pwrite, flush = fdatasync),
//! which separates the server's own overhead from the engine's in benchmarks.

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use node_agent::frontend::nbd::{
    BackendError, BlockBackend, DEFAULT_TCP_ADDR, ExportRegistry, NbdServer, ServerConfig,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backend {
    Engine,
    Raw,
}

#[derive(Parser, Debug)]
struct Args {
    /// Volume file (engine format, or raw bytes with --backend raw).
    #[arg(long)]
    file: PathBuf,
    /// Export name.
    #[arg(long, default_value = "vol")]
    name: String,
    #[arg(long, value_enum, default_value = "engine")]
    backend: Backend,
    /// Create the file (engine: format a new volume; raw: set its length).
    #[arg(long)]
    create: bool,
    /// Size for --create, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Engine WAL size for --create, in MiB.
    #[arg(long, default_value_t = 256)]
    wal_mib: u64,
    /// TCP listen address (NBD has no authentication: keep it on loopback).
    #[arg(long, default_value = DEFAULT_TCP_ADDR)]
    listen: SocketAddr,
    /// Also listen on this unix socket.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 64)]
    max_in_flight_requests: usize,
}

/// A plain file: what `nbdkit file` serves, for like-for-like comparisons.
struct RawFile {
    file: File,
    size_bytes: u64,
}

fn io(e: std::io::Error) -> BackendError {
    BackendError::Io(e.to_string())
}

impl BlockBackend for RawFile {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.file.read_exact_at(buf, offset).map_err(io)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.file.write_all_at(data, offset).map_err(io)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.write(offset, data)?;
        self.flush()
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.file.sync_data().map_err(io)
    }
    fn trim(&self, _offset: u64, _length: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        let zeros = vec![0u8; 1 << 20];
        let mut at = offset;
        let end = offset + length;
        while at < end {
            let n = (end - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at).map_err(io)?;
            at += n as u64;
        }
        Ok(())
    }
    fn flush_is_volume_wide(&self) -> bool {
        true
    }
}

fn open_backend(args: &Args) -> anyhow::Result<Arc<dyn BlockBackend>> {
    Ok(match args.backend {
        Backend::Engine => {
            let cfg = engine::VolumeConfig::default();
            let v = if args.create {
                let opts = engine::CreateOptions {
                    size_bytes: args.size_mib << 20,
                    wal_size_bytes: args.wal_mib << 20,
                    ..engine::CreateOptions::default()
                };
                engine::Volume::create_file(&args.file, opts, cfg)
            } else {
                engine::Volume::open_file(&args.file, cfg)
            }
            .with_context(|| format!("engine volume {}", args.file.display()))?;
            Arc::new(v)
        }
        Backend::Raw => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(args.create)
                .truncate(false)
                .open(&args.file)
                .with_context(|| format!("open {}", args.file.display()))?;
            if args.create {
                file.set_len(args.size_mib << 20)?;
            }
            let size_bytes = file.metadata()?.len() / 512 * 512;
            Arc::new(RawFile { file, size_bytes })
        }
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::logging::init(telemetry::logging::LogFormat::Text);
    let args = Args::parse();
    let backend = open_backend(&args)?;
    let registry = ExportRegistry::new();
    registry.add(&args.name, backend.clone())?;
    let config = ServerConfig {
        max_in_flight_requests: args.max_in_flight_requests,
        default_export: Some(args.name.clone()),
        ..ServerConfig::default()
    };
    let server = NbdServer::new(registry, config)?;
    let addr = server.listen_tcp(args.listen).await?;
    if let Some(path) = &args.unix {
        server.listen_unix(path).await?;
    }
    println!(
        "serving {} ({} bytes) on nbd://{addr}/{}",
        args.file.display(),
        backend.size_bytes(),
        args.name
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    server.shutdown();
    tokio::task::spawn_blocking(move || backend.flush())
        .await?
        .context("final flush")?;
    Ok(())
}
