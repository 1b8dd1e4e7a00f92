//! Where threads run and how much CPU they use: the few OS calls behind
//! `--reactor-cpu` and the password-check threads' placement, priority and
//! CPU share. Linux only; elsewhere these do nothing and report nothing.

use std::io;
use std::time::Duration;

/// The CPUs the calling thread may run on, in order; `None` if unknown.
pub fn allowed() -> Option<Vec<usize>> {
    imp::allowed()
}

/// Confines the calling thread to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    imp::pin_current_thread(cpus)
}

/// The CPU time the calling thread has used; `None` if unknown.
pub fn thread_time() -> Option<Duration> {
    imp::thread_time()
}

/// Puts the calling thread in the lowest scheduling class (Linux's
/// SCHED_IDLE): it runs only on CPU time nothing else wants.
pub fn lower_priority() -> io::Result<()> {
    imp::lower_priority()
}

/// The CPUs password checks may use: every allowed CPU but `reserved` (the
/// reactor's, with `--reactor-cpu`) or, without one, the first. `None`
/// when no CPU would be left or the set cannot be read: no confinement.
pub fn for_checks(reserved: Option<usize>) -> Option<Vec<usize>> {
    let all = allowed()?;
    let keep_off = reserved.or_else(|| all.first().copied())?;
    let rest: Vec<usize> = all.into_iter().filter(|&c| c != keep_off).collect();
    (!rest.is_empty()).then_some(rest)
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod imp {
    use std::io;
    use std::time::Duration;

    const SET_SIZE: usize = std::mem::size_of::<libc::cpu_set_t>();

    pub fn allowed() -> Option<Vec<usize>> {
        // SAFETY: cpu_set_t is plain data (all-zero is the empty set);
        // sched_getaffinity writes at most SET_SIZE bytes into it, and
        // CPU_ISSET only reads it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, SET_SIZE, &mut set) != 0 {
                return None;
            }
            Some(
                (0..libc::CPU_SETSIZE as usize)
                    .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
                    .collect(),
            )
        }
    }

    pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
        if cpus.iter().any(|&c| c >= libc::CPU_SETSIZE as usize) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "CPU number out of range",
            ));
        }
        // SAFETY: as in `allowed`; CPU_SET writes within the set (the
        // numbers are checked above), and sched_setaffinity reads it and
        // changes only the calling thread (pid 0).
        let result = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &cpu in cpus {
                libc::CPU_SET(cpu, &mut set);
            }
            libc::sched_setaffinity(0, SET_SIZE, &set)
        };
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    pub fn thread_time() -> Option<Duration> {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into `now`.
        let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
        (result == 0).then(|| {
            Duration::new(
                u64::try_from(now.tv_sec).unwrap_or(0),
                u32::try_from(now.tv_nsec).unwrap_or(0),
            )
        })
    }

    pub fn lower_priority() -> io::Result<()> {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler reads `param` and changes only the
        // calling thread (pid 0).
        let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::io;
    use std::time::Duration;

    pub fn allowed() -> Option<Vec<usize>> {
        None
    }

    pub fn pin_current_thread(_: &[usize]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "CPU pinning is only supported on Linux",
        ))
    }

    pub fn thread_time() -> Option<Duration> {
        None
    }

    pub fn lower_priority() -> io::Result<()> {
        Ok(())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_thread_sees_only_its_cpu() {
        let all = allowed().unwrap();
        assert!(!all.is_empty());
        let last = *all.last().unwrap();
        // In a thread of its own: affinity is per thread.
        let seen = std::thread::spawn(move || {
            pin_current_thread(&[last]).unwrap();
            allowed().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(seen, [last]);
        assert!(pin_current_thread(&[usize::MAX]).is_err());
    }

    #[test]
    fn checks_keep_off_the_reserved_cpu_or_the_first() {
        let all = allowed().unwrap();
        match for_checks(None) {
            Some(cpus) => {
                assert_eq!(cpus.len(), all.len() - 1);
                assert!(!cpus.contains(&all[0]));
            }
            None => assert_eq!(all.len(), 1),
        }
        let last = *all.last().unwrap();
        if let Some(cpus) = for_checks(Some(last)) {
            assert!(!cpus.contains(&last));
            assert_eq!(cpus.len(), all.len() - 1);
        }
    }

    #[test]
    fn thread_time_moves_with_work() {
        let before = thread_time().unwrap();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(thread_time().unwrap() > before, "{x}");
    }
}
