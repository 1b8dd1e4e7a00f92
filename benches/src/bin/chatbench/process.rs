//! A process's resident memory and CPU time, from Linux's /proc.

pub struct ProcessSample {
    pub rss_bytes: u64,
    pub cpu_secs: f64,
}

impl ProcessSample {
    pub fn read(pid: u32) -> Result<ProcessSample, String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("cannot read /proc/{pid}/status (Linux only): {e}"))?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or("no VmRSS in /proc status")?;
        let stat =
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
        // Fields after the parenthesised command name; utime and stime are
        // the 14th and 15th fields of the whole line.
        let after_name = stat.rsplit_once(')').ok_or("malformed /proc stat")?.1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |i: usize| -> Result<f64, String> {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| "malformed /proc stat".to_owned())
        };
        let cpu_ticks = ticks(11)? + ticks(12)?;
        Ok(ProcessSample {
            rss_bytes: rss_kib * 1024,
            cpu_secs: cpu_ticks / clock_ticks_per_second(),
        })
    }
}

/// The CPU time so far of the process `server_pid` and of every process
/// named in `cpu_of` ([`cpu_secs_of_command`]), together; `None` if
/// neither is given.
pub fn cpu_secs(server_pid: Option<u32>, cpu_of: &[String]) -> Result<Option<f64>, String> {
    let server = server_pid
        .map(ProcessSample::read)
        .transpose()?
        .map(|s| s.cpu_secs);
    if cpu_of.is_empty() {
        return Ok(server);
    }
    let mut total = server.unwrap_or(0.0);
    for name in cpu_of {
        total += cpu_secs_of_command(name)?;
    }
    Ok(Some(total))
}

/// The CPU time, user and system, of every running process whose command
/// name (`/proc/PID/comm`) is `name`, together: a cluster's nodes, or a
/// database server and all its backends. A process that ends between the
/// listing and the read is passed over.
pub fn cpu_secs_of_command(name: &str) -> Result<f64, String> {
    let entries = std::fs::read_dir("/proc").map_err(|e| format!("cannot list /proc: {e}"))?;
    let mut total = 0.0;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if comm.trim_end() == name {
            if let Ok(sample) = ProcessSample::read(pid) {
                total += sample.cpu_secs;
            }
        }
    }
    Ok(total)
}

/// Asked of `getconf` once: running it takes milliseconds, which a sample
/// taken mid-run (at the start of a measurement window) would otherwise
/// add to the load generator's latency.
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}
