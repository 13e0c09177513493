//! Process figures from `/proc`: resident memory and CPU time.

use std::fs;

/// `VmRSS` of process `pid` in KiB (`None` if it is gone or unreadable).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line["VmRSS:".len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// User plus system CPU time of a process (`"self"` or a pid), in clock
/// ticks, from fields 14 and 15 of `/proc/<who>/stat`.
pub fn cpu_ticks(who: &str) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{who}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_ascii_whitespace().skip(11); // field 3 is index 0
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Busy and total ticks of one CPU so far, from its `cpuN` line in
/// `/proc/stat` (busy is everything but idle and iowait).
pub fn cpu_line(cpu: usize) -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let label = format!("cpu{cpu} ");
    let line = stat.lines().find(|l| l.starts_with(&label))?;
    let ticks: Vec<u64> = line[label.len()..].split_ascii_whitespace().map(|t| t.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal guest guest_nice;
    // guest time is already counted in user.
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// The CPU this process is pinned to, if its affinity allows exactly one.
pub fn pinned_cpu() -> Option<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it in.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        set
    };
    let mut cpus = (0..libc::CPU_SETSIZE as usize).filter(|&cpu| {
        // SAFETY: `cpu` is below CPU_SETSIZE and `set` was filled in.
        unsafe { libc::CPU_ISSET(cpu, &set) }
    });
    let first = cpus.next()?;
    cpus.next().is_none().then_some(first)
}

/// Clock ticks per second, the unit of [`cpu_ticks`].
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// CPU use of a process between two [`cpu_ticks`] readings `secs` apart, in
/// percent of one CPU.
pub fn cpu_percent(before: Option<u64>, after: Option<u64>, secs: f64) -> Option<f64> {
    let (before, after) = (before?, after?);
    (secs > 0.0).then(|| after.saturating_sub(before) as f64 / ticks_per_second() / secs * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_figures() {
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
        assert!(cpu_ticks("self").is_some());
        assert_eq!(cpu_percent(Some(100), Some(150), 1.0), Some(50.0 * 100.0 / ticks_per_second()));
        assert_eq!(cpu_percent(None, Some(1), 1.0), None);
        let (busy, total) = cpu_line(0).expect("cpu0 in /proc/stat");
        assert!(busy <= total && total > 0);
        assert_eq!(cpu_line(100_000), None);
    }
}
