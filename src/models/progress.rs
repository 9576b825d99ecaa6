//! How far a model's load has come: the bytes of its weight files read so far out of their
//! total. Beside the loader, a second thread reads the weight files through in large
//! sequential reads: the reads count the progress, and they bring a cold file into the page
//! cache ahead of the loader's mapped reads (page faults at random offsets, the slower way to
//! read a cold file). The two run side by side, and the reader stops when the loader is
//! done.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::error::LoadError;

/// Bytes read per call while reading weights through.
const CHUNK: usize = 4 << 20;

/// A load's progress, shared between the loading thread and whoever shows it.
#[derive(Debug, Default)]
pub struct LoadProgress {
    read: AtomicU64,
    total: AtomicU64,
    downloaded: AtomicU64,
    download_total: AtomicU64,
}

/// What [`LoadProgress`] has counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of weight files read.
    pub bytes_read: u64,
    /// Their total (0 before the load knows its files).
    pub bytes_total: u64,
    /// Bytes of an `hf:` source's files downloaded.
    pub bytes_downloaded: u64,
    /// The sizes of the files whose download has started (0 when nothing is downloaded).
    pub download_bytes_total: u64,
}

impl LoadProgress {
    /// Everything counted so far.
    pub fn progress(&self) -> Progress {
        Progress {
            bytes_read: self.read.load(Ordering::Relaxed),
            bytes_total: self.total.load(Ordering::Relaxed),
            bytes_downloaded: self.downloaded.load(Ordering::Relaxed),
            download_bytes_total: self.download_total.load(Ordering::Relaxed),
        }
    }

    /// A file of `bytes` starts downloading.
    pub fn download_started(&self, bytes: u64) {
        self.download_total.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `bytes` more have been downloaded.
    pub fn downloaded(&self, bytes: u64) {
        self.downloaded.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes of weights read so far and their total (0 and 0 before the load knows its files
    /// or for a model built in memory).
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.read.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    /// Sets the total and counts `read` bytes of it (for loads that report progress
    /// themselves).
    pub fn set(&self, read: u64, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.read.store(read, Ordering::Relaxed);
    }

    /// Runs `load` while a second thread reads `files` through, counting their bytes; the
    /// count reads the whole total once `load` has succeeded.
    pub fn read_ahead<T>(
        &self,
        files: &[PathBuf],
        load: impl FnOnce() -> Result<T, LoadError>,
    ) -> Result<T, LoadError> {
        let stop = AtomicBool::new(false);
        let loaded = std::thread::scope(|scope| {
            scope.spawn(|| {
                // The loader reports a file it cannot read; the reader only counts.
                let _ = self.read_through(files, &stop);
            });
            let loaded = load();
            stop.store(true, Ordering::Relaxed);
            loaded
        });
        if loaded.is_ok() {
            let total = self.total.load(Ordering::Relaxed);
            self.read.store(total, Ordering::Relaxed);
        }
        loaded
    }

    /// Reads `files` through, counting their bytes, until `stop` is set.
    fn read_through(&self, files: &[PathBuf], stop: &AtomicBool) -> Result<(), LoadError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LoadError::Io { path, source }
        };
        let mut total = 0;
        for file in files {
            total += std::fs::metadata(file).map_err(io(file))?.len();
        }
        self.set(0, total);
        let mut buffer = vec![0u8; CHUNK];
        for file in files {
            let mut reader = std::fs::File::open(file).map_err(io(file))?;
            while !stop.load(Ordering::Relaxed) {
                let n = reader.read(&mut buffer).map_err(io(file))?;
                if n == 0 {
                    break;
                }
                self.read.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// The weight files of a HuggingFace directory: its `*.safetensors`, sorted.
pub fn weight_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_through_counts_every_byte_of_the_weight_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.safetensors"), vec![1u8; CHUNK + 17]).unwrap();
        std::fs::write(dir.path().join("a.safetensors"), vec![2u8; 5]).unwrap();
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        let files = weight_files(dir.path());
        let names: Vec<_> = files.iter().map(|f| f.file_name().unwrap()).collect();
        assert_eq!(names, ["a.safetensors", "b.safetensors"]);
        let progress = LoadProgress::default();
        let bytes = (CHUNK + 22) as u64;
        progress
            .read_through(&files, &AtomicBool::new(false))
            .unwrap();
        assert_eq!(progress.snapshot(), (bytes, bytes));
        let stopped = LoadProgress::default();
        stopped
            .read_through(&files, &AtomicBool::new(true))
            .unwrap();
        assert_eq!(
            stopped.snapshot(),
            (0, bytes),
            "a stopped reader reads nothing more"
        );
        let missing =
            progress.read_through(&[dir.path().join("gone.gguf")], &AtomicBool::new(false));
        assert!(matches!(missing, Err(LoadError::Io { .. })));
        let failed: Result<(), _> =
            stopped.read_ahead(&files, || Err(LoadError::Panicked("x".into())));
        assert!(failed.is_err());
        assert_eq!(progress.read_ahead(&files, || Ok(7)).unwrap(), 7);
        assert_eq!(progress.snapshot(), (bytes, bytes));
    }
}
