//! Arbitrary text through the cgroup path parser (and the other parsers of
//! kernel-provided text): never a panic, and every pod it names is well formed.
#![no_main]

use gpu_scaler::attribution::{Owner, cgroup_path, cgroup_tree::Cgroup2Mount, ebpf, tracefs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ebpf::decode(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Owner::Pod(pod)) = cgroup_path::parse(text) {
        let uid = &pod.pod_uid;
        assert!(uid.len() == 32 || uid.len() == 36, "uid {uid:?}");
        assert!(!uid.contains('_') && *uid == uid.to_ascii_lowercase(), "uid {uid:?}");
        if let Some(id) = &pod.container_id {
            assert!(!id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()), "id {id:?}");
        }
        assert!(!pod.is_conmon || pod.container_id.is_some());
    }
    let _ = tracefs::Format::parse(text);
    let _ = Cgroup2Mount::from_mountinfo(text);
});
