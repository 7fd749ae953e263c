//! Processes started by tests: killed by PID on drop, never anything else.

use std::{
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("failed to run {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

/// Runs a command to completion; an error carries its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<Output, ProcessError> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ProcessError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(ProcessError::Failed {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(output)
}

/// A child process killed (SIGTERM, then SIGKILL) and reaped on drop.
pub struct ChildGuard {
    child: Option<Child>,
    pub name: String,
}

impl ChildGuard {
    pub fn spawn(name: &str, command: &mut Command) -> Result<Self, ProcessError> {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                command: name.to_owned(),
                source,
            })?;
        Ok(Self {
            child: Some(child),
            name: name.to_owned(),
        })
    }

    /// Spawns `args` inside a network namespace, output to `log` (or null).
    pub fn spawn_in(netns: &str, args: &[&str], log: Option<&Path>) -> Result<Self, ProcessError> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns]).args(args);
        match log {
            Some(path) => {
                let file = std::fs::File::create(path).map_err(|source| ProcessError::Spawn {
                    command: path.display().to_string(),
                    source,
                })?;
                let err = file.try_clone().map_err(|source| ProcessError::Spawn {
                    command: path.display().to_string(),
                    source,
                })?;
                cmd.stdout(file).stderr(err);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        Self::spawn(&format!("{netns}: {}", args.join(" ")), &mut cmd)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on the PID of a child we spawned and have not
            // reaped yet, so the PID cannot have been reused.
            unsafe {
                libc::kill(child.id() as i32, signal);
            }
        }
    }

    /// SIGSTOP: the process is frozen (its threads, its timers) until
    /// [`resume`](Self::resume) or its end.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGKILL and reap.
    pub fn kill_hard(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status if
    /// the process exited by itself.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        // A paused process handles SIGTERM only once it runs again.
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        let mut child = self.child.take()?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as in `signal`.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
        let _ = child.wait();
        None
    }

    /// Waits for the process to exit by itself, up to `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop(Duration::from_secs(3));
        }
    }
}

/// A numeric field of `/proc/PID/status` (`Threads:`, `VmRSS:` in KiB...).
pub fn proc_status(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU seconds of a running process.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces).
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of /proc/pid/stat, 12 and 13 after
    // the state field.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks as f64 / hz)
}

/// `setpriv` arguments that leave a process only `caps` (its bounding set
/// holds nothing else, as in a container granted only these).
pub fn setpriv_args(caps: &[String]) -> Vec<String> {
    let set: String = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        "setpriv".into(),
        format!("--bounding-set={set}"),
        "--inh-caps=-all".into(),
        "--".into(),
    ]
}
