//! Per-instance budgets of a Lua state: the memory limit (mlua's allocator refuses an
//! allocation beyond `#limits.memory`, so the allocating callback fails with "not enough
//! memory" instead of the process aborting), and the time a callback may run without
//! yielding (`#limits.time`): the callback is interrupted with an error that names the
//! script line, and the instance goes on serving.
//!
//! A *slice* is one stretch of Lua running for a callback: one poll of its coroutine, from a
//! resume to the next yield or return. `timed` marks the slice on this thread while it polls
//! a callback's future. Lua that runs outside a marked slice is never interrupted.
//!
//! # No hook in the common case
//!
//! A Lua count hook costs on every VM instruction while it is set (Lua 5.4 then routes each
//! instruction through `luaG_traceexec`: +128% instructions on a pure-Lua loop, +24% CPU on a
//! handler-like workload; docs/limits.md), so none is set while
//! callbacks behave. Instead:
//!
//! * each instance thread owns a `Slot`: a generation counter it bumps at the start and end
//!   of every slice (two plain stores, no clock read, odd while a slice runs);
//! * one watchdog thread per process looks at every slot each `limit / 10` (1–100 ms); a slot
//!   whose counter stayed odd and unchanged for the budget is an overrun: the watchdog records
//!   the generation and sends `SIGURG` to the owning thread (`pthread_kill`), again at every
//!   look while the overrun lasts;
//! * the signal handler runs on the owning thread, in the middle of whatever it was doing, and
//!   calls `lua_sethook(L, hook, LUA_MASKCOUNT, ARM_AFTER)` on the coroutine running the slice (a
//!   thread-local pointer). This is what Lua's own `lua.c` does on Ctrl-C: `lua_sethook`
//!   is written to be called from a signal handler (ldebug.c: "This function can be called
//!   during a signal, under 'reasonable' assumptions": it only stores the hook fields and sets
//!   the `volatile sig_atomic_t` trap of each Lua frame, which the interpreter re-reads at
//!   jumps and after calls, so even `while true do end` sees it). mlua's `set_hook` cannot be
//!   used: it must run on the owning thread at a point where mlua holds no state, and it
//!   allocates; calling `lua_sethook` from the watchdog thread itself would race with the
//!   owner walking and freeing its call frames. Signals reach the owner, so nothing races;
//! * the hook then runs on the owning thread `ARM_AFTER` instructions later and raises the
//!   interruption error with the current line (again every `HOOK_AGAIN` instructions while
//!   the slice lasts). A hook that fires when no overrun is recorded (the slice ended
//!   meanwhile) removes itself. The host's `pcall`/`xpcall` call [`pause`] when they catch an
//!   error: after an interruption it yields the callback (preemption), from a C function, the
//!   one place where mlua's coroutines may safely yield.
//!
//! Only the coroutine in the thread-local pointer gets the hook, so the pointer follows the
//! Lua thread that is running: the host's runners call [`enter`] first thing in a callback's
//! coroutine, and `coroutine.resume`/`coroutine.wrap` are wrapped (only while the budget is
//! on) to point at the coroutine they run and back when it yields or returns (under a
//! `lua_pcall`, so an error never leaves the pointer on a coroutine that may be collected).

use mlua::ffi;
use mlua::{Function, Lua};
use std::cell::{Cell, RefCell};
use std::ffi::{c_int, CStr};
use std::future::Future;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// The signal the watchdog sends; ignored by default, so a stray one harms nothing (Go's
/// runtime preempts goroutines with it for the same reason).
const SIGNAL: c_int = libc::SIGURG;

/// VM instructions a slice found past its budget may still run before the hook interrupts it:
/// a runaway loop runs them in microseconds, while a callback that overran inside a slow C
/// call (a panic's backtrace, a blocking library call) and is about to return is left alone,
/// as the old every-20,000-instructions hook did.
const ARM_AFTER: c_int = 1_000;

/// VM instructions between two interruptions of the same slice (a script that caught the
/// first and cannot be paused where it is, a message handler building its traceback).
const HOOK_AGAIN: c_int = 10_000;

/// One instance thread's slices, as the watchdog sees them.
struct Slot {
    /// Odd while a slice runs; only the owning thread writes it.
    gen: AtomicU64,
    /// The slice (its `gen`) the watchdog found past the budget; 0 for none.
    overrun: AtomicU64,
    /// The budget in ms; 0 for none.
    limit_ms: AtomicU64,
    /// The watchdog's own notes: the generation it saw last and when it first saw it
    /// (ms since the watchdog started).
    seen_gen: AtomicU64,
    seen_at: AtomicU64,
    thread: libc::pthread_t,
    /// False once the owning thread exits: no signal may be sent to it after that.
    alive: Mutex<bool>,
}

/// The owning thread's handle on its slot; dropped when the thread exits.
struct Owner(Arc<Slot>);

impl Drop for Owner {
    fn drop(&mut self) {
        SLOT.with(|s| s.set(ptr::null()));
        *self.0.alive.lock().unwrap_or_else(|e| e.into_inner()) = false;
    }
}

thread_local! {
    static OWNER: RefCell<Option<Owner>> = const { RefCell::new(None) };
    /// This thread's slot (kept alive by `OWNER`), for the hot path and the hook.
    static SLOT: Cell<*const Slot> = const { Cell::new(ptr::null()) };
    /// The Lua thread (coroutine) running the current slice; null outside slices. Read by
    /// the signal handler: a `const` thread-local of a plain pointer is a bare TLS access.
    static CURRENT: Cell<*mut ffi::lua_State> = const { Cell::new(ptr::null_mut()) };
    /// How many `timed` polls are nested on this thread (a script load inside a callback).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Whether the current slice was already interrupted with an error.
    static INTERRUPTED: Cell<bool> = const { Cell::new(false) };
    /// Whether `pause` preempted the current slice (yielded its coroutine).
    static PREEMPTED: Cell<bool> = const { Cell::new(false) };
}

/// The slots the watchdog looks at; starting it installs the signal handler.
fn watchdog() -> &'static Mutex<Vec<Weak<Slot>>> {
    static SLOTS: OnceLock<Mutex<Vec<Weak<Slot>>>> = OnceLock::new();
    SLOTS.get_or_init(|| {
        // SAFETY: a plain sigaction with a handler that only touches a const thread-local
        // and calls lua_sethook (see the module's documentation).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(c_int) as usize;
            sa.sa_flags = libc::SA_RESTART | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(SIGNAL, &sa, ptr::null_mut());
        }
        std::thread::Builder::new()
            .name("stage-watchdog".into())
            .spawn(watch)
            .expect("cannot start the time budget's watchdog thread");
        Mutex::new(Vec::new())
    })
}

fn watch() {
    let epoch = Instant::now();
    loop {
        let slots: Vec<Arc<Slot>> = {
            let mut all = watchdog().lock().unwrap_or_else(|e| e.into_inner());
            all.retain(|w| w.strong_count() > 0);
            all.iter().filter_map(Weak::upgrade).collect()
        };
        let now = epoch.elapsed().as_millis() as u64;
        let mut tick = 100;
        for s in &slots {
            let limit = s.limit_ms.load(Ordering::Relaxed);
            if limit > 0 {
                tick = tick.min((limit / 10).max(1));
            }
            let gen = s.gen.load(Ordering::Relaxed);
            if limit == 0 || gen % 2 == 0 {
                s.seen_gen.store(gen, Ordering::Relaxed);
                continue;
            }
            if s.seen_gen.load(Ordering::Relaxed) != gen {
                s.seen_gen.store(gen, Ordering::Relaxed);
                s.seen_at.store(now, Ordering::Relaxed);
            } else if now - s.seen_at.load(Ordering::Relaxed) >= limit {
                s.overrun.store(gen, Ordering::Release);
                let alive = s.alive.lock().unwrap_or_else(|e| e.into_inner());
                if *alive {
                    // SAFETY: the thread is alive: it clears `alive` under this lock before
                    // it exits.
                    unsafe { libc::pthread_kill(s.thread, SIGNAL) };
                }
            }
        }
        drop(slots);
        std::thread::sleep(Duration::from_millis(tick));
    }
}

extern "C" fn on_signal(_: c_int) {
    let l = CURRENT.with(|c| c.get());
    if !l.is_null() {
        // SAFETY: `l` is the coroutine of the slice running on this thread (alive for the
        // whole slice); lua_sethook is safe to call from a signal handler (module docs).
        unsafe { ffi::lua_sethook(l, Some(hook), ffi::LUA_MASKCOUNT, ARM_AFTER) };
    }
}

/// Whether the slice running on this thread is past its budget, and the budget.
fn overrun() -> Option<u64> {
    let slot = SLOT.with(|s| s.get());
    if slot.is_null() {
        return None;
    }
    // SAFETY: SLOT is cleared before the Owner holding the slot is dropped.
    let s = unsafe { &*slot };
    let gen = s.gen.load(Ordering::Relaxed);
    (gen % 2 == 1 && s.overrun.load(Ordering::Acquire) == gen).then(|| s.limit_ms.load(Ordering::Relaxed))
}

unsafe extern "C-unwind" fn hook(l: *mut ffi::lua_State, ar: *mut ffi::lua_Debug) {
    // SAFETY: Lua C API calls on the state Lua handed to this function.
    unsafe {
        let Some(limit) = overrun() else {
            // Armed for a slice that ended: nothing to do until the watchdog arms it again.
            ffi::lua_sethook(l, None, 0, 0);
            return;
        };
        // Never yield here: mlua truncates a coroutine's stack to the frame that yielded
        // (`lua_settop(co, 0)` after each resume), which for a hook is the Lua function's own
        // frame (its registers, open call results, to-be-closed variables). Raise instead,
        // and again every HOOK_AGAIN instructions while the slice lasts; the host's `pcall`
        // and `xpcall` pause a callback that catches the error (`pause`, a C function: a
        // safe place to yield).
        INTERRUPTED.with(|i| i.set(true));
        ffi::lua_sethook(l, Some(hook), ffi::LUA_MASKCOUNT, HOOK_AGAIN);
        {
            let place = if ffi::lua_getinfo(l, c"Sl".as_ptr(), ar) != 0 && (*ar).currentline > 0 {
                let file = CStr::from_ptr((*ar).short_src.as_ptr()).to_string_lossy();
                format!("{file}:{}: ", (*ar).currentline)
            } else {
                String::new()
            };
            let msg = format!(
                "{place}callback ran for more than {limit} ms without yielding (#limits.time); interrupted"
            );
            ffi::lua_pushlstring(l, msg.as_ptr().cast(), msg.len());
        }
        // Nothing with a destructor is alive here: lua_error unwinds with longjmp.
        ffi::lua_error(l);
    }
}

unsafe extern "C-unwind" fn pause_c(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: Lua C API calls on the state Lua handed to this function.
    unsafe {
        if INTERRUPTED.with(|i| i.get()) && overrun().is_some() && ffi::lua_isyieldable(l) != 0 {
            PREEMPTED.with(|p| p.set(true));
            return ffi::lua_yield(l, 0);
        }
        0
    }
}

/// `pause()`, which the host's `pcall` and `xpcall` call when they caught an error: when the
/// error was this slice's interruption, it yields the callback's coroutine (from a C
/// function, where yielding is safe), so a script that catches the interruption and computes
/// on is preempted: the instance serves its sockets, timers and messages, and the callback
/// resumes with a new budget. Otherwise it returns at once.
pub fn pause(lua: &Lua) -> mlua::Result<Function> {
    // SAFETY: pause_c only yields where Lua allows it (lua_isyieldable).
    unsafe { lua.create_c_function(pause_c) }
}

/// Sets the memory limit and the time budget of an instance's state, on the thread that
/// runs it. `memory` 0 leaves memory unlimited; `time` zero sets no time budget.
pub fn install(lua: &Lua, memory: usize, time: Duration) -> mlua::Result<()> {
    if memory > 0 {
        lua.set_memory_limit(memory)?;
    }
    let ms = time.as_millis().min(u64::MAX as u128) as u64;
    OWNER.with(|o| {
        let mut o = o.borrow_mut();
        match o.as_ref() {
            Some(owner) => owner.0.limit_ms.store(ms, Ordering::Relaxed),
            None if ms == 0 => {}
            None => {
                let slot = Arc::new(Slot {
                    gen: AtomicU64::new(0),
                    overrun: AtomicU64::new(0),
                    limit_ms: AtomicU64::new(ms),
                    seen_gen: AtomicU64::new(0),
                    seen_at: AtomicU64::new(0),
                    // SAFETY: pthread_self has no preconditions.
                    thread: unsafe { libc::pthread_self() },
                    alive: Mutex::new(true),
                });
                SLOT.with(|s| s.set(Arc::as_ptr(&slot)));
                watchdog()
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Arc::downgrade(&slot));
                *o = Some(Owner(slot));
            }
        }
    });
    if ms > 0 {
        wrap_coroutines(lua)?;
    }
    Ok(())
}

/// Lua's `coroutine.resume` and `coroutine.wrap` (the same C functions for every state).
static ORIGINAL: OnceLock<(ffi::lua_CFunction, ffi::lua_CFunction)> = OnceLock::new();

fn wrap_coroutines(lua: &Lua) -> mlua::Result<()> {
    const WRAPPED: &str = "stage.budget.coroutines";
    if lua.named_registry_value::<bool>(WRAPPED).unwrap_or(false) {
        return Ok(());
    }
    let co: mlua::Table = lua.globals().get("coroutine")?;
    let resume: Function = co.get("resume")?;
    let wrap: Function = co.get("wrap")?;
    let (Some(r), Some(w)) = (c_function(lua, &resume), c_function(lua, &wrap)) else {
        return Ok(()); // not Lua's own (replaced before the budget was set): left as they are
    };
    ORIGINAL.get_or_init(|| (r, w));
    lua.set_named_registry_value(WRAPPED, true)?;
    // SAFETY: the wrappers follow the Lua C API's rules (stack discipline, lua_error last).
    unsafe {
        co.set("resume", lua.create_c_function(co_resume)?)?;
        co.set("wrap", lua.create_c_function(co_wrap)?)?;
    }
    Ok(())
}

fn c_function(lua: &Lua, f: &Function) -> Option<ffi::lua_CFunction> {
    let mut c = None;
    // SAFETY: only reads the function that exec_raw pushed.
    unsafe { lua.exec_raw::<()>(f, |l| c = ffi::lua_tocfunction(l, -1)) }.ok()?;
    c
}

/// Calls the function at stack index 1 with the values above it, under `lua_pcall`, with
/// `CURRENT` pointing at `co` meanwhile. Returns the status; the results or the error are
/// left on the stack.
unsafe fn run_in(l: *mut ffi::lua_State, co: *mut ffi::lua_State, nargs: c_int) -> c_int {
    // SAFETY: Lua C API calls on the state Lua handed to this function.
    unsafe {
        let prev = CURRENT.with(|c| c.replace(co));
        let status = ffi::lua_pcall(l, nargs, ffi::LUA_MULTRET, 0);
        CURRENT.with(|c| c.set(prev));
        status
    }
}

unsafe extern "C-unwind" fn co_resume(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: Lua C API calls on the state Lua handed to this function.
    unsafe {
        let (resume, _) = *ORIGINAL.get().expect("set before the wrapper is installed");
        let co = ffi::lua_tothread(l, 1);
        if co.is_null() || CURRENT.with(|c| c.get()).is_null() {
            // Not a coroutine (Lua's error names `resume`), or outside a marked slice.
            return resume(l);
        }
        let n = ffi::lua_gettop(l);
        ffi::lua_pushcfunction(l, resume);
        ffi::lua_insert(l, 1);
        if run_in(l, co, n) != ffi::LUA_OK {
            ffi::lua_error(l);
        }
        ffi::lua_gettop(l)
    }
}

unsafe extern "C-unwind" fn co_wrap(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: Lua C API calls on the state Lua handed to this function.
    unsafe {
        let (_, wrap) = *ORIGINAL.get().expect("set before the wrapper is installed");
        wrap(l);
        // Lua's function calls its coroutine, its first upvalue.
        if ffi::lua_getupvalue(l, -1, 1).is_null() {
            return 1;
        }
        if ffi::lua_type(l, -1) != ffi::LUA_TTHREAD {
            ffi::lua_pop(l, 1);
            return 1;
        }
        ffi::lua_pushcclosure(l, co_wrapped, 2);
        1
    }
}

unsafe extern "C-unwind" fn co_wrapped(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: Lua C API calls on the state Lua handed to this function.
    unsafe {
        let co = ffi::lua_tothread(l, ffi::lua_upvalueindex(2));
        let n = ffi::lua_gettop(l);
        ffi::lua_pushvalue(l, ffi::lua_upvalueindex(1));
        ffi::lua_insert(l, 1);
        let status = if CURRENT.with(|c| c.get()).is_null() {
            ffi::lua_pcall(l, n, ffi::LUA_MULTRET, 0)
        } else {
            run_in(l, co, n)
        };
        if status != ffi::LUA_OK {
            // Lua's function prefixes a string error with its caller's position, which is this
            // wrapper (no position) here: add the script's.
            if status != ffi::LUA_ERRMEM && ffi::lua_type(l, -1) == ffi::LUA_TSTRING {
                ffi::luaL_where(l, 1);
                ffi::lua_insert(l, -2);
                ffi::lua_concat(l, 2);
            }
            ffi::lua_error(l);
        }
        ffi::lua_gettop(l)
    }
}

unsafe extern "C-unwind" fn enter_c(l: *mut ffi::lua_State) -> c_int {
    if DEPTH.with(|d| d.get()) > 0 {
        CURRENT.with(|c| c.set(l));
    }
    0
}

/// `enter()`, which the host's runners call first thing in a callback's coroutine: it tells
/// the time budget which Lua thread the slice runs (see the module's documentation).
pub fn enter(lua: &Lua) -> mlua::Result<Function> {
    // SAFETY: enter_c touches no Lua stack.
    unsafe { lua.create_c_function(enter_c) }
}

fn bump() {
    let slot = SLOT.with(|s| s.get());
    if !slot.is_null() {
        // SAFETY: SLOT is cleared before the Owner holding the slot is dropped.
        let g = unsafe { &(*slot).gen };
        g.store(g.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }
}

/// Polls `fut` (a callback's coroutine, started through a runner that calls [`enter`]) with
/// each poll marked as a slice. A slice already marked (a callback started from inside
/// another, such as a script load) keeps its start.
pub async fn timed<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    // After a preemption, the callback waits until the runtime has looked at its sockets
    // and timers (mlua wakes a yielded coroutine at once, which would starve them).
    let mut pause: Option<std::pin::Pin<Box<dyn Future<Output = ()>>>> = None;
    // The callback's coroutine, known once `enter` ran in it.
    let mut mine: *mut ffi::lua_State = ptr::null_mut();
    std::future::poll_fn(|cx| {
        if let Some(p) = pause.as_mut() {
            if p.as_mut().poll(cx).is_pending() {
                return std::task::Poll::Pending;
            }
            pause = None;
        }
        let depth = DEPTH.with(|d| d.replace(d.get() + 1));
        if depth == 0 {
            INTERRUPTED.with(|i| i.set(false));
            PREEMPTED.with(|p| p.set(false));
            bump();
        }
        let prev = CURRENT.with(|c| c.replace(mine));
        let r = fut.as_mut().poll(cx);
        let now = CURRENT.with(|c| c.replace(prev));
        if mine.is_null() && r.is_pending() {
            mine = now;
        }
        DEPTH.with(|d| d.set(depth));
        if depth == 0 {
            bump();
            if r.is_pending() && PREEMPTED.with(|p| p.replace(false)) {
                pause = Some(Box::pin(tokio::task::yield_now()));
            }
        }
        r
    })
    .await
}

/// Runs `f` as a marked slice (for synchronous calls into Lua). The budget applies when `f`
/// calls a function that calls [`enter`] (or when the slice runs on `lua`'s main thread,
/// which is what `Function::call` outside a coroutine uses).
pub fn timed_sync<R>(lua: &Lua, f: impl FnOnce() -> R) -> R {
    let depth = DEPTH.with(|d| d.replace(d.get() + 1));
    let main = if depth == 0 {
        INTERRUPTED.with(|i| i.set(false));
        bump();
        // SAFETY: reads the state's own pointer.
        unsafe { lua.exec_raw::<()>((), |l| CURRENT.with(|c| c.set(l))).ok() };
        true
    } else {
        false
    };
    let r = f();
    DEPTH.with(|d| d.set(depth));
    if main {
        CURRENT.with(|c| c.set(ptr::null_mut()));
        bump();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlua::Function;

    /// `src` as a callback the way the host's runners start one (calling `enter` first).
    fn callback(lua: &Lua, src: &str, name: &str) -> Function {
        let f = lua.load(src).set_name(name).into_function().unwrap();
        lua.load("local enter, f = ... return function(...) enter() return f(...) end")
            .call((enter(lua).unwrap(), f))
            .unwrap()
    }

    fn run<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_runaway_loop_is_interrupted_with_its_line_and_the_state_serves_on() {
        std::thread::spawn(|| {
            let lua = unsafe { Lua::unsafe_new() }; // with the debug library
            install(&lua, 0, Duration::from_millis(100)).unwrap();
            let f = callback(
                &lua,
                "local n = 0\nwhile true do\n n = n + 1\nend",
                "@package/loop.lua",
            );
            let t = Instant::now();
            let e = run(timed(f.call_async::<()>(()))).unwrap_err().to_string();
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            assert!(e.contains("package/loop.lua:"), "{e}");
            assert!(e.contains("more than 100 ms without yielding"), "{e}");
            // The same state runs the next callback.
            let ok = callback(&lua, "return 1 + 1", "=ok");
            assert_eq!(run(timed(ok.call_async::<i64>(()))).unwrap(), 2);
            // No hook is left on the state once the callback is done.
            let hooked = callback(&lua, "return debug.gethook() ~= nil", "=hooked");
            assert!(!run(timed(hooked.call_async::<bool>(()))).unwrap());
            // Unmarked Lua is not interrupted (the hook only looks at marked slices).
            let short: Function = lua
                .load("local n = 0 for i = 1, 3e6 do n = n + i end return n")
                .into_function()
                .unwrap();
            assert!(short.call::<i64>(()).is_ok());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_loop_that_catches_the_interruption_is_preempted_so_others_run() {
        std::thread::spawn(|| {
            let lua = unsafe { Lua::unsafe_new() }; // the host's states have the debug library
            install(&lua, 0, Duration::from_millis(50)).unwrap();
            // The host's pcall (callback.rs), which pauses a callback that caught an interruption.
            crate::host::callback::install_runner(&lua).unwrap();
            let f = callback(
                &lua,
                "local caught = 0 while caught < 5 do if not pcall(function() while true do end end) then caught = caught + 1 end end return caught",
                "=trap",
            );
            let ticks = std::rc::Rc::new(std::cell::Cell::new(0));
            let t2 = ticks.clone();
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            let local = tokio::task::LocalSet::new();
            let caught = local.block_on(&rt, async move {
                tokio::task::spawn_local(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        t2.set(t2.get() + 1);
                    }
                });
                timed(f.call_async::<i64>(())).await
            });
            assert_eq!(caught.unwrap(), 5);
            // 5 interruptions of 50 ms at least: the other task ran in between.
            assert!(ticks.get() >= 3, "{} ticks", ticks.get());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_caught_interruption_leaves_the_callbacks_locals_intact() {
        // The preemption yields from `pause` (a C function), never from the hook: a hook
        // yield would let mlua cut the Lua frame's registers (see `hook`).
        std::thread::spawn(|| {
            let lua = unsafe { Lua::unsafe_new() }; // the host's states have the debug library
            install(&lua, 0, Duration::from_millis(30)).unwrap();
            crate::host::callback::install_runner(&lua).unwrap();
            let f = callback(
                &lua,
                "local a, b, c = {1}, 'two', 3.5\n\
                 local closed = false\n\
                 do local x <close> = setmetatable({}, {__close = function() closed = true end})\n\
                   for i = 1, 3 do\n\
                     local ok, e = pcall(function() while true do end end)\n\
                     assert(not ok and e:find('interrupted'), tostring(e))\n\
                     assert(not closed, 'closed early')\n\
                     collectgarbage()\n\
                   end\n\
                 end\n\
                 return a[1] .. ' ' .. b .. ' ' .. c .. ' ' .. tostring(closed) .. ' ' .. select('#', pcall(error))",
                "=locals",
            );
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            let local = tokio::task::LocalSet::new();
            let r = local.block_on(&rt, timed(f.call_async::<String>(()))).unwrap();
            assert_eq!(r, "1 two 3.5 true 2");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_slice_is_one_poll_so_yielding_resets_the_clock() {
        std::thread::spawn(|| {
            let lua = unsafe { Lua::unsafe_new() }; // with the debug library
            install(&lua, 0, Duration::from_millis(150)).unwrap();
            let sleep = lua
                .create_async_function(|_, ms: u64| async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(())
                })
                .unwrap();
            lua.globals().set("sleep", sleep).unwrap();
            let t0 = Instant::now();
            let now = lua
                .create_function(move |_, ()| Ok(t0.elapsed().as_secs_f64()))
                .unwrap();
            lua.globals().set("now", now).unwrap();
            // Ten busy stretches of 30 ms (wall) with yields between: 300 ms in all, never
            // 150 at once.
            // No hook runs while callbacks stay within the budget.
            let f = callback(
                &lua,
                "for _ = 1, 10 do local t = now() while now() - t < 0.03 do end assert(debug.gethook() == nil) sleep(1) end return 'ok'",
                "=work",
            );
            assert_eq!(run(timed(f.call_async::<String>(()))).unwrap(), "ok");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_runaway_loop_in_a_scripts_own_coroutine_is_interrupted_too() {
        std::thread::spawn(|| {
            let lua = Lua::new();
            install(&lua, 0, Duration::from_millis(100)).unwrap();
            // coroutine.wrap: the error reaches the caller with both positions, as in Lua.
            let f = callback(
                &lua,
                "local g = coroutine.wrap(function()\n coroutine.yield(1)\n while true do end\nend)\nassert(g() == 1)\nreturn g()",
                "@package/wrap.lua",
            );
            let t = Instant::now();
            let e = run(timed(f.call_async::<()>(()))).unwrap_err().to_string();
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            assert!(e.contains("package/wrap.lua:6: package/wrap.lua:3: callback ran for more than 100 ms"), "{e}");
            // coroutine.resume: false and the message, and the caller goes on.
            let f = callback(
                &lua,
                "local co = coroutine.create(function() while true do end end)\nlocal ok, e = coroutine.resume(co)\nreturn tostring(ok) .. ' ' .. e .. ' ' .. coroutine.status(co)",
                "@package/resume.lua",
            );
            let r = run(timed(f.call_async::<String>(()))).unwrap();
            assert!(r.starts_with("false package/resume.lua:1: callback ran for more than"), "{r}");
            assert!(r.ends_with(" dead"), "{r}");
            // The wrappers keep Lua's behaviour otherwise: the same results and messages as
            // a state without the budget (Lua's own functions).
            let same = "local g = coroutine.wrap(function(a) local b = coroutine.yield(a + 1) return b * 2 end)\n\
                 local x = g(1) local y = g(5)\n\
                 local ok, e = pcall(function() return g() end)\n\
                 local ok2, e2 = pcall(function() return coroutine.wrap(function() error('boom') end)() end)\n\
                 local ok3, e3 = pcall(coroutine.resume, 42)\n\
                 local ok4, e4 = pcall(coroutine.wrap, 42)\n\
                 local co = coroutine.create(function(...) local n = select('#', ...) coroutine.yield(n) error({code = 7}) end)\n\
                 local _, n = coroutine.resume(co, 1, nil, 3)\n\
                 local ok5, e5 = coroutine.resume(co)\n\
                 local ok6, e6 = pcall(coroutine.wrap(function() error({code = 8}) end))\n\
                 return table.concat({x, y, tostring(ok), e, e2, e3, e4, n, tostring(ok5), e5.code, e6.code, coroutine.status(co)}, ' | ')";
            let r = run(timed(callback(&lua, same, "@package/same.lua").call_async::<String>(()))).unwrap();
            let plain = Lua::new();
            let expected = run(callback(&plain, same, "@package/same.lua").call_async::<String>(())).unwrap();
            assert_eq!(r, expected);
            assert!(r.starts_with("2 | 10 | false | package/same.lua:3: cannot resume dead coroutine | package/same.lua:4: package/same.lua:4: boom"), "{r}");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn memory_beyond_the_limit_is_an_error_and_the_state_recovers() {
        let lua = Lua::new();
        install(&lua, 32 << 20, Duration::ZERO).unwrap();
        let e = lua
            .load("local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1000) .. i end")
            .exec()
            .unwrap_err();
        assert!(e.to_string().contains("not enough memory"), "{e}");
        lua.gc_collect().unwrap();
        assert!(lua.used_memory() < 8 << 20, "{}", lua.used_memory());
        assert_eq!(
            lua.load("return #string.rep('y', 1000)").eval::<i64>().unwrap(),
            1000
        );
    }
}
