//! A sub-millisecond sleep for the send schedule.
//!
//! Tokio's timer wheel has a 1 ms resolution, which would add up to a
//! millisecond of send delay (and so of measured latency) to every message.
//! A Linux `timerfd` armed at an absolute `CLOCK_MONOTONIC` deadline wakes
//! the runtime's own epoll within microseconds, on the same thread. If a
//! timerfd cannot be made, the Tokio timer is used instead.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Sleeps until instants given in nanoseconds since a start instant.
pub struct Timer {
    /// Start of the generator's clock.
    start: Instant,
    /// `CLOCK_MONOTONIC` at `start`, in ns.
    start_mono_ns: u64,
    /// The timerfd, if one could be made.
    fd: Option<AsyncFd<OwnedFd>>,
}

impl Timer {
    /// A timer on the clock that started at `start`. Must be called within a
    /// Tokio runtime.
    pub fn new(start: Instant) -> Self {
        let fd = make_timerfd().ok();
        // Rust's Instant is CLOCK_MONOTONIC on Linux: read both back to back.
        let now = Instant::now();
        let mono = monotonic_ns();
        let start_mono_ns = mono.saturating_sub(now.duration_since(start).as_nanos() as u64);
        Self { start, start_mono_ns, fd }
    }

    /// Whether the precise timerfd is in use.
    pub fn is_precise(&self) -> bool {
        self.fd.is_some()
    }

    /// Sleeps until `at_ns` nanoseconds after the start (returns at once if
    /// that is past).
    pub async fn sleep_until(&self, at_ns: u64) {
        if let Some(fd) = &self.fd
            && self.wait_timerfd(fd, at_ns).await.is_ok()
        {
            return;
        }
        tokio::time::sleep_until((self.start + Duration::from_nanos(at_ns)).into()).await;
    }

    /// Arms the timerfd for `at_ns` and waits for it to expire.
    async fn wait_timerfd(&self, fd: &AsyncFd<OwnedFd>, at_ns: u64) -> io::Result<()> {
        let deadline = self.start_mono_ns.saturating_add(at_ns).max(1);
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: (deadline / 1_000_000_000) as libc::time_t,
                tv_nsec: (deadline % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: the fd is a timerfd we own; `spec` is a valid itimerspec
        // and the old-value pointer may be null.
        let armed =
            unsafe { libc::timerfd_settime(fd.as_raw_fd(), libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut()) };
        if armed != 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut guard = fd.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes into an 8-byte buffer.
            let n = unsafe { libc::read(fd.as_raw_fd(), expirations.as_mut_ptr().cast(), expirations.len()) };
            if n == 8 {
                // Reading reset the expiration count: nothing more to read
                // until the timer is armed again.
                guard.clear_ready();
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
            guard.clear_ready();
        }
    }
}

/// Creates a non-blocking monotonic timerfd registered with the runtime.
fn make_timerfd() -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: plain syscall; the result is checked before use.
    let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an OwnedFd is a valid open fd and always returns the same fd
    // from as_raw_fd; the AsyncFd owns it until dropped.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)
}

/// `CLOCK_MONOTONIC` now, in ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_precisely_to_absolute_deadlines() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let start = Instant::now();
            let timer = Timer::new(start);
            assert!(timer.is_precise());
            for step in 1..=20u64 {
                let at = 5_000_000 + step * 300_000; // every 0.3 ms after 5 ms
                timer.sleep_until(at).await;
                let now = start.elapsed().as_nanos() as u64;
                assert!(now >= at, "woke early: {now} < {at}");
            }
            // A deadline in the past returns at once.
            timer.sleep_until(0).await;
        });
    }
}
