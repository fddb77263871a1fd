//! Parsing a vLLM `/metrics` exposition of about 200 KB (four data-parallel
//! engines, many histograms), side by side in one run: gpu-scaler's parser
//! over every sample, its filtered extract of what the vLLM figures read, a
//! naive line split, and the `prometheus-parse` crate. Prints medians and MB/s
//! per core; asserts nothing about speed. `cargo xtask bench engine` (`EXPOSITION_BENCH_ITERS` sets the iterations).

use std::{hint::black_box, time::Instant};

use gpu_scaler::engine::{
    exposition::{self, All, Event},
    series::{SeriesSelector, extract},
};
use gpu_scaler_tests::engine::vllm_exposition_sized;

/// Median seconds of each of `fs` over `iters` rounds, interleaved: every
/// round runs each once, so a burst of load on a shared machine slows them
/// alike and the ratios hold.
fn medians(iters: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    let mut t: Vec<Vec<f64>> = vec![Vec::with_capacity(iters); fs.len()];
    for _ in 0..iters {
        for (f, t) in fs.iter_mut().zip(&mut t) {
            let start = Instant::now();
            f();
            t.push(start.elapsed().as_secs_f64());
        }
    }
    t.into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect()
}

fn main() {
    let iters: usize = std::env::var("EXPOSITION_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let text = vllm_exposition_sized(200 * 1024, 3);
    let mb = text.len() as f64 / 1e6;
    let waiting = SeriesSelector::family("vllm:num_requests_waiting");
    let kv = SeriesSelector::family("vllm:kv_cache_usage_perc");

    let names = [
        "gpu-scaler parse, every sample and label",
        "gpu-scaler extract (vLLM queue + KV families)",
        "naive line split (name, value; no labels)",
        "prometheus-parse 0.2 (Scrape::parse)",
    ];
    let mut full = || {
        let mut n = 0usize;
        exposition::parse(&text, &All, |e| {
            if let Event::Sample(s) = e {
                n += s.labels().count();
            }
        })
        .expect("parses");
        black_box(n);
    };
    let mut filtered = || {
        black_box(extract(&text, &[&waiting, &kv]).expect("parses"));
    };
    let mut naive = || {
        let mut sum = 0.0;
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let mut it = line.rsplitn(2, ' ');
            if let Some(v) = it.next().and_then(|v| v.parse::<f64>().ok()) {
                sum += v;
            }
        }
        black_box(sum);
    };
    let mut crate_parse = || {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        black_box(prometheus_parse::Scrape::parse(lines).expect("parses"));
    };
    let times = medians(
        iters,
        &mut [&mut full, &mut filtered, &mut naive, &mut crate_parse],
    );
    let rows: Vec<(&str, f64)> = names.into_iter().zip(times).collect();
    println!(
        "exposition: {} bytes ({} lines), median of {iters} interleaved rounds",
        text.len(),
        text.lines().count(),
    );
    let base = rows[0].1;
    for (what, secs) in &rows {
        println!(
            "  {what:<48} {:>9.3} ms  {:>8.0} MB/s  ({:.2}x gpu-scaler parse)",
            secs * 1e3,
            mb / secs,
            secs / base
        );
    }
}
