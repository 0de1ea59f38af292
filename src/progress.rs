//! Progress bars (indicatif), shown only when asked for and stderr is a terminal.
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

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
    } else {
        ProgressDrawTarget::hidden()
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
