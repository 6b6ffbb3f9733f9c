//! What a dynamically linked program needs in its image: its interpreter (`PT_INTERP`) and
//! every `DT_NEEDED` library, transitively, found where the dynamic loader looks without an
//! `ld.so.cache`: the standard x86-64 library directories. Each is taken from the image's own
//! tree when it has it there, else from this host, and copied to the same path in the tree.
//! (`RPATH`/`RUNPATH` and `LD_LIBRARY_PATH` are not followed: a program that needs them gets
//! its libraries in a tree.)

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};

use crate::elf::{self, Arch, ElfError, FileKind};
use crate::rootfs::resolve_in_root;

/// Where x86-64 libraries are looked for, in order (Debian's multiarch directories first);
/// also what [`crate::rootfs`] checks a tree's dynamic programs against.
pub const LIBRARY_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
    "/usr/local/lib",
];

/// Errors gathering a program's interpreter and libraries.
#[derive(Debug, thiserror::Error)]
pub enum DepsError {
    /// The interpreter or a library is neither in the tree nor on this host.
    #[error(
        "{program} needs {what}, which is neither in the image's tree nor on this host \
         (looked in {searched}): install it, put it in the tree (--dir, or the route's `tree`) \
         at that path, or link the program statically"
    )]
    Missing {
        /// The program, or the name of the library, that needs it.
        program: PathBuf,
        /// What is missing, e.g. `the library libfoo.so.1`.
        what: String,
        /// Where it was looked for.
        searched: String,
    },
    /// A `DT_NEEDED` entry that is empty, `.`, `..` or contains `/`.
    #[error("{program}: library name {name:?} is not a plain file name")]
    BadName {
        /// The program, or the name of the library, that names it.
        program: PathBuf,
        /// The entry.
        name: String,
    },
    /// Copying a file from this host into the tree failed.
    #[error("copying {from} into the image: {source}")]
    Copy {
        /// The host file.
        from: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading the program or one of its libraries failed.
    #[error(transparent)]
    Elf(#[from] ElfError),
}

/// Copies into `root` (an image's staging tree) what the program at `root`/`program` needs and
/// the tree lacks; returns the guest paths added, in the order found. A static program (or a
/// script, or an i386 program, which the tree must provide for) needs nothing.
pub fn add_dynamic_deps(root: &Path, program: &str) -> Result<Vec<PathBuf>, DepsError> {
    let shown = PathBuf::from(program);
    let Some(host_program) = resolve_in_root(root, program) else {
        return Ok(Vec::new());
    };
    let info = match elf::inspect(&host_program)? {
        FileKind::Elf(info) if info.arch == Arch::X86_64 => info,
        _ => return Ok(Vec::new()),
    };
    let Some(interp) = info.interpreter else {
        return Ok(Vec::new());
    };
    let mut added = Vec::new();
    if resolve_in_root(root, &interp).is_none() {
        let from = PathBuf::from(&interp);
        if !from.is_file() {
            return Err(DepsError::Missing {
                program: shown,
                what: format!("its interpreter {interp}"),
                searched: "this host".into(),
            });
        }
        copy_in(root, &from, &interp)?;
        added.push(from);
    }
    let mut todo: VecDeque<(String, PathBuf)> = info
        .needed
        .into_iter()
        .map(|n| (n, shown.clone()))
        .collect();
    let mut seen = BTreeSet::new();
    while let Some((name, by)) = todo.pop_front() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(DepsError::BadName { program: by, name });
        }
        let in_tree = LIBRARY_DIRS
            .iter()
            .find_map(|d| resolve_in_root(root, &format!("{d}/{name}")));
        let lib = match in_tree {
            Some(p) => p,
            None => {
                let (dir, from) = host_library(&name).ok_or_else(|| DepsError::Missing {
                    program: by.clone(),
                    what: format!("the library {name}"),
                    searched: LIBRARY_DIRS.join(", "),
                })?;
                let guest = format!("{dir}/{name}");
                copy_in(root, &from, &guest)?;
                added.push(PathBuf::from(guest));
                from
            }
        };
        if let FileKind::Elf(l) = elf::inspect(&lib)? {
            let lib_name = PathBuf::from(&name);
            todo.extend(l.needed.into_iter().map(|n| (n, lib_name.clone())));
        }
    }
    Ok(added)
}

/// The first x86-64 `name` in the host's library directories: (directory, path).
fn host_library(name: &str) -> Option<(&'static str, PathBuf)> {
    LIBRARY_DIRS.iter().find_map(|d| {
        let p = Path::new(d).join(name);
        match elf::inspect(&p) {
            Ok(FileKind::Elf(i)) if i.arch == Arch::X86_64 => Some((*d, p)),
            _ => None,
        }
    })
}

/// Copies `from` (symlinks followed) to `guest` under `root`, creating its directory.
fn copy_in(root: &Path, from: &Path, guest: &str) -> Result<(), DepsError> {
    let err = |source| DepsError::Copy {
        from: from.to_path_buf(),
        source,
    };
    let to = root.join(guest.trim_start_matches('/'));
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    fs::copy(from, &to).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ldd_paths(program: &Path) -> Vec<String> {
        let out = std::process::Command::new("ldd")
            .arg(program)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let l = l.trim();
                let path = l.split("=> ").nth(1).unwrap_or(l);
                let path = path.split(" (").next()?.trim();
                path.starts_with('/').then(|| path.to_string())
            })
            .collect()
    }

    #[test]
    fn a_dynamic_program_gets_what_ldd_lists_and_a_static_one_nothing() {
        let tree = tempfile::tempdir().unwrap();
        // /bin/ls: dynamic on every host we build on (libselinux, libc, ...).
        fs::create_dir_all(tree.path().join("cgi-bin")).unwrap();
        fs::copy("/bin/ls", tree.path().join("cgi-bin/ls")).unwrap();
        let added = add_dynamic_deps(tree.path(), "/cgi-bin/ls").unwrap();
        assert!(!added.is_empty());
        for want in ldd_paths(Path::new("/bin/ls")) {
            let name = Path::new(&want).file_name().unwrap().to_str().unwrap();
            let found = want.contains("ld-linux")
                || LIBRARY_DIRS
                    .iter()
                    .any(|d| resolve_in_root(tree.path(), &format!("{d}/{name}")).is_some());
            assert!(found, "{want} missing from the tree; added {added:?}");
        }
        let interp = match elf::inspect(Path::new("/bin/ls")).unwrap() {
            FileKind::Elf(i) => i.interpreter.unwrap(),
            _ => unreachable!(),
        };
        assert!(resolve_in_root(tree.path(), &interp).is_some());
        // A second pass finds everything in the tree already.
        assert!(add_dynamic_deps(tree.path(), "/cgi-bin/ls")
            .unwrap()
            .is_empty());
        // A static program needs nothing.
        fs::copy("/bin/busybox", tree.path().join("cgi-bin/bb")).unwrap();
        assert!(add_dynamic_deps(tree.path(), "/cgi-bin/bb")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_library_found_nowhere_is_named_and_one_in_the_tree_is_used() {
        // A program linked against a library that only a temporary directory has.
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("nope.c"), "int nope(void) { return 7; }\n").unwrap();
        fs::write(
            d.path().join("main.c"),
            "int nope(void);\nint main(void) { return nope(); }\n",
        )
        .unwrap();
        let gcc = |args: &[&str]| {
            let st = std::process::Command::new("gcc")
                .current_dir(d.path())
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "gcc {args:?}");
        };
        gcc(&["-shared", "-fPIC", "-o", "libxcginope.so", "nope.c"]);
        gcc(&["-o", "prog", "main.c", "-L.", "-lxcginope"]);
        let tree = tempfile::tempdir().unwrap();
        fs::copy(d.path().join("prog"), tree.path().join("prog")).unwrap();
        let e = add_dynamic_deps(tree.path(), "/prog").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("/prog needs the library libxcginope.so") && msg.contains("statically"),
            "{msg}"
        );
        // With the library in the tree, the rest (libc, the interpreter) comes from the host.
        let lib = tree.path().join("usr/lib/x86_64-linux-gnu");
        fs::create_dir_all(&lib).unwrap();
        fs::copy(d.path().join("libxcginope.so"), lib.join("libxcginope.so")).unwrap();
        let added = add_dynamic_deps(tree.path(), "/prog").unwrap();
        assert!(added.iter().any(|p| p.ends_with("libc.so.6")), "{added:?}");
        assert!(
            !added.iter().any(|p| p.ends_with("libxcginope.so")),
            "{added:?}"
        );
    }
}
