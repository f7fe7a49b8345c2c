//! The NBD server against real clients: nbdinfo, qemu-io, nbdcopy and fio's nbd engine.

mod common;

use common::{TestServer, path_str, pattern, read_backend, run, run_ok};
use node_agent::frontend::nbd::BlockBackend;

#[test]
fn nbdinfo_reports_size_flags_and_block_sizes() {
    let (s, _b) = TestServer::with_mem_export("vol-info", 64 << 20, 4096);
    let out = run_ok("nbdinfo", &["--json", &s.uri("vol-info")]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], false);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "vol-info");
    assert_eq!(e["export-size"], 64u64 << 20);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 4096);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32u64 << 20);

    // The same export over the unix socket.
    let out = run_ok("nbdinfo", &["--size", &s.unix_uri("vol-info")]);
    assert_eq!(out.trim(), (64u64 << 20).to_string());
}

#[test]
fn nbdinfo_lists_every_export_and_fails_for_unknown_names() {
    let (s, _a) = TestServer::with_mem_export("alpha", 1 << 20, 512);
    s.add_mem("beta", 2 << 20, 512);
    let out = run_ok("nbdinfo", &["--list", "--json", &s.uri("")]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| e["export-name"].as_str().expect("name").to_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["alpha", "beta"]);

    let out = run("nbdinfo", &[&s.uri("gamma")]);
    assert!(!out.status.success(), "unknown export must fail");
    // The server keeps serving after the refusal.
    run_ok("nbdinfo", &["--size", &s.uri("beta")]);
}

#[test]
fn qemu_io_writes_and_reads_patterns_at_offsets() {
    let (s, b) = TestServer::with_mem_export("vol-q", 16 << 20, 512);
    let uri = s.uri("vol-q");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 1052672 64k",
            "-c",
            "write -P 0x11 16711680 64k",
            "-c",
            "write -z 4096 4096",
            "-c",
            "flush",
            &uri,
        ],
    );
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 4096",
            "-c",
            "read -P 0 4096 4096",
            "-c",
            "read -P 0xab 8192 1040384",
            "-c",
            "read -P 0 1048576 4096",
            "-c",
            "read -P 0xcd 1052672 64k",
            "-c",
            "read -P 0x11 16711680 64k",
            &uri,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // The bytes really are in the backend where the client put them.
    assert!(
        read_backend(b.as_ref(), 1052672, 65536)
            .iter()
            .all(|&x| x == 0xcd)
    );
    assert!(read_backend(b.as_ref(), 4096, 4096).iter().all(|&x| x == 0));
    assert!(read_backend(b.as_ref(), 0, 4096).iter().all(|&x| x == 0xab));

    // A pattern mismatch is detected (the check can fail).
    let out = run("qemu-io", &["-f", "raw", "-c", "read -P 0xee 0 4096", &uri]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Pattern verification failed"), "{stdout}");
}

#[test]
fn nbdcopy_round_trips_a_random_file() {
    let size = 24usize << 20;
    let (s, b) = TestServer::with_mem_export("vol-copy", size as u64, 4096);
    let src = s.dir.path().join("in.img");
    let dst = s.dir.path().join("out.img");
    let data = pattern(0x5eed_c0de, size);
    std::fs::write(&src, &data).expect("write source");

    run_ok("nbdcopy", &[path_str(&src), &s.uri("vol-copy")]);
    assert_eq!(b.size_bytes(), size as u64);
    assert!(
        read_backend(b.as_ref(), 0, size) == data,
        "backend differs from source"
    );

    run_ok("nbdcopy", &[&s.unix_uri("vol-copy"), path_str(&dst)]);
    let back = std::fs::read(&dst).expect("read copy");
    assert_eq!(back.len(), data.len());
    assert!(back == data, "copied file differs from source");
}

#[test]
fn fio_nbd_engine_verifies_crc32c_under_concurrency() {
    let (s, _b) = TestServer::with_mem_export("vol-fio", 32 << 20, 4096);
    let uri = s.uri("vol-fio");
    let out = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--verify_fatal=1",
            // fio would otherwise leave a verify state file in the working directory.
            "--verify_state_save=0",
            "--do_verify=1",
            "--fsync=32",
            "--output-format=json",
        ],
    );
    // fio prints a banner before the JSON document.
    let json = &out[out.find('{').expect("fio json")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio json");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert!(job["write"]["io_bytes"].as_u64().expect("io_bytes") >= 32 << 20);
    assert!(job["read"]["io_bytes"].as_u64().expect("verify reads") >= 32 << 20);
}
