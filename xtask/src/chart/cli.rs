//! The flags and environment variables the chart passes to `gpu-scaler serve` against
//! those the daemon declares (its clap `#[arg(...)]` attributes, read from source).

use std::{collections::BTreeSet, fs, path::Path};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use super::DAEMON_SOURCES;

/// Flags and variables the chart passes before the daemon declares them (a chart
/// change landing ahead of the daemon's). The check fails when one of these appears
/// in the daemon's sources, so whoever lands it also removes it here.
pub(super) const PENDING_CLI: &[&str] = &[];
/// Variables for the container runtime or the logger, not clap arguments.
const NOT_CLI_ENV: &[&str] = &[
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
    "RUST_LOG",
];

/// The flags (`--name`) and variables the container passes to the daemon.
pub(super) fn cli_inputs(container: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for arg in container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if arg.starts_with("--") {
            out.insert(arg.split('=').next().unwrap_or(arg).to_owned());
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        if let Some(name) = e["name"].as_str().filter(|n| !NOT_CLI_ENV.contains(n)) {
            out.insert(name.to_owned());
        }
    }
    out
}

/// The flags and variables declared by `#[arg(...)]` attributes in the daemon's
/// sources: `--field-name` (or `long = "..."`) and `env = "..."`. A source scan, not
/// clap itself: building the daemon here would mean building the eBPF probe.
pub(super) fn declared_cli(root: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.extend(declared_in(&fs::read_to_string(&path)?));
            }
        }
    }
    Ok(out)
}

fn declared_in(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    // The text of the `#[arg(...)]` attributes seen since the last field.
    let mut attr: Option<String> = None;
    for line in source.lines().map(str::trim) {
        if line.starts_with("#[arg(") {
            attr.get_or_insert_with(String::new).push_str(line);
            continue;
        }
        let Some(text) = attr.as_mut() else { continue };
        let field = line
            .strip_prefix("pub ")
            .unwrap_or(line)
            .split(':')
            .next()
            .unwrap_or_default()
            .trim();
        let is_field = line.contains(':')
            && !field.is_empty()
            && field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !is_field {
            // A continuation of a multi-line attribute, another attribute, a comment.
            text.push_str(line);
            continue;
        }
        let quoted = |key: &str| {
            text.split(&format!("{key} = \""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
        };
        if let Some(env) = quoted("env") {
            out.insert(env.to_owned());
        }
        if text.contains("long") {
            let long = quoted("long").map_or_else(|| field.replace('_', "-"), str::to_owned);
            out.insert(format!("--{long}"));
        }
        attr = None;
    }
    out
}

/// Every flag and variable the chart passes must be declared by the daemon, except
/// those still pending, which must not be declared yet.
pub(super) fn check_cli(
    used: &BTreeSet<String>,
    declared: &BTreeSet<String>,
    pending: &[&str],
) -> Result<()> {
    let unknown: Vec<&String> = used
        .iter()
        .filter(|u| !declared.contains(*u) && !pending.contains(&u.as_str()))
        .collect();
    ensure!(
        unknown.is_empty(),
        "the chart passes {unknown:?}, which gpu-scaler serve does not declare ({DAEMON_SOURCES})"
    );
    let landed: Vec<&&str> = PENDING_CLI
        .iter()
        .filter(|p| declared.contains(**p))
        .collect();
    ensure!(
        landed.is_empty(),
        "{landed:?} are now declared by the daemon: remove them from PENDING_CLI in xtask/src/chart/cli.rs"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_cli_reads_clap_attributes() {
        let source = r#"
            /// Doc.
            #[arg(long, env = "GPU_SCALER_LISTEN", default_value = "0.0.0.0:6000")]
            pub listen: SocketAddr,
            #[arg(
                long = "peers-static",
                value_delimiter = ','
            )]
            pub peers: Vec<String>,
            #[arg(long, env = "NODE_NAME")]
            #[serde(skip)]
            pub node_name: Option<String>,
            #[arg(short)]
            pub verbose: bool,
        "#;
        let declared = declared_in(source);
        let expected: BTreeSet<String> = [
            "--listen",
            "GPU_SCALER_LISTEN",
            "--peers-static",
            "--node-name",
            "NODE_NAME",
        ]
        .map(String::from)
        .into();
        assert_eq!(declared, expected);
    }

    #[test]
    fn check_cli_refuses_unknown_and_landed_flags() {
        let declared: BTreeSet<String> = ["--listen", "NODE_NAME"].map(String::from).into();
        let used: BTreeSet<String> = ["--listen", "NODE_NAME", "--peer-listen"]
            .map(String::from)
            .into();
        check_cli(&used, &declared, &["--peer-listen"]).expect("pending flags pass");
        let typo: BTreeSet<String> = ["--lisen"].map(String::from).into();
        assert!(check_cli(&typo, &declared, &[]).is_err());
        let landed: BTreeSet<String> = ["--listen", "--peer-listen"].map(String::from).into();
        assert!(check_cli(&used, &landed, &["--peer-listen"]).is_err());
    }
}
