//! The two ways the blockvol image is built carry the same host tools: deploy/Dockerfile
//! installs the Debian packages named in deploy/image-tools.txt (and nothing else but CA
//! certificates), and hack/images.sh copies exactly the programs named there from this
//! machine. The test checks that the Dockerfile still takes its package list from that
//! file, that the daemonless build's file list has every listed program, and that each
//! program on this machine comes from the package the list names (so the Docker build's
//! packages provide the same programs).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// (package, program) pairs of deploy/image-tools.txt.
fn image_tools() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("deploy/image-tools.txt")).expect("list");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut words = l.split_whitespace();
            let pkg = words.next().expect("package").to_owned();
            let program = words.next().unwrap_or_else(|| panic!("no program: {l}"));
            assert!(words.next().is_none(), "two columns only: {l}");
            (pkg, program.to_owned())
        })
        .collect()
}

#[test]
fn the_dockerfile_installs_exactly_the_listed_packages() {
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).expect("Dockerfile");
    let runtime = dockerfile.split("\nFROM ").last().expect("a runtime stage");
    assert!(
        runtime.contains("COPY deploy/image-tools.txt /tmp/image-tools.txt"),
        "the runtime stage must copy the tool list:\n{runtime}"
    );
    // The install command, continuation lines joined: only ca-certificates and the list.
    let joined = runtime.replace("\\\n", " ");
    let install = joined
        .lines()
        .find(|l| l.contains("apt-get install"))
        .expect("an apt-get install");
    let args = install
        .split("apt-get install")
        .nth(1)
        .and_then(|rest| rest.split(" && for ").next())
        .expect("install arguments");
    let words: Vec<&str> = args.split_whitespace().collect();
    let packages: Vec<&&str> = words
        .iter()
        .take_while(|w| !w.starts_with("$("))
        .filter(|w| !w.starts_with('-'))
        .collect();
    assert_eq!(
        packages,
        vec![&"ca-certificates"],
        "packages named in the Dockerfile instead of deploy/image-tools.txt: {install}"
    );
    assert!(
        args.contains("$(awk '!/^#/ && NF {print $1}' /tmp/image-tools.txt | sort -u)"),
        "the Dockerfile must install the packages of deploy/image-tools.txt: {install}"
    );
    assert!(
        runtime.contains("awk '!/^#/ && NF {print $2}' /tmp/image-tools.txt")
            && runtime.contains("command -v"),
        "the Dockerfile must check every listed program is installed"
    );
}

#[test]
fn the_daemonless_image_has_every_listed_program_from_the_listed_package() {
    let out = Command::new("bash")
        .arg(repo().join("hack/images.sh"))
        .arg("--tool-files")
        .output()
        .expect("hack/images.sh --tool-files");
    let files: BTreeSet<String> = testkit::stdout_lines(&out, "hack/images.sh --tool-files")
        .into_iter()
        .collect();
    let tools = image_tools();
    assert!(!tools.is_empty());
    for (package, program) in &tools {
        let in_image: Vec<String> = ["/usr/bin", "/usr/sbin"]
            .iter()
            .map(|d| format!("{d}/{program}"))
            .filter(|p| files.contains(p))
            .collect();
        assert_eq!(
            in_image.len(),
            1,
            "{program} is not in the daemonless image: {files:?}"
        );
        // dpkg records merged-/usr programs under either spelling.
        let owners: Vec<String> = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
            .iter()
            .filter_map(|d| {
                let o = Command::new("dpkg")
                    .args(["-S", &format!("{d}/{program}")])
                    .output()
                    .ok()?;
                o.status.success().then(|| {
                    String::from_utf8_lossy(&o.stdout)
                        .split(':')
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_owned()
                })
            })
            .collect();
        assert!(
            owners.iter().any(|o| o == package),
            "{program} comes from {owners:?} on this machine, the list says {package}"
        );
    }
    // The programs' shared libraries came along.
    assert!(
        files.iter().any(|f| f.ends_with("/libc.so.6")),
        "the C library is missing: {files:?}"
    );
}
