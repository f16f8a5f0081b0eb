//! SQLite's allocator, wrapped so that an abandoned statement stops at its
//! next large allocation, not only at the bottom of a loop.
//!
//! A deadline reaches a statement through `sqlite3_interrupt`, which the
//! VM looks at only where it jumps back (the bottom of a loop). A statement
//! without a loop (one row of many terms) never jumps back, so it ran its
//! whole text after its deadline: 2,000 terms of
//! `octet_length(randomblob(8e6))` are half a minute of a core, holding a
//! blocking thread and the component's write connection. Almost every term
//! whose work grows with its input allocates its result (`randomblob`,
//! `upper`, `||`, `printf`, `hex`, a JSON parse), so this wrapper makes
//! each allocation a checkpoint: once the caller of the component SQL a
//! thread runs has stopped waiting (and interrupted it), an allocation of
//! [`CHECKED_FROM`] bytes or more on that thread fails, and SQLite ends the
//! statement with SQLITE_NOMEM, as it would on an exhausted heap. No one
//! reads that error. Once the statement has also outrun its grace and its
//! thread is lowered (`threads.rs`), every allocation on it fails, so that
//! a thread at idle priority takes SQLite's process-wide locks as seldom
//! as possible.
//!
//! Why a failed allocation is safe: SQLite handles a failed allocation
//! anywhere (its test suite fails every allocation in turn), rolling the
//! statement or its transaction back, and the pager's own allocations are
//! below the threshold, so a rollback gets the pages it reads back. Once
//! the thread is lowered those fail too, and the statement may end with its
//! savepoint or transaction still open: the write connection's next user
//! rolls that back (`roll_back_abandoned` in `sqlite.rs`), and a read
//! connection whose caller is gone is closed, never reused. The
//! host's own connections (the message log, the coordination offsets)
//! never mark a thread, so nothing of theirs fails. One refusal costs the
//! others a little: SQLite answers a failed allocation by releasing that
//! much of the shared page cache before it gives up.
//!
//! What it does not catch: terms that work on a large value without
//! allocating, such as comparing, turning text into a number or a JSON
//! lookup in a blob (the replaced functions of `functions.rs` look at the
//! interrupt themselves). `v + 0` on 8 MB of digits costs 26 ms a term, and
//! 1 MiB of SQL holds 100,000 terms: many minutes. Only SQLite looking at
//! the interrupt at every instruction (a patched build) or component SQL in
//! a process the host can kill would stop those; instead their thread is
//! lowered to idle priority (`threads.rs`). This wrapper takes the terms
//! that allocate, which the first attacks used, at no cost to statements
//! that finish, so that what is left to run on idle CPU is rare.
//!
//! The wrapper must be in place before SQLite initializes, which the first
//! connection of the process does, so [`install`] runs before any
//! connection is opened (`sandbox::prepare_sqlite`).

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use rusqlite::ffi;

/// Allocations from this size up fail once the caller has stopped waiting.
/// 16 KiB: above every allocation of the pager's own (a page and its
/// header, just over 4 KiB; the WAL's checksum buffer; the page cache's
/// hash table), which a statement's rollback may need and so never fail;
/// while a term below it costs tens of microseconds, so even 50,000 of them
/// (its 1 MiB of SQL) end within a second or two.
const CHECKED_FROM: c_int = 16 << 10;

type Malloc = unsafe extern "C" fn(c_int) -> *mut c_void;
type Realloc = unsafe extern "C" fn(*mut c_void, c_int) -> *mut c_void;

/// SQLite's own `xMalloc` and `xRealloc`, which the wrapper calls.
static SQLITE_ALLOCATOR: OnceLock<(Malloc, Realloc)> = OnceLock::new();

/// Where the call a thread runs stands, in [`Running`]'s flag.
pub const WAITED_FOR: u8 = 0;
/// Its caller stopped waiting: large allocations fail.
pub const ABANDONED: u8 = 1;
/// It outran its grace and runs at idle priority: every allocation fails.
pub const LOWERED: u8 = 2;

thread_local! {
    /// Where the call of component SQL this thread runs stands; null while
    /// it runs none.
    static CALL: Cell<*const AtomicU8> = const { Cell::new(std::ptr::null()) };
}

/// Wraps SQLite's allocator; false if SQLite had initialized already (then
/// only loops stop at an interrupt).
pub fn install() -> bool {
    let mut own = ffi::sqlite3_mem_methods {
        xMalloc: None,
        xFree: None,
        xRealloc: None,
        xSize: None,
        xRoundup: None,
        xInit: None,
        xShutdown: None,
        pAppData: std::ptr::null_mut(),
    };
    // SAFETY: GETMALLOC fills the struct it is given; MALLOC copies the
    // struct it is given, and both are refused (SQLITE_MISUSE) once SQLite
    // has initialized, when its allocator can no longer change.
    unsafe {
        if ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETMALLOC, &mut own) != ffi::SQLITE_OK {
            return false;
        }
        let (Some(malloc_of_sqlite), Some(realloc_of_sqlite)) = (own.xMalloc, own.xRealloc) else {
            return false;
        };
        let _ = SQLITE_ALLOCATOR.set((malloc_of_sqlite, realloc_of_sqlite));
        let wrapped = ffi::sqlite3_mem_methods {
            xMalloc: Some(malloc),
            xRealloc: Some(realloc),
            ..own
        };
        ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &wrapped) == ffi::SQLITE_OK
    }
}

/// Marks the calling thread as running component SQL for a caller who
/// moves `call` on from [`WAITED_FOR`] when it stops waiting, until
/// dropped. The flag is the call's own, not the connection's: SQLite
/// leaves a connection's interrupt flag set after the statement it
/// stopped, until the next one runs, and the next user's SQL text and
/// parameters are copied before that.
pub struct Running {
    /// Keeps alive the flag the thread-local points to.
    _flag: Arc<AtomicU8>,
}

impl Running {
    pub fn on(call: Arc<AtomicU8>) -> Running {
        CALL.set(Arc::as_ptr(&call));
        Running { _flag: call }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        CALL.set(std::ptr::null());
    }
}

/// Whether an allocation of `size` bytes fails: the thread's caller has
/// stopped waiting, and it is large or the thread was lowered.
fn refused(size: c_int) -> bool {
    let call = CALL.get();
    if call.is_null() {
        return false;
    }
    // SAFETY: a set pointer is the `Running` guard's, alive while set.
    match unsafe { (*call).load(Ordering::Relaxed) } {
        WAITED_FOR => false,
        ABANDONED => size >= CHECKED_FROM,
        _ => true,
    }
}

unsafe extern "C" fn malloc(size: c_int) -> *mut c_void {
    match SQLITE_ALLOCATOR.get() {
        Some((malloc, _)) if !refused(size) => malloc(size),
        _ => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn realloc(old: *mut c_void, size: c_int) -> *mut c_void {
    match SQLITE_ALLOCATOR.get() {
        Some((_, realloc)) if !refused(size) => realloc(old, size),
        _ => std::ptr::null_mut(),
    }
}
