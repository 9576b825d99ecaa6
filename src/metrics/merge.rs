//! The exposition of a cluster: the Prometheus texts of several nodes as one, every sample
//! labelled with its `node` and every family's `# HELP` and `# TYPE` written once.

use std::collections::HashMap;

/// One metric family as gathered from every node.
#[derive(Default)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<String>,
}

/// Merges `(node, text)` expositions, families in the order first seen.
pub fn merge(parts: &[(String, String)]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: HashMap<String, Family> = HashMap::new();
    for (node, text) in parts {
        let mut current = String::new();
        for line in text.lines() {
            let comment = line
                .strip_prefix("# HELP ")
                .map(|rest| (rest, true))
                .or_else(|| line.strip_prefix("# TYPE ").map(|rest| (rest, false)));
            let name = match comment {
                Some((rest, _)) => rest.split(' ').next().unwrap_or(rest),
                None if line.starts_with('#') || line.trim().is_empty() => continue,
                None if current.is_empty() => line.split(['{', ' ']).next().unwrap_or(line),
                None => current.as_str(),
            }
            .to_string();
            let family = families.entry(name.clone()).or_insert_with(|| {
                order.push(name.clone());
                Family::default()
            });
            match comment {
                Some((_, true)) => {
                    family.help.get_or_insert_with(|| line.to_string());
                }
                Some((_, false)) => {
                    family.kind.get_or_insert_with(|| line.to_string());
                }
                None => family.samples.push(labelled(line, node)),
            }
            current = name;
        }
    }
    let mut out = String::new();
    for name in order {
        let Some(family) = families.remove(&name) else {
            continue;
        };
        for line in family
            .help
            .iter()
            .chain(&family.kind)
            .chain(&family.samples)
        {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A sample line with `node="<node>"` first among its labels (node names need no escaping:
/// letters, digits, `-`, `_`, `.`).
fn labelled(line: &str, node: &str) -> String {
    match line.find(['{', ' ']) {
        Some(at) if line[at..].starts_with("{}") => {
            format!("{}{{node=\"{node}\"}}{}", &line[..at], &line[at + 2..])
        }
        Some(at) if line[at..].starts_with('{') => {
            format!("{}{{node=\"{node}\",{}", &line[..at], &line[at + 1..])
        }
        Some(at) => format!("{}{{node=\"{node}\"}}{}", &line[..at], &line[at..]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_written_once_with_every_node_s_samples() {
        let a = "# HELP up Whether it is up.\n# TYPE up gauge\nup 1\n\
                 # HELP lat Latency.\n# TYPE lat histogram\nlat_bucket{model=\"m\",le=\"1\"} 2\nlat_sum{model=\"m\"} 0.5\nlat_count{model=\"m\"} 2\n";
        let b = "# HELP up Whether it is up.\n# TYPE up gauge\nup 0\n\
                 # HELP only_b B's own.\n# TYPE only_b counter\nonly_b{} 3\n";
        let merged = merge(&[("a".into(), a.into()), ("b".into(), b.into())]);
        assert_eq!(
            merged,
            "# HELP up Whether it is up.\n# TYPE up gauge\nup{node=\"a\"} 1\nup{node=\"b\"} 0\n\
             # HELP lat Latency.\n# TYPE lat histogram\nlat_bucket{node=\"a\",model=\"m\",le=\"1\"} 2\n\
             lat_sum{node=\"a\",model=\"m\"} 0.5\nlat_count{node=\"a\",model=\"m\"} 2\n\
             # HELP only_b B's own.\n# TYPE only_b counter\nonly_b{node=\"b\"} 3\n"
        );
    }
}
