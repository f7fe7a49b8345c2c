//! Writes the CRD YAML to `deploy/crds/` and `charts/blockvol/templates/crds/` (or,
//! with `--stdout`, prints the `deploy/crds/` form).

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
        for out in api::crd::OUTPUTS {
            let dir = root.join(out.dir);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(file), out.render(&crd)?)?;
            eprintln!("wrote {}", dir.join(file).display());
        }
    }
    Ok(())
}
