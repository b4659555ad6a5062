//! The `idem` command line: run the proxy, or check a configuration file.

use clap::{Parser, Subcommand};
use idem::config::settings::Settings;
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc instead of glibc malloc: a proxied request makes a few dozen small allocations
/// (Pingora's per-request futures and headers), and glibc spent about a fifth of the
/// instructions of a request on them (BENCHMARKS.md, "Profiles").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The shipped, commented proxy.toml: what `--print-default-config` prints.
const DEFAULT_CONFIG: &str = include_str!("../proxy.toml");

/// A deduplicating reverse proxy: the backend does the work once, however often the client retries.
#[derive(Parser)]
#[command(name = "idem", version, about)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = "proxy.toml")]
    config: PathBuf,
    /// Print the shipped, commented proxy.toml (a starting point) and exit.
    #[arg(long, exclusive = true)]
    print_default_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration file and exit: 0 when valid (with a WARN line per value that works but should be written otherwise), 1 with file:line and the reason otherwise.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{DEFAULT_CONFIG}");
        return ExitCode::SUCCESS;
    }
    let settings = match Settings::load(&cli.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("idem: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => {
            // Valid but unwise (a password written in a URL): said, and still a valid file.
            for w in settings.warnings() {
                eprintln!("idem: WARN {w}");
            }
            let preflight = idem::server::preflight(&settings);
            for w in &preflight.warnings {
                eprintln!("idem: WARN {}: {w}", cli.config.display());
            }
            for e in &preflight.errors {
                eprintln!("idem: {}: {e}", cli.config.display());
            }
            if !preflight.errors.is_empty() {
                return ExitCode::from(1);
            }
            println!("{}: ok", cli.config.display());
            ExitCode::SUCCESS
        }
        Command::Run => {
            idem::server::init_logging(settings.log_format);
            for w in settings.warnings() {
                tracing::warn!("configuration: {w}");
            }
            match idem::server::run(settings, cli.config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("idem: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
