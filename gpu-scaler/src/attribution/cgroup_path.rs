//! cgroup path -> [`Owner`] for every kubelet cgroup layout (see docs/architecture.md#kubelet-cgroup-layouts).
//!
//! The kubelet names a pod's cgroup in one of two ways:
//! - systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice`
//!   (`kubepods-pod<uid>.slice` for guaranteed pods; kind prefixes every name with
//!   `kubelet-` under `kubelet.slice`), the uid's `-` written as `_` because `-` is
//!   systemd's slice separator, and containers as `<runtime>-<id>.scope`;
//! - cgroupfs driver: `kubepods/<qos>/pod<uid>` (`kubepods/pod<uid>` for guaranteed)
//!   and containers as `<id>` (containerd, docker) or `crio-<id>` (CRI-O).
//!
//! The pod part can sit below a host prefix (a kind node's own
//! `system.slice/docker-<id>.scope`, or a nested host's `docker/<id>`); the first pod
//! from the root wins, since that is the pod this node's kubelet knows. Directories
//! below a container (crun's `container` subgroup, a nested runtime) belong to it.

use std::fmt;

use super::{Owner, PodIdentity, QosClass, Runtime};

/// Why a pod-shaped path could not be read. Paths that simply are not a pod's are
/// [`Owner::Host`], not errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("cgroup path {0:?} is not absolute")]
    NotAbsolute(String),
    #[error("cgroup path {path:?}: {segment:?} names a pod but {uid:?} is not a pod UID")]
    BadPodUid {
        path: String,
        segment: String,
        uid: String,
    },
    #[error("cgroup path {path:?}: {segment:?} names a container but its id is not hex")]
    BadContainerId { path: String, segment: String },
}

/// Parses a cgroup v2 path (relative to the mount, starting with `/`) into its
/// owner. A path that is not a pod's is `Ok(Owner::Host)`.
pub fn parse(path: &str) -> Result<Owner, ParseError> {
    if !path.starts_with('/') {
        return Err(ParseError::NotAbsolute(path.to_owned()));
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, seg) in segments.iter().enumerate() {
        let parent = i.checked_sub(1).map(|p| segments[p]);
        let grandparent = i.checked_sub(2).map(|p| segments[p]);
        let Some((uid_raw, qos)) = pod_segment(seg, parent, grandparent) else {
            continue;
        };
        let pod_uid = canonical_uid(uid_raw).ok_or_else(|| ParseError::BadPodUid {
            path: path.to_owned(),
            segment: (*seg).to_owned(),
            uid: uid_raw.to_owned(),
        })?;
        let mut identity = PodIdentity {
            pod_uid,
            container_id: None,
            runtime: None,
            qos,
            is_conmon: false,
        };
        if let Some(container) = segments.get(i + 1) {
            match container_segment(container) {
                ContainerSegment::Container {
                    id,
                    runtime,
                    conmon,
                } => {
                    identity.container_id = Some(id.to_ascii_lowercase());
                    identity.runtime = Some(runtime);
                    identity.is_conmon = conmon;
                }
                ContainerSegment::BadId => {
                    return Err(ParseError::BadContainerId {
                        path: path.to_owned(),
                        segment: (*container).to_owned(),
                    });
                }
                // Something the runtime or a workload made directly in the pod
                // cgroup: still the pod's, but no container we can name.
                ContainerSegment::Other => {}
            }
        }
        return Ok(Owner::Pod(identity));
    }
    Ok(Owner::Host)
}

/// If `seg` is a pod cgroup, its raw uid and QoS class.
fn pod_segment<'a>(
    seg: &'a str,
    parent: Option<&str>,
    grandparent: Option<&str>,
) -> Option<(&'a str, QosClass)> {
    if let Some(unit) = seg.strip_suffix(".slice") {
        // systemd: `<prefix>-pod<uid>.slice`, where <prefix> is the parent slice's
        // own name, `kubepods[-qos]` or `kubelet-kubepods[-qos]`.
        let (prefix, pod) = unit.rsplit_once('-')?;
        let uid = pod.strip_prefix("pod")?;
        // Read from inside a private cgroup namespace, /proc/<pid>/cgroup climbs
        // out of the namespace root with `..` and omits the shared ancestors: the
        // slice name then vouches for itself.
        match parent? {
            OUTSIDE_NAMESPACE => {}
            p if p.strip_suffix(".slice")? == prefix => {}
            _ => return None,
        }
        let qos = if let Some(base) = prefix.strip_suffix("-burstable") {
            is_kubepods_slice(base).then_some(QosClass::Burstable)?
        } else if let Some(base) = prefix.strip_suffix("-besteffort") {
            is_kubepods_slice(base).then_some(QosClass::BestEffort)?
        } else {
            is_kubepods_slice(prefix).then_some(QosClass::Guaranteed)?
        };
        return Some((uid, qos));
    }
    // cgroupfs: `kubepods/pod<uid>` or `kubepods/<qos>/pod<uid>`.
    let uid = seg.strip_prefix("pod")?;
    match (parent?, grandparent) {
        ("kubepods", _) => Some((uid, QosClass::Guaranteed)),
        ("burstable", Some("kubepods" | OUTSIDE_NAMESPACE)) => Some((uid, QosClass::Burstable)),
        ("besteffort", Some("kubepods" | OUTSIDE_NAMESPACE)) => Some((uid, QosClass::BestEffort)),
        _ => None,
    }
}

/// The segment a path from inside a cgroup namespace starts with when the cgroup
/// lies outside that namespace's root (see cgroup_namespaces(7)).
const OUTSIDE_NAMESPACE: &str = "..";

fn is_kubepods_slice(unit: &str) -> bool {
    unit == "kubepods" || unit == "kubelet-kubepods"
}

/// The pod UID in the API's form (lowercase, dashed), or `None` if `raw` is not a
/// UID: 32 hex digits, either bare (a static pod's config hash) or in the 8-4-4-4-12
/// groups, separated by `-` or by `_` (systemd).
fn canonical_uid(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let ok = match bytes.len() {
        32 => bytes.iter().all(u8::is_ascii_hexdigit),
        36 => bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-' || *b == b'_',
            _ => b.is_ascii_hexdigit(),
        }),
        _ => false,
    };
    ok.then(|| raw.replace('_', "-").to_ascii_lowercase())
}

enum ContainerSegment<'a> {
    Container {
        id: &'a str,
        runtime: Runtime,
        conmon: bool,
    },
    /// A runtime's prefix with an id that is not hex.
    BadId,
    /// Not a container name at all.
    Other,
}

/// Longest first, so `crio-conmon-` is not read as `crio-` with id `conmon-...`.
const RUNTIME_PREFIXES: [(&str, Runtime, bool); 5] = [
    ("cri-containerd-", Runtime::Containerd, false),
    ("crio-conmon-", Runtime::CriO, true),
    ("crio-", Runtime::CriO, false),
    ("docker-", Runtime::Docker, false),
    ("libpod-", Runtime::Podman, false),
];

/// Shortest id accepted for a bare (cgroupfs driver) container directory; runtimes
/// use 64 hex digits, so anything this long and all hex is not a coincidence.
const MIN_BARE_ID: usize = 12;
const MAX_ID: usize = 128;

fn container_segment(seg: &str) -> ContainerSegment<'_> {
    let name = seg.strip_suffix(".scope").unwrap_or(seg);
    for (prefix, runtime, conmon) in RUNTIME_PREFIXES {
        if let Some(id) = name.strip_prefix(prefix) {
            return if is_hex_id(id, 1) {
                ContainerSegment::Container {
                    id,
                    runtime,
                    conmon,
                }
            } else {
                ContainerSegment::BadId
            };
        }
    }
    if name.len() == seg.len() && is_hex_id(name, MIN_BARE_ID) {
        return ContainerSegment::Container {
            id: name,
            runtime: Runtime::Unknown,
            conmon: false,
        };
    }
    ContainerSegment::Other
}

fn is_hex_id(id: &str, min: usize) -> bool {
    (min..=MAX_ID).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl fmt::Display for QosClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Guaranteed => "guaranteed",
            Self::Burstable => "burstable",
            Self::BestEffort => "besteffort",
        })
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Containerd => "containerd",
            Self::CriO => "crio",
            Self::Docker => "docker",
            Self::Podman => "podman",
            Self::Unknown => "unknown",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "7b5b4c2e-1f4a-4d3e-9c8b-0a1b2c3d4e5f";
    const UID_: &str = "7b5b4c2e_1f4a_4d3e_9c8b_0a1b2c3d4e5f";
    const CID: &str = "4f2a9c0d1e3b5a7c9e1f3a5b7d9c1e3f5a7b9d1c3e5f7a9b1d3c5e7f9a1b3c5d";

    fn pod(
        container: Option<&str>,
        runtime: Option<Runtime>,
        qos: QosClass,
        conmon: bool,
    ) -> Owner {
        Owner::Pod(PodIdentity {
            pod_uid: UID.into(),
            container_id: container.map(Into::into),
            runtime,
            qos,
            is_conmon: conmon,
        })
    }

    fn ok(path: &str) -> Owner {
        parse(path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn systemd_containerd_burstable() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(
            ok(&p),
            pod(
                Some(CID),
                Some(Runtime::Containerd),
                QosClass::Burstable,
                false
            )
        );
    }

    #[test]
    fn systemd_containerd_besteffort() {
        let p = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(
            ok(&p),
            pod(
                Some(CID),
                Some(Runtime::Containerd),
                QosClass::BestEffort,
                false
            )
        );
    }

    #[test]
    fn systemd_guaranteed_has_no_qos_level() {
        let p = format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope");
        assert_eq!(
            ok(&p),
            pod(
                Some(CID),
                Some(Runtime::Containerd),
                QosClass::Guaranteed,
                false
            )
        );
    }

    #[test]
    fn systemd_crio_and_its_conmon() {
        let base =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        assert_eq!(
            ok(&format!("{base}/crio-{CID}.scope")),
            pod(Some(CID), Some(Runtime::CriO), QosClass::Burstable, false)
        );
        assert_eq!(
            ok(&format!("{base}/crio-conmon-{CID}.scope")),
            pod(Some(CID), Some(Runtime::CriO), QosClass::Burstable, true)
        );
    }

    #[test]
    fn systemd_crun_container_subgroup_belongs_to_the_container() {
        let p = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope/container"
        );
        assert_eq!(
            ok(&p),
            pod(Some(CID), Some(Runtime::CriO), QosClass::BestEffort, false)
        );
    }

    #[test]
    fn systemd_docker_and_podman() {
        let base = format!("/kubepods.slice/kubepods-pod{UID_}.slice");
        assert_eq!(
            ok(&format!("{base}/docker-{CID}.scope")),
            pod(
                Some(CID),
                Some(Runtime::Docker),
                QosClass::Guaranteed,
                false
            )
        );
        assert_eq!(
            ok(&format!("{base}/libpod-{CID}.scope")),
            pod(
                Some(CID),
                Some(Runtime::Podman),
                QosClass::Guaranteed,
                false
            )
        );
    }

    #[test]
    fn systemd_pod_level_process_has_no_container() {
        let p =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        assert_eq!(ok(&p), pod(None, None, QosClass::Burstable, false));
    }

    #[test]
    fn kind_kubelet_slice() {
        let p = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(
            ok(&p),
            pod(
                Some(CID),
                Some(Runtime::Containerd),
                QosClass::Burstable,
                false
            )
        );
        let g = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(
            ok(&g),
            pod(
                Some(CID),
                Some(Runtime::Containerd),
                QosClass::Guaranteed,
                false
            )
        );
    }

    /// Read from inside a private cgroup namespace (a container on cgroup v2),
    /// /proc/<pid>/cgroup is relative to the namespace root and climbs out of it.
    #[test]
    fn seen_from_a_private_cgroup_namespace() {
        let p = format!("/../../kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope");
        assert_eq!(
            ok(&p),
            pod(
                Some(CID),
                Some(Runtime::Containerd),
                QosClass::Burstable,
                false
            )
        );
    }

    #[test]
    fn kind_node_seen_from_the_host() {
        let p = format!(
            "/system.slice/docker-{CID}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(
            ok(&p),
            pod(
                Some(CID),
                Some(Runtime::Containerd),
                QosClass::BestEffort,
                false
            )
        );
    }

    #[test]
    fn cgroupfs_burstable_and_besteffort() {
        assert_eq!(
            ok(&format!("/kubepods/burstable/pod{UID}/{CID}")),
            pod(
                Some(CID),
                Some(Runtime::Unknown),
                QosClass::Burstable,
                false
            )
        );
        assert_eq!(
            ok(&format!("/kubepods/besteffort/pod{UID}/{CID}")),
            pod(
                Some(CID),
                Some(Runtime::Unknown),
                QosClass::BestEffort,
                false
            )
        );
    }

    #[test]
    fn cgroupfs_guaranteed() {
        assert_eq!(
            ok(&format!("/kubepods/pod{UID}/{CID}")),
            pod(
                Some(CID),
                Some(Runtime::Unknown),
                QosClass::Guaranteed,
                false
            )
        );
        assert_eq!(
            ok(&format!("/kubepods/pod{UID}")),
            pod(None, None, QosClass::Guaranteed, false)
        );
    }

    #[test]
    fn cgroupfs_crio_names_its_runtime() {
        let base = format!("/kubepods/burstable/pod{UID}");
        assert_eq!(
            ok(&format!("{base}/crio-{CID}")),
            pod(Some(CID), Some(Runtime::CriO), QosClass::Burstable, false)
        );
        assert_eq!(
            ok(&format!("{base}/crio-conmon-{CID}")),
            pod(Some(CID), Some(Runtime::CriO), QosClass::Burstable, true)
        );
    }

    #[test]
    fn cgroupfs_nested_in_a_docker_host() {
        assert_eq!(
            ok(&format!("/docker/{CID}/kubepods/besteffort/pod{UID}/{CID}")),
            pod(
                Some(CID),
                Some(Runtime::Unknown),
                QosClass::BestEffort,
                false
            )
        );
    }

    #[test]
    fn uid_with_underscores_in_cgroupfs_and_dashes_in_systemd_are_accepted() {
        assert_eq!(
            ok(&format!("/kubepods/pod{UID_}/{CID}")),
            pod(
                Some(CID),
                Some(Runtime::Unknown),
                QosClass::Guaranteed,
                false
            )
        );
    }

    #[test]
    fn static_pod_config_hash_uid() {
        let hash = "0c5e2f7a9b1d3c5e7f9a1b3c5d7e9f1a";
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-{CID}.scope"
        );
        let Owner::Pod(id) = ok(&p) else {
            panic!("static pod not recognised")
        };
        assert_eq!(id.pod_uid, hash);
    }

    #[test]
    fn uppercase_ids_are_normalised() {
        let p = format!(
            "/kubepods/pod{}/{}",
            UID.to_ascii_uppercase(),
            CID.to_ascii_uppercase()
        );
        assert_eq!(
            ok(&p),
            pod(
                Some(CID),
                Some(Runtime::Unknown),
                QosClass::Guaranteed,
                false
            )
        );
    }

    #[test]
    fn trailing_and_double_slashes_are_tolerated() {
        assert_eq!(
            ok(&format!("//kubepods//pod{UID}/{CID}/")),
            pod(
                Some(CID),
                Some(Runtime::Unknown),
                QosClass::Guaranteed,
                false
            )
        );
    }

    #[test]
    fn unknown_directory_in_a_pod_is_the_pod_without_container() {
        assert_eq!(
            ok(&format!("/kubepods/pod{UID}/not-a-container")),
            pod(None, None, QosClass::Guaranteed, false)
        );
    }

    #[test]
    fn host_paths() {
        for p in [
            "/",
            "/init.scope",
            "/system.slice/kubelet.service",
            "/system.slice/containerd.service",
            "/user.slice/user-0.slice/session-1.scope",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable",
            "/kubelet.slice/kubelet.service",
            "/system.slice/docker-4f2a9c0d1e3b.scope",
            "/process_api/157490552ba73390ae7c78ae0d4b2715",
            // a `pod...` directory outside a kubepods hierarchy is not a pod
            "/user.slice/pod7b5b4c2e-1f4a-4d3e-9c8b-0a1b2c3d4e5f/x",
            // a pod slice whose parent is not the matching QoS slice
            "/system.slice/kubepods-burstable-pod7b5b4c2e_1f4a_4d3e_9c8b_0a1b2c3d4e5f.slice",
        ] {
            assert_eq!(ok(p), Owner::Host, "{p}");
        }
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert!(matches!(parse(""), Err(ParseError::NotAbsolute(_))));
        assert!(matches!(
            parse("kubepods/pod1/x"),
            Err(ParseError::NotAbsolute(_))
        ));
        assert!(matches!(
            parse("/kubepods/podnot-a-uid/x"),
            Err(ParseError::BadPodUid { .. })
        ));
        assert!(matches!(
            parse("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice"),
            Err(ParseError::BadPodUid { .. })
        ));
        assert!(matches!(
            parse(&format!("/kubepods/pod{UID}/cri-containerd-zzzz.scope")),
            Err(ParseError::BadContainerId { .. })
        ));
        assert!(matches!(
            parse(&format!("/kubepods/pod{UID}/crio-.scope")),
            Err(ParseError::BadContainerId { .. })
        ));
        // UTF-8 multibyte characters around the separators must not split a char.
        for p in [
            "/kubepods/pod\u{e9}\u{e9}\u{e9}/x",
            "/kubepods.slice/kubepods-\u{1f600}.slice/kubepods-\u{1f600}-pod\u{1f600}.slice",
            "/kubepods/burstable/pod/",
            "/kubepods.slice/-pod.slice",
            "/.slice/.slice",
        ] {
            let _ = parse(p);
        }
        let long = format!("/kubepods/pod{UID}/{}", "a".repeat(100_000));
        assert_eq!(
            parse(&long).expect("long unknown dir is the pod"),
            pod(None, None, QosClass::Guaranteed, false)
        );
    }
}
