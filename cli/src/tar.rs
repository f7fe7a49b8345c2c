//! A minimal POSIX ustar writer for the support bundle: regular files only, names up to
//! 255 bytes (split into prefix and name at a `/`), sizes up to 8 GiB. Enough for YAML
//! files, and readable by every `tar`. Compression is left to `gzip` (see `dump`).

use crate::error::{Error, Result};

const BLOCK: usize = 512;

/// An archive being built in memory.
#[derive(Debug, Default)]
pub struct TarWriter {
    buf: Vec<u8>,
}

impl TarWriter {
    pub fn new() -> TarWriter {
        TarWriter::default()
    }

    /// Appends a regular file (mode 0644) with modification time `mtime` (Unix seconds).
    pub fn add_file(&mut self, path: &str, data: &[u8], mtime: u64) -> Result<()> {
        let (prefix, name) = split_path(path)?;
        let mut header = [0u8; BLOCK];
        put(&mut header[0..100], name.as_bytes());
        put_octal(&mut header[100..108], 0o644);
        put_octal(&mut header[108..116], 0);
        put_octal(&mut header[116..124], 0);
        let size = u64::try_from(data.len()).unwrap_or(u64::MAX);
        if size >= 1 << 33 {
            return Err(Error::Archive {
                what: format!("adding {path} to the bundle"),
                message: "larger than 8 GiB".into(),
            });
        }
        put_octal(&mut header[124..136], size);
        put_octal(&mut header[136..148], mtime.min((1 << 33) - 1));
        header[156] = b'0';
        put(&mut header[257..263], b"ustar\0");
        put(&mut header[263..265], b"00");
        put(&mut header[345..500], prefix.as_bytes());
        // The checksum is computed with its own field as spaces.
        header[148..156].fill(b' ');
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        put(&mut header[148..156], format!("{sum:06o}\0 ").as_bytes());
        self.buf.extend_from_slice(&header);
        self.buf.extend_from_slice(data);
        let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
        Ok(())
    }

    /// The archive, with the two zero blocks that end it.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend(std::iter::repeat_n(0u8, 2 * BLOCK));
        self.buf
    }
}

/// ustar keeps names of up to 100 bytes in `name` and up to 155 more in `prefix`,
/// joined by a `/` that is not stored.
fn split_path(path: &str) -> Result<(&str, &str)> {
    let bad = |message: &str| Error::Archive {
        what: format!("adding {path} to the bundle"),
        message: message.into(),
    };
    if path.is_empty() || path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(bad("not a relative path inside the bundle"));
    }
    if path.len() <= 100 {
        return Ok(("", path));
    }
    path.char_indices()
        .filter(|&(i, c)| c == '/' && i <= 155 && path.len() - i - 1 <= 100 && i + 1 < path.len())
        .map(|(i, _)| (&path[..i], &path[i + 1..]))
        .next()
        .ok_or_else(|| bad("the path is too long for a tar header"))
}

fn put(field: &mut [u8], value: &[u8]) {
    field[..value.len()].copy_from_slice(value);
}

/// Zero-padded octal filling all but the last byte, which stays NUL.
fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    put(field, format!("{value:0digits$o}").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn system_tar_lists_and_extracts_what_was_written() {
        let long_dir = "d".repeat(120);
        let long = format!("bundle/{long_dir}/file.yaml");
        let mut tar = TarWriter::new();
        tar.add_file("bundle/a.yaml", b"kind: A\n", 1_700_000_000)
            .unwrap();
        tar.add_file("bundle/empty.txt", b"", 1_700_000_000)
            .unwrap();
        tar.add_file(&long, &vec![b'x'; 1025], 1_700_000_000)
            .unwrap();
        let bytes = tar.finish();
        assert_eq!(bytes.len() % BLOCK, 0);

        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("t.tar");
        std::fs::write(&archive, &bytes).unwrap();
        let out = Command::new("tar")
            .arg("-xvf")
            .arg(&archive)
            .arg("-C")
            .arg(dir.path())
            .output()
            .unwrap();
        let listed = testkit::stdout_lines(&out, "tar -xvf");
        assert_eq!(listed, ["bundle/a.yaml", "bundle/empty.txt", long.as_str()]);
        assert_eq!(
            std::fs::read(dir.path().join("bundle/a.yaml")).unwrap(),
            b"kind: A\n"
        );
        assert_eq!(std::fs::read(dir.path().join(&long)).unwrap().len(), 1025);
    }

    #[test]
    fn paths_that_escape_or_do_not_fit_are_refused() {
        let mut tar = TarWriter::new();
        assert!(tar.add_file("/etc/passwd", b"", 0).is_err());
        assert!(tar.add_file("a/../../b", b"", 0).is_err());
        assert!(tar.add_file("", b"", 0).is_err());
        assert!(tar.add_file(&"x".repeat(101), b"", 0).is_err());
    }
}
