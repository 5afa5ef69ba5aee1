//! Per-instance budgets of a Lua state: the memory limit (mlua's allocator refuses an
//! allocation beyond `#limits.memory`, so the allocating callback fails with "not enough
//! memory" instead of the process aborting), and the time a callback may run without
//! yielding (`#limits.time`): an instruction-count hook interrupts it with an error that
//! names the script line, and the instance goes on serving.
//!
//! A *slice* is one stretch of Lua running for a callback: one poll of its coroutine, from a
//! resume to the next yield or return. `timed` marks the slice on this thread while it polls
//! a callback's future; the hook, called every [`HOOK_EVERY`] VM instructions, compares the
//! slice's start with the clock. Lua that runs outside a marked slice (nothing the host
//! starts) is never interrupted. Each instance has its own thread and Lua state, so the mark
//! is a thread-local.

use mlua::{HookTriggers, Lua, VmState};
use std::cell::Cell;
use std::future::Future;
use std::time::{Duration, Instant};

/// VM instructions between two looks at the clock: a few tens of microseconds of Lua, so
/// the hook's cost stays far below 1% (docs/limits.md has the measurement).
pub const HOOK_EVERY: u32 = 20_000;

thread_local! {
    /// When the slice running on this thread started, if one is marked.
    static SLICE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// The time budget of the Lua state on this thread; zero means no limit.
    static LIMIT: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    /// Whether the current slice was already interrupted with an error.
    static INTERRUPTED: Cell<bool> = const { Cell::new(false) };
    /// Whether the hook preempted the current slice (yielded its coroutine).
    static PREEMPTED: Cell<bool> = const { Cell::new(false) };
}

/// Sets the memory limit and installs the time-budget hook on an instance's state.
/// `memory` 0 leaves memory unlimited; `time` zero installs no hook.
pub fn install(lua: &Lua, memory: usize, time: Duration) -> mlua::Result<()> {
    if memory > 0 {
        lua.set_memory_limit(memory)?;
    }
    LIMIT.with(|l| l.set(time));
    if time.is_zero() {
        return Ok(());
    }
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(HOOK_EVERY),
        move |_lua, debug| {
            let Some(start) = SLICE.with(|s| s.get()) else {
                return Ok(VmState::Continue);
            };
            let limit = LIMIT.with(|l| l.get());
            if limit.is_zero() || start.elapsed() < limit {
                return Ok(VmState::Continue);
            }
            if INTERRUPTED.with(|i| i.replace(true)) {
                // The script caught the interruption (pcall) and runs on: preempt it instead.
                // Yielding ends the slice; the instance serves its other work, and the
                // callback is resumed later with a new budget (and interrupted again).
                PREEMPTED.with(|p| p.set(true));
                return Ok(VmState::Yield);
            }
            let src = debug.source();
            let place = match (src.short_src.as_deref(), debug.current_line()) {
                (Some(file), Some(line)) => format!("{file}:{line}: "),
                _ => String::new(),
            };
            Err(mlua::Error::runtime(format!(
                "{place}callback ran for more than {} ms without yielding (#limits.time); interrupted",
                limit.as_millis()
            )))
        },
    )
}

/// Polls `fut` (a callback's coroutine) with each poll marked as a slice. A slice already
/// marked (a callback started from inside another, such as a script load) keeps its start.
pub async fn timed<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    // After a preemption, the callback waits until the runtime has looked at its sockets
    // and timers (mlua wakes a yielded coroutine at once, which would starve them).
    let mut pause: Option<std::pin::Pin<Box<dyn Future<Output = ()>>>> = None;
    std::future::poll_fn(|cx| {
        if let Some(p) = pause.as_mut() {
            if p.as_mut().poll(cx).is_pending() {
                return std::task::Poll::Pending;
            }
            pause = None;
        }
        let outer = SLICE.with(|s| s.get());
        if outer.is_none() {
            SLICE.with(|s| s.set(Some(Instant::now())));
            INTERRUPTED.with(|i| i.set(false));
            PREEMPTED.with(|p| p.set(false));
        }
        let r = fut.as_mut().poll(cx);
        SLICE.with(|s| s.set(outer));
        if outer.is_none() && r.is_pending() && PREEMPTED.with(|p| p.replace(false)) {
            pause = Some(Box::pin(tokio::task::yield_now()));
        }
        r
    })
    .await
}

/// Runs `f` as a marked slice (for synchronous calls into Lua).
pub fn timed_sync<R>(f: impl FnOnce() -> R) -> R {
    let outer = SLICE.with(|s| s.get());
    if outer.is_none() {
        SLICE.with(|s| s.set(Some(Instant::now())));
        INTERRUPTED.with(|i| i.set(false));
    }
    let r = f();
    SLICE.with(|s| s.set(outer));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlua::Function;

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
            let lua = Lua::new();
            install(&lua, 0, Duration::from_millis(100)).unwrap();
            let f: Function = lua
                .load("local n = 0\nwhile true do\n n = n + 1\nend")
                .set_name("@package/loop.lua")
                .into_function()
                .unwrap();
            let t = Instant::now();
            let e = run(timed(f.call_async::<()>(()))).unwrap_err().to_string();
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            assert!(e.contains("package/loop.lua:"), "{e}");
            assert!(e.contains("more than 100 ms without yielding"), "{e}");
            // The same state runs the next callback.
            let ok: Function = lua.load("return 1 + 1").into_function().unwrap();
            assert_eq!(run(timed(ok.call_async::<i64>(()))).unwrap(), 2);
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
            let lua = Lua::new();
            install(&lua, 0, Duration::from_millis(50)).unwrap();
            let f: Function = lua
                .load("local caught = 0 while caught < 5 do if not pcall(function() while true do end end) then caught = caught + 1 end end return caught")
                .into_function()
                .unwrap();
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
    fn a_slice_is_one_poll_so_yielding_resets_the_clock() {
        std::thread::spawn(|| {
            let lua = Lua::new();
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
            let f: Function = lua
                .load(
                    "for _ = 1, 10 do local t = now() while now() - t < 0.03 do end sleep(1) end return 'ok'",
                )
                .into_function()
                .unwrap();
            assert_eq!(run(timed(f.call_async::<String>(()))).unwrap(), "ok");
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
