//! keepalived's `enable_script_security`: a program that would run as root (no user of its
//! own, no script user) is refused if it, or a directory on its path, could be changed by
//! anyone but root; a shell command line cannot be vetted that way and is refused too.

use std::{os::unix::fs::MetadataExt, path::Path};

use crate::config::ServiceConfig;

use super::spec::Probe;

/// Why `path` is not safe to run as root, if it is not: the program and every directory
/// above it, on the path as written (links included) and on the one they lead to, must be
/// root's and writable by no one else.
fn unsafe_reason(path: &Path) -> Option<String> {
    let real = match std::fs::canonicalize(path) {
        Ok(r) => r,
        Err(e) => return Some(format!("{}: {e}", path.display())),
    };
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_or(path.to_path_buf(), |d| d.join(path))
    };
    for p in [absolute.as_path(), real.as_path()] {
        if let Some(why) = unsafe_components(p) {
            return Some(why);
        }
    }
    None
}

fn unsafe_components(path: &Path) -> Option<String> {
    let mut p = Some(path);
    while let Some(x) = p {
        match std::fs::symlink_metadata(x) {
            Err(e) => return Some(format!("{}: {e}", x.display())),
            Ok(m) => {
                if m.uid() != 0 {
                    return Some(format!("{} is owned by uid {}", x.display(), m.uid()));
                }
                // Group or world writable (a sticky /tmp does not protect the program); a
                // link's own mode means nothing, its owner does.
                if !m.file_type().is_symlink() && m.mode() & 0o022 != 0 {
                    return Some(format!(
                        "{} is writable by group or others (mode {:o})",
                        x.display(),
                        m.mode() & 0o7777
                    ));
                }
            }
        }
        p = x.parent().filter(|d| !d.as_os_str().is_empty());
    }
    None
}

/// The program of a command line, found on PATH if it has no slash.
fn program(argv0: &str) -> Option<std::path::PathBuf> {
    if argv0.contains('/') {
        return Some(argv0.into());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(argv0))
            .find(|p| p.is_file())
    })
}

/// Whether `user` (a name or a number; `None`: the daemon's own, root) is root.
fn is_root(user: Option<&str>) -> bool {
    match user {
        None => true,
        Some(u) => {
            let name = u.split_whitespace().next().unwrap_or(u);
            match name.parse::<u32>() {
                Ok(uid) => uid == 0,
                Err(_) => nix::unistd::User::from_name(name)
                    .ok()
                    .flatten()
                    .is_some_and(|u| u.uid.is_root()),
            }
        }
    }
}

/// Checks every program of `services` that would run as root; the error names it and why.
pub fn check(services: &[ServiceConfig], script_user: Option<&str>) -> Result<(), String> {
    let as_root = |user: Option<&String>| is_root(user.map(String::as_str).or(script_user));
    let vet = |what: &str, argv: &[String], shell: bool| -> Result<(), String> {
        if shell {
            return Err(format!(
                "{what}: a shell command runs as root and cannot be vetted (script_security); set a user or script_user"
            ));
        }
        let Some(first) = argv.first() else {
            return Ok(());
        };
        let path = program(first).ok_or_else(|| format!("{what}: {first} not found on PATH"))?;
        match unsafe_reason(&path) {
            Some(why) => Err(format!(
                "{what}: {} would run as root but {why} (script_security)",
                path.display()
            )),
            None => Ok(()),
        }
    };
    for s in services {
        for (name, c) in [
            ("quorum_up", &s.health.quorum_up),
            ("quorum_down", &s.health.quorum_down),
        ] {
            if let Some(argv) = c {
                vet(&format!("service {} {name}", s.key), argv, false)?;
            }
        }
        for b in &s.backends {
            let who = format!(
                "service {} real server {}",
                s.key,
                std::net::SocketAddr::new(b.addr, b.port)
            );
            for (name, c) in [
                ("notify_up", &b.health.notify_up),
                ("notify_down", &b.health.notify_down),
            ] {
                if let Some(argv) = c {
                    vet(&format!("{who} {name}"), argv, false)?;
                }
            }
            for (i, c) in b.health.checks.iter().enumerate() {
                match &c.probe {
                    Probe::Misc(m) if as_root(m.user.as_ref()) => {
                        vet(&format!("{who} check {i}"), &m.argv, m.shell)?
                    }
                    Probe::SendExpect(se) if is_root(script_user) => {
                        if let Some(p) = &se.program {
                            vet(&format!("{who} check {i}"), p, false)?;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_programs_are_refused() {
        let dir = std::env::temp_dir().join(format!("xlb-sec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let prog = dir.join("check.sh");
        std::fs::write(&prog, "#!/bin/sh\nexit 0\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o777)).unwrap();
        let text = format!(
            "[dataplane]\ninterfaces = [\"x\"]\n[[services]]\nname = \"s\"\naddress = \"10.0.0.1:80\"\n[[services.backends]]\naddress = \"10.0.0.11\"\nchecks = [{{ type = \"misc\", command = \"{}\" }}]\n",
            prog.display()
        );
        let services = crate::config::parse(Path::new("t.toml"), &text)
            .unwrap()
            .services;
        let e = check(&services, None).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
        // As another user it is that user's business.
        check(&services, Some("nobody")).unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The temporary directory itself is world writable: still refused.
        let e = check(&services, None).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
        // An explicit root user is root.
        let e = check(&services, Some("root")).unwrap_err();
        assert!(e.contains("would run as root"), "{e}");
        let e = check(&services, Some("0")).unwrap_err();
        assert!(e.contains("would run as root"), "{e}");
        // A system program is fine.
        let ok = text.replace(&prog.display().to_string(), "/bin/true");
        let services = crate::config::parse(Path::new("t.toml"), &ok)
            .unwrap()
            .services;
        check(&services, None).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
