//! Time per op (`LLAMATUNE_PROFILE`), for finding where a step's time goes.
//!
//! Three ways to time an op:
//! - `sync` (`LLAMATUNE_PROFILE=1`): the stream is synchronized before and after the op and the host
//!   clock read. Simple, but each op's time then includes its launch and its drain, which overstates
//!   small ops (session 15's split-k LoRA change was predicted from it and gained nothing).
//! - `events` (`LLAMATUNE_PROFILE=events`): a CUDA event is recorded on the stream before and after
//!   the op and nothing is synchronized until the report, so the ops run back to back as in a plain
//!   step and their times add up to the step's device time. Events are read once they have completed
//!   (queried, never waited for). An op whose work the host issues more slowly than the device runs
//!   it (a starved device) is timed at the host's pace: compare the profiled step's time with the
//!   plain one's; where they agree, the device was never waiting.
//! - `host` (`LLAMATUNE_PROFILE=host`): the host's own time in each op (issuing its launches, its
//!   allocations, and any wait for a download inside it), nothing recorded on the stream: where the
//!   host spends a step when the device waits for it.
//!
//! An op timed inside another (a nested span) is reported apart and not added to the total; its time
//! is also part of the enclosing op's.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Events pending before the profiler looks for completed ones to read.
const EVENT_BATCH: usize = 256;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum ProfileMode {
    Sync,
    Events,
    Host,
}

impl ProfileMode {
    /// The mode `LLAMATUNE_PROFILE` asks for: unset → none, `events` → events, `host` → host, anything
    /// else → sync.
    pub(super) fn from_env() -> Option<ProfileMode> {
        let v = std::env::var_os("LLAMATUNE_PROFILE")?;
        Some(match v.to_str() {
            Some("events") => ProfileMode::Events,
            Some("host") => ProfileMode::Host,
            _ => ProfileMode::Sync,
        })
    }
}

/// One op's totals: seconds, calls, and whether it ran inside another timed op.
#[derive(Default, Clone, Copy)]
struct Total {
    seconds: f64,
    calls: u64,
    nested: bool,
}

#[derive(Default)]
struct State {
    totals: HashMap<&'static str, Total>,
    /// Events mode: (op, nested, start, end) not read yet, in stream order.
    pending: std::collections::VecDeque<(&'static str, bool, CudaEvent, CudaEvent)>,
    /// Events already read, for reuse.
    free: Vec<CudaEvent>,
    /// Spans open now (a span opened while another is open is nested).
    depth: usize,
}

pub(super) struct Profiler {
    mode: ProfileMode,
    stream: Arc<CudaStream>,
    state: Mutex<State>,
}

/// An op being timed; its time is taken when it is dropped.
pub(super) struct Span<'a> {
    profiler: &'a Profiler,
    op: &'static str,
    nested: bool,
    start: Instant,
    event: Option<CudaEvent>,
}

impl Profiler {
    pub(super) fn new(mode: ProfileMode, stream: Arc<CudaStream>) -> Self {
        Profiler { mode, stream, state: Mutex::new(State::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("profile lock")
    }

    /// An event recorded on the stream now, reusing one already read where there is one.
    fn record(&self, st: &mut State) -> CudaEvent {
        let event = match st.free.pop() {
            Some(e) => e,
            None => ck!(self.stream.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)), "profile event"),
        };
        ck!(event.record(&self.stream), "profile event");
        event
    }

    /// Starts timing `op`.
    pub(super) fn span(&self, op: &'static str) -> Span<'_> {
        let mut st = self.lock();
        st.depth += 1;
        let nested = st.depth > 1;
        let event = match self.mode {
            ProfileMode::Sync => {
                ck!(self.stream.synchronize(), "synchronize");
                None
            }
            ProfileMode::Events => Some(self.record(&mut st)),
            ProfileMode::Host => None,
        };
        Span { profiler: self, op, nested, start: Instant::now(), event }
    }

    fn finish(&self, span: &mut Span<'_>) {
        let mut st = self.lock();
        st.depth -= 1;
        match span.event.take() {
            None => {
                if self.mode == ProfileMode::Sync {
                    ck!(self.stream.synchronize(), "synchronize");
                }
                let seconds = span.start.elapsed().as_secs_f64();
                add(&mut st, span.op, span.nested, seconds);
            }
            Some(start) => {
                let end = self.record(&mut st);
                st.pending.push_back((span.op, span.nested, start, end));
                if st.pending.len() >= EVENT_BATCH {
                    read_completed(&mut st);
                }
            }
        }
    }

    /// Reads every pending event pair into the totals (waits for the stream once).
    fn read_pending(&self, st: &mut State) {
        if !st.pending.is_empty() {
            ck!(self.stream.synchronize(), "synchronize");
            read_completed(st);
        }
    }

    /// Forgets what was timed so far (a new window, e.g. after warm-up steps).
    pub(super) fn reset(&self) {
        let mut st = self.lock();
        self.read_pending(&mut st);
        st.totals.clear();
    }

    /// (op, seconds, calls, nested), slowest first.
    pub(super) fn report(&self) -> Vec<(&'static str, f64, u64, bool)> {
        let mut st = self.lock();
        self.read_pending(&mut st);
        let mut v: Vec<_> = st.totals.iter().map(|(k, t)| (*k, t.seconds, t.calls, t.nested)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    /// The report as printed when the backend goes away.
    pub(super) fn print(&self) {
        let report = self.report();
        if report.is_empty() {
            return;
        }
        let total: f64 = report.iter().filter(|r| !r.3).map(|r| r.1).sum();
        let how = match self.mode {
            ProfileMode::Sync => "each op synchronized",
            ProfileMode::Events => "CUDA events, nothing synchronized",
            ProfileMode::Host => "the host's time in each op, nothing synchronized",
        };
        let what = if self.mode == ProfileMode::Host { "host time" } else { "device time" };
        eprintln!("{what} by op ({how}), total {total:.3} s (↳: inside another op, not added):");
        for (op, t, n, nested) in report {
            let mark = if nested { "↳ " } else { "" };
            eprintln!("  {:<26}{:>10.1} ms {:>6.1}% {n:>8} calls", format!("{mark}{op}"), t * 1e3, 100.0 * t / total);
        }
    }
}

/// Reads the pending event pairs whose end has completed, oldest first, without waiting: the stream
/// completes them in order, so the first one still running ends the read.
fn read_completed(st: &mut State) {
    while let Some((_, _, _, end)) = st.pending.front() {
        if !ck!(end.try_is_complete(), "profile event") {
            break;
        }
        let (op, nested, start, end) = st.pending.pop_front().expect("a pending pair");
        let ms = ck!(start.elapsed_ms(&end), "profile event");
        add(st, op, nested, ms as f64 * 1e-3);
        st.free.push(start);
        st.free.push(end);
    }
}

fn add(st: &mut State, op: &'static str, nested: bool, seconds: f64) {
    let t = st.totals.entry(op).or_default();
    t.seconds += seconds;
    t.calls += 1;
    t.nested |= nested;
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        let profiler = self.profiler;
        profiler.finish(self);
    }
}
