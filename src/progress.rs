//! A progress line for long work: a bar with ETA on a terminal, plain periodic lines otherwise
//! (logs stay readable when stderr is a file).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    total: usize,
    start: Instant,
    last_plain: Instant,
    tty: bool,
}

fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

impl Progress {
    pub fn new(label: &str, total: usize) -> Self {
        let now = Instant::now();
        Progress {
            label: label.into(),
            total: total.max(1),
            start: now,
            last_plain: now,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Reports `done` of `total`, with a short status text.
    pub fn update(&mut self, done: usize, status: &str) {
        let elapsed = self.start.elapsed();
        let frac = done as f64 / self.total as f64;
        let eta = if done > 0 { elapsed.mul_f64((1.0 - frac) / frac) } else { Duration::ZERO };
        if self.tty {
            const W: usize = 30;
            let filled = ((frac * W as f64) as usize).min(W);
            let bar: String = "#".repeat(filled) + &".".repeat(W - filled);
            eprint!(
                "\r{} [{bar}] {done}/{} {} ETA {} {status}\x1b[K",
                self.label,
                self.total,
                fmt_dur(elapsed),
                fmt_dur(eta)
            );
            let _ = std::io::stderr().flush();
        } else if done == self.total || self.last_plain.elapsed() >= Duration::from_secs(10) {
            self.last_plain = Instant::now();
            eprintln!(
                "{}: {done}/{} ({:.0}%) elapsed {} eta {} {status}",
                self.label,
                self.total,
                frac * 100.0,
                fmt_dur(elapsed),
                fmt_dur(eta)
            );
        }
    }

    /// Prints a line without breaking the bar.
    pub fn println(&self, line: &str) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
        eprintln!("{line}");
    }

    pub fn finish(&mut self) {
        if self.tty {
            eprintln!();
        }
    }
}
