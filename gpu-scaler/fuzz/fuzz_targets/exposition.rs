//! Arbitrary text through the engine-metrics parsers (what a pod's engine
//! answers is untrusted): never a panic, and a parsed exposition's extracts are
//! consistent with what was asked.
#![no_main]

use gpu_scaler::engine::{
    exposition::{self, All, Event, Prefixes},
    series::{SeriesSelector, extract},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut samples = 0usize;
    let full = exposition::parse(text, &All, |e| {
        if let Event::Sample(s) = e {
            // Walking the labels of a checked block never fails.
            samples += 1 + s.labels().count();
        }
    });
    let _ = exposition::parse(text, &Prefixes(&["vllm:", "nv_"]), |_| {});
    let selectors = [
        SeriesSelector::family("vllm:num_requests_waiting"),
        SeriesSelector::family("h"),
        SeriesSelector::parse("nv_trt_llm_request_metrics{request_type=\"waiting\"}")
            .expect("a valid selector"),
    ];
    let refs: Vec<&SeriesSelector> = selectors.iter().collect();
    if let Ok(x) = extract(text, &refs) {
        assert!(full.is_ok() || x.len() <= refs.len());
        assert!(x.keys().all(|k| selectors.contains(k)));
    }
    if let Ok(sel) = SeriesSelector::parse(text) {
        // What it prints parses back to itself.
        assert_eq!(SeriesSelector::parse(&sel.to_string()).as_ref(), Ok(&sel));
    }
});
