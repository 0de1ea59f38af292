//! Progress bars (indicatif): drawn on stderr when asked for and stderr is a terminal;
//! otherwise, when log records of [`TARGET`] at info level are wanted (the Python package's
//! `smoe_opt.progress` logger, or `-v` without a terminal), the bar's line becomes a log
//! record at most every [`log_interval`].
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The log target of progress records (Python: the `smoe_opt.progress` logger).
pub const TARGET: &str = "smoe_opt::progress";

/// A byte-count progress bar, hidden unless `enabled` and stderr is a terminal.
pub fn bytes_bar(enabled: bool, total: u64, msg: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), draw_target(enabled));
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(msg);
    bar
}

/// A spinner for steps of unknown length, hidden unless `enabled` and stderr is a terminal.
pub fn spinner(enabled: bool, msg: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, draw_target(enabled));
    bar.set_message(msg);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn draw_target(enabled: bool) -> ProgressDrawTarget {
    if enabled && std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else if log::log_enabled!(target: TARGET, log::Level::Info) {
        ProgressDrawTarget::term_like_with_hz(Box::new(LogTerm::new()), 2)
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// How often a bar logs its line: `SMOE_PROGRESS_LOG_SECS` seconds (fractions allowed;
/// 0 logs every drawn frame), by default 5. The first record comes after one interval (at
/// most one second), so steps shorter than that log nothing.
pub fn log_interval() -> Duration {
    std::env::var("SMOE_PROGRESS_LOG_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs(5), Duration::from_secs_f64)
}

/// A "terminal" that turns each drawn frame of a bar into a log record, rate-limited.
#[derive(Debug)]
struct LogTerm {
    every: Duration,
    state: Mutex<LogState>,
}

#[derive(Debug)]
struct LogState {
    frame: String,
    last: Instant,
    first: bool,
}

impl LogTerm {
    fn new() -> Self {
        LogTerm {
            every: log_interval(),
            state: Mutex::new(LogState {
                frame: String::new(),
                last: Instant::now(),
                first: true,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TermLike for LogTerm {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        let mut st = self.state();
        if !st.frame.is_empty() && !s.trim().is_empty() {
            st.frame.push(' ');
        }
        st.frame.push_str(s.trim());
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let mut st = self.state();
        let frame = std::mem::take(&mut st.frame);
        let wait = if st.first {
            self.every.min(Duration::from_secs(1))
        } else {
            self.every
        };
        if !frame.is_empty() && st.last.elapsed() >= wait {
            log::info!(target: TARGET, "{frame}");
            st.last = Instant::now();
            st.first = false;
        }
        Ok(())
    }
}

/// A count progress bar (`what` per second shown), hidden unless `enabled` and stderr is a
/// terminal.
pub fn count_bar(enabled: bool, total: u64, what: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), draw_target(enabled));
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{msg}} [{{bar:30}}] {{pos}}/{{len}} {what} ({{per_sec}}) eta {{eta}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}
