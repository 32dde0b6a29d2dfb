//! Small helpers every stage uses: counted nouns, a stable hash, byte sizes.

/// `1 case`, `2 cases`.
pub fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// FNV-1a: stable across builds and platforms (std's hasher is not), for partitions by case id
/// and the matrix file's fingerprint.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_from(0, bytes)
}

/// FNV-1a whose offset basis is mixed with `seed`: one stable stream seed per (seed, name).
pub fn fnv1a_from(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET ^ seed, |h, &b| {
        (h ^ b as u64).wrapping_mul(FNV_PRIME)
    })
}

/// `3.2 GB`, `512 MB`, `4.0 PB` (powers of 1000).
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Write `bytes` to `path` so that a reader never sees a half-written file: into a temporary
/// file beside it, then renamed over it (a kill leaves the old file or the new one). A path
/// that exists and is not a regular file (`/dev/stdout`, a pipe) is written in place.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if path.exists() && !path.is_file() {
        return std::fs::write(path, bytes);
    }
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(name);
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    match written.and_then(|_| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// `word` as a POSIX shell reads it back: as is when it holds only safe characters, else in
/// single quotes (a `'` inside closed, escaped and reopened).
pub fn shell_quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:@,+%".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}
