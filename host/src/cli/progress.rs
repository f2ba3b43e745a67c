//! One self-overwriting status line on stderr for long operations; silent when stderr is not a
//! terminal, so scripts and pipes see only the results.

use std::fmt::Display;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Redraws at most this often.
const REDRAW: Duration = Duration::from_millis(100);

pub struct Progress {
    enabled: bool,
    drawn: Option<Instant>,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            enabled: std::io::stderr().is_terminal(),
            drawn: None,
        }
    }

    pub fn update(&mut self, status: impl Display) {
        if !self.enabled || self.drawn.is_some_and(|at| at.elapsed() < REDRAW) {
            return;
        }
        let mut stderr = std::io::stderr().lock();
        let _ = write!(stderr, "\r\x1b[2K{status}");
        let _ = stderr.flush();
        self.drawn = Some(Instant::now());
    }

    /// Clears the line.
    pub fn finish(&mut self) {
        if self.enabled && self.drawn.is_some() {
            eprint!("\r\x1b[2K");
            self.drawn = None;
        }
    }
}
