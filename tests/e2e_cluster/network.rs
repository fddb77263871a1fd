//! The test's own network: a bridge in the host's namespace and one network
//! namespace per "machine" (each node, and KEDA's metrics server), joined to it by a
//! veth pair with an address the test assigns. The API server refuses loopback
//! endpoints for the aggregation layer's Services, and every daemon listens on the
//! chart's fixed ports (0.0.0.0:6000, :6001, :9090), so each needs an address of its
//! own. Traffic stays on this machine; everything is removed on drop.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::Command,
};

/// A bridge `gse<N>b` with 10.213.N.1/24 and the namespaces hanging off it.
pub struct Network {
    n: u8,
    bridge: String,
    namespaces: Vec<String>,
}

/// A network namespace of [`Network`]: its address, and the file that enters it.
#[derive(Clone, Debug)]
pub struct Netns {
    pub name: String,
    pub ip: Ipv4Addr,
    path: PathBuf,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Network {
    /// Creates the bridge. The error (no `ip`, no bridge or veth support, not
    /// root) is the probe's answer for [`gpu_scaler_tests::kernel::require`].
    pub fn create() -> Result<Self, String> {
        // A subnet per test process, so two runs on one machine do not collide.
        let n = 20 + (std::process::id() % 200) as u8;
        let bridge = format!("gse{n}b");
        let _ = ip(&["link", "del", &bridge]);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        let net = Self {
            n,
            bridge,
            namespaces: Vec::new(),
        };
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.host_ip()),
            "dev",
            &net.bridge,
        ])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        Ok(net)
    }

    /// The bridge's name (pod IPs are added to it).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The host's address on the bridge: where the API server and KEDA's operator
    /// listen.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.n, 1)
    }

    /// A new namespace `gpu-scaler-e2e-<pid>-<short>` at 10.213.N.`host`, routed
    /// through the bridge, its loopback up.
    pub fn namespace(&mut self, short: &str, host: u8) -> Result<Netns, String> {
        let name = format!("gpu-scaler-e2e-{}-{short}", std::process::id());
        let addr = Ipv4Addr::new(10, 213, self.n, host);
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        let (outer, inner) = (
            format!("gse{}v{host}", self.n),
            format!("gse{}i{host}", self.n),
        );
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ])?;
        ip(&["link", "set", &outer, "master", &self.bridge, "up"])?;
        ip(&["link", "set", &inner, "netns", &name])?;
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &inner,
        ])?;
        ip(&["-n", &name, "link", "set", &inner, "up"])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &name,
            "route",
            "add",
            "default",
            "via",
            &self.host_ip().to_string(),
        ])?;
        Ok(Netns {
            path: PathBuf::from("/run/netns").join(&name),
            name,
            ip: addr,
        })
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and so the pair.
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

impl Netns {
    /// Makes `cmd` start inside this namespace (network only: the mount, pid and
    /// cgroup namespaces stay the host's, so /sys/fs/cgroup and /proc are the ones
    /// the pods' processes live in; `ip netns exec` would remount /sys).
    pub fn enter(&self, cmd: &mut Command) {
        let file =
            File::open(&self.path).unwrap_or_else(|e| panic!("enter namespace {}: {e}", self.name));
        // SAFETY: setns is a plain syscall, async-signal-safe; the file stays open
        // (moved into the closure) until the child execs.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}
