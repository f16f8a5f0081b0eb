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
//! else wants, and the component's next statements are refused while
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
//! memory, within the heap limit of `sandbox.rs`; a read connection, or in
//! `execute` and transactions its component's write connection, so that
//! component's writes wait (the others' do not). Where the OS has no
//! `SCHED_IDLE` (not Linux), a statement runs on at full priority.

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
/// wait before its new statements are refused. Only SQL written to outrun
/// its interrupt gets here, so there is no need to allow many: 2 bounds
/// what a component holds this way at 2 threads and their memory, and the
/// refusal tells it why.
pub const MAX_OVERRUNS: usize = 2;

/// How long a thread with nothing to run stays for the next call, as
/// tokio's blocking pool does: starting a thread costs tens of
/// microseconds, a parked one nothing but its stack.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// One database's statements that run on past their caller's wait, lowered.
#[derive(Clone, Default)]
pub struct Overruns(Arc<AtomicUsize>);

/// Runs `job` on a statement thread, unless `overruns` holds
/// [`MAX_OVERRUNS`] already. If the returned future is dropped while `job`
/// runs, `stop` is called, and [`GRACE`] later the thread is lowered if
/// `job` still runs; if dropped before `job` started, `job` never runs. A
/// result is only handed back once `job` is marked done, so `stop` never
/// reaches what runs after it on the same connection.
pub async fn run<R: Send + 'static>(
    overruns: &Overruns,
    job: impl FnOnce() -> R + Send + 'static,
    stop: impl FnOnce() + Send + 'static,
) -> Result<R, Error> {
    let running = overruns.0.load(Ordering::Relaxed);
    if running >= MAX_OVERRUNS {
        return Err(Error::Unavailable(format!(
            "{running} statements of this database are still running long after their \
             callers stopped waiting (SQL that outran its deadline); new ones run once they end"
        )));
    }
    let call = Arc::new(Call {
        state: Mutex::new(State::Queued),
        overruns: overruns.clone(),
    });
    let (answer, answered) = oneshot::channel();
    let on_thread = call.clone();
    POOL.spawn(Box::new(move || {
        if !on_thread.start() {
            return Fate::Serve;
        }
        // A job that panicked has no answer; its caller gets an error.
        let result = panic::catch_unwind(AssertUnwindSafe(job));
        let fate = on_thread.finish();
        if let Ok(result) = result {
            let _ = answer.send(result);
        }
        fate
    }))?;
    let waiting = Waiting {
        call,
        stop: Some(Box::new(stop)),
    };
    let result = answered.await;
    drop(waiting);
    result.map_err(|_| Error::Unavailable("a storage thread ended without an answer".into()))
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

type Job = Box<dyn FnOnce() -> Fate + Send>;

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
            if job() == Fate::End {
                return;
            }
            self.idle.lock().unwrap().push(Idle {
                id,
                jobs: sender.clone(),
            });
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
    use super::*;

    /// The scheduling policy of a thread of this process (`SCHED_*`).
    fn policy(tid: i32) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // The 41st field; the fields after the command start at the 3rd.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        fields[41 - 3].parse().unwrap()
    }

    /// A job that says which thread it runs on and then waits to be let go.
    fn held() -> (
        impl FnOnce() -> i32 + Send + 'static,
        mpsc::Receiver<i32>,
        mpsc::Sender<()>,
    ) {
        let (started, tid) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let job = move || {
            // SAFETY: gettid only reads the calling thread's id.
            let me = unsafe { libc::gettid() };
            started.send(me).unwrap();
            let _ = released.recv();
            me
        };
        (job, tid, release)
    }

    #[tokio::test]
    async fn a_job_answers_and_its_thread_serves_the_next() {
        let overruns = Overruns::default();
        let mut threads = std::collections::HashSet::new();
        for _ in 0..20 {
            // SAFETY: gettid only reads the calling thread's id.
            let tid = run(&overruns, || unsafe { libc::gettid() }, || {}).await;
            threads.insert(tid.unwrap());
        }
        // Other tests share the pool, and may take the idle thread between
        // two of these calls; they do not make a thread a call.
        assert!(
            threads.len() < 10,
            "20 calls took {} threads",
            threads.len()
        );
        for tid in threads {
            assert_eq!(policy(tid), libc::SCHED_OTHER);
        }
    }

    // Multi-threaded: the test blocks on its jobs while its calls run.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_job_its_caller_left_is_stopped_then_lowered() {
        let overruns = Overruns::default();
        let (job, tid, release) = held();
        let (stopped, was_stopped) = mpsc::channel();
        let call = tokio::spawn({
            let overruns = overruns.clone();
            async move { run(&overruns, job, move || stopped.send(()).unwrap()).await }
        });
        let tid = tid.recv().unwrap();
        call.abort();
        let _ = call.await;
        was_stopped.recv().unwrap();
        assert_eq!(policy(tid), libc::SCHED_OTHER, "lowered within its grace");
        tokio::time::sleep(GRACE * 3).await;
        assert_eq!(policy(tid), libc::SCHED_IDLE);
        assert_eq!(overruns.0.load(Ordering::Relaxed), 1);

        release.send(()).unwrap();
        let ended = format!("/proc/self/task/{tid}");
        for _ in 0..100 {
            if !std::path::Path::new(&ended).exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !std::path::Path::new(&ended).exists(),
            "a lowered thread ends"
        );
        assert_eq!(overruns.0.load(Ordering::Relaxed), 0);
    }

    // Multi-threaded: the test blocks on its jobs while its calls run.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_database_with_statements_running_on_is_refused_until_they_end() {
        let overruns = Overruns::default();
        let mut releases = Vec::new();
        for _ in 0..MAX_OVERRUNS {
            let (job, tid, release) = held();
            let call = tokio::spawn({
                let overruns = overruns.clone();
                async move { run(&overruns, job, || {}).await }
            });
            tid.recv().unwrap();
            call.abort();
            releases.push(release);
        }
        tokio::time::sleep(GRACE * 3).await;
        let refused = run(&overruns, || (), || {}).await.unwrap_err();
        assert!(
            refused.to_string().contains("still running long after"),
            "{refused}"
        );
        assert!(
            run(&Overruns::default(), || (), || {}).await.is_ok(),
            "others run"
        );
        for release in releases {
            release.send(()).unwrap();
        }
        for _ in 0..100 {
            if run(&overruns, || (), || {}).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("still refused once its statements ended");
    }

    #[tokio::test]
    async fn a_job_that_panics_is_an_error() {
        let failed = run(&Overruns::default(), || panic!("boom"), || {}).await;
        assert!(failed.is_err());
    }
}
