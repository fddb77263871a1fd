//! Ring buffer records decoded into typed events: the byte layouts of
//! [`gpu_scaler_common`] ([`ProcessEvent`], [`CgroupEvent`]) become an [`Event`],
//! and the events `ps --watch` shows ([`WatchEvent`]).
//!
//! This lives in gpu-scaler, not in the common crate behind a feature, because
//! decoding allocates (a cgroup path becomes a `String`, a `comm` a lossy UTF-8
//! `String`) and [`WatchEvent`] carries this crate's [`Attribution`]: the common
//! crate would need `alloc`/`std` and serde behind a feature, all for code the
//! probe never runs. The common crate stays the layouts alone, `no_std` with no
//! conditional code beyond `aya::Pod`, and its size asserts stay compile-time
//! there; this module depends on nothing else of the backend (no loader, no
//! tracker), so the fuzz target can drive [`decode`] alone.

use gpu_scaler_common::{
    CgroupEvent, EVENT_ATTACH, EVENT_CGROUP_MKDIR, EVENT_CGROUP_RMDIR, EVENT_EXEC, EVENT_EXIT,
    EVENT_FORK, ProcessEvent,
};

use super::super::Attribution;

/// A lifecycle event as `gpu-scaler ps --watch` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WatchEvent {
    pub event: WatchKind,
    pub pid: u32,
    pub comm: String,
    /// Who the process belongs to; `None` if its cgroup could not be found.
    #[serde(flatten)]
    pub attribution: Option<Attribution>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchKind {
    Exec,
    Exit,
}

/// A probe record, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Exec {
        pid: u32,
        old_pid: u32,
        cgroup_id: u64,
        comm: [u8; 16],
    },
    Fork {
        pid: u32,
        cgroup_id: u64,
    },
    /// Task `pid` (a tid) was moved into `cgroup_id` without exec.
    Attach {
        pid: u32,
        cgroup_id: u64,
    },
    Exit {
        tid: u32,
        tgid: u32,
        group_dead: bool,
        comm: [u8; 16],
    },
    Mkdir {
        id: u64,
        /// `None` when the path did not fit in the record.
        path: Option<String>,
    },
    Rmdir {
        id: u64,
    },
}

/// Decodes one ring buffer record; `None` for a record of unknown kind or size
/// (a probe and daemon from different builds), which is logged by the caller.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    let kind = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    match kind {
        EVENT_EXEC | EVENT_FORK | EVENT_EXIT | EVENT_ATTACH => {
            if bytes.len() < size_of::<ProcessEvent>() {
                return None;
            }
            // SAFETY: length checked; ProcessEvent is plain integers (aya::Pod).
            let ev: ProcessEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            Some(match kind {
                EVENT_EXEC => Event::Exec {
                    pid: ev.pid,
                    old_pid: ev.aux,
                    cgroup_id: ev.cgroup_id,
                    comm: ev.comm,
                },
                EVENT_FORK => Event::Fork {
                    pid: ev.pid,
                    cgroup_id: ev.cgroup_id,
                },
                EVENT_ATTACH => Event::Attach {
                    pid: ev.pid,
                    cgroup_id: ev.cgroup_id,
                },
                _ => Event::Exit {
                    tid: ev.pid,
                    tgid: ev.tgid,
                    group_dead: ev.aux != 0,
                    comm: ev.comm,
                },
            })
        }
        EVENT_CGROUP_MKDIR | EVENT_CGROUP_RMDIR => {
            if bytes.len() < size_of::<CgroupEvent>() {
                return None;
            }
            // SAFETY: as above.
            let ev: CgroupEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            if kind == EVENT_CGROUP_RMDIR {
                return Some(Event::Rmdir { id: ev.id });
            }
            let len = (ev.path_len as usize).min(ev.path.len());
            let path = (ev.truncated == 0)
                .then(|| std::str::from_utf8(&ev.path[..len]).ok().map(str::to_owned))
                .flatten();
            Some(Event::Mkdir { id: ev.id, path })
        }
        _ => None,
    }
}

/// A task's `comm`, up to its first NUL, as text.
pub(super) fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-integer #[repr(C)] value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn decodes_process_events() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"bash");
        let ev = ProcessEvent {
            kind: EVENT_EXIT,
            pid: 12,
            tgid: 10,
            aux: 1,
            cgroup_id: 99,
            ktime_ns: 5,
            comm,
        };
        assert_eq!(
            decode(&bytes(&ev)),
            Some(Event::Exit {
                tid: 12,
                tgid: 10,
                group_dead: true,
                comm
            })
        );
        assert_eq!(comm_str(&comm), "bash");
        let attach = ProcessEvent {
            kind: EVENT_ATTACH,
            ..ev
        };
        assert_eq!(
            decode(&bytes(&attach)),
            Some(Event::Attach {
                pid: 12,
                cgroup_id: 99
            })
        );
        let exec = ProcessEvent {
            kind: EVENT_EXEC,
            aux: 11,
            ..ev
        };
        assert!(matches!(
            decode(&bytes(&exec)),
            Some(Event::Exec {
                pid: 12,
                old_pid: 11,
                cgroup_id: 99,
                ..
            })
        ));
    }

    #[test]
    fn decodes_cgroup_events_and_truncation() {
        let mut ev = CgroupEvent {
            kind: EVENT_CGROUP_MKDIR,
            level: 2,
            id: 4242,
            path_len: 6,
            truncated: 0,
            path: [0; gpu_scaler_common::CGROUP_PATH_BYTES],
        };
        ev.path[..6].copy_from_slice(b"/a/bcd");
        assert_eq!(
            decode(&bytes(&ev)),
            Some(Event::Mkdir {
                id: 4242,
                path: Some("/a/bcd".into())
            })
        );
        ev.truncated = 1;
        assert_eq!(
            decode(&bytes(&ev)),
            Some(Event::Mkdir {
                id: 4242,
                path: None
            })
        );
        ev.kind = EVENT_CGROUP_RMDIR;
        assert_eq!(decode(&bytes(&ev)), Some(Event::Rmdir { id: 4242 }));
    }

    #[test]
    fn short_or_unknown_records_are_rejected() {
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[1, 0, 0]), None);
        assert_eq!(decode(&EVENT_EXEC.to_ne_bytes()), None);
        assert_eq!(decode(&77u32.to_ne_bytes().repeat(20)), None);
        assert_eq!(decode(&EVENT_CGROUP_MKDIR.to_ne_bytes().repeat(12)), None);
    }
}
