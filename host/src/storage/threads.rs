//! The threads component SQL runs on, and what becomes of one whose caller
//! stopped waiting.
//!
//! A caller that stops waiting interrupts its statement, which SQLite looks
//! at where its VM jumps back (a loop), the allocator at a large allocation
//! (`allocator.rs`) and the replaced functions at every step
//! (`functions.rs`). A statement with none of these, many terms that each
//! walk a large value without allocating (`v + 0` on 8 MB of digits is
//! 26 ms a term, and 1 MiB of SQL holds thousands of terms), runs on to its
//! end, minutes later. Nothing inside SQLite can stop it, and a thread
//! cannot be killed. What the host can choose is who pays: 100 ms
//! ([`GRACE`]) after its caller stopped waiting, a statement still running
//! has its thread lowered to `SCHED_IDLE`, so it runs on only on CPU no one
//! else wants, and from then on every SQLite allocation on that thread
//! fails (`allocator.rs`), ending it at its next one. That keeps it from
//! SQLite's process-wide locks (the allocator's, the shared page cache's)
//! as far as the host can: a thread preempted at idle priority while it
//! holds one stalls every connection until it runs again. It still takes
//! them for the one allocation that fails and for the frees of its
//! unwinding; the connection it leaves is closed on tokio's blocking pool,
//! not on the lowered thread. The component's statements are refused while
//! [`MAX_OVERRUNS`] of its own run on like that. The grace keeps the
//! lowering from statements that stop at their interrupt anyway: lowered
//! while it unwinds a transaction, a writer would keep its component's
//! write connection for as long as the host stays busy.
//!
//! An unprivileged thread cannot raise itself back from `SCHED_IDLE`, so a
//! lowered thread ends when its statement does instead of serving the next
//! call. That is why these are threads of their own and not tokio's
//! blocking pool, whose threads go on to serve everyone else. Otherwise
//! they are a pool like it: a call takes the thread idle the shortest time,
//! or starts one, and a thread idle for [`KEEP_ALIVE`] ends.
//!
//! What a statement running on holds meanwhile, besides idle CPU: its
//! memory, within the heap limit of `sandbox.rs`; a read connection and
//! one of its database's few query slots (`sqlite.rs`), or in `execute`
//! and transactions its component's write connection, so that component's
//! queries or writes wait (the others' do not). The slots bound how many
//! one component can have running on, however many requests it starts at
//! once. Idle CPU is not free everywhere: under a CPU quota (a cgroup's
//! `cpu.max`, a container's CPU limit) it counts against the host's
//! quota like any other. Where the OS has no `SCHED_IDLE` (not Linux), a
//! statement runs on at full priority.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::Error;

/// How long after its caller stopped waiting a statement may still run at
/// full priority. Statements stopped by their interrupt end within
/// microseconds, or a few milliseconds when they roll a transaction back;
/// 100 ms is far above that and still a small share of a core per call.
pub const GRACE: Duration = Duration::from_millis(100);

/// How many of one database's statements may run on past their caller's
/// wait before its component's new statements are refused, with an error
/// that says why. Only SQL written to outrun its interrupt gets here, so
/// one is enough. And no fewer would do: a query running on keeps its read
/// snapshot, so SQLite cannot restart its WAL, and writes beside it would
/// grow that file past the database's size limit for as long as it runs.
/// Statements already started when the count is reached may still join
/// it, up to the database's query slots and its one writer.
pub const MAX_OVERRUNS: usize = 1;

/// How long a thread with nothing to run stays for the next call, as
/// tokio's blocking pool does: starting a thread costs tens of
/// microseconds, a parked one nothing but its stack.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// One database's statements that run on past their caller's wait, lowered.
#[derive(Clone, Default)]
pub struct Overruns(Arc<AtomicUsize>);

impl Overruns {
    /// Refuses component SQL while [`MAX_OVERRUNS`] of the database's
    /// statements run on. The host's own statements (its outbox, a
    /// deploy's migrations) are not asked, so they go on.
    pub fn admit(&self) -> Result<(), Error> {
        let running = self.0.load(Ordering::Relaxed);
        if running >= MAX_OVERRUNS {
            return Err(Error::Unavailable(format!(
                "{running} statements of this database are still running long after their \
                 callers stopped waiting (SQL that outran its deadline); new ones run once they end"
            )));
        }
        Ok(())
    }
}

/// What becomes of a call whose caller stopped waiting while it ran: `stop`
/// at once, `lowered` once [`GRACE`] later it still runs and its thread is
/// lowered.
pub struct OnAbandon {
    pub stop: Box<dyn FnOnce() + Send>,
    pub lowered: Box<dyn FnOnce() + Send>,
}

/// Runs `job` on a storage thread, counting it in `overruns` if it runs on
/// past its caller's wait. If the returned future is dropped while `job`
/// runs, `on_abandon` says what follows; if dropped before `job` started,
/// `job` never runs. A result is only handed back once `job` is marked
/// done, so `stop` never reaches what runs after it on the same connection.
/// A `job` that panics must hand back nothing of its own: it ends as an
/// error, and what it captured is dropped while it still counts as running.
pub async fn run<R: Send + 'static>(
    overruns: &Overruns,
    job: impl FnOnce() -> R + Send + 'static,
    on_abandon: OnAbandon,
) -> Result<R, Error> {
    let call = Arc::new(Call {
        state: Mutex::new(State::Queued),
        overruns: overruns.clone(),
        lowered: Mutex::new(Some(on_abandon.lowered)),
    });
    let (answer, answered) = oneshot::channel();
    let on_thread = call.clone();
    let runtime = tokio::runtime::Handle::current();
    POOL.spawn(Box::new(move |idle: &dyn Fn()| {
        if !on_thread.start() {
            return Fate::Serve;
        }
        let result = panic::catch_unwind(AssertUnwindSafe(job));
        let fate = on_thread.finish();
        if fate == Fate::Serve {
            // Before the answer, so that the caller's next call finds this
            // thread idle rather than starting another.
            idle();
        }
        if let Ok(result) = result {
            if let Err(unheard) = answer.send(result) {
                if fate == Fate::End {
                    // Dropping it may close a connection, which takes
                    // SQLite's shared locks: not at idle priority.
                    runtime.spawn_blocking(move || drop(unheard));
                }
            }
        }
        fate
    }))?;
    let waiting = Waiting {
        call,
        stop: Some(on_abandon.stop),
    };
    let result = answered.await;
    drop(waiting);
    result.map_err(|_| failed())
}

/// The error of a call that panicked (the panic is in the host's log).
pub fn failed() -> Error {
    Error::Unavailable("a storage call failed; see the host's log".into())
}

/// The caller's side of a call: dropping it before the answer stops the job.
struct Waiting {
    call: Arc<Call>,
    stop: Option<Box<dyn FnOnce() + Send>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut state = self.call.state.lock().unwrap();
        match *state {
            State::Queued => *state = State::Cancelled,
            State::Running { .. } => {
                if let Some(stop) = self.stop.take() {
                    stop();
                }
                drop(state);
                // Outside an async context (the runtime shutting down) the
                // statement is left as it is: the process ends with it.
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let call = self.call.clone();
                    runtime.spawn(async move {
                        tokio::time::sleep(GRACE).await;
                        call.lower();
                    });
                }
            }
            State::Cancelled | State::Lowered | State::Done => {}
        }
    }
}

struct Call {
    state: Mutex<State>,
    overruns: Overruns,
    lowered: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

enum State {
    Queued,
    /// Its caller stopped waiting before a thread took it.
    Cancelled,
    Running {
        thread: Thread,
    },
    /// Running on past its caller's wait, at idle priority.
    Lowered,
    Done,
}

impl Call {
    /// Marks the job running on this thread; false if it was cancelled.
    fn start(&self) -> bool {
        let mut state = self.state.lock().unwrap();
        if matches!(*state, State::Cancelled) {
            return false;
        }
        *state = State::Running {
            thread: Thread::current(),
        };
        true
    }

    /// Marks the job done, and says whether its thread may serve again.
    fn finish(&self) -> Fate {
        let mut state = self.state.lock().unwrap();
        let lowered = matches!(*state, State::Lowered);
        *state = State::Done;
        if lowered {
            self.overruns.0.fetch_sub(1, Ordering::Relaxed);
            Fate::End
        } else {
            Fate::Serve
        }
    }

    /// Lowers the job's thread if the job still runs.
    fn lower(&self) {
        let mut state = self.state.lock().unwrap();
        if let State::Running { thread } = *state {
            // Counted even where the thread cannot be lowered: the
            // refusal still bounds how many run on.
            self.overruns.0.fetch_add(1, Ordering::Relaxed);
            *state = State::Lowered;
            // Before the thread slows down, so that it does not take
            // another lock at idle priority first.
            if let Some(lowered) = self.lowered.lock().unwrap().take() {
                lowered();
            }
            thread.lower();
            tracing::warn!(
                grace = ?GRACE,
                "a statement runs on past its caller's deadline; its thread now gets only idle CPU"
            );
        }
    }
}

/// What a thread does after a job.
#[derive(PartialEq)]
enum Fate {
    Serve,
    /// It was lowered and cannot be raised again.
    End,
}

/// An OS thread, as the scheduler knows it.
#[derive(Clone, Copy)]
struct Thread {
    #[cfg(target_os = "linux")]
    tid: libc::pid_t,
}

impl Thread {
    fn current() -> Thread {
        Thread {
            // SAFETY: gettid only reads the calling thread's id.
            #[cfg(target_os = "linux")]
            tid: unsafe { libc::gettid() },
        }
    }

    /// Gives the thread only the CPU no other thread wants. Called while it
    /// runs a job, so the thread (and its id) is alive.
    fn lower(self) {
        #[cfg(target_os = "linux")]
        {
            let idle = libc::sched_param { sched_priority: 0 };
            // SAFETY: sets the policy of a live thread of this process, which
            // any thread may lower without privilege.
            if unsafe { libc::sched_setscheduler(self.tid, libc::SCHED_IDLE, &idle) } != 0 {
                tracing::error!(
                    error = %std::io::Error::last_os_error(),
                    "cannot lower the priority of a statement past its deadline"
                );
            }
        }
    }
}

/// A job is given how to put its thread on the idle list, which it does
/// before it answers if the thread is to serve again.
type Job = Box<dyn FnOnce(&dyn Fn()) -> Fate + Send>;

static POOL: Pool = Pool {
    idle: Mutex::new(Vec::new()),
    next: AtomicU64::new(0),
};

struct Pool {
    /// The threads waiting for a job, the most recently idle last.
    idle: Mutex<Vec<Idle>>,
    next: AtomicU64,
}

struct Idle {
    id: u64,
    jobs: mpsc::Sender<Job>,
}

impl Pool {
    fn spawn(&'static self, job: Job) -> Result<(), Error> {
        let idle = self.idle.lock().unwrap().pop();
        if let Some(idle) = idle {
            // Its thread waits on the channel until it is taken from `idle`.
            let _ = idle.jobs.send(job);
            return Ok(());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        std::thread::Builder::new()
            .name("agora-storage".into())
            .spawn(move || self.work(id, job))
            .map(|_| ())
            .map_err(|e| Error::Unavailable(format!("cannot start a storage thread: {e}")))
    }

    fn work(&self, id: u64, mut job: Job) {
        let (sender, jobs) = mpsc::channel();
        loop {
            let listed = Cell::new(false);
            let idle = || {
                if !listed.replace(true) {
                    self.idle.lock().unwrap().push(Idle {
                        id,
                        jobs: sender.clone(),
                    });
                }
            };
            if job(&idle) == Fate::End {
                return;
            }
            idle();
            job = match jobs.recv_timeout(KEEP_ALIVE) {
                Ok(next) => next,
                Err(_) => {
                    let mut idle = self.idle.lock().unwrap();
                    if let Some(at) = idle.iter().position(|i| i.id == id) {
                        idle.remove(at);
                        return;
                    }
                    drop(idle);
                    // Taken just now: its job is on the way.
                    let Ok(next) = jobs.recv() else { return };
                    next
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// The scheduling policy of a thread of this process (`SCHED_*`).
    fn policy(tid: i32) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // The 41st field; the fields after the command start at the 3rd.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        fields[41 - 3].parse().unwrap()
    }

    fn tid() -> i32 {
        // SAFETY: gettid only reads the calling thread's id.
        unsafe { libc::gettid() }
    }

    fn unheeded() -> OnAbandon {
        OnAbandon {
            stop: Box::new(|| {}),
            lowered: Box::new(|| {}),
        }
    }

    /// Polls `done` for up to 10 s: a lowered thread may wait long for CPU
    /// on a busy machine.
    async fn within_10s(mut done: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// A job that says which thread it runs on and then waits to be let go.
    fn held() -> (
        impl FnOnce() -> i32 + Send + 'static,
        mpsc::Receiver<i32>,
        mpsc::Sender<()>,
    ) {
        let (started, running_on) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let job = move || {
            started.send(tid()).unwrap();
            let _ = released.recv();
            tid()
        };
        (job, running_on, release)
    }

    #[tokio::test]
    async fn a_job_answers_and_its_thread_serves_the_next() {
        let overruns = Overruns::default();
        let mut threads = std::collections::HashSet::new();
        for _ in 0..20 {
            let job = || (tid(), policy(tid()));
            let (tid, policy) = run(&overruns, job, unheeded()).await.unwrap();
            assert_eq!(policy, libc::SCHED_OTHER);
            threads.insert(tid);
        }
        // Other tests share the pool, and may take the idle thread between
        // two of these calls; they do not make a thread a call.
        assert!(
            threads.len() < 10,
            "20 calls took {} threads",
            threads.len()
        );
    }

    // Multi-threaded: the test blocks on its jobs while its calls run.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_job_its_caller_left_is_stopped_then_lowered() {
        let overruns = Overruns::default();
        let (job, running_on, release) = held();
        let (stopped, was_stopped) = mpsc::channel();
        let (lowered, was_lowered) = mpsc::channel();
        let on_abandon = OnAbandon {
            stop: Box::new(move || stopped.send(()).unwrap()),
            lowered: Box::new(move || lowered.send(()).unwrap()),
        };
        let call = tokio::spawn({
            let overruns = overruns.clone();
            async move { run(&overruns, job, on_abandon).await }
        });
        let tid = running_on.recv().unwrap();
        call.abort();
        let _ = call.await;
        was_stopped.recv().unwrap();
        was_lowered.recv_timeout(Duration::from_secs(10)).unwrap();
        // Told just before the thread is lowered.
        assert!(within_10s(|| policy(tid) == libc::SCHED_IDLE).await);
        assert_eq!(overruns.0.load(Ordering::Relaxed), 1);

        release.send(()).unwrap();
        let task = format!("/proc/self/task/{tid}");
        let ended = within_10s(|| !std::path::Path::new(&task).exists()).await;
        assert!(ended, "a lowered thread ends with its job");
        assert_eq!(overruns.0.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_database_with_statements_running_on_is_refused_until_they_end() {
        let overruns = Overruns::default();
        let mut releases = Vec::new();
        for _ in 0..MAX_OVERRUNS {
            let (job, running_on, release) = held();
            let call = tokio::spawn({
                let overruns = overruns.clone();
                async move { run(&overruns, job, unheeded()).await }
            });
            running_on.recv().unwrap();
            call.abort();
            releases.push(release);
        }
        let lowered = within_10s(|| overruns.0.load(Ordering::Relaxed) == MAX_OVERRUNS).await;
        assert!(lowered);
        let refused = overruns.admit().unwrap_err();
        assert!(
            refused.to_string().contains("still running long after"),
            "{refused}"
        );
        assert!(Overruns::default().admit().is_ok(), "others run");
        for release in releases {
            release.send(()).unwrap();
        }
        assert!(within_10s(|| overruns.admit().is_ok()).await);
    }

    #[tokio::test]
    async fn a_job_that_panics_is_an_error() {
        let failed = run(&Overruns::default(), || panic!("boom"), unheeded()).await;
        assert!(failed.is_err());
    }
}
