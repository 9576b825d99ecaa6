//! Z2: any path the admin API accepts resolves under the models root.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn root() -> &'static tempfile::TempDir {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = tempfile::tempdir().expect("a temp dir");
        std::fs::create_dir_all(root.path().join("model/sub")).expect("dirs");
        std::fs::write(root.path().join("model/config.json"), "{}").expect("a file");
        root
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let root = root();
    if let Ok(resolved) = llorch::config::confine(root.path(), path) {
        let canonical = root.path().canonicalize().expect("the root");
        assert!(resolved.starts_with(&canonical), "{path:?} -> {resolved:?}");
    }
});
