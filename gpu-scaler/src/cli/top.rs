//! `gpu-scaler top`: a live view of a node's pods on its GPUs, refreshed every
//! second; of this node (its own attribution, GPU source and pods, as `gpus`
//! does) or, with `--address`, of a running daemon through its /v1/snapshot.

use std::{
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::watch,
};

use crate::{
    attribution, gpu, join,
    pods::{self, PodSet},
    snapshot::SnapshotReceiver,
    top::{SortKey, View},
};

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// A running daemon's HTTP listener (its --metrics-listen), e.g.
    /// 10.0.0.5:9090; without it, this node is sampled directly.
    #[arg(long)]
    pub address: Option<String>,

    /// Order of the pods.
    #[arg(long, value_enum, default_value_t)]
    pub sort: SortKey,

    /// Print one view and exit.
    #[arg(long)]
    pub once: bool,

    /// Print JSON instead of a table (with --once: one document).
    #[arg(long)]
    pub json: bool,

    /// List only the idle GPU holders: pods holding GPU memory at no more
    /// than --idle-sm-percent SM for --idle-after or longer (a daemon's own
    /// settings with --address).
    #[arg(long)]
    pub idle: bool,

    #[command(flatten)]
    pub accounting: super::accounting::AccountingArgs,

    /// Refresh interval of the live view.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,

    #[command(flatten)]
    pub gpu_source: super::gpu_source::GpuSourceArgs,

    #[command(flatten)]
    pub local_attribution: super::local_attribution::LocalAttributionArgs,

    /// A PodList JSON file naming the pods (local view); without it pods show
    /// by UID only as unattributed usage.
    #[arg(long, env = "GPU_SCALER_PODS_FILE")]
    pub pods_file: Option<PathBuf>,

    /// This node's name, to pick its pods from the pods file.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
}

/// Where views come from.
enum Source {
    Remote(String),
    Local {
        snapshots: SnapshotReceiver,
        // Kept so the pod source and the sampler keep running.
        _pods_tx: Option<watch::Sender<Arc<PodSet>>>,
    },
}

impl Source {
    async fn view(&mut self, sort: SortKey) -> super::Result<View> {
        let now = SystemTime::now();
        let view = match self {
            Self::Remote(addr) => {
                let body = get(addr, "/v1/snapshot").await?;
                let doc: serde_json::Value = serde_json::from_str(&body).map_err(|e| {
                    super::Error::Rpc(format!("{addr}/v1/snapshot is not JSON: {e}"))
                })?;
                View::from_json(&doc, sort, now)
            }
            Self::Local { snapshots, .. } => {
                let snap = snapshots.borrow().clone();
                View::from_snapshot(&snap, sort, now)
            }
        };
        view.map_err(|e| super::Error::Rpc(e.to_string()))
    }
}

async fn local(args: &TopArgs) -> super::Result<Source> {
    let poll = args.interval.min(Duration::from_secs(1));
    let gpu = gpu::start(args.gpu_source.config(poll));
    let attributor = attribution::start(attribution::Config {
        mode: args.local_attribution.attribution,
        exit_grace: Duration::from_secs(30),
        ebpf_ring_buffer: attribution::RingBufferSize::DEFAULT,
    })
    .await?;
    let (pods, pods_tx) = match &args.pods_file {
        Some(path) => (
            pods::file::start(pods::file::Config {
                path: path.clone(),
                node_name: args.node_name.clone(),
                check_interval: poll,
            })
            .map_err(|e| super::Error::Usage(e.to_string()))?,
            None,
        ),
        None => {
            let (tx, rx) = watch::channel(Arc::new(PodSet::empty("none", args.node_name.clone())));
            (rx, Some(tx))
        }
    };
    let mut snapshots = join::start(
        attributor,
        gpu,
        pods,
        join::Options {
            accounting: args.accounting.config(),
            ..Default::default()
        },
    );
    // The first view waits for the GPU source's first pass (or its error).
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        snapshots.wait_for(|s| {
            s.samples_taken_at.is_some()
                || s.gpu_error
                    .as_deref()
                    .is_some_and(|e| !e.contains("not been polled yet"))
        }),
    )
    .await
    .map(|r| r.is_ok());
    if first != Ok(true) {
        return Err(super::Error::Usage(
            "the GPU source gave no answer within 10 s (or the sampler stopped)".into(),
        ));
    }
    Ok(Source::Local {
        snapshots,
        _pods_tx: pods_tx,
    })
}

/// GET `path` from an HTTP/1.1 server at `addr` (`host:port`, optionally with
/// `http://`): the body of a 200 answer, an error otherwise.
pub async fn get(addr: &str, path: &str) -> super::Result<String> {
    let host = addr.trim_start_matches("http://").trim_end_matches('/');
    let fail = |what: String| super::Error::Rpc(format!("{host}{path}: {what}"));
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(host))
        .await
        .map_err(|_| fail("connect timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| fail(e.to_string()))?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| fail("no answer within 10 s".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8(buf).map_err(|_| fail("answer is not UTF-8".into()))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| fail("not an HTTP answer".into()))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(fail(format!("HTTP {status}: {}", body.trim())));
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        dechunk(body).ok_or_else(|| fail("bad chunked encoding".into()))
    } else {
        Ok(body.to_owned())
    }
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

pub async fn run(args: TopArgs) -> super::Result<()> {
    let mut source = match &args.address {
        Some(a) => Source::Remote(a.clone()),
        None => local(&args).await?,
    };
    if args.once {
        print!("{}", once(&mut source, &args).await?);
        return Ok(());
    }
    live(&mut source, &args).await
}

async fn once(source: &mut Source, args: &TopArgs) -> super::Result<String> {
    let view = source.view(args.sort).await?;
    render(&view, args).map_err(|e| super::Error::Rpc(e.to_string()))
}

/// One frame of the view as `args` asks for it.
fn render(view: &View, args: &TopArgs) -> crate::top::Result<String> {
    Ok(match (args.idle, args.json) {
        (true, true) => view.idle_json()?,
        (true, false) => view.render_idle(),
        (false, true) => view.to_json()?,
        (false, false) => view.render_table(),
    })
}

/// What `top --once` prints for `args` (`--once` implied): the command's
/// output without the process around it, for tests.
pub async fn output_once(args: TopArgs) -> super::Result<String> {
    let mut source = match &args.address {
        Some(a) => Source::Remote(a.clone()),
        None => local(&args).await?,
    };
    once(&mut source, &args).await
}

/// Keys of the live view: `s` cycles the sort key, `q` quits.
async fn live(source: &mut Source, args: &TopArgs) -> super::Result<()> {
    let keys = Keys::start();
    let mut sort = args.sort;
    let mut tick = tokio::time::interval(args.interval);
    let mut keys_rx = keys.as_ref().map(|k| k.rx.resubscribe());
    loop {
        let frame = match source.view(sort).await {
            Ok(v) => render(&v, args).unwrap_or_else(|e| format!("serializing the view: {e}\n")),
            Err(e) => format!("{e}\n"),
        };
        let mut out = std::io::stdout().lock();
        if !args.json {
            // Clear the screen and home the cursor.
            let _ = write!(out, "\x1b[2J\x1b[H");
        }
        let hint = if keys.is_some() {
            "\n[s] sort  [q] quit\n"
        } else {
            ""
        };
        let _ = write!(out, "{frame}{hint}");
        let _ = out.flush();
        drop(out);
        loop {
            tokio::select! {
                _ = tick.tick() => break,
                _ = tokio::signal::ctrl_c() => return Ok(()),
                k = async {
                    match keys_rx.as_mut() {
                        Some(rx) => rx.recv().await.ok(),
                        None => std::future::pending().await,
                    }
                } => match k {
                    Some(b'q') => return Ok(()),
                    Some(b's') => { sort = sort.next(); break }
                    _ => {}
                },
            }
        }
    }
}

/// Single key presses from a terminal on stdin: non-canonical mode without
/// echo while the view runs, restored on drop.
struct Keys {
    saved: libc::termios,
    rx: tokio::sync::broadcast::Receiver<u8>,
}

impl Keys {
    fn start() -> Option<Self> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is open (checked a terminal above); `saved` is valid.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: as above; `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        let (tx, rx) = tokio::sync::broadcast::channel(16);
        // A plain thread: a blocking read of stdin cannot be cancelled, and the
        // process exits when the view ends.
        let _ = std::thread::Builder::new()
            .name("top-keys".into())
            .spawn(move || {
                use std::io::Read as _;
                let mut b = [0u8; 1];
                while std::io::stdin().read(&mut b).is_ok_and(|n| n == 1) {
                    if tx.send(b[0]).is_err() {
                        break;
                    }
                }
            });
        Some(Self { saved, rx })
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `start` on the same fd.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").as_deref(),
            Some("hello world")
        );
        assert_eq!(dechunk("zz\r\nhello"), None);
        assert_eq!(dechunk("9\r\nhello"), None, "short chunk");
    }
}
