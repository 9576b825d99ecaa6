//! Where a model comes from: a local HuggingFace directory, a `.gguf` file, a `hf:` repository
//! resolved through the hf-hub cache, or the built-in demo model.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hf_hub::{Cache, Repo, RepoType};

use super::progress::LoadProgress;

use super::error::LoadError;

/// The prefix of hub sources: `hf:org/repo[@revision]`.
const HUB_PREFIX: &str = "hf:";
/// The built-in demo model's source string.
pub const BUILTIN_DEMO: &str = "builtin:demo";
/// Files of a HuggingFace model directory that are used when present.
const OPTIONAL_HUB_FILES: &[&str] = &[
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];

/// A parsed model source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local directory in HuggingFace layout.
    Dir(PathBuf),
    /// A single GGUF file.
    Gguf(PathBuf),
    /// A hub repository, resolved through the local hf-hub cache (downloading what is missing).
    Hub {
        /// `org/name`.
        repo: String,
        /// A branch, tag or commit hash (`main` when absent).
        revision: String,
    },
    /// The small seeded random Llama built in memory.
    BuiltinDemo,
    /// The test backend: `ms` milliseconds per forward pass, no compute, and a load that
    /// takes `load_ms` (test builds only).
    #[cfg(feature = "fault-injection")]
    BuiltinFake {
        /// Milliseconds per forward pass.
        ms: u64,
        /// Milliseconds the load takes.
        load_ms: u64,
    },
}

impl FromStr for ModelSource {
    type Err = LoadError;

    fn from_str(text: &str) -> Result<Self, LoadError> {
        let bad = |reason: &str| LoadError::BadSource {
            source_str: text.to_string(),
            reason: reason.to_string(),
        };
        if text.is_empty() {
            return Err(bad("the source is empty"));
        }
        if let Some(name) = text.strip_prefix("builtin:") {
            #[cfg(feature = "fault-injection")]
            if let Some(rest) = name.strip_prefix("fake") {
                let query = rest.strip_prefix('?');
                if rest.is_empty() || query.is_some() {
                    return super::fake::parse_query(query)
                        .map(|(ms, load_ms)| ModelSource::BuiltinFake { ms, load_ms })
                        .map_err(|reason| bad(&reason));
                }
            }
            return match name {
                "demo" => Ok(ModelSource::BuiltinDemo),
                _ => Err(bad("the only built-in model is builtin:demo")),
            };
        }
        if let Some(spec) = text.strip_prefix(HUB_PREFIX) {
            let (repo, revision) = match spec.split_once('@') {
                Some((repo, revision)) => (repo, revision),
                None => (spec, "main"),
            };
            let valid_repo = repo.split('/').count() == 2
                && repo
                    .split('/')
                    .all(|part| !part.is_empty() && part != "." && part != "..");
            if !valid_repo {
                return Err(bad("expected hf:org/name[@revision]"));
            }
            if revision.is_empty() {
                return Err(bad("the revision after '@' is empty"));
            }
            return Ok(ModelSource::Hub {
                repo: repo.to_string(),
                revision: revision.to_string(),
            });
        }
        let path = PathBuf::from(text);
        let is_gguf = path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("gguf"));
        Ok(if is_gguf {
            ModelSource::Gguf(path)
        } else {
            ModelSource::Dir(path)
        })
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Dir(path) | ModelSource::Gguf(path) => write!(f, "{}", path.display()),
            ModelSource::Hub { repo, revision } => write!(f, "{HUB_PREFIX}{repo}@{revision}"),
            ModelSource::BuiltinDemo => f.write_str(BUILTIN_DEMO),
            #[cfg(feature = "fault-injection")]
            ModelSource::BuiltinFake { ms, load_ms: 0 } => write!(f, "builtin:fake?ms={ms}"),
            #[cfg(feature = "fault-injection")]
            ModelSource::BuiltinFake { ms, load_ms } => {
                write!(f, "builtin:fake?ms={ms}&load_ms={load_ms}")
            }
        }
    }
}

/// Returns the hub cache llorch uses: `HF_HUB_CACHE` if set, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (the layout of the Python `huggingface_hub` client).
pub fn default_hub_cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => Cache::new(PathBuf::from(dir)),
        None => Cache::from_env(),
    }
}

/// Whether downloads are forbidden (`HF_HUB_OFFLINE=1`), as in the Python client.
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// The hub's address: `HF_ENDPOINT` (a mirror, as the Python client takes it), else
/// `https://huggingface.co`.
pub fn hub_endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|endpoint| !endpoint.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".to_string())
}

/// Resolves a hub repository to a local snapshot directory holding a complete HuggingFace model.
///
/// Files already in `cache` are used as they are; missing ones are downloaded into it from
/// [`hub_endpoint`] unless `offline` is set, in which case the first missing file is an error.
/// Downloads count their bytes in `progress`.
pub fn resolve_hub(
    repo: &str,
    revision: &str,
    cache: &Cache,
    offline: bool,
    progress: &LoadProgress,
) -> Result<PathBuf, LoadError> {
    let fetcher = HubFetcher::new(repo, revision, cache, offline, progress)?;
    let config = fetcher.fetch("config.json")?;
    fetcher.fetch("tokenizer.json")?;
    for name in OPTIONAL_HUB_FILES {
        fetcher.fetch_optional(name);
    }
    if fetcher.fetch_optional("model.safetensors").is_none() {
        let index_path = fetcher.fetch("model.safetensors.index.json")?;
        for shard in shard_files(&index_path)? {
            fetcher.fetch(&shard)?;
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| fetcher.error("the snapshot has no parent directory".to_string()))
}

/// Lists the shard file names of a `model.safetensors.index.json`, in sorted order.
pub fn shard_files(index_path: &Path) -> Result<Vec<String>, LoadError> {
    let text = std::fs::read_to_string(index_path).map_err(|source| LoadError::Io {
        path: index_path.to_path_buf(),
        source,
    })?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|err| LoadError::BadJson {
            path: index_path.to_path_buf(),
            message: err.to_string(),
        })?;
    let map = index
        .get("weight_map")
        .and_then(|v| v.as_object())
        .ok_or_else(|| LoadError::BadJson {
            path: index_path.to_path_buf(),
            message: "missing object field `weight_map`".to_string(),
        })?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    if let Some(bad) = shards
        .iter()
        .find(|name| name.contains("..") || name.starts_with('/'))
    {
        return Err(LoadError::BadJson {
            path: index_path.to_path_buf(),
            message: format!("shard name {bad:?} leaves the model directory"),
        });
    }
    Ok(shards)
}

struct HubFetcher<'a> {
    label: String,
    repo: Repo,
    revision: &'a str,
    cache: &'a Cache,
    offline: bool,
    progress: &'a LoadProgress,
}

/// Counts one file's download in a [`LoadProgress`] (hf-hub announces a file's size when
/// it starts, and again when it resumes; the size is counted once).
struct Counting<'a> {
    progress: &'a LoadProgress,
    announced: bool,
}

impl hf_hub::api::Progress for Counting<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        if !self.announced {
            self.announced = true;
            self.progress.download_started(size as u64);
        }
    }

    fn update(&mut self, size: usize) {
        self.progress.downloaded(size as u64);
    }

    fn finish(&mut self) {}
}

impl<'a> HubFetcher<'a> {
    fn new(
        repo: &str,
        revision: &'a str,
        cache: &'a Cache,
        offline: bool,
        progress: &'a LoadProgress,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            label: format!("{repo}@{revision}"),
            repo: Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()),
            revision,
            cache,
            offline,
            progress,
        })
    }

    fn error(&self, message: String) -> LoadError {
        LoadError::Hub {
            repo: self.label.clone(),
            message,
        }
    }

    /// Looks a file up in the cache: through `refs/<revision>` for branches and tags, or
    /// directly under `snapshots/<hash>` when the revision is a commit hash.
    fn cached(&self, name: &str) -> Option<PathBuf> {
        if let Some(path) = self.cache.repo(self.repo.clone()).get(name) {
            return Some(path);
        }
        let is_commit =
            self.revision.len() == 40 && self.revision.chars().all(|c| c.is_ascii_hexdigit());
        if !is_commit {
            return None;
        }
        let path = self
            .cache
            .path()
            .join(self.repo.folder_name())
            .join("snapshots")
            .join(self.revision)
            .join(name);
        path.exists().then_some(path)
    }

    fn fetch_optional(&self, name: &str) -> Option<PathBuf> {
        self.fetch(name).ok()
    }

    fn fetch(&self, name: &str) -> Result<PathBuf, LoadError> {
        if let Some(path) = self.cached(name) {
            return Ok(path);
        }
        if self.offline {
            return Err(self.error(format!(
                "{name} is not in the cache at {} and HF_HUB_OFFLINE is set",
                self.cache.path().display()
            )));
        }
        let api = hf_hub::api::sync::ApiBuilder::from_cache(self.cache.clone())
            .with_endpoint(hub_endpoint())
            .with_progress(false)
            .build()
            .map_err(|err| self.error(err.to_string()))?;
        let counting = Counting {
            progress: self.progress,
            announced: false,
        };
        api.repo(self.repo.clone())
            .download_with_progress(name, counting)
            .map_err(|err| self.error(format!("downloading {name}: {err}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_source_kind() {
        assert_eq!(
            "builtin:demo".parse::<ModelSource>().unwrap(),
            ModelSource::BuiltinDemo
        );
        assert_eq!(
            "hf:org/name@v1".parse::<ModelSource>().unwrap(),
            ModelSource::Hub {
                repo: "org/name".into(),
                revision: "v1".into()
            }
        );
        assert_eq!(
            "hf:org/name".parse::<ModelSource>().unwrap(),
            ModelSource::Hub {
                repo: "org/name".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            "m/x.GGUF".parse::<ModelSource>().unwrap(),
            ModelSource::Gguf("m/x.GGUF".into())
        );
        assert_eq!(
            "models/llama".parse::<ModelSource>().unwrap(),
            ModelSource::Dir("models/llama".into())
        );
    }

    #[test]
    fn rejects_malformed_sources() {
        for text in [
            "",
            "builtin:nope",
            "hf:justname",
            "hf:a/b/c",
            "hf:org/name@",
            "hf:../x",
        ] {
            let err = text.parse::<ModelSource>().unwrap_err().to_string();
            assert!(err.contains("invalid model source"), "{text}: {err}");
        }
    }
}
