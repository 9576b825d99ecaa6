//! Path confinement for models loaded through the admin API: a local source must name a path
//! under `server.models_root`. Paths are percent-decoded first (so an encoded `..` cannot slip
//! through), must be relative with no `..` component and no NUL byte, must still be under the
//! root once symlinks are resolved, and must name a directory or a regular file (a FIFO or a
//! device would hang or never end a read).

use std::path::{Component, Path, PathBuf};

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Outside(String);

/// Resolves `path` (as given in a request) under `root`, or says why it is refused.
pub fn confine(root: &Path, path: &str) -> Result<PathBuf, Outside> {
    let decoded = percent_decode(path);
    if decoded.contains('\0') {
        return Err(Outside("the path contains a NUL byte".to_string()));
    }
    let relative = Path::new(&decoded);
    let escapes = relative
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if relative.is_absolute() || escapes {
        return Err(Outside(format!(
            "{path:?} is not a path relative to the models root without '..'"
        )));
    }
    let root = root
        .canonicalize()
        .map_err(|err| Outside(format!("the models root cannot be opened: {err}")))?;
    let joined = root.join(relative);
    let resolved = joined
        .canonicalize()
        .map_err(|_| Outside(format!("{path:?} does not exist under the models root")))?;
    if !resolved.starts_with(&root) {
        return Err(Outside(format!(
            "{path:?} leads outside the models root (through a symlink)"
        )));
    }
    let kind = std::fs::metadata(&resolved)
        .map_err(|err| Outside(format!("{path:?} cannot be read: {err}")))?
        .file_type();
    if !kind.is_dir() && !kind.is_file() {
        return Err(Outside(format!(
            "{path:?} is neither a directory nor a regular file"
        )));
    }
    if kind.is_dir() {
        for entry in std::fs::read_dir(&resolved).map_err(|err| Outside(err.to_string()))? {
            let entry = entry.map_err(|err| Outside(err.to_string()))?;
            let target = entry.path().canonicalize();
            let inside = target.as_ref().is_ok_and(|t| t.starts_with(&root));
            let regular = target
                .as_ref()
                .ok()
                .and_then(|t| std::fs::metadata(t).ok())
                .is_some_and(|m| m.is_file() || m.is_dir());
            if !inside || !regular {
                return Err(Outside(format!(
                    "{} in {path:?} leads outside the models root or is not a regular file",
                    entry.file_name().to_string_lossy()
                )));
            }
        }
    }
    Ok(resolved)
}

/// Decodes `%XX` escapes (invalid ones are kept as they are).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        let hex = bytes
            .get(index + 1..index + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (byte, hex) {
            (b'%', Some(value)) => {
                out.push(value);
                index += 3;
            }
            _ => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_under_the_root_are_accepted() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("model")).unwrap();
        std::fs::write(root.path().join("model/config.json"), "{}").unwrap();
        std::fs::write(outside.path().join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("link"))
            .unwrap();
        let fifo = root.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        assert!(confine(root.path(), "model").is_ok());
        assert!(confine(root.path(), "./model").is_ok());
        for bad in [
            "../x",
            "/etc/passwd",
            "%2e%2e/x",
            "model/../../x",
            "link",
            "fifo",
            "mo\0del",
            "/dev/zero",
            "missing",
        ] {
            assert!(confine(root.path(), bad).is_err(), "{bad:?} was accepted");
        }
        std::os::unix::fs::symlink(outside.path(), root.path().join("model/escape")).unwrap();
        assert!(
            confine(root.path(), "model").is_err(),
            "a symlink inside the model dir escapes"
        );
    }
}
