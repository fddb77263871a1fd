//! Tracepoint record layouts from tracefs, so the probe reads fields at this
//! kernel's offsets instead of hard-coded ones (aya's Rust eBPF has no CO-RE).
//!
//! Layouts do change: `sched_process_fork` carried `char parent_comm[16]` until
//! the kernel commit "tracing/sched: Use __string() instead of fixed lengths for
//! task->comm" made the comms `__data_loc` strings, which moved `child_pid` from
//! offset 44 to 20; `sched_process_exit` has a `group_dead` field on this kernel
//! (6.18) that older ones lack.

use std::{
    fs,
    path::{Path, PathBuf},
};

use gpu_scaler_common::{FIELD_ABSENT, TracepointOffsets};

use super::{Error, Result};

/// Where tracefs is mounted on current kernels, and where it lives under debugfs
/// on old ones.
const TRACEFS_DIRS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// One `field:` line of a tracepoint's `format` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// The declaration as written, e.g. `__data_loc char[] path` or `char comm[16]`.
    pub decl: String,
    pub name: String,
    pub offset: u32,
    pub size: u32,
    pub signed: bool,
}

/// The parsed `format` file of one tracepoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Format {
    pub name: String,
    pub fields: Vec<Field>,
}

impl Format {
    /// Parses the text of a `format` file.
    pub fn parse(text: &str) -> Result<Self> {
        let mut name = None;
        let mut fields = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(n) = line.strip_prefix("name:") {
                name = Some(n.trim().to_owned());
            } else if line.starts_with("field:") {
                fields.push(parse_field(line)?);
            }
        }
        let name = name.ok_or_else(|| format_error("no `name:` line"))?;
        if fields.is_empty() {
            return Err(format_error(&format!("{name}: no `field:` lines")));
        }
        Ok(Self { name, fields })
    }

    /// The field called `name`, if the record has it.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// The offset of `name`, checked to be a `size`-byte field: the probe reads
    /// exactly that many bytes, so another size means a layout it cannot handle.
    pub fn offset(&self, name: &str, size: u32) -> Result<u32> {
        let field = self
            .field(name)
            .ok_or_else(|| format_error(&format!("{}: no field `{name}`", self.name)))?;
        if field.size != size {
            return Err(format_error(&format!(
                "{}: field `{name}` is {} bytes ({}), expected {size}",
                self.name, field.size, field.decl
            )));
        }
        Ok(field.offset)
    }

    /// Like [`Format::offset`] for a `__data_loc` string (a u32 locator).
    pub fn data_loc(&self, name: &str) -> Result<u32> {
        let offset = self.offset(name, 4)?;
        let field = self.field(name).expect("checked by offset");
        if !field.decl.starts_with("__data_loc") {
            return Err(format_error(&format!(
                "{}: field `{name}` is `{}`, expected a __data_loc string",
                self.name, field.decl
            )));
        }
        Ok(offset)
    }
}

/// `field:<decl>;\toffset:<n>;\tsize:<n>;\tsigned:<0|1>;`
fn parse_field(line: &str) -> Result<Field> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    let mut signed = None;
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once(':')
            .ok_or_else(|| format_error(&format!("malformed part {part:?} in {line:?}")))?;
        let number = || {
            value
                .trim()
                .parse::<u32>()
                .map_err(|_| format_error(&format!("{key} {value:?} is not a number in {line:?}")))
        };
        match key.trim() {
            "field" => decl = Some(value.trim().to_owned()),
            "offset" => offset = Some(number()?),
            "size" => size = Some(number()?),
            "signed" => signed = Some(number()? != 0),
            _ => {} // newer kernels may add keys; they do not change the layout
        }
    }
    let decl = decl.ok_or_else(|| format_error(&format!("no declaration in {line:?}")))?;
    let name = field_name(&decl)
        .ok_or_else(|| format_error(&format!("no field name in {decl:?}")))?
        .to_owned();
    Ok(Field {
        name,
        decl,
        offset: offset.ok_or_else(|| format_error(&format!("no offset in {line:?}")))?,
        size: size.ok_or_else(|| format_error(&format!("no size in {line:?}")))?,
        signed: signed.unwrap_or(false),
    })
}

/// The identifier of a C declaration: the last word, minus any `[N]` suffix.
fn field_name(decl: &str) -> Option<&str> {
    let last = decl.split_whitespace().last()?;
    let name = last.split('[').next()?;
    (!name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .then_some(name)
}

fn format_error(msg: &str) -> Error {
    Error::Tracefs(msg.to_owned())
}

/// The tracepoints' formats, read from one tracefs directory.
#[derive(Clone, Debug)]
pub struct Formats {
    pub exec: Format,
    pub fork: Format,
    pub exit: Format,
    pub mkdir: Format,
    pub rmdir: Format,
    pub attach: Format,
}

impl Formats {
    /// Reads `events/<cat>/<name>/format` for each tracepoint under `tracefs`.
    pub fn read(tracefs: &Path) -> Result<Self> {
        let read = |cat: &str, name: &str| -> Result<Format> {
            let path = tracefs.join("events").join(cat).join(name).join("format");
            let text = fs::read_to_string(&path).map_err(|source| Error::Io {
                path: path.display().to_string(),
                source,
            })?;
            Format::parse(&text)
        };
        Ok(Self {
            exec: read("sched", "sched_process_exec")?,
            fork: read("sched", "sched_process_fork")?,
            exit: read("sched", "sched_process_exit")?,
            mkdir: read("cgroup", "cgroup_mkdir")?,
            rmdir: read("cgroup", "cgroup_rmdir")?,
            attach: read("cgroup", "cgroup_attach_task")?,
        })
    }

    /// The offsets the probe needs, each checked for the size it reads.
    pub fn offsets(&self) -> Result<TracepointOffsets> {
        let group_dead = match self.exit.field("group_dead") {
            Some(_) => self.exit.offset("group_dead", 1)?,
            None => FIELD_ABSENT,
        };
        Ok(TracepointOffsets {
            exec_old_pid: self.exec.offset("old_pid", 4)?,
            fork_child_pid: self.fork.offset("child_pid", 4)?,
            exit_group_dead: group_dead,
            mkdir_root: self.mkdir.offset("root", 4)?,
            mkdir_level: self.mkdir.offset("level", 4)?,
            mkdir_id: self.mkdir.offset("id", 8)?,
            mkdir_path: self.mkdir.data_loc("path")?,
            rmdir_root: self.rmdir.offset("root", 4)?,
            rmdir_level: self.rmdir.offset("level", 4)?,
            rmdir_id: self.rmdir.offset("id", 8)?,
            rmdir_path: self.rmdir.data_loc("path")?,
            attach_dst_root: self.attach.offset("dst_root", 4)?,
            attach_dst_id: self.attach.offset("dst_id", 8)?,
            attach_pid: self.attach.offset("pid", 4)?,
        })
    }
}

/// The tracefs directory, mounting tracefs at /sys/kernel/tracing if no known
/// location has it (minimal hosts and containers often leave it unmounted).
pub fn ensure_mounted() -> Result<PathBuf> {
    for dir in TRACEFS_DIRS {
        if Path::new(dir).join("events").is_dir() {
            return Ok(PathBuf::from(dir));
        }
    }
    let target = TRACEFS_DIRS[0];
    let c_target = std::ffi::CString::new(target).expect("no NUL");
    let c_type = c"tracefs";
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c_type.as_ptr(),
            c_target.as_ptr(),
            c_type.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Error::Io {
            path: format!("mount -t tracefs tracefs {target}"),
            source: std::io::Error::last_os_error(),
        });
    }
    tracing::info!(path = target, "mounted tracefs");
    Ok(PathBuf::from(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sched_process_fork` before comm became a `__data_loc` string.
    const OLD_FORK: &str = "name: sched_process_fork
ID: 318
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;
\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;

print fmt: \"comm=%s pid=%d child_comm=%s child_pid=%d\", REC->parent_comm, REC->parent_pid, REC->child_comm, REC->child_pid
";

    /// `sched_process_exit` before `group_dead`.
    const OLD_EXIT: &str = "name: sched_process_exit
ID: 316
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;

print fmt: \"comm=%s pid=%d prio=%d\", REC->comm, REC->pid, REC->prio
";

    #[test]
    fn old_fork_layout_with_fixed_comm_arrays() {
        let f = Format::parse(OLD_FORK).expect("parses");
        assert_eq!(f.name, "sched_process_fork");
        let comm = f.field("parent_comm").expect("parent_comm");
        assert_eq!((comm.offset, comm.size), (8, 16));
        assert_eq!(comm.decl, "char parent_comm[16]");
        assert_eq!(f.offset("parent_pid", 4).unwrap(), 24);
        assert_eq!(f.offset("child_pid", 4).unwrap(), 44);
        assert!(f.field("child_pid").unwrap().signed);
        // A fixed array is not a __data_loc string.
        assert!(f.data_loc("child_comm").is_err());
    }

    #[test]
    fn old_exit_layout_has_no_group_dead() {
        let exit = Format::parse(OLD_EXIT).expect("parses");
        assert!(exit.field("group_dead").is_none());
        assert_eq!(exit.offset("pid", 4).unwrap(), 24);
    }

    #[test]
    fn wrong_size_or_missing_field_is_a_clear_error() {
        let f = Format::parse(OLD_FORK).expect("parses");
        let err = f.offset("child_pid", 8).unwrap_err().to_string();
        assert!(
            err.contains("child_pid") && err.contains("4 bytes"),
            "{err}"
        );
        let err = f.offset("nope", 4).unwrap_err().to_string();
        assert!(err.contains("no field `nope`"), "{err}");
    }

    #[test]
    fn malformed_format_files_are_errors() {
        assert!(Format::parse("").is_err());
        assert!(Format::parse("name: x\n").is_err());
        assert!(Format::parse("name: x\n\tfield:int a;\toffset:z;\tsize:4;\tsigned:1;\n").is_err());
        assert!(Format::parse("name: x\n\tfield:int a;\tsize:4;\n").is_err());
        assert!(Format::parse("name: x\n\tfield:;\toffset:0;\tsize:4;\n").is_err());
    }

    /// This kernel's own format files, as the loader reads them.
    #[test]
    fn this_kernels_formats() {
        let dir = match ensure_mounted() {
            Ok(dir) => dir,
            Err(e) => {
                // Unit tests may run unprivileged: the kernel test in tests/ makes
                // this a hard requirement under GPU_SCALER_REQUIRE_KERNEL=1.
                eprintln!("skipping: tracefs unavailable: {e}");
                assert_ne!(
                    std::env::var("GPU_SCALER_REQUIRE_KERNEL").as_deref(),
                    Ok("1"),
                    "tracefs required: {e}"
                );
                return;
            }
        };
        let formats = Formats::read(&dir).expect("read this kernel's formats");
        let o = formats.offsets().expect("offsets");
        // Checked against the field each offset was taken from, and against the
        // record header (8 bytes of common_* fields) that every event starts with.
        assert_eq!(
            o.exec_old_pid,
            formats.exec.field("old_pid").unwrap().offset
        );
        assert_eq!(
            o.fork_child_pid,
            formats.fork.field("child_pid").unwrap().offset
        );
        for off in [o.exec_old_pid, o.fork_child_pid, o.mkdir_root, o.rmdir_id] {
            assert!(off >= 8, "offset {off} inside the common header");
        }
        assert_eq!(formats.mkdir.field("id").unwrap().size, 8);
        assert!(formats.fork.field("parent_pid").is_some());
    }
}
