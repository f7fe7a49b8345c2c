//! The NBD server in front of a real engine volume on a file: real clients write and
//! verify through it, and what a client flushed is in the file after reopening.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{TestServer, path_str, pattern, run_ok};
use engine::{CreateOptions, Volume, VolumeConfig};
use node_agent::frontend::nbd::{BlockBackend, ServerConfig};

fn engine_server(file: &Path, size: u64) -> (TestServer, Arc<Volume>) {
    let s = TestServer::start(ServerConfig::default());
    let opts = CreateOptions {
        size_bytes: size,
        wal_size_bytes: 16 << 20,
        ..CreateOptions::default()
    };
    let v =
        Arc::new(Volume::create_file(file, opts, VolumeConfig::default()).expect("create volume"));
    s.add("vol", v.clone());
    (s, v)
}

#[test]
fn nbdcopy_data_is_in_the_volume_file_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("vol.img");
    let size = 32usize << 20;
    let src = dir.path().join("in.img");
    let data = pattern(0xe9_91e5, size);
    std::fs::write(&src, &data).expect("source");
    {
        let (s, _v) = engine_server(&file, size as u64);
        let info = run_ok("nbdinfo", &["--json", &s.uri("vol")]);
        let info: serde_json::Value = serde_json::from_str(&info).expect("json");
        assert_eq!(info["exports"][0]["export-size"], size as u64);
        assert_eq!(info["exports"][0]["can_multi_conn"], true);
        assert_eq!(info["exports"][0]["block_size_minimum"], 4096);
        // nbdcopy flushes at the end; that flush is what makes the data durable.
        run_ok("nbdcopy", &[path_str(&src), &s.uri("vol")]);
        let out = dir.path().join("out.img");
        run_ok("nbdcopy", &[&s.unix_uri("vol"), path_str(&out)]);
        assert!(
            std::fs::read(&out).expect("copy") == data,
            "round trip differs"
        );
    }
    // Server and volume are gone; reopen the file with the engine alone.
    let v = Volume::open_file(&file, VolumeConfig::default()).expect("reopen");
    let mut buf = vec![0u8; size];
    BlockBackend::read(&v, 0, &mut buf).expect("read");
    assert!(
        buf == data,
        "reopened volume differs from what the client wrote"
    );
}

#[test]
fn fio_verify_passes_against_an_engine_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, _v) = engine_server(&dir.path().join("vol.img"), 32 << 20);
    let out = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", s.uri("vol")),
            "--rw=randwrite",
            "--bsrange=4k-128k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--verify_fatal=1",
            // fio would otherwise leave a verify state file in the working directory.
            "--verify_state_save=0",
            "--fsync=16",
            "--output-format=json",
        ],
    );
    let v: serde_json::Value =
        serde_json::from_str(&out[out.find('{').expect("json")..]).expect("fio json");
    assert_eq!(v["jobs"][0]["error"], 0, "{}", v["jobs"][0]);
    assert!(
        v["jobs"][0]["read"]["io_bytes"]
            .as_u64()
            .expect("verify reads")
            >= 32 << 20
    );
}
