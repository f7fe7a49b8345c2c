//! Writes the CRD YAML to `deploy/crds/` and `charts/blockvol/crds/` (or, with
//! `--stdout`, prints it).

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let stdout = std::env::args().any(|a| a == "--stdout");
    for (file, crd) in api::crd::all() {
        let yaml = api::crd::to_yaml(&crd)?;
        if stdout {
            println!("---\n{yaml}");
            continue;
        }
        for dir in api::crd::OUTPUT_DIRS {
            let dir = root.join(dir);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(file), &yaml)?;
            eprintln!("wrote {}", dir.join(file).display());
        }
    }
    Ok(())
}
