//! SQL functions the sandbox puts in place of SQLite's own, so that a
//! component's statement stops at its deadline however it spends its time.
//!
//! The deadline reaches a statement through `sqlite3_interrupt`, which
//! SQLite's VM looks at only at the bottom of a loop, never inside one
//! instruction. A few built-ins do work quadratic in their arguments in a
//! single instruction: `instr` and `replace` compare the needle at every
//! offset, `trim(x, set)` and its `ltrim`/`rtrim` compare every character
//! with every member of the set, and `LIKE`/`GLOB` retry the rest of the
//! pattern at every offset after a wildcard. With the 8 MiB values the
//! sandbox allows, one call ran for minutes (measured with SQLite's own:
//! `x LIKE '%' || y || 'b%'` on 400,000 and 40,000 characters took 38 s),
//! holding a core, a blocking thread and, in `execute`, the component's
//! write connection, all past the deadline.
//!
//! Each replacement here gives the same answer as the built-in, quirks
//! included (the tests compare them on random input): `instr` and
//! `replace` search with `memchr`'s linear-time `memmem`, `trim` looks its
//! set up in a hash map, and `LIKE`/`GLOB` keep SQLite's matching rules
//! and order but look at `sqlite3_is_interrupted` as they go, so the
//! deadline stops them within a few milliseconds. The alternative of
//! lowering SQLite's limits (pattern length, value size) would have cut
//! the worst case without removing it, and cut what honest components may
//! store.
//!
//! Each also looks at the interrupt when it is called, so that a statement
//! without a loop, where the VM never looks (one row of thousands of
//! terms), stops at its next call of one of them. `substr` is replaced for
//! that alone: it walks its text to the start it is given and allocates
//! nothing of that size, so the allocator's check (`allocator.rs`) would
//! not stop it. `length` stays SQLite's, whose `length(blob)` reads no
//! content; it is one of the terms still open (see the README).
//!
//! What this costs: SQLite rewrites `col LIKE 'abc%'` into an index range
//! only for its own `like`, so such a query scans instead. The shop's
//! searches are `LIKE '%term%'`, which no index serves anyway.
//!
//! The functions run inside SQLite, called from C: a panic there would
//! abort the host, so each body runs under `catch_unwind` and a panic
//! fails only the statement.

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use memchr::memmem;
use rusqlite::ffi;
use rusqlite::Connection;

/// Registers the replacements on `conn`, where they take precedence over
/// the built-ins of the same name and number of arguments. `trim(x)` with
/// no set is linear and stays SQLite's.
pub fn install(conn: &Connection) -> rusqlite::Result<()> {
    type Body =
        unsafe extern "C" fn(*mut ffi::sqlite3_context, c_int, *mut *mut ffi::sqlite3_value);
    let functions: [(&CStr, c_int, Body, *const c_void); 12] = [
        (c"substr", 2, substr, std::ptr::null()),
        (c"substr", 3, substr, std::ptr::null()),
        (c"substring", 2, substr, std::ptr::null()),
        (c"substring", 3, substr, std::ptr::null()),
        (c"instr", 2, instr, std::ptr::null()),
        (c"replace", 3, replace, std::ptr::null()),
        (c"ltrim", 2, trim, &TRIM_LEFT as *const Trim as _),
        (c"rtrim", 2, trim, &TRIM_RIGHT as *const Trim as _),
        (c"trim", 2, trim, &TRIM_BOTH as *const Trim as _),
        (c"like", 2, like, &LIKE as *const Rules as _),
        (c"like", 3, like, &LIKE as *const Rules as _),
        (c"glob", 2, like, &GLOB as *const Rules as _),
    ];
    for (name, args, body, data) in functions {
        // SAFETY: the handle is open for the call; `data` points to a
        // static that outlives every connection, and is only read.
        let rc = unsafe {
            ffi::sqlite3_create_function_v2(
                conn.handle(),
                name.as_ptr(),
                args,
                ffi::SQLITE_UTF8 | ffi::SQLITE_DETERMINISTIC | ffi::SQLITE_INNOCUOUS,
                data as *mut c_void,
                Some(body),
                None,
                None,
                None,
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(rusqlite::Error::SqliteFailure(
                ffi::Error::new(rc),
                Some(format!("replacing SQLite's {}", name.to_string_lossy())),
            ));
        }
    }
    Ok(())
}

/// The statement was interrupted (its deadline passed) while a function ran.
struct Interrupted;

/// How a function ended, for [`call`] to hand to SQLite.
enum Outcome {
    Null,
    Int(i64),
    /// Text borrowed from an argument, which SQLite copies.
    Text(*const u8, usize),
    /// Text in memory from `sqlite3_malloc64`, which SQLite takes.
    Owned(*mut u8, usize),
    /// A blob borrowed from an argument, which SQLite copies.
    Blob(*const u8, usize),
    Error(&'static CStr),
    TooBig,
    NoMemory,
}

/// How much work a function does between two looks at the interrupt
/// flag: about a millisecond of it, so the flag costs nothing measurable.
const WORK_BETWEEN_CHECKS: usize = 1 << 16;

/// Counts a function's work and looks at the interrupt flag every
/// [`WORK_BETWEEN_CHECKS`] units of it.
struct Budget {
    db: *mut ffi::sqlite3,
    spent: usize,
}

impl Budget {
    fn spend(&mut self, work: usize) -> Result<(), Interrupted> {
        self.spent += work;
        if self.spent < WORK_BETWEEN_CHECKS {
            return Ok(());
        }
        self.spent = 0;
        // SAFETY: the handle is the one calling this function.
        if unsafe { ffi::sqlite3_is_interrupted(self.db) } != 0 {
            return Err(Interrupted);
        }
        Ok(())
    }

    /// [`read_char`], charged by the bytes it read: one malformed
    /// character can run on for megabytes of continuation bytes.
    fn read(&mut self, s: &[u8], at: &mut usize) -> Result<u32, Interrupted> {
        let start = *at;
        let c = read_char(s, at);
        self.spend(1 + *at - start)?;
        Ok(c)
    }

    /// [`skip_char`], charged by the bytes it stepped over.
    fn skip(&mut self, s: &[u8], at: &mut usize) -> Result<(), Interrupted> {
        let start = *at;
        skip_char(s, at);
        self.spend(*at - start)
    }
}

/// The arguments of one call.
struct Args {
    ctx: *mut ffi::sqlite3_context,
    argv: *mut *mut ffi::sqlite3_value,
}

impl Args {
    fn value(&self, i: usize) -> *mut ffi::sqlite3_value {
        // SAFETY: SQLite calls each function with the number of arguments
        // it was registered with, and callers ask only for those.
        unsafe { *self.argv.add(i) }
    }

    fn is_null(&self, i: usize) -> bool {
        // SAFETY: a valid argument.
        unsafe { ffi::sqlite3_value_type(self.value(i)) == ffi::SQLITE_NULL }
    }

    fn is_blob(&self, i: usize) -> bool {
        // SAFETY: a valid argument.
        unsafe { ffi::sqlite3_value_type(self.value(i)) == ffi::SQLITE_BLOB }
    }

    /// Argument `i` as text, converted as SQLite converts it (a number to
    /// its text, a blob's bytes as they are); `None` for NULL.
    fn text(&self, i: usize) -> Option<&[u8]> {
        // SAFETY: a valid argument.
        unsafe { text_of(self.value(i)) }
    }

    fn blob(&self, i: usize) -> &[u8] {
        // SAFETY: a valid argument; the pointer stays valid until the
        // argument is converted, which no caller does after this.
        unsafe {
            let value = self.value(i);
            let bytes = ffi::sqlite3_value_blob(value);
            let len = ffi::sqlite3_value_bytes(value) as usize;
            if bytes.is_null() {
                &[]
            } else {
                std::slice::from_raw_parts(bytes.cast(), len)
            }
        }
    }

    fn budget(&self) -> Budget {
        Budget {
            // SAFETY: the context of the current call.
            db: unsafe { ffi::sqlite3_context_db_handle(self.ctx) },
            spent: 0,
        }
    }

    fn limit(&self, limit: c_int) -> usize {
        // SAFETY: reading a limit (-1 changes nothing).
        unsafe { ffi::sqlite3_limit(ffi::sqlite3_context_db_handle(self.ctx), limit, -1) as usize }
    }

    /// The static the function was registered with.
    fn user_data<T>(&self) -> &'static T {
        // SAFETY: `install` registers each function with a pointer to a
        // static of the type its body reads.
        unsafe { &*(ffi::sqlite3_user_data(self.ctx) as *const T) }
    }
}

/// # Safety
/// `value` is a valid, protected `sqlite3_value`; the slice is valid until
/// the value is next converted or freed.
unsafe fn text_of<'a>(value: *mut ffi::sqlite3_value) -> Option<&'a [u8]> {
    let text = ffi::sqlite3_value_text(value);
    if text.is_null() {
        return None;
    }
    let len = ffi::sqlite3_value_bytes(value) as usize;
    Some(std::slice::from_raw_parts(text, len))
}

/// Runs `body` and hands its outcome to SQLite. An interrupt fails the
/// statement as SQLite's own interrupt does; a panic fails it with the
/// function's name.
///
/// # Safety
/// Called by SQLite with a valid context and arguments.
unsafe fn call(
    ctx: *mut ffi::sqlite3_context,
    argv: *mut *mut ffi::sqlite3_value,
    name: &'static CStr,
    body: impl FnOnce(&Args) -> Result<Outcome, Interrupted>,
) {
    // A statement interrupted between two terms stops at its next call,
    // also where the VM has no loop to look at the interrupt in.
    if ffi::sqlite3_is_interrupted(ffi::sqlite3_context_db_handle(ctx)) != 0 {
        ffi::sqlite3_result_error_code(ctx, ffi::SQLITE_INTERRUPT);
        return;
    }
    let args = Args { ctx, argv };
    let outcome = catch_unwind(AssertUnwindSafe(|| body(&args)));
    match outcome {
        Ok(Ok(Outcome::Null)) => ffi::sqlite3_result_null(ctx),
        Ok(Ok(Outcome::Int(n))) => ffi::sqlite3_result_int64(ctx, n),
        Ok(Ok(Outcome::Text(text, len))) => ffi::sqlite3_result_text64(
            ctx,
            text.cast(),
            len as u64,
            ffi::SQLITE_TRANSIENT(),
            ffi::SQLITE_UTF8 as u8,
        ),
        Ok(Ok(Outcome::Owned(text, len))) => ffi::sqlite3_result_text64(
            ctx,
            text.cast(),
            len as u64,
            Some(ffi::sqlite3_free),
            ffi::SQLITE_UTF8 as u8,
        ),
        Ok(Ok(Outcome::Blob(bytes, len))) => {
            ffi::sqlite3_result_blob64(ctx, bytes.cast(), len as u64, ffi::SQLITE_TRANSIENT())
        }
        Ok(Ok(Outcome::Error(message))) => ffi::sqlite3_result_error(ctx, message.as_ptr(), -1),
        Ok(Ok(Outcome::TooBig)) => ffi::sqlite3_result_error_toobig(ctx),
        Ok(Ok(Outcome::NoMemory)) => ffi::sqlite3_result_error_nomem(ctx),
        Ok(Err(Interrupted)) => ffi::sqlite3_result_error_code(ctx, ffi::SQLITE_INTERRUPT),
        Err(_) => {
            let message = format!(
                "internal error in the host's {}()\0",
                name.to_string_lossy()
            );
            ffi::sqlite3_result_error(ctx, message.as_ptr().cast(), -1);
        }
    }
}

/// Whether `b` continues a UTF-8 character rather than starting one.
fn continues(b: u8) -> bool {
    b & 0xC0 == 0x80
}

/// `substr(x, start[, count])` and `substring`: `count` characters of text
/// (bytes of a blob) from the 1-based `start`, counted from the end when
/// negative, before `start` when `count` is negative. SQLite's rules to
/// the letter, ported from `substrFunc`; replaced so that each call looks
/// at the interrupt as it steps through the text.
unsafe extern "C" fn substr(
    ctx: *mut ffi::sqlite3_context,
    argc: c_int,
    argv: *mut *mut ffi::sqlite3_value,
) {
    call(ctx, argv, c"substr", |args| {
        // SAFETY: valid arguments, of which there are `argc`.
        let kind = |i| unsafe { ffi::sqlite3_value_type(args.value(i)) };
        let int = |i| unsafe { ffi::sqlite3_value_int64(args.value(i)) };
        let mut budget = args.budget();
        let mut start = int(1);
        let (is_blob, x, len) = if kind(0) == ffi::SQLITE_BLOB {
            // SAFETY: a valid argument; SQLite's own answers NULL for an
            // empty blob, whose pointer is null.
            if unsafe { ffi::sqlite3_value_blob(args.value(0)) }.is_null() {
                return Ok(Outcome::Null);
            }
            let blob = args.blob(0);
            (true, blob, blob.len() as i64)
        } else {
            let Some(text) = args.text(0) else {
                return Ok(Outcome::Null);
            };
            let text = &text[..memchr::memchr(0, text).unwrap_or(text.len())];
            let mut len = 0;
            if start < 0 {
                let mut at = 0;
                while at < text.len() {
                    budget.skip(text, &mut at)?;
                    len += 1;
                }
            }
            (false, text, len)
        };
        let mut count = if argc == 3 {
            let count = int(2);
            if count == 0 && kind(2) == ffi::SQLITE_NULL {
                return Ok(Outcome::Null);
            }
            count
        } else {
            args.limit(ffi::SQLITE_LIMIT_LENGTH) as i64
        };
        if start == 0 && kind(1) == ffi::SQLITE_NULL {
            return Ok(Outcome::Null);
        }
        if start < 0 {
            start += len;
            if start < 0 {
                count = if count < 0 { 0 } else { count + start };
                start = 0;
            }
        } else if start > 0 {
            start -= 1;
        } else if count > 0 {
            count -= 1;
        }
        if count < 0 {
            count = if count < -start { start } else { -count };
            start -= count;
        }
        if is_blob {
            let start = start.min(len) as usize;
            let count = count.min(len - start as i64) as usize;
            return Ok(Outcome::Blob(x[start..].as_ptr(), count));
        }
        let mut from = 0;
        while from < x.len() && start > 0 {
            budget.skip(x, &mut from)?;
            start -= 1;
        }
        let mut to = from;
        while to < x.len() && count > 0 {
            budget.skip(x, &mut to)?;
            count -= 1;
        }
        Ok(Outcome::Text(x[from..].as_ptr(), to - from))
    })
}

/// `instr(haystack, needle)`: the 1-based position of the first
/// occurrence, in characters for text and bytes for two blobs; 0 if none.
unsafe extern "C" fn instr(
    ctx: *mut ffi::sqlite3_context,
    _: c_int,
    argv: *mut *mut ffi::sqlite3_value,
) {
    call(ctx, argv, c"instr", |args| {
        if args.is_null(0) || args.is_null(1) {
            return Ok(Outcome::Null);
        }
        // SQLite compares bytes of two blobs, and text otherwise, reading
        // a blob beside text as text through a copy so that the argument
        // itself keeps its type.
        let (blobs, text_copies);
        let (haystack, needle, is_text) = if args.is_blob(0) && args.is_blob(1) {
            blobs = (args.blob(0), args.blob(1));
            (blobs.0, blobs.1, false)
        } else if !args.is_blob(0) && !args.is_blob(1) {
            match (args.text(0), args.text(1)) {
                (Some(h), Some(n)) => (h, n, true),
                _ => return Ok(Outcome::NoMemory),
            }
        } else {
            text_copies = (Copy::of(args.value(0)), Copy::of(args.value(1)));
            match (text_copies.0.text(), text_copies.1.text()) {
                (Some(h), Some(n)) => (h, n, true),
                _ => return Ok(Outcome::NoMemory),
            }
        };
        let Some(&first) = needle.first() else {
            return Ok(Outcome::Int(1));
        };
        // SQLite tries only the offsets where a character starts (and the
        // first), so a needle that starts inside a character can match
        // only at the very start.
        let found = if is_text && continues(first) {
            haystack.starts_with(needle).then_some(0)
        } else {
            memmem::find(haystack, needle)
        };
        Ok(Outcome::Int(match found {
            None => 0,
            Some(at) if is_text => {
                1 + haystack[1..=at].iter().filter(|b| !continues(**b)).count() as i64
            }
            Some(at) => 1 + at as i64,
        }))
    })
}

/// A copy of an argument, converted without touching the original.
struct Copy(*mut ffi::sqlite3_value);

impl Copy {
    fn of(value: *mut ffi::sqlite3_value) -> Copy {
        // SAFETY: `value` is a valid argument; a null copy (out of
        // memory) reads as no text.
        Copy(unsafe { ffi::sqlite3_value_dup(value) })
    }

    fn text(&self) -> Option<&[u8]> {
        if self.0.is_null() {
            return None;
        }
        // SAFETY: a valid, unprotected copy this struct owns.
        unsafe { text_of(self.0) }
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        // SAFETY: the copy was made by sqlite3_value_dup (null is a no-op).
        unsafe { ffi::sqlite3_value_free(self.0) }
    }
}

/// `replace(text, pattern, replacement)`: every non-overlapping occurrence
/// of `pattern`, left to right, replaced.
unsafe extern "C" fn replace(
    ctx: *mut ffi::sqlite3_context,
    _: c_int,
    argv: *mut *mut ffi::sqlite3_value,
) {
    call(ctx, argv, c"replace", |args| {
        let Some(text) = args.text(0) else {
            return Ok(Outcome::Null);
        };
        let Some(pattern) = args.text(1) else {
            return Ok(Outcome::Null);
        };
        // SQLite tests for an empty pattern as a C string.
        if pattern.first().is_none_or(|b| *b == 0) {
            return Ok(Outcome::Text(text.as_ptr(), text.len()));
        }
        let Some(replacement) = args.text(2) else {
            return Ok(Outcome::Null);
        };
        let finder = memmem::Finder::new(pattern);
        let count = finder.find_iter(text).count();
        let len = text.len() - count * pattern.len() + count * replacement.len();
        if len > args.limit(ffi::SQLITE_LIMIT_LENGTH) {
            return Ok(Outcome::TooBig);
        }
        // SAFETY: a fresh allocation of len + 1 bytes (never zero), handed
        // to SQLite, which frees it, once filled.
        let out = unsafe { ffi::sqlite3_malloc64(len as u64 + 1) }.cast::<u8>();
        if out.is_null() {
            return Ok(Outcome::NoMemory);
        }
        // The allocation is uninitialised, so it is written through its
        // pointer; the pieces add up to `len` by the count above.
        let mut to = 0;
        let mut put = |piece: &[u8]| {
            assert!(to + piece.len() <= len);
            // SAFETY: in bounds (just checked), and `piece` is another
            // allocation's.
            unsafe { std::ptr::copy_nonoverlapping(piece.as_ptr(), out.add(to), piece.len()) };
            to += piece.len();
        };
        let mut from = 0;
        for at in finder.find_iter(text) {
            put(&text[from..at]);
            put(replacement);
            from = at + pattern.len();
        }
        put(&text[from..]);
        Ok(Outcome::Owned(out, len))
    })
}

/// Which ends `trim`, `ltrim` and `rtrim` take characters from.
struct Trim {
    left: bool,
    right: bool,
}

static TRIM_LEFT: Trim = Trim {
    left: true,
    right: false,
};
static TRIM_RIGHT: Trim = Trim {
    left: false,
    right: true,
};
static TRIM_BOTH: Trim = Trim {
    left: true,
    right: true,
};

/// `trim(text, set)` and its one-sided forms: removes, from the ends, the
/// characters of `set`. As in SQLite, the set's characters are split as
/// SQLite steps over UTF-8, compared as bytes, and where two of them match
/// the one that comes first in the set wins.
unsafe extern "C" fn trim(
    ctx: *mut ffi::sqlite3_context,
    _: c_int,
    argv: *mut *mut ffi::sqlite3_value,
) {
    call(ctx, argv, c"trim", |args| {
        let ends: &Trim = args.user_data();
        if args.is_null(0) {
            return Ok(Outcome::Null);
        }
        let Some(text) = args.text(0) else {
            return Ok(Outcome::Null);
        };
        let Some(set) = args.text(1) else {
            return Ok(Outcome::Null);
        };
        // SQLite reads the set as a C string.
        let set = &set[..memchr::memchr(0, set).unwrap_or(set.len())];
        let mut members: HashMap<&[u8], usize> = HashMap::new();
        let (mut at, mut order) = (0, 0);
        while at < set.len() {
            let start = at;
            skip_char(set, &mut at);
            members.entry(&set[start..at]).or_insert(order);
            order += 1;
        }
        let mut lengths: Vec<usize> = members.keys().map(|m| m.len()).collect();
        lengths.sort_unstable();
        lengths.dedup();
        let mut budget = args.budget();
        // The member of the set that `text` starts (or ends) with, first in
        // the set's order, as the length to remove.
        let mut matching = |text: &[u8], at_start: bool| -> Result<Option<usize>, Interrupted> {
            let mut best: Option<(usize, usize)> = None;
            for &len in lengths.iter().take_while(|len| **len <= text.len()) {
                budget.spend(len)?;
                let end = if at_start {
                    &text[..len]
                } else {
                    &text[text.len() - len..]
                };
                if let Some(&order) = members.get(end) {
                    if best.is_none_or(|(o, _)| order < o) {
                        best = Some((order, len));
                    }
                }
            }
            Ok(best.map(|(_, len)| len))
        };
        let (mut start, mut end) = (0, text.len());
        if ends.left {
            while let Some(len) = matching(&text[start..end], true)? {
                start += len;
            }
        }
        if ends.right {
            while let Some(len) = matching(&text[start..end], false)? {
                end -= len;
            }
        }
        Ok(Outcome::Text(text[start..].as_ptr(), end - start))
    })
}

/// Steps over one character as SQLite's `SQLITE_SKIP_UTF8` does: a lead
/// byte and the continuation bytes after it, or any other byte alone.
fn skip_char(s: &[u8], at: &mut usize) {
    let lead = s[*at];
    *at += 1;
    if lead >= 0xC0 {
        while s.get(*at).is_some_and(|b| continues(*b)) {
            *at += 1;
        }
    }
}

/// The value of a lead byte's own bits (SQLite's `sqlite3Utf8Trans1`).
fn lead_bits(lead: u8) -> u32 {
    u32::from(match lead {
        0xC0..=0xDF => lead - 0xC0,
        0xE0..=0xEF => lead - 0xE0,
        0xF0..=0xF7 => lead - 0xF0,
        0xF8..=0xFB => lead - 0xF8,
        0xFC..=0xFD => lead - 0xFC,
        _ => 0,
    })
}

/// Reads one character as SQLite's `sqlite3Utf8Read` does, malformed
/// input included; 0 at the end.
fn read_char(s: &[u8], at: &mut usize) -> u32 {
    let Some(&lead) = s.get(*at) else {
        return 0;
    };
    *at += 1;
    if lead < 0xC0 {
        return u32::from(lead);
    }
    let mut c = lead_bits(lead);
    while let Some(&b) = s.get(*at).filter(|b| continues(**b)) {
        c = (c << 6) + u32::from(b & 0x3F);
        *at += 1;
    }
    if c < 0x80 || (c & 0xFFFF_F800) == 0xD800 || (c & 0xFFFF_FFFE) == 0xFFFE {
        0xFFFD
    } else {
        c
    }
}

/// The wildcards of `LIKE` or `GLOB` (SQLite's `compareInfo`).
#[derive(Clone, Copy)]
struct Rules {
    /// `%` or `*`; 0 when the ESCAPE character is `%`.
    any: u32,
    /// `_` or `?`; 0 when the ESCAPE character is `_`.
    one: u32,
    /// GLOB's `[`, which opens a set of characters; 0 for LIKE.
    set: u32,
    /// LIKE folds ASCII letters.
    fold: bool,
}

static LIKE: Rules = Rules {
    any: '%' as u32,
    one: '_' as u32,
    set: 0,
    fold: true,
};
static GLOB: Rules = Rules {
    any: '*' as u32,
    one: '?' as u32,
    set: '[' as u32,
    fold: false,
};

/// `like(pattern, text[, escape])` and `glob(pattern, text)`, which
/// `text LIKE pattern [ESCAPE e]` and `text GLOB pattern` call.
unsafe extern "C" fn like(
    ctx: *mut ffi::sqlite3_context,
    argc: c_int,
    argv: *mut *mut ffi::sqlite3_value,
) {
    call(ctx, argv, c"like", |args| {
        let mut rules: Rules = *args.user_data::<Rules>();
        // SAFETY: a valid argument.
        let pattern_bytes = unsafe { ffi::sqlite3_value_bytes(args.value(0)) } as usize;
        if pattern_bytes > args.limit(ffi::SQLITE_LIMIT_LIKE_PATTERN_LENGTH) {
            return Ok(Outcome::Error(c"LIKE or GLOB pattern too complex"));
        }
        // LIKE's escape, or GLOB's `[`: what SQLite calls matchOther.
        let escape = if argc == 3 {
            let Some(e) = args.text(2) else {
                return Ok(Outcome::Null);
            };
            let e = &e[..memchr::memchr(0, e).unwrap_or(e.len())];
            let mut at = 0;
            let escape = read_char(e, &mut at);
            if e.is_empty() || at < e.len() {
                return Ok(Outcome::Error(
                    c"ESCAPE expression must be a single character",
                ));
            }
            if escape == rules.any {
                rules.any = 0;
            }
            if escape == rules.one {
                rules.one = 0;
            }
            escape
        } else {
            rules.set
        };
        let (Some(pattern), Some(text)) = (args.text(0), args.text(1)) else {
            return Ok(Outcome::Null);
        };
        // Both are read as C strings.
        let pattern = &pattern[..memchr::memchr(0, pattern).unwrap_or(pattern.len())];
        let text = &text[..memchr::memchr(0, text).unwrap_or(text.len())];
        let matched = pattern_matches(pattern, text, &rules, escape, &mut args.budget())?;
        Ok(Outcome::Int(matched.into()))
    })
}

/// Where a wildcard lets the match resume after a mismatch.
enum Resume {
    /// After the next occurrence of this ASCII byte (or its other case).
    Byte([u8; 2]),
    /// After the next occurrence of this character.
    Char(u32),
    /// At the next character, whatever it is (GLOB's `*[...]`).
    Any,
}

/// The last wildcard seen: SQLite's `patternCompare` recurses at each one,
/// and a failure past a later wildcard fails the whole match
/// (`SQLITE_NOWILDCARDMATCH`), so only the last one is ever resumed.
struct Wildcard {
    /// Where the pattern resumes.
    pattern: usize,
    resume: Resume,
    /// Where the search for the next place to resume starts in the text.
    from: usize,
}

impl Wildcard {
    /// Moves to the next place in `text` the match can resume from.
    fn next(&mut self, text: &[u8], budget: &mut Budget) -> Result<Option<usize>, Interrupted> {
        match self.resume {
            Resume::Byte([a, b]) => {
                while self.from < text.len() {
                    let end = text.len().min(self.from + WORK_BETWEEN_CHECKS);
                    let found = memchr::memchr2(a, b, &text[self.from..end]);
                    budget.spend(found.map_or(end - self.from, |at| at + 1))?;
                    if let Some(at) = found {
                        self.from += at + 1;
                        return Ok(Some(self.from));
                    }
                    self.from = end;
                }
                Ok(None)
            }
            Resume::Char(c) => loop {
                match budget.read(text, &mut self.from)? {
                    0 => return Ok(None),
                    found if found == c => return Ok(Some(self.from)),
                    _ => {}
                }
            },
            Resume::Any => {
                if self.from >= text.len() {
                    return Ok(None);
                }
                let at = self.from;
                skip_char(text, &mut self.from);
                budget.spend(self.from - at)?;
                Ok(Some(at))
            }
        }
    }
}

fn to_lower(c: u32) -> u32 {
    if (u32::from(b'A')..=u32::from(b'Z')).contains(&c) {
        c + 32
    } else {
        c
    }
}

/// SQLite's `patternCompare`, with its recursion turned into a loop that
/// resumes at the last wildcard, and an eye on the interrupt flag.
fn pattern_matches(
    pattern: &[u8],
    text: &[u8],
    rules: &Rules,
    escape: u32,
    budget: &mut Budget,
) -> Result<bool, Interrupted> {
    let (mut p, mut t) = (0, 0);
    let mut wildcard: Option<Wildcard> = None;
    // One past the last escaped character of the pattern (`zEscaped`).
    let mut escaped = usize::MAX;
    loop {
        let mismatch = 'step: {
            let c = budget.read(pattern, &mut p)?;
            if c == 0 {
                if t == text.len() {
                    return Ok(true);
                }
                break 'step true;
            }
            if c == rules.any {
                let mut c;
                loop {
                    c = budget.read(pattern, &mut p)?;
                    if c == rules.any {
                        continue;
                    }
                    if c == rules.one && rules.one != 0 {
                        if budget.read(text, &mut t)? == 0 {
                            return Ok(false);
                        }
                        continue;
                    }
                    break;
                }
                if c == 0 {
                    return Ok(true);
                }
                let resume = if c == escape && rules.set != 0 {
                    // `*[...]`: resume at every character, from the `[`.
                    p -= 1;
                    Resume::Any
                } else {
                    let c = if c == escape {
                        match budget.read(pattern, &mut p)? {
                            0 => return Ok(false),
                            c => c,
                        }
                    } else {
                        c
                    };
                    match u8::try_from(c) {
                        Ok(byte) if byte < 0x80 && rules.fold => {
                            Resume::Byte([byte.to_ascii_uppercase(), byte.to_ascii_lowercase()])
                        }
                        Ok(byte) if byte < 0x80 => Resume::Byte([byte, byte]),
                        _ => Resume::Char(c),
                    }
                };
                wildcard = Some(Wildcard {
                    pattern: p,
                    resume,
                    from: t,
                });
                break 'step true;
            }
            let mut c = c;
            if c == escape {
                if rules.set == 0 {
                    c = budget.read(pattern, &mut p)?;
                    if c == 0 {
                        break 'step true;
                    }
                    escaped = p;
                } else {
                    break 'step !matches_set(pattern, &mut p, text, &mut t, budget)?;
                }
            }
            let c2 = budget.read(text, &mut t)?;
            if c == c2 {
                break 'step false;
            }
            if rules.fold && c < 0x80 && c2 < 0x80 && to_lower(c) == to_lower(c2) {
                break 'step false;
            }
            !(c == rules.one && p != escaped && c2 != 0)
        };
        if mismatch {
            let Some(w) = wildcard.as_mut() else {
                return Ok(false);
            };
            let Some(resume_at) = w.next(text, budget)? else {
                return Ok(false);
            };
            t = resume_at;
            p = w.pattern;
            escaped = usize::MAX;
        }
    }
}

/// GLOB's `[...]` (or `[^...]`) at `p`, just past the `[`, against the
/// next character of `text`.
fn matches_set(
    pattern: &[u8],
    p: &mut usize,
    text: &[u8],
    t: &mut usize,
    budget: &mut Budget,
) -> Result<bool, Interrupted> {
    let c = budget.read(text, t)?;
    if c == 0 {
        return Ok(false);
    }
    let (mut seen, mut invert) = (false, false);
    let mut c2 = budget.read(pattern, p)?;
    if c2 == u32::from(b'^') {
        invert = true;
        c2 = budget.read(pattern, p)?;
    }
    if c2 == u32::from(b']') {
        seen = c == u32::from(b']');
        c2 = budget.read(pattern, p)?;
    }
    let mut prior = 0;
    while c2 != 0 && c2 != u32::from(b']') {
        let next = pattern.get(*p).copied();
        if c2 == u32::from(b'-') && next.is_some_and(|b| b != b']') && prior > 0 {
            c2 = budget.read(pattern, p)?;
            if c >= prior && c <= c2 {
                seen = true;
            }
            prior = 0;
        } else {
            if c == c2 {
                seen = true;
            }
            prior = c2;
        }
        c2 = budget.read(pattern, p)?;
    }
    Ok(c2 != 0 && seen != invert)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::types::Value;

    /// A connection with SQLite's built-ins and one with the replacements.
    fn pair() -> (Connection, Connection) {
        super::super::sandbox::prepare_sqlite();
        let builtin = Connection::open_in_memory().unwrap();
        let replaced = Connection::open_in_memory().unwrap();
        install(&replaced).unwrap();
        (builtin, replaced)
    }

    /// The result's type and bytes (text may be malformed UTF-8), or the error.
    fn eval(conn: &Connection, sql: &str, args: &[Value]) -> Result<String, String> {
        let mut statement = conn.prepare_cached(sql).map_err(|e| e.to_string())?;
        statement
            .query_row(rusqlite::params_from_iter(args), |row| {
                Ok(format!("{:?}", row.get_ref(0)?))
            })
            .map_err(|e| e.to_string())
    }

    /// A small, seeded generator, so that a failure repeats.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Up to `max` pieces of [`PIECES`] as a value of any type: text
        /// where the bytes are UTF-8, a blob otherwise (which the SQL may
        /// cast to text, malformed UTF-8 and all), a number or NULL.
        fn value(&mut self, max: u64) -> Value {
            let len = self.next() % (max + 1);
            let bytes: Vec<u8> = (0..len)
                .flat_map(|_| PIECES[(self.next() % PIECES.len() as u64) as usize].to_vec())
                .collect();
            match self.next() % 10 {
                0 => Value::Null,
                1 => Value::Real(f64::from((self.next() % 2000) as u32) / 7.0),
                2 => Value::Integer((self.next() % 200) as i64 - 100),
                3 | 4 => Value::Blob(bytes),
                _ => String::from_utf8(bytes)
                    .map_or_else(|e| Value::Blob(e.into_bytes()), Value::Text),
            }
        }
    }

    /// Pieces that exercise the wildcards, case folding, multi-byte and
    /// malformed UTF-8, and NUL.
    const PIECES: &[&[u8]] = &[
        b"a",
        b"A",
        b"b",
        b"%",
        b"_",
        b"*",
        b"?",
        b"[",
        b"]",
        b"^",
        b"-",
        b"\\",
        b"x",
        "\u{e9}".as_bytes(),
        "\u{c9}".as_bytes(),
        "\u{20ac}".as_bytes(),
        b"\xC3",
        b"\xA9",
        b"\0",
        b"1",
        b".",
    ];

    /// Evaluates `sql`, whose arguments are written `{1}`, `{2}`, ... on
    /// both connections for many random arguments, each passed as it is
    /// or cast to text: the replacements must answer as SQLite does,
    /// errors included.
    fn agrees(sql: &str, arity: usize, max: u64) {
        let (builtin, replaced) = pair();
        let mut random = Random(0x9E37_79B9_7F4A_7C15 ^ sql.len() as u64);
        let mut outcomes = std::collections::HashSet::new();
        for _ in 0..20_000 {
            let args: Vec<Value> = (0..arity).map(|_| random.value(max)).collect();
            let mut statement = sql.to_owned();
            for i in 1..=arity {
                let arg = if random.next().is_multiple_of(2) {
                    format!("?{i}")
                } else {
                    format!("CAST(?{i} AS TEXT)")
                };
                statement = statement.replace(&format!("{{{i}}}"), &arg);
            }
            let expected = eval(&builtin, &statement, &args);
            let actual = eval(&replaced, &statement, &args);
            assert_eq!(actual, expected, "{statement} with {args:?}");
            outcomes.insert(expected);
        }
        // The inputs reach more than NULL and one answer.
        assert!(outcomes.len() >= 3, "{sql}: only {outcomes:?}");
    }

    /// A connection with the replacements and the sandbox's value limit.
    fn replaced() -> Connection {
        super::super::sandbox::prepare_sqlite();
        let conn = Connection::open_in_memory().unwrap();
        conn.set_limit(
            rusqlite::limits::Limit::SQLITE_LIMIT_LENGTH,
            super::super::sandbox::MAX_VALUE_BYTES,
        )
        .unwrap();
        install(&conn).unwrap();
        conn
    }

    /// Texts on which SQLite's own functions do work quadratic in their
    /// lengths: `x` of 4,000,000 `a`s and a `b`, `y` of 1,000,000 `a`s
    /// and a `b`, `set_` of 20,000 `c`s and an `a`, and `p` of 40,000
    /// `a`s (under the sandbox's limit on patterns).
    const LONG: &str = "WITH t(x, y, set_, p) AS (SELECT printf('%.*c', 4000000, 'a') || 'b', \
                        printf('%.*c', 1000000, 'a') || 'b', printf('%.*c', 20000, 'c') || 'a', \
                        printf('%.*c', 40000, 'a')) ";

    #[test]
    fn searches_on_megabytes_take_linear_time() {
        let conn = replaced();
        let one = |expr: &str| -> i64 {
            conn.query_row(&format!("{LONG} SELECT {expr} FROM t"), [], |row| {
                row.get(0)
            })
            .unwrap()
        };
        // Each of these ran for minutes with SQLite's own functions.
        assert_eq!(one("instr(x, y)"), 3_000_001);
        assert_eq!(one("length(replace(x, y, 'c'))"), 3_000_001);
        assert_eq!(one("length(trim(x, set_))"), 1);
        assert_eq!(one("length(ltrim(x, set_))"), 1);
        assert_eq!(one("length(rtrim(x || 'a', set_))"), 4_000_001);
    }

    #[test]
    fn a_pattern_match_on_megabytes_stops_at_an_interrupt() {
        let conn = replaced();
        // Each tries the 40,000-character rest of the pattern at each of
        // four million offsets: many minutes of work.
        // The last is one malformed character of 49,001 bytes after the
        // wildcard, read again at each offset: work between two looks at
        // the interrupt is counted in bytes, not characters.
        let malformed = "CAST(unhex('C3' || replace(hex(zeroblob(49000)), '00', '80')) AS TEXT)";
        let long_char = format!("x LIKE '%a' || {malformed}");
        for expr in [
            "x LIKE '%' || p || 'c%'",
            "x GLOB '*' || p || 'c*'",
            "x LIKE '%' || p || '_c'",
            long_char.as_str(),
        ] {
            let started = std::time::Instant::now();
            let stopper = std::thread::spawn({
                let interrupt = conn.get_interrupt_handle();
                move || {
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    interrupt.interrupt();
                }
            });
            let result: rusqlite::Result<i64> =
                conn.query_row(&format!("{LONG} SELECT {expr} FROM t"), [], |row| {
                    row.get(0)
                });
            stopper.join().unwrap();
            assert_eq!(
                result.unwrap_err().sqlite_error_code(),
                Some(rusqlite::ErrorCode::OperationInterrupted),
                "{expr}"
            );
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "{expr}"
            );
        }
    }

    #[test]
    fn like_answers_as_sqlites_own() {
        agrees("SELECT {2} LIKE {1}", 2, 8);
        agrees("SELECT like({1}, {2})", 2, 12);
    }

    #[test]
    fn like_with_an_escape_answers_as_sqlites_own() {
        agrees("SELECT {2} LIKE {1} ESCAPE {3}", 3, 6);
    }

    #[test]
    fn glob_answers_as_sqlites_own() {
        agrees("SELECT {2} GLOB {1}", 2, 10);
    }

    #[test]
    fn substr_answers_as_sqlites_own() {
        agrees(
            "SELECT substr({1}, length({2}) - 6, length({3}) - 6)",
            3,
            12,
        );
        agrees("SELECT substring({1}, {2})", 2, 12);
        agrees("SELECT substr({1}, {2} % 9, {3})", 3, 10);
        agrees("SELECT substr({1}, -length({2}))", 2, 10);
    }

    #[test]
    fn instr_answers_as_sqlites_own() {
        agrees("SELECT instr({1}, {2})", 2, 10);
    }

    #[test]
    fn replace_answers_as_sqlites_own() {
        agrees("SELECT replace({1}, {2}, {3})", 3, 8);
    }

    #[test]
    fn trim_answers_as_sqlites_own() {
        agrees("SELECT trim({1}, {2})", 2, 10);
        agrees("SELECT ltrim({1}, {2})", 2, 10);
        agrees("SELECT rtrim({1}, {2})", 2, 10);
    }
}
