//! Password checks off the reactor thread.
//!
//! An Argon2 verification costs milliseconds of CPU, which would stall
//! every connection if the reactor ran it. The core asks for one with
//! `Output::VerifyPassword`; the reactor hands it to this pool of worker
//! threads and takes the verdict back on its next wake-up (a worker wakes
//! the poller when it has one).
//!
//! Waiting checks are served one client address at a time, in turn, so
//! that an address with many checks queued delays another's by at most
//! one check each.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Instant;

use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use chatproto::{HashedPassword, Password, PeerKey, VerifyTicket};
use polling::Poller;
use tracing::warn;

use crate::cpu;

/// A check to run.
struct Job {
    ticket: VerifyTicket,
    hash: HashedPassword,
    password: Password,
}

/// Checks waiting for a worker: a queue per peer, served in turn.
#[derive(Debug, Default)]
struct FairQueue {
    by_peer: HashMap<PeerKey, VecDeque<Job>>,
    /// Peers with checks waiting, the next to serve first.
    turns: VecDeque<PeerKey>,
    /// The pool is stopping: workers take nothing more.
    closed: bool,
}

impl FairQueue {
    fn push(&mut self, peer: PeerKey, job: Job) {
        let queue = self.by_peer.entry(peer).or_default();
        if queue.is_empty() {
            self.turns.push_back(peer);
        }
        queue.push_back(job);
    }

    fn pop(&mut self) -> Option<Job> {
        let peer = self.turns.pop_front()?;
        let queue = self.by_peer.get_mut(&peer)?;
        let job = queue.pop_front();
        if queue.is_empty() {
            self.by_peer.remove(&peer);
        } else {
            self.turns.push_back(peer);
        }
        job
    }
}

/// The queue and the bell workers wait on.
type Jobs = (Mutex<FairQueue>, Condvar);

/// The worker pool.
#[derive(Debug)]
pub struct Verifier {
    jobs: Arc<Jobs>,
    /// Set when the pool stops: queued checks are dropped, not run.
    stopping: Arc<AtomicBool>,
    verdicts: Receiver<(Job, bool)>,
    workers: Vec<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job({})", self.ticket)
    }
}

impl Verifier {
    /// Starts `threads` workers, each using at most `cpu_percent` of a CPU;
    /// each verdict wakes `poller`.
    /// On Linux the workers run in the SCHED_IDLE class and off
    /// `reserved_cpu` (the reactor's), or off the first CPU without one:
    /// see [`cpu::for_checks`].
    pub fn start(
        threads: usize,
        cpu_percent: u8,
        reserved_cpu: Option<usize>,
        poller: Arc<Poller>,
    ) -> std::io::Result<Verifier> {
        let rest_per_busy =
            f64::from(100 - cpu_percent.clamp(1, 100)) / f64::from(cpu_percent.max(1));
        let jobs: Arc<Jobs> = Arc::default();
        let (verdict_tx, verdicts) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let cpus = cpu::for_checks(reserved_cpu);
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let queue = jobs.clone();
            let verdict_tx = verdict_tx.clone();
            let poller = poller.clone();
            let stopping = stopping.clone();
            let cpus = cpus.clone();
            workers.push(
                thread::Builder::new()
                    .name(format!("verify-{i}"))
                    .spawn(move || {
                        place_worker(cpus.as_deref());
                        work(&queue, &verdict_tx, &poller, &stopping, rest_per_busy);
                    })?,
            );
        }
        Ok(Verifier {
            jobs,
            stopping,
            verdicts,
            workers,
        })
    }

    /// Queues a check for a login from `peer`.
    pub fn submit(
        &self,
        ticket: VerifyTicket,
        peer: PeerKey,
        hash: HashedPassword,
        password: Password,
    ) {
        let (queue, bell) = &*self.jobs;
        if let Ok(mut queue) = queue.lock() {
            if !queue.closed {
                queue.push(
                    peer,
                    Job {
                        ticket,
                        hash,
                        password,
                    },
                );
                bell.notify_one();
            }
        }
    }

    /// Verdicts ready now.
    pub fn verdicts(&self) -> impl Iterator<Item = (VerifyTicket, bool)> + '_ {
        // The job is dropped here, on the reactor thread that allocated it.
        self.verdicts.try_iter().map(|(job, ok)| (job.ticket, ok))
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        // Workers finish the check in hand and drop the rest.
        self.stopping.store(true, Ordering::Relaxed);
        let (queue, bell) = &*self.jobs;
        if let Ok(mut queue) = queue.lock() {
            queue.closed = true;
        }
        bell.notify_all();
        for worker in self.workers.drain(..) {
            // Out of a rest at once.
            worker.thread().unpark();
            let _ = worker.join();
        }
    }
}

/// One worker: checks jobs until the queue closes.
fn work(
    jobs: &Jobs,
    verdicts: &Sender<(Job, bool)>,
    poller: &Poller,
    stopping: &AtomicBool,
    rest_per_busy: f64,
) {
    let mut memory = Memory::default();
    loop {
        // The lock is held only to take one job; with none waiting, the
        // worker's Argon2 memory goes back before it sleeps.
        let (queue, bell) = jobs;
        let Ok(mut waiting) = queue.lock() else {
            return;
        };
        let job = loop {
            if waiting.closed {
                return;
            }
            if let Some(job) = waiting.pop() {
                break job;
            }
            memory = Memory::default();
            waiting = match bell.wait(waiting) {
                Ok(waiting) => waiting,
                Err(_) => return,
            };
        };
        drop(waiting);
        if stopping.load(Ordering::Relaxed) {
            return;
        }
        let started = (Instant::now(), cpu::thread_time());
        let ok = memory.verify(&job.hash, &job.password);
        // CPU time, not wall time: time spent preempted is not work.
        let busy = match (started.1, cpu::thread_time()) {
            (Some(before), Some(after)) => after.saturating_sub(before),
            _ => started.0.elapsed(),
        };
        if verdicts.send((job, ok)).is_err() {
            return;
        }
        let _ = poller.notify();
        if rest_per_busy > 0.0 {
            // Under a CPU share: rest in proportion to the work just done,
            // leaving the CPU idle for the reactor and everything else.
            let until = Instant::now() + busy.mul_f64(rest_per_busy);
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() || stopping.load(Ordering::Relaxed) {
                    break;
                }
                thread::park_timeout(left);
            }
        }
    }
}

/// An Argon2id PHC string taken apart: what a check against it needs.
pub struct ArgonHash<'a> {
    version: Version,
    params: Params,
    salt: argon2::password_hash::Salt<'a>,
    expected: argon2::password_hash::Output,
}

/// Takes an Argon2id PHC string apart, or says what is wrong with it: the
/// credentials loader refuses what this refuses, so every hash it accepts
/// can be checked.
pub fn parse(phc: &str) -> Result<ArgonHash<'_>, String> {
    let parsed = PasswordHash::new(phc).map_err(|e| {
        format!("bad password hash: {e} (expected $argon2id$v=19$m=...,t=...,p=...$salt$hash)")
    })?;
    if parsed.algorithm != Algorithm::Argon2id.ident() {
        return Err(format!(
            "password hash uses {}: only argon2id is accepted",
            parsed.algorithm
        ));
    }
    let version = match parsed.version {
        Some(v) => Version::try_from(v).map_err(|e| format!("bad argon2 version: {e}"))?,
        None => Version::default(),
    };
    let params = Params::try_from(&parsed).map_err(|e| format!("bad argon2id parameters: {e}"))?;
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Err("password hash has no salt or no hash part".to_owned());
    };
    Ok(ArgonHash {
        version,
        params,
        salt,
        expected,
    })
}

/// A worker's Argon2 working memory, kept from one check to the next while
/// checks keep coming: allocating and faulting in 19 MiB per check, and
/// unmapping it after, costs the whole process (page faults, the address
/// space lock), the reactor included.
#[derive(Default)]
struct Memory {
    blocks: Vec<Block>,
}

impl Memory {
    /// Whether `password` matches `hash`.
    fn verify(&mut self, hash: &HashedPassword, password: &Password) -> bool {
        match self.check(hash, password) {
            Ok(matches) => matches,
            Err(e) => {
                // The credentials loader refuses hashes it cannot read.
                warn!("unusable password hash: {e}");
                false
            }
        }
    }

    fn check(&mut self, hash: &HashedPassword, password: &Password) -> Result<bool, String> {
        let ArgonHash {
            version,
            params,
            salt,
            expected,
        } = parse(hash.as_str())?;
        let mut salt_buf = [0u8; 64];
        let salt = salt.decode_b64(&mut salt_buf).map_err(|e| e.to_string())?;
        let needed = params.block_count();
        if self.blocks.len() < needed {
            self.blocks.resize(needed, Block::default());
        }
        let mut out = [0u8; argon2::password_hash::Output::MAX_LENGTH];
        let out = &mut out[..expected.len()];
        Argon2::new(Algorithm::Argon2id, version, params)
            .hash_password_into_with_memory(
                password.expose().as_bytes(),
                salt,
                out,
                &mut self.blocks[..needed],
            )
            .map_err(|e| e.to_string())?;
        // `Output`'s comparison is constant-time.
        let computed = argon2::password_hash::Output::new(out).map_err(|e| e.to_string())?;
        Ok(computed == expected)
    }
}

/// Checks run only on CPU time nothing else wants (SCHED_IDLE), so the
/// reactor preempts them at once, and off the reactor's CPU: measured with
/// `chatbench --login-storm` on 2 CPUs, with checks free to run on both,
/// even in SCHED_IDLE, messages' p99 rose from 0.2 ms to 3–5 ms (each
/// wake-up of the reactor or a client then preempted a check mid-hash, on
/// either CPU).
fn place_worker(cpus: Option<&[usize]>) {
    if let Some(cpus) = cpus {
        if let Err(e) = cpu::pin_current_thread(cpus) {
            warn!("cannot keep password checks off the reactor's CPU: {e}");
        }
    }
    if let Err(e) = cpu::lower_priority() {
        warn!("cannot lower the priority of a password-check thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, SaltString};
    use std::time::Duration;

    fn hash(password: &str) -> HashedPassword {
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let phc = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string();
        HashedPassword::new(&phc).unwrap()
    }

    #[test]
    fn waiting_checks_are_served_one_peer_at_a_time() {
        let mut q = FairQueue::default();
        let flood = PeerKey::from_bytes([2; 16]);
        let user = PeerKey::from_bytes([1; 16]);
        let job = |n| Job {
            ticket: ticket(n),
            hash: cheap_hash("x"),
            password: "x".parse().unwrap(),
        };
        for n in 0..8 {
            q.push(flood, job(n));
        }
        q.push(user, job(100));
        let order: Vec<u64> = std::iter::from_fn(|| q.pop())
            .map(|j| j.ticket.into_raw())
            .collect();
        // The user's check comes second, not ninth.
        assert_eq!(order, [0, 100, 1, 2, 3, 4, 5, 6, 7]);
        assert!(q.by_peer.is_empty() && q.turns.is_empty());
    }

    #[test]
    fn verdicts_come_back_and_wake_the_poller() {
        // A worker resting under a CPU share still answers every check.
        for (threads, cpu_percent) in [(2, 100), (1, 10)] {
            let poller = Arc::new(Poller::new().unwrap());
            let verifier = Verifier::start(threads, cpu_percent, None, poller.clone()).unwrap();
            let h = cheap_hash("right");
            verifier.submit(
                ticket(1),
                PeerKey::UNSPECIFIED,
                h.clone(),
                "right".parse().unwrap(),
            );
            verifier.submit(ticket(2), PeerKey::UNSPECIFIED, h, "wrong".parse().unwrap());
            let mut got = Vec::new();
            let mut events = polling::Events::new();
            while got.len() < 2 {
                poller
                    .wait(&mut events, Some(Duration::from_secs(10)))
                    .unwrap();
                got.extend(verifier.verdicts());
            }
            got.sort();
            assert_eq!(got, [(ticket(1), true), (ticket(2), false)]);
        }
    }

    #[test]
    fn stopping_the_pool_cuts_a_rest_short() {
        // At 1 % a worker rests 99 times as long as a check took: with the
        // default parameters in a debug build, minutes. Dropping the pool
        // must not wait for that.
        let poller = Arc::new(Poller::new().unwrap());
        let verifier = Verifier::start(1, 1, None, poller.clone()).unwrap();
        verifier.submit(
            ticket(1),
            PeerKey::UNSPECIFIED,
            hash("right"),
            "right".parse().unwrap(),
        );
        let mut events = polling::Events::new();
        while verifier.verdicts().next().is_none() {
            poller
                .wait(&mut events, Some(Duration::from_secs(10)))
                .unwrap();
        }
        drop(verifier);
    }

    /// A hash with the smallest parameters: quick to check in a debug build.
    fn cheap_hash(password: &str) -> HashedPassword {
        let salt = SaltString::encode_b64(b"another salt 123").unwrap();
        let params = Params::new(8, 1, 1, None).unwrap();
        let phc = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string();
        HashedPassword::new(&phc).unwrap()
    }

    #[test]
    fn reused_memory_checks_hashes_of_any_parameters() {
        let small = cheap_hash("tiny");
        let mut memory = Memory::default();
        for _ in 0..2 {
            assert!(memory.verify(&hash("right"), &"right".parse().unwrap()));
            assert!(!memory.verify(&hash("right"), &"wrong".parse().unwrap()));
            assert!(memory.verify(&small, &"tiny".parse().unwrap()));
            assert!(!memory.verify(&small, &"right".parse().unwrap()));
        }
        let bcrypt = HashedPassword::new("$2b$12$abcdefghijklmnopqrstuv").unwrap();
        assert!(!memory.verify(&bcrypt, &"x".parse().unwrap()));
    }

    fn ticket(n: u64) -> VerifyTicket {
        VerifyTicket::from_raw(n)
    }
}
