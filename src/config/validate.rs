//! Validation of the wire types into a [`PoolConfig`]: every error names file, line and field.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::cluster::validate_cluster;
use super::schema::{ModelEntry, PoolFile, ServerSection};
use super::{ConfigError, ModelSpec, PoolConfig, ServerConfig};
use crate::models::{DTypeChoice, DeviceSpec, ModelSource};

/// The only schema version this build reads.
const SCHEMA_VERSION: u32 = 1;

/// Validates a parsed pool file. `text` is the file's content, used to locate lines.
pub fn validate(path: &Path, text: &str, file: &PoolFile) -> Result<PoolConfig, ConfigError> {
    let error = |line: Option<usize>, field: String, message: String| ConfigError {
        file: path.to_path_buf(),
        line,
        field,
        message,
    };
    if file.version != SCHEMA_VERSION {
        return Err(error(
            find_key_line(text, None, "version"),
            "version".to_string(),
            format!(
                "unsupported version {}; this build reads version 1",
                file.version
            ),
        ));
    }
    let listen: SocketAddr = file.server.listen.parse().map_err(|_| {
        error(
            find_key_line(text, Some("server"), "listen"),
            "server.listen".to_string(),
            format!(
                "{:?} is not an address like 127.0.0.1:8080",
                file.server.listen
            ),
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut names = HashSet::new();
    let mut models = Vec::with_capacity(file.models.len());
    for (index, entry) in file.models.iter().enumerate() {
        let locate = |field: &str| find_model_line(text, index, field);
        let fail = |field: &str, message: String| {
            error(locate(field), format!("models[{index}].{field}"), message)
        };
        if entry.name.trim().is_empty() {
            return Err(fail("name", "the name is empty".to_string()));
        }
        if !names.insert(entry.name.clone()) {
            return Err(fail(
                "name",
                format!("duplicate model name {:?}", entry.name),
            ));
        }
        models.push(validate_model(entry, base, &fail)?);
    }
    let mut opened: HashSet<DeviceSpec> = HashSet::new();
    for (index, model) in models.iter().enumerate() {
        for device in &model.devices {
            if *device == DeviceSpec::Cpu || !opened.insert(*device) {
                continue;
            }
            if let Err(err) = device.open() {
                return Err(error(
                    find_model_line(text, index, "devices"),
                    format!("models[{index}].devices"),
                    err.to_string(),
                ));
            }
        }
    }
    let mut budgets = HashMap::new();
    for (name, section) in &file.devices {
        let section_name = format!("devices.\"{name}\"");
        let fail = |field: &str, message: String| {
            let line = find_key_line(text, Some(&section_name), field)
                .or_else(|| find_key_line(text, Some(&format!("devices.{name}")), field));
            error(line, format!("devices.{name}.{field}"), message)
        };
        let device: DeviceSpec = name
            .parse()
            .map_err(|message| fail("memory_budget", message))?;
        if let Some(budget) = &section.memory_budget {
            let bytes = parse_bytes(budget).map_err(|message| fail("memory_budget", message))?;
            budgets.insert(device, bytes);
        }
    }
    for (device, budget) in &budgets {
        let preloaded: Vec<(&ModelSpec, u64)> = models
            .iter()
            .filter(|model| model.preload)
            .map(|model| {
                let copies = model.devices.iter().filter(|d| *d == device).count() as u64;
                (model, copies * model.footprint(*device))
            })
            .filter(|(_, bytes)| *bytes > 0)
            .collect();
        let total: u64 = preloaded.iter().map(|(_, bytes)| bytes).sum();
        if total > *budget {
            let names: Vec<&str> = preloaded.iter().map(|(m, _)| m.name.as_str()).collect();
            let section = format!("devices.\"{device}\"");
            let line = find_key_line(text, Some(&section), "memory_budget").or_else(|| {
                find_key_line(text, Some(&format!("devices.{device}")), "memory_budget")
            });
            return Err(error(
                line,
                format!("devices.{device}.memory_budget"),
                format!(
                    "the models preloaded on {device} ({}) need {total} bytes, over the budget of {budget} bytes; \
                     set preload = false on some of them",
                    names.join(", ")
                ),
            ));
        }
    }
    let mut server = validate_server(&file.server, listen, &|field: &str, message: String| {
        error(
            find_key_line(text, Some("server"), field),
            format!("server.{field}"),
            message,
        )
    })?;
    server.models_root = match &file.server.models_root {
        Some(root) => base.join(root),
        None => base.to_path_buf(),
    };
    let cluster = match &file.cluster {
        Some(section) => Some(validate_cluster(section, base, &|field: &str, message| {
            error(
                find_key_line(text, Some("cluster"), field),
                format!("cluster.{field}"),
                message,
            )
        })?),
        None => None,
    };
    Ok(PoolConfig {
        server,
        models,
        budgets,
        cluster,
    })
}

/// Validates `[server]` beyond its address.
fn validate_server(
    section: &ServerSection,
    listen: SocketAddr,
    fail: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ServerConfig, ConfigError> {
    let mut server = ServerConfig::new(listen);
    let durations = [
        (
            "header_timeout",
            &section.header_timeout,
            &mut server.header_timeout,
        ),
        (
            "body_timeout",
            &section.body_timeout,
            &mut server.body_timeout,
        ),
        (
            "shutdown_timeout",
            &section.shutdown_timeout,
            &mut server.shutdown_timeout,
        ),
    ];
    for (field, value, target) in durations {
        if let Some(value) = value {
            *target = parse_duration(value).map_err(|message| fail(field, message))?;
        }
    }
    if let Some(max_body) = &section.max_body {
        let bytes = parse_bytes(max_body).map_err(|message| fail("max_body", message))?;
        if bytes == 0 {
            return Err(fail("max_body", "must be at least 1 byte".to_string()));
        }
        server.max_body = usize::try_from(bytes).unwrap_or(usize::MAX);
    }
    let counts = [
        (
            "max_connections",
            section.max_connections,
            &mut server.max_connections,
        ),
        (
            "http_threads",
            section.http_threads,
            &mut server.http_threads,
        ),
        (
            "max_messages",
            section.max_messages,
            &mut server.limits.max_messages,
        ),
        ("max_stop", section.max_stop, &mut server.limits.max_stop),
        (
            "max_stop_bytes",
            section.max_stop_bytes,
            &mut server.limits.max_stop_bytes,
        ),
    ];
    for (field, value, target) in counts {
        match value {
            Some(0) => return Err(fail(field, "must be at least 1".to_string())),
            Some(value) => *target = value,
            None => {}
        }
    }
    server.metrics_public = section.metrics_public;
    for origin in &section.cors_origins {
        let valid = (origin.starts_with("http://") || origin.starts_with("https://"))
            && axum::http::HeaderValue::from_str(origin).is_ok();
        if !valid || origin.contains('*') {
            return Err(fail(
                "cors_origins",
                format!("{origin:?} is not an origin like https://app.example (no wildcards)"),
            ));
        }
    }
    server.cors_origins = section.cors_origins.clone();
    server.allowed_hosts = section.allowed_hosts.clone();
    if let Some(per_second) = section.rate_limit {
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(fail(
                "rate_limit",
                "must be a positive number of requests per second".to_string(),
            ));
        }
        let burst = section
            .rate_burst
            .map_or(per_second.ceil().max(1.0), f64::from);
        if burst < 1.0 {
            return Err(fail("rate_burst", "must be at least 1".to_string()));
        }
        server.rate_limit = Some(super::Rate { per_second, burst });
    }
    Ok(server)
}

/// Splits `"8GiB"` into `(8.0, "GiB")`; `example` completes the error message.
fn number_and_unit<'a>(text: &'a str, what: &str, example: &str) -> Result<(f64, &'a str), String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number = number
        .parse()
        .map_err(|_| format!("invalid {what} {text:?}: expected e.g. {example}"))?;
    Ok((number, unit.trim()))
}

/// Parses a size such as `"8GiB"`, `"512MB"`, `"1024"` (bytes).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = number_and_unit(text, "size", "\"8GiB\" or \"512MB\"")?;
    let scale: f64 = match unit {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "invalid size unit {other:?} in {text:?} (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    Ok((number * scale) as u64)
}

/// Parses a duration such as `"30s"`, `"5m"`, `"1h"`, `"250ms"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = number_and_unit(text, "duration", "\"30s\" or \"5m\"")?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {text:?} (ms, s, m, h)"
            ))
        }
    };
    if seconds <= 0.0 {
        return Err(format!("the duration {text:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Validates one `[[models]]` entry given outside a file (an admin load); relative paths are
/// taken from `base`. Errors name the field as `models.<field>`.
pub fn validate_entry(entry: &ModelEntry, base: &Path) -> Result<ModelSpec, ConfigError> {
    let fail = |field: &str, message: String| ConfigError {
        file: "request body".into(),
        line: None,
        field: format!("models.{field}"),
        message,
    };
    if entry.name.trim().is_empty() {
        return Err(fail("name", "the name is empty".to_string()));
    }
    validate_model(entry, base, &fail)
}

fn validate_model(
    entry: &ModelEntry,
    base: &Path,
    fail: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ModelSpec, ConfigError> {
    let source = resolve_source(entry, base, fail)?;
    if entry.devices.is_empty() {
        return Err(fail("devices", "at least one device is needed".to_string()));
    }
    let devices = entry
        .devices
        .iter()
        .map(|device| device.parse::<DeviceSpec>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|message| fail("devices", message))?;
    let dtype: DTypeChoice = entry
        .dtype
        .parse()
        .map_err(|message| fail("dtype", message))?;
    if matches!(source, ModelSource::Gguf(_))
        && !matches!(dtype, DTypeChoice::Auto | DTypeChoice::F32)
    {
        return Err(fail(
            "dtype",
            format!(
                "GGUF models run in their stored quantized types; dtype {dtype} does not apply"
            ),
        ));
    }
    if dtype == DTypeChoice::Bf16 && devices.iter().any(|d| matches!(d, DeviceSpec::Metal(_))) {
        return Err(fail(
            "dtype",
            "bf16 is not supported on metal devices".to_string(),
        ));
    }
    if entry.max_concurrent == Some(0) {
        return Err(fail("max_concurrent", "must be at least 1".to_string()));
    }
    if let Some(tokens) = entry.max_batch_tokens {
        let sequences = entry.max_concurrent.unwrap_or(1);
        if tokens < sequences {
            return Err(fail(
                "max_batch_tokens",
                format!(
                    "must be at least max_concurrent ({sequences}), so every running sequence \
                     can take its next token in one step"
                ),
            ));
        }
    }
    let kv_cache = entry
        .kv_cache
        .as_deref()
        .map(parse_bytes)
        .transpose()
        .map_err(|message| fail("kv_cache", message))?;
    if kv_cache == Some(0) {
        return Err(fail("kv_cache", "must be more than 0 bytes".to_string()));
    }
    let kv_cache_dtype = entry
        .kv_cache_dtype
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|message| fail("kv_cache_dtype", message))?
        .unwrap_or_default();
    let prefix_cache = entry
        .prefix_cache
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|message| fail("prefix_cache", message))?
        .unwrap_or_default();
    if entry.max_queue == 0 {
        return Err(fail("max_queue", "must be at least 1".to_string()));
    }
    if entry.max_seq_len == Some(0) {
        return Err(fail("max_seq_len", "must be at least 1".to_string()));
    }
    let keep_alive = entry
        .keep_alive
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|message| fail("keep_alive", message))?;
    let duration = |field: &str, value: &Option<String>, default: Duration| {
        value
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|message| fail(field, message))
            .map(|parsed| parsed.unwrap_or(default))
    };
    let stall_timeout = duration(
        "stall_timeout",
        &entry.stall_timeout,
        super::DEFAULT_STALL_TIMEOUT,
    )?;
    let queue_timeout = duration(
        "queue_timeout",
        &entry.queue_timeout,
        super::DEFAULT_QUEUE_TIMEOUT,
    )?;
    let request_timeout = duration(
        "request_timeout",
        &entry.request_timeout,
        super::DEFAULT_REQUEST_TIMEOUT,
    )?;
    let load_timeout = duration(
        "load_timeout",
        &entry.load_timeout,
        super::DEFAULT_LOAD_TIMEOUT,
    )?;
    let slow_reader_timeout = duration(
        "slow_reader_timeout",
        &entry.slow_reader_timeout,
        super::DEFAULT_SLOW_READER_TIMEOUT,
    )?;
    Ok(ModelSpec {
        name: entry.name.clone(),
        source,
        devices,
        dtype,
        max_concurrent: entry.max_concurrent,
        max_batch_tokens: entry.max_batch_tokens,
        kv_cache,
        kv_cache_dtype,
        prefix_cache,
        max_queue: entry.max_queue,
        max_seq_len: entry.max_seq_len,
        preload: entry.preload,
        keep_alive,
        pinned: entry.pinned,
        stall_timeout,
        queue_timeout,
        request_timeout,
        load_timeout,
        slow_reader_timeout,
        queue_during_load: entry.queue_during_load,
    })
}

/// Parses the source and, for local sources, checks the files exist (relative paths are taken
/// from the config file's folder).
fn resolve_source(
    entry: &ModelEntry,
    base: &Path,
    fail: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ModelSource, ConfigError> {
    let source: ModelSource = entry
        .source
        .parse()
        .map_err(|err: crate::models::LoadError| fail("source", err.to_string()))?;
    Ok(match source {
        ModelSource::Dir(dir) => {
            let dir = base.join(dir);
            for needed in ["config.json", "tokenizer.json"] {
                if !dir.join(needed).is_file() {
                    return Err(fail(
                        "source",
                        format!("missing file {}", dir.join(needed).display()),
                    ));
                }
            }
            ModelSource::Dir(dir)
        }
        ModelSource::Gguf(file) => {
            let file = base.join(file);
            if !file.is_file() {
                return Err(fail("source", format!("missing file {}", file.display())));
            }
            ModelSource::Gguf(file)
        }
        other => other,
    })
}

/// Finds the 1-based line of `key = ...` inside the `[section]` table (top level when `None`).
fn find_key_line(text: &str, section: Option<&str>, key: &str) -> Option<usize> {
    let mut current: Option<String> = None;
    for (number, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            current = Some(trimmed.trim_matches(['[', ']']).trim().to_string());
            continue;
        }
        if current.as_deref() == section && key_of(trimmed) == Some(key) {
            return Some(number + 1);
        }
    }
    None
}

/// Finds the line of `field` in the `index`-th `[[models]]` table, or the table's header.
fn find_model_line(text: &str, index: usize, field: &str) -> Option<usize> {
    let mut seen = 0usize;
    let mut header = None;
    for (number, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            if header.is_some() {
                break;
            }
            if trimmed == "[[models]]" {
                if seen == index {
                    header = Some(number + 1);
                }
                seen += 1;
            }
            continue;
        }
        if header.is_some() && key_of(trimmed) == Some(field) {
            return Some(number + 1);
        }
    }
    header
}

fn key_of(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    Some(key.trim().trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use super::super::{parse, PrefixCacheScope};
    use super::*;
    use crate::models::batch::KvDtype;

    fn check(text: &str) -> Result<PoolConfig, ConfigError> {
        let path = Path::new("/etc/llorch/pool.toml");
        let file = parse(path, text)?;
        validate(path, text, &file)
    }

    const DEMO: &str = "version = 1\n\n[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n";

    #[test]
    fn defaults_fill_everything_but_name_and_source() {
        let pool = check(DEMO).unwrap();
        assert_eq!(pool.server.listen.to_string(), "127.0.0.1:8080");
        let model = &pool.models[0];
        assert_eq!(model.devices, vec![DeviceSpec::Cpu]);
        assert_eq!((model.max_concurrent, model.max_queue), (None, 64));
        assert_eq!(model.dtype, DTypeChoice::Auto);
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        let err = check("version = 1\n[server\nlisten = 1\n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(
            err.to_string().starts_with("/etc/llorch/pool.toml:2:"),
            "{err}"
        );
    }

    #[test]
    fn unknown_fields_name_the_field_and_line() {
        let err = check(&format!("{DEMO}max_concurency = 2\n")).unwrap_err();
        assert_eq!(err.line, Some(6), "{err}");
        assert_eq!(err.field, "max_concurency", "{err}");
    }

    #[test]
    fn duplicate_names_point_at_the_second_entry() {
        let err = check(&format!(
            "{DEMO}\n[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n"
        ))
        .unwrap_err();
        assert_eq!(
            (err.line, err.field.as_str()),
            (Some(8), "models[1].name"),
            "{err}"
        );
        assert!(
            err.message.contains("duplicate model name \"demo\""),
            "{err}"
        );
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let cases = [
            (
                "devices = [\"tpu:0\"]",
                "models[0].devices",
                "invalid device",
            ),
            ("dtype = \"f8\"", "models[0].dtype", "invalid dtype"),
            (
                "max_concurrent = 0",
                "models[0].max_concurrent",
                "at least 1",
            ),
        ];
        for (line, field, message) in cases {
            let err = check(&format!("{DEMO}{line}\n")).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert_eq!(err.line, Some(6), "{err}");
            assert!(err.message.contains(message), "{err}");
        }
        let err = check("version = 2\n").unwrap_err();
        assert_eq!((err.line, err.field.as_str()), (Some(1), "version"));
        let err = check("version = 1\n[server]\nlisten = \"nowhere\"\n").unwrap_err();
        assert_eq!((err.line, err.field.as_str()), (Some(3), "server.listen"));
        let err = check("version = 1\n[server]\nhttp_threads = 0\n").unwrap_err();
        assert_eq!(
            (err.line, err.field.as_str()),
            (Some(3), "server.http_threads")
        );
        assert!(err.message.contains("at least 1"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment::Error
    fn environment_overrides_the_server_section_only() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("pool.toml", DEMO)?;
            jail.set_env("LLORCH_SERVER__LISTEN", "127.0.0.1:9999");
            jail.set_env("LLORCH_FIXTURES", "/not/a/config/key");
            let pool = super::super::load(Path::new("pool.toml")).unwrap();
            assert_eq!(pool.server.listen.to_string(), "127.0.0.1:9999");
            jail.set_env("LLORCH_SERVER__LISTEN", "not an address");
            let err = super::super::load(Path::new("pool.toml")).unwrap_err();
            assert_eq!(err.field, "server.listen");
            Ok(())
        });
    }

    #[test]
    fn sizes_durations_and_budgets_parse() {
        assert_eq!(parse_bytes("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("512MB").unwrap(), 512_000_000);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert!(parse_bytes("8 parsecs").is_err());
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("0s").is_err());
        let pool = check(&format!("{DEMO}keep_alive = \"30s\"\npinned = true\npreload = false\n\n[devices.cpu]\nmemory_budget = \"2GiB\"\n")).unwrap();
        assert_eq!(pool.models[0].keep_alive, Some(Duration::from_secs(30)));
        assert!(pool.models[0].pinned && !pool.models[0].preload);
        assert_eq!(pool.budgets[&DeviceSpec::Cpu], 2 << 30);
        let err = check(&format!(
            "{DEMO}\n[devices.cpu]\nmemory_budget = \"lots\"\n"
        ))
        .unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.line),
            ("devices.cpu.memory_budget", Some(8)),
            "{err}"
        );
        let err = check(&format!("{DEMO}keep_alive = \"soon\"\n")).unwrap_err();
        assert_eq!(err.field, "models[0].keep_alive");
        let err = check(&format!(
            "{DEMO}\n[devices.cpu]\nmemory_budget = \"1MiB\"\n"
        ))
        .unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.line),
            ("devices.cpu.memory_budget", Some(8)),
            "{err}"
        );
        assert!(err.message.contains("(demo) need"), "{err}");
        // An explicit KV cache counts toward the budget beside the weights.
        let fits =
            format!("{DEMO}kv_cache = \"64MiB\"\n\n[devices.cpu]\nmemory_budget = \"80MiB\"\n");
        let pool = check(&fits).unwrap();
        assert_eq!(pool.models[0].kv_cache, Some(64 << 20));
        let over =
            format!("{DEMO}kv_cache = \"79MiB\"\n\n[devices.cpu]\nmemory_budget = \"80MiB\"\n");
        let err = check(&over).unwrap_err();
        assert_eq!(err.field, "devices.cpu.memory_budget", "{err}");
    }

    #[test]
    fn batching_settings_are_checked() {
        let pool = check(&format!(
            "{DEMO}max_concurrent = 8\nmax_batch_tokens = 64\nprefix_cache = \"global\"\n\
             kv_cache_dtype = \"f16\"\n"
        ))
        .unwrap();
        let model = &pool.models[0];
        assert_eq!(model.kv_cache_dtype, KvDtype::F16);
        assert_eq!(
            (model.max_concurrent, model.max_batch_tokens),
            (Some(8), Some(64))
        );
        assert_eq!(model.prefix_cache, PrefixCacheScope::Global);
        for (line, field) in [
            (
                "max_batch_tokens = 4\nmax_concurrent = 8",
                "models[0].max_batch_tokens",
            ),
            ("kv_cache = \"0B\"", "models[0].kv_cache"),
            ("kv_cache = \"big\"", "models[0].kv_cache"),
            ("prefix_cache = \"shared\"", "models[0].prefix_cache"),
            ("kv_cache_dtype = \"f8\"", "models[0].kv_cache_dtype"),
        ] {
            let err = check(&format!("{DEMO}{line}\n")).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn missing_model_files_are_reported() {
        let err =
            check("version = 1\n[[models]]\nname = \"x\"\nsource = \"no/such/dir\"\n").unwrap_err();
        assert_eq!(
            (err.line, err.field.as_str()),
            (Some(4), "models[0].source")
        );
        assert!(
            err.message
                .contains("missing file /etc/llorch/no/such/dir/config.json"),
            "{err}"
        );
    }
}
