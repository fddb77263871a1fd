//! `cargo deny` in `cargo xtask test` (issue 13, supply chain): the licenses,
//! bans and sources of every dependency, by the rules in deny.toml. Installs
//! cargo-deny (`cargo install --locked`, pinned) only when it is missing.
//!
//! The advisories check needs the RustSec advisory database, a git repository
//! cargo-deny clones when it runs; CI machines reach package registries only, so
//! it is not part of the test run: run `cargo deny check advisories` where the
//! database can be fetched.

use std::process::Command;

use anyhow::Result;

/// The cargo-deny release the checks are written for (deny.toml's format).
const CARGO_DENY_VERSION: &str = "0.20.2";

/// The checks that need nothing but the lock file and the crates' manifests.
const OFFLINE_CHECKS: &[&str] = &["licenses", "bans", "sources"];

pub fn check() -> Result<()> {
    ensure()?;
    // `--offline` reads every crate's manifest from cargo's cache, those of
    // other platforms' dependencies (windows-*, android_*) included, which a
    // Linux build never downloads: a fresh machine has them only after a fetch
    // for every target.
    super::cargo(&["fetch", "--locked"])?;
    let mut cmd = Command::new("cargo");
    cmd.args(["deny", "--locked", "--offline", "check"])
        .args(OFFLINE_CHECKS);
    super::run(&mut cmd)
}

fn ensure() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["deny", "--version"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_DENY_VERSION)
        });
    if installed {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-deny {CARGO_DENY_VERSION} (once)");
    super::run(Command::new("cargo").args([
        "install",
        "cargo-deny",
        "--locked",
        "--version",
        CARGO_DENY_VERSION,
    ]))
}
