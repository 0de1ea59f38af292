//! The `smoe-opt` command line (flags and commands: `smoe_opt::cli`).
use smoe_opt::cli;
use std::process::ExitCode;

/// glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in its arenas,
/// one per thread: a layer-by-layer pass over a large model, which frees each layer's
/// matrices before the next, would keep every thread's high-water mark resident. Blocks of
/// 1 MiB and more are mapped and unmapped instead, so freed layers leave the process.
fn return_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn main() -> ExitCode {
    return_large_blocks();
    let cli = match cli::parse(std::env::args_os()) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // A signal skips destructors: remove the temporary output files, then exit as the shell
    // expects (128 + SIGINT).
    let _ = ctrlc::set_handler(|| {
        smoe_opt::fsutil::remove_pending();
        std::process::exit(130);
    });
    let level = if cli.quiet() {
        log::LevelFilter::Error
    } else {
        [
            log::LevelFilter::Warn,
            log::LevelFilter::Info,
            log::LevelFilter::Debug,
        ][usize::from(cli.verbose().min(2))]
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_target(false)
        .format_timestamp(None)
        .init();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::message(&e));
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
