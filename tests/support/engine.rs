//! A serving engine's `/metrics` as a real HTTP server on a real socket, for
//! the engine-signal tests: what it answers is set by the test (a fixed text,
//! or a function of the time since it started, for counters that advance), it
//! counts the requests it gets, and it can refuse, fail or come back.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// What the engine answers, given the seconds since it started.
pub type Body = Box<dyn Fn(f64) -> String + Send>;

struct State {
    body: Body,
    status: u16,
    started: Instant,
}

/// A fake engine listening on one address until dropped or stopped.
pub struct FakeEngine {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    conns: Conns,
    thread: Option<JoinHandle<()>>,
}

/// Open connections, so `stop` can close kept-alive ones too.
type Conns = Arc<Mutex<Vec<TcpStream>>>;

/// Answers requests on one connection until the client closes it or the
/// engine stops. HTTP/1.1 keep-alive, as uvicorn (vLLM, SGLang), axum (TGI)
/// and Triton's HTTP server do: a scraper that reconnects every poll would
/// measure connection setup, not reading.
fn serve(mut s: TcpStream, state: &Mutex<State>, requests: &AtomicU64, stop: &AtomicBool) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = [0u8; 4096];
    let mut head = Vec::new();
    loop {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        // GETs only: nothing follows the head but the next request.
        let end = head
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("head end")
            + 4;
        head.drain(..end);
        requests.fetch_add(1, Ordering::SeqCst);
        let (status, body) = {
            let st = state.lock().expect("engine state");
            let t = st.started.elapsed().as_secs_f64();
            (st.status, (st.body)(t))
        };
        let reply = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: text/plain; version=0.0.4\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

impl FakeEngine {
    /// Listens on `addr` (a 127.0.0.x address and a port), answering `text`.
    pub fn start(addr: SocketAddr, text: &str) -> Self {
        let text = text.to_owned();
        Self::start_with(addr, Box::new(move |_| text.clone()))
    }

    /// Listens on `addr`, answering `body(seconds since start)`.
    pub fn start_with(addr: SocketAddr, body: Body) -> Self {
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("fake engine bind {addr}: {e}"));
        let state = Arc::new(Mutex::new(State {
            body,
            status: 200,
            started: Instant::now(),
        }));
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Conns = Arc::default();
        let thread = {
            let (state, requests, stop, conns) =
                (state.clone(), requests.clone(), stop.clone(), conns.clone());
            std::thread::spawn(move || {
                // Blocking accept (no busy loop, so a hundred engines cost the
                // machine nothing while idle); `stop` wakes it with a connection.
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            if stop.load(Ordering::SeqCst) {
                                break;
                            }
                            if let Ok(c) = s.try_clone() {
                                conns.lock().expect("engine conns").push(c);
                            }
                            let (state, requests, stop) =
                                (state.clone(), requests.clone(), stop.clone());
                            std::thread::spawn(move || serve(s, &state, &requests, &stop));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Self {
            addr,
            state,
            requests,
            stop,
            conns,
            thread: Some(thread),
        }
    }

    /// Answers `text` from now on.
    pub fn set(&self, text: &str) {
        let text = text.to_owned();
        self.set_with(Box::new(move |_| text.clone()));
    }

    /// Answers `body(seconds since now)` from now on (a restart: counters start
    /// again from whatever `body(0)` says).
    pub fn set_with(&self, body: Body) {
        let mut st = self.state.lock().expect("engine state");
        st.body = body;
        st.started = Instant::now();
    }

    /// Answers with HTTP `status` (and the same body) from now on.
    pub fn set_status(&self, status: u16) {
        self.state.lock().expect("engine state").status = status;
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Stops listening and closes open connections: connections are refused
    /// from now on.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for c in self.conns.lock().expect("engine conns").drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A vLLM >= 0.12 exposition with one series per data-parallel engine:
/// `(waiting, running, kv_cache_usage_perc)` for engine "0", "1", ... Names,
/// labels, HELP/TYPE and the histogram layout follow vLLM's
/// `vllm/v1/metrics/loggers.py` (labels sorted, `_count` before `_sum`).
pub fn vllm_exposition(engines: &[(u32, u32, f64)]) -> String {
    let model = "meta-llama/Llama-3.1-8B-Instruct";
    let mut s = String::new();
    let family = |s: &mut String, name: &str, help: &str, kind: &str| {
        s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    };
    family(
        &mut s,
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        "gauge",
    );
    for (i, (_, running, _)) in engines.iter().enumerate() {
        s.push_str(&format!(
            "vllm:num_requests_running{{engine=\"{i}\",model_name=\"{model}\"}} {running}.0\n"
        ));
    }
    family(
        &mut s,
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        "gauge",
    );
    for (i, (waiting, _, _)) in engines.iter().enumerate() {
        s.push_str(&format!(
            "vllm:num_requests_waiting{{engine=\"{i}\",model_name=\"{model}\"}} {waiting}.0\n"
        ));
    }
    // The prefix trap: another family whose name starts with the one read.
    family(
        &mut s,
        "vllm:num_requests_waiting_by_reason",
        "Number of requests waiting, by reason.",
        "gauge",
    );
    for i in 0..engines.len() {
        s.push_str(&format!(
            "vllm:num_requests_waiting_by_reason{{engine=\"{i}\",model_name=\"{model}\",reason=\"capacity\"}} 100.0\n"
        ));
    }
    family(
        &mut s,
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        "gauge",
    );
    for (i, (_, _, kv)) in engines.iter().enumerate() {
        s.push_str(&format!(
            "vllm:kv_cache_usage_perc{{engine=\"{i}\",model_name=\"{model}\"}} {kv}\n"
        ));
    }
    family(
        &mut s,
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        "histogram",
    );
    for i in 0..engines.len() {
        for le in [
            "0.3", "0.5", "0.8", "1.0", "1.5", "2.0", "2.5", "5.0", "10.0", "20.0", "30.0", "40.0",
            "50.0", "60.0", "120.0", "240.0", "480.0", "960.0", "1920.0", "7680.0", "+Inf",
        ] {
            s.push_str(&format!(
                "vllm:request_queue_time_seconds_bucket{{engine=\"{i}\",le=\"{le}\",model_name=\"{model}\"}} 12.0\n"
            ));
        }
        s.push_str(&format!(
            "vllm:request_queue_time_seconds_count{{engine=\"{i}\",model_name=\"{model}\"}} 12.0\n\
             vllm:request_queue_time_seconds_sum{{engine=\"{i}\",model_name=\"{model}\"}} 1.4\n"
        ));
    }
    s
}

/// A Triton exposition for `models` whose counters advance with `t` seconds:
/// `(model, requests per second, queue ms per request)`, plus a REJECTED
/// failure every 10 requests and 8 batch items per request (which a per-item
/// division would get wrong). Follows Triton's `metrics.md` (labels `model`,
/// `version`; failures by `reason`).
pub fn triton_exposition(models: &[(&str, f64, f64)], t: f64) -> String {
    let mut s = String::from(
        "# HELP nv_inference_request_success Number of successful inference requests, all batch sizes\n\
         # TYPE nv_inference_request_success counter\n",
    );
    for (m, rate, _) in models {
        s.push_str(&format!(
            "nv_inference_request_success{{model=\"{m}\",version=\"1\"}} {}\n",
            rate * t * 0.9
        ));
    }
    s.push_str(
        "# HELP nv_inference_request_failure Number of failed inference requests, all batch sizes\n\
         # TYPE nv_inference_request_failure counter\n",
    );
    for (m, rate, _) in models {
        s.push_str(&format!(
            "nv_inference_request_failure{{model=\"{m}\",reason=\"REJECTED\",version=\"1\"}} {}\n\
             nv_inference_request_failure{{model=\"{m}\",reason=\"BACKEND\",version=\"1\"}} 0\n",
            rate * t * 0.1
        ));
    }
    s.push_str(
        "# HELP nv_inference_count Number of inferences performed (does not include cached requests)\n\
         # TYPE nv_inference_count counter\n",
    );
    for (m, rate, _) in models {
        s.push_str(&format!(
            "nv_inference_count{{model=\"{m}\",version=\"1\"}} {}\n",
            rate * t * 8.0
        ));
    }
    s.push_str(
        "# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds (includes cached requests)\n\
         # TYPE nv_inference_queue_duration_us counter\n",
    );
    for (m, rate, wait_ms) in models {
        s.push_str(&format!(
            "nv_inference_queue_duration_us{{model=\"{m}\",version=\"1\"}} {}\n",
            rate * t * wait_ms * 1000.0
        ));
    }
    s.push_str(
        "# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.\n\
         # TYPE nv_inference_pending_request_count gauge\n",
    );
    for (m, _, _) in models {
        s.push_str(&format!(
            "nv_inference_pending_request_count{{model=\"{m}\",version=\"1\"}} 3\n"
        ));
    }
    s
}

/// A vLLM >= 0.12 exposition of about `target` bytes as a real one of a large
/// deployment looks: four data-parallel engines, the gauges and counters the
/// figures read, then histogram families in vLLM's layout (sorted labels,
/// `_count` before `_sum`, `_created` gauges) until the size is reached.
pub fn vllm_exposition_sized(target: usize, waiting: u32) -> String {
    let model = "meta-llama/Llama-3.1-70B-Instruct";
    let buckets = [
        "0.001", "0.005", "0.01", "0.02", "0.04", "0.06", "0.08", "0.1", "0.25", "0.5", "0.75",
        "1.0", "2.5", "5.0", "7.5", "10.0", "20.0", "40.0", "80.0", "160.0", "640.0", "2560.0",
        "+Inf",
    ];
    let mut s = String::new();
    for (name, kind) in [
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:prompt_tokens_total", "counter"),
        ("vllm:generation_tokens_total", "counter"),
    ] {
        s.push_str(&format!(
            "# HELP {name} A vLLM figure.\n# TYPE {name} {kind}\n"
        ));
        for e in 0..4 {
            let v = if name == "vllm:num_requests_waiting" {
                // The pod's total is `waiting`, on engine 0.
                if e == 0 { waiting } else { 0 }
            } else {
                e * 7 + 3
            };
            s.push_str(&format!(
                "{name}{{engine=\"{e}\",model_name=\"{model}\"}} {v}.0\n"
            ));
        }
    }
    let mut i = 0;
    while s.len() < target {
        let name = format!("vllm:histogram_{i}_seconds");
        s.push_str(&format!(
            "# HELP {name} Histogram of a vLLM latency.\n# TYPE {name} histogram\n"
        ));
        for e in 0..4 {
            for (j, le) in buckets.iter().enumerate() {
                s.push_str(&format!(
                    "{name}_bucket{{engine=\"{e}\",le=\"{le}\",model_name=\"{model}\"}} {}.0\n",
                    j * 11 + e as usize
                ));
            }
            s.push_str(&format!(
                "{name}_count{{engine=\"{e}\",model_name=\"{model}\"}} 253.0\n\
                 {name}_sum{{engine=\"{e}\",model_name=\"{model}\"}} 1234.5678\n"
            ));
        }
        s.push_str(&format!(
            "# HELP {name}_created A vLLM figure.\n# TYPE {name}_created gauge\n"
        ));
        for e in 0..4 {
            s.push_str(&format!(
                "{name}_created{{engine=\"{e}\",model_name=\"{model}\"}} 1.7e+09\n"
            ));
        }
        i += 1;
    }
    s
}
