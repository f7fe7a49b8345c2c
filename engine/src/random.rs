//! Unique bytes for volume ids and handshake nonces: read from /dev/urandom, or, when
//! that cannot be read, made from the clock, a process-wide counter and the process id.
//! The fallback is unique, not secret; nothing here is used as a key.

use std::sync::atomic::{AtomicU64, Ordering};

/// `N` bytes that no other call (in this or another process) returns.
pub(crate) fn unique_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut out))
        .is_ok();
    if !ok {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let c = COUNTER.fetch_add(1, Ordering::Relaxed);
        let parts = t.to_le_bytes().into_iter().chain(c.to_le_bytes());
        let parts = parts.chain(std::process::id().to_le_bytes());
        // Folded into `out` when it is shorter than the 28 bytes the parts take.
        for (i, b) in parts.enumerate() {
            out[i % N] ^= b;
        }
    }
    out
}
